"""``par``: AReAM/AFA pixel-adaptive refinement of masks (DESIGN.md §3.6)."""

from __future__ import annotations

import math

import torch

from wsss_fast import _backend
from wsss_fast.ops import _checks, reference

OP = "par"


def par(
    image: torch.Tensor,
    masks: torch.Tensor,
    *,
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24),
    iters: int = 10,
    w_pos: float = 0.01,
) -> torch.Tensor:
    """Refine ``masks`` with colour- and position-aware affinities to 8 ring neighbours per dilation.

    Args:
        image: ``[B, 3, H, W]`` float, any range.
        masks: ``[B, C, h, w]``; resized to ``(H, W)`` bilinearly (``align_corners=True``) if needed.
        dilations: ring dilations; ``K = 8 * len(dilations)`` neighbours, replicate padding.
        iters: number of updates ``m_i <- sum_j aff_ij m_j``.
        w_pos: weight of the position term.

    Returns:
        ``[B, C, H, W]`` in ``masks.dtype``. The exact formula is in ``wsss_fast.ops.reference.par``.

    Only the ``reference`` backend exists so far; the fused backends arrive with their issue.
    """
    image, masks, dilations, iters = _checks.image_and_masks(OP, image, masks, dilations, iters)
    if isinstance(w_pos, bool) or not isinstance(w_pos, (int, float)) or not math.isfinite(w_pos):
        raise ValueError(f"wsss_fast.par: w_pos must be a finite number, got {w_pos!r}")
    _, impl = _backend.select(OP, _IMPLS, image.device)
    return impl(image, masks, dilations=dilations, iters=iters, w_pos=float(w_pos))


_IMPLS = {"reference": reference.par}
