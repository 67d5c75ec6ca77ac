"""``pamr``: GETAM's pixel-adaptive mask refinement (DESIGN.md §3.6)."""

from __future__ import annotations

import torch

from wsss_fast import _backend
from wsss_fast.ops import _checks, reference

OP = "pamr"


def pamr(
    image: torch.Tensor,
    masks: torch.Tensor,
    *,
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24),
    iters: int = 10,
) -> torch.Tensor:
    """Refine ``masks`` with colour affinities to 8 ring neighbours per dilation (no position term).

    Args:
        image: ``[B, 3, H, W]`` float (GETAM feeds the 0-255 crop).
        masks: ``[B, C, h, w]``; resized to ``(H, W)`` bilinearly (``align_corners=True``) if needed.
        dilations: ring dilations; ``K = 8 * len(dilations)`` neighbours, replicate padding.
        iters: number of updates ``m_i <- sum_j aff_ij m_j``.

    Returns:
        ``[B, C, H, W]`` in ``masks.dtype``. The exact formula is in ``wsss_fast.ops.reference.pamr``.

    Only the ``reference`` backend exists so far; the fused backends arrive with their issue.
    """
    image, masks, dilations, iters = _checks.image_and_masks(OP, image, masks, dilations, iters)
    _, impl = _backend.select(OP, _IMPLS, image.device)
    return impl(image, masks, dilations=dilations, iters=iters)


_IMPLS = {"reference": reference.pamr}
