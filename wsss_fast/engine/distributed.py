"""Process-group set-up for ``torchrun`` and the small collectives the loop needs.

A single process (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``) creates no process
group. Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) :func:`setup` initialises
NCCL for CUDA devices and gloo for CPU, and places the process on ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "all_reduce_mean", "resolve_device", "setup", "teardown"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False
    """True when :func:`setup` created the process group (and :func:`teardown` destroys it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available else CPU; a bare ``cuda`` -> ``cuda:<local_rank>``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(device: str = "auto") -> DistInfo:
    """Read the torchrun environment; initialise the process group when there are several ranks.

    An already initialised process group (a caller set it up) is used as is.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    created = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        created = True
    return DistInfo(rank, world_size, local_rank, dev, created)


def teardown(info: DistInfo) -> None:
    if info.initialised_here and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalar metrics over ranks (identity in a single process). Every rank must call it
    with the same keys in the same order."""
    if not info.distributed or not values:
        return dict(values)
    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    t /= info.world_size
    return dict(zip(keys, t.tolist()))
