"""Optimizers and per-iteration learning-rate schedules.

Schedules are :class:`torch.optim.lr_scheduler.LRScheduler` subclasses whose lr is a closed form
of the step count, so ``state_dict``/``load_state_dict`` resume them exactly. They are stepped
once per optimizer step. With ``w`` warm-up steps, ``T`` total steps, ``s`` the step, each group's
lr is ``base_lr * f(s)`` with

- warm-up (``s < w``): ``f = start + (1 - start) * s / w``;
- cosine: ``f = m + (1 - m) * (1 + cos(pi * p)) / 2``;
- poly: ``f = m + (1 - m) * (1 - p) ** power``;

where ``p = (s - w) / (T - w)`` clipped to [0, 1] and ``m = min_lr_ratio``; an optional
``lr_factor(s, T)`` (a pure function of the step, e.g. a method's phase rule) multiplies ``f``. With no warm-up and
``m = 0``, poly is the PSA/IRN ``PolyOptimizer`` rule ``lr0 * (1 - s / T) ** 0.9``.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupCosineLR", "WarmupPolyLR", "build_optimizer", "build_scheduler"]


class _WarmupLR(LRScheduler):
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        *,
        warmup_steps: int = 0,
        warmup_start: float = 0.0,
        min_lr_ratio: float = 0.0,
        lr_factor=None,
        last_epoch: int = -1,
    ):
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps}; expected >= 1")
        self.total_steps = int(total_steps)
        self.warmup_steps = max(0, int(warmup_steps))
        self.warmup_start = float(warmup_start)
        self.min_lr_ratio = float(min_lr_ratio)
        self.lr_factor = lr_factor
        super().__init__(optimizer, last_epoch)

    def _decay(self, progress: float) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict:
        # lr_factor is code, not state: it is given again when the scheduler is rebuilt.
        return {k: v for k, v in super().state_dict().items() if k != "lr_factor"}

    def load_state_dict(self, state_dict: dict) -> None:
        state = {k: v for k, v in state_dict.items() if k != "lr_factor"}
        super().load_state_dict(state)

    def factor(self, step: int) -> float:
        """The lr multiplier at optimizer step ``step`` (0-based)."""
        w = self.warmup_steps
        if step < w:
            f = self.warmup_start + (1.0 - self.warmup_start) * step / w
            return (
                f if self.lr_factor is None else f * float(self.lr_factor(step, self.total_steps))
            )
        progress = min(1.0, max(0.0, (step - w) / max(1, self.total_steps - w)))
        m = self.min_lr_ratio
        extra = 1.0 if self.lr_factor is None else float(self.lr_factor(step, self.total_steps))
        return (m + (1.0 - m) * self._decay(progress)) * extra

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]


class WarmupCosineLR(_WarmupLR):
    """Linear warm-up, then cosine decay to ``min_lr_ratio * base_lr`` at ``total_steps``."""

    def _decay(self, progress: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupPolyLR(_WarmupLR):
    """Linear warm-up, then ``(1 - progress) ** power`` decay (``power=0.9`` in PSA/IRN/GETAM)."""

    def __init__(self, optimizer, total_steps, *, power: float = 0.9, **kwargs):
        self.power = float(power)
        super().__init__(optimizer, total_steps, **kwargs)

    def _decay(self, progress: float) -> float:
        return (1.0 - progress) ** self.power


class _ConstantLR(_WarmupLR):
    def _decay(self, progress: float) -> float:
        return 1.0


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    """AdamW or SGD from an :class:`~wsss_fast.engine.config.OptimConfig`.

    ``params`` is an iterable of parameters or of parameter-group dicts (a group may set its own
    ``lr`` or ``weight_decay``). ``poly_quirk`` reproduces ``PolyOptimizer``'s
    ``SGD(params, lr, weight_decay)`` call, whose third positional argument is momentum.
    """
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
        )
    if cfg.poly_quirk:
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.weight_decay, weight_decay=0.0)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(
    cfg, optimizer, total_steps: int, steps_per_epoch: int, lr_factor=None
) -> LRScheduler:
    """The schedule of a :class:`~wsss_fast.engine.config.ScheduleConfig`; warm-up is
    ``warmup_steps + round(warmup_epochs * steps_per_epoch)`` steps; ``lr_factor(step,
    total_steps)``, when given, multiplies every group's lr (a method's phase rule)."""
    warmup = cfg.warmup_steps + round(cfg.warmup_epochs * steps_per_epoch)
    kwargs = dict(
        warmup_steps=warmup,
        warmup_start=cfg.warmup_start,
        min_lr_ratio=cfg.min_lr_ratio,
        lr_factor=lr_factor,
    )
    if cfg.name == "cosine":
        return WarmupCosineLR(optimizer, total_steps, **kwargs)
    if cfg.name == "poly":
        return WarmupPolyLR(optimizer, total_steps, power=cfg.power, **kwargs)
    return _ConstantLR(optimizer, total_steps, **kwargs)
