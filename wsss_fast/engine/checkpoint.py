"""Checkpoints: atomic writes, the newest-K rotation and RNG state capture.

A training checkpoint (written by :func:`wsss_fast.engine.train`) is a ``torch.save`` dict with
``model``, ``optimizer``, ``scheduler``, ``scaler`` (or None), ``step`` (optimizer steps done),
``epoch``, ``batch_in_epoch`` (micro-batches of that epoch already consumed), ``rng`` (see
:func:`rng_state`) and ``config`` (the config as a plain mapping). Files are named
``ckpt_<step>.pt`` in the run folder, so the newest is the one with the largest step.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from wsss_fast.data.io import atomic_write

__all__ = [
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / f"ckpt_{step:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``run_dir``, oldest first (temporary files of an interrupted write are not
    listed: they start with a dot)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """``torch.save(state)`` through a temporary file and a rename: a crash mid-write (or an
    exception from pickling) leaves either the old file or none, never a truncated one."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    # weights_only=False: the checkpoint holds numpy and Python RNG states, which the
    # weights-only unpickler rejects; only load checkpoints you wrote.
    return torch.load(path, map_location=map_location, weights_only=False)


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep <= 0`` keeps everything)."""
    if keep <= 0:
        return
    for path in list_checkpoints(run_dir)[:-keep]:
        path.unlink(missing_ok=True)


def rng_state() -> dict:
    """Python, numpy, torch CPU and (when initialised) CUDA generator states."""
    # The legacy global numpy state is what third-party augmentation code draws from.
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only when CUDA is available)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
