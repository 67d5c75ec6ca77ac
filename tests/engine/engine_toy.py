"""A toy method and data set for the engine tests: a 2-layer MLP classifying random vectors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wsss_fast.engine import load_config, register_section


@dataclass
class ToyConfig:
    hidden: int = 16
    dropout: float = 0.0
    linear: bool = False
    """A single nn.Linear(8, 1) trained with MSE (for exact accumulation/DDP comparisons)."""


register_section("toy", ToyConfig)


class ToyDataset(torch.utils.data.Dataset):
    """``n`` fixed random vectors ``[8]``; the class is the sign of a fixed projection, so it can
    be learnt. Records ``set_epoch`` calls like the real data sets."""

    def __init__(self, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        w = torch.randn(8, generator=g)
        self.y = (self.x @ w > 0).long()
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i], "name": f"s{i}"}


class ToyMethod:
    def build_model(self, cfg) -> nn.Module:
        if cfg.toy.linear:
            return nn.Linear(8, 1)
        return nn.Sequential(
            nn.Linear(8, cfg.toy.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.toy.dropout),
            nn.Linear(cfg.toy.hidden, 2),
        )

    def training_step(self, model, batch, info) -> dict:
        out = model(batch["image"])
        if out.shape[-1] == 1:
            loss = F.mse_loss(out[:, 0], batch["label"].float())
            return {"loss": loss}
        ce = F.cross_entropy(out, batch["label"])
        acc = (out.argmax(-1) == batch["label"]).float().mean()
        return {"loss": ce, "acc": acc}


def toy_config(out_dir, *overrides):
    """Defaults for fast CPU runs; ``overrides`` as on the command line."""
    base = [
        "method=toy",
        f"train.out_dir={out_dir}",
        "train.device=cpu",
        "train.progress=false",
        "train.tensorboard=false",
        "train.log_every=1",
        "data.batch_size=4",
    ]
    return load_config(None, [*base, *overrides])


class Killed(Exception):
    """Stands in for a process being killed after a given optimizer step."""


def kill_at(step: int):
    """A callback that "kills" the run right after optimizer step ``step``."""

    def callback(info, metrics):
        if info.step == step:
            raise Killed

    return callback


def ddp_worker(
    rank: int, world_size: int, port: int, out_dir: str, overrides: list, kill_step: int = 0
) -> None:
    """Entry point of one spawned rank: the torchrun environment, then the ordinary ``train``;
    saves the final weights and log history to ``out_dir/rank<r>.pt``."""
    import os

    from wsss_fast.engine import train

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    cfg = toy_config(out_dir, *overrides)
    callbacks = [kill_at(kill_step)] if kill_step else []
    result = train(cfg, ToyMethod(), ToyDataset(16), callbacks=callbacks)
    torch.save(
        {"state": result.model.state_dict(), "history": result.history},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
