"""Small pieces every method module uses: its config section, the loop's step info, DDP."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from wsss_fast._backend import BackendNotImplementedError, use_backend
from wsss_fast.data.io import IGNORE_INDEX

T = TypeVar("T")


def section_config(cfg: Any, cls: type[T], section: str, method: str, fallback: T | None) -> T:
    """The ``cls`` instance in ``cfg``: ``cfg`` itself, or an engine config's ``section``
    section, or ``fallback`` when ``cfg`` is None; a TypeError naming the fix otherwise."""
    if isinstance(cfg, cls):
        return cfg
    sections = getattr(cfg, "sections", None)
    if isinstance(sections, Mapping) and isinstance(sections.get(section), cls):
        return sections[section]
    if cfg is None and fallback is not None:
        return fallback
    raise TypeError(
        f"{method}: expected a {cls.__name__} or an engine Config with a '{section}' section, "
        f"got {type(cfg).__name__}; register it with register_section('{section}', "
        f"{cls.__name__})"
    )


def step_value(step_info: Any, name: str) -> int:
    """``step_info.name`` or ``step_info[name]`` (the loop's StepInfo, or a dict in tests)."""
    if isinstance(step_info, Mapping):
        return int(step_info[name])
    return int(getattr(step_info, name))


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper."""
    return getattr(model, "module", model)


def mask_outside_box(labels: torch.Tensor, crop_box: torch.Tensor | None) -> torch.Tensor:
    """``labels`` ``[B, H, W]`` with 255 outside each image's ``crop_box`` ``[y0, y1, x0, x1]``."""
    if crop_box is None:
        return labels
    H, W = labels.shape[-2:]
    box = crop_box.to(labels.device).long()
    ys = torch.arange(H, device=labels.device)[None, :, None]
    xs = torch.arange(W, device=labels.device)[None, None, :]
    inside = (
        (ys >= box[:, 0, None, None])
        & (ys < box[:, 1, None, None])
        & (xs >= box[:, 2, None, None])
        & (xs < box[:, 3, None, None])
    )
    return labels.masked_fill(~inside, IGNORE_INDEX)


def or_auto(op, *args, **kwargs):
    """``op(*args, **kwargs)``; where the chosen backend lacks ``op`` (Triton has no ``par``,
    ``pamr`` or ``getam_map`` kernel yet), the automatic choice for the device instead.

    For ops the methods run without gradient, where every backend computes the same numbers:
    the attention ops keep the chosen backend."""
    try:
        return op(*args, **kwargs)
    except BackendNotImplementedError:
        with use_backend("auto"):
            return op(*args, **kwargs)


def layer_from_config(value: float, depth: int, lowest: int, what: str) -> int:
    """A layer index from a config value: an integer ``>= lowest`` is the layer itself, a value in
    ``(0, 1)`` a fraction of ``depth``, rounded (for shallow test models). ``what`` (e.g.
    ``"AReAM: layer_index"``) names the setting in errors. The result lies in
    ``lowest..depth - 1``."""
    if 0 < value < 1:
        layer = round(value * depth)
    elif value >= lowest and float(value).is_integer():
        layer = int(value)
    else:
        raise ValueError(f"{what}={value}; expected an integer >= {lowest} or a fraction in (0, 1)")
    if not lowest <= layer <= depth - 1:
        raise ValueError(
            f"{what}={value} gives layer {layer} for depth {depth}; expected "
            f"{lowest} <= layer <= {depth - 1}"
        )
    return layer


def decay_groups(model: nn.Module) -> list[dict]:
    """timm's ``create_optimizer`` grouping: no weight decay on 1-d parameters (norms, biases)
    nor on the names ``model.no_weight_decay()`` lists (tokens, position embeddings)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
