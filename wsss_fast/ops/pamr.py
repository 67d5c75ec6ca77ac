"""``pamr``: GETAM's pixel-adaptive mask refinement (DESIGN.md §3.6).

Like ``par`` (whose shared helpers it uses), the ``torch`` and ``cuda`` backends compute the
``[B, K, H, W]`` affinities once and gather each pixel's K neighbours at every iteration instead of
unfolding the published code's ``[B, C, K, H, W]`` neighbour tensor.
"""

from __future__ import annotations

import torch

from wsss_fast import _backend, _ext
from wsss_fast.ops import _checks, reference
from wsss_fast.ops.par import (
    acc_dtype,
    masks_for_kernel,
    refine,
    refuse_grad,
    register_no_backward,
    softmax_over_taps_,
    state_at_image_size,
    tap_std,
    taps,
)

OP = "pamr"


def pamr(
    image: torch.Tensor,
    masks: torch.Tensor,
    *,
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24),
    iters: int = 10,
) -> torch.Tensor:
    """Refine ``masks`` with colour affinities to 8 ring neighbours per dilation (no position term).

    With ``sigma_i`` the unbiased standard deviation, per image channel, of the full 3x3 windows
    (centre included) of pixel i at every dilation, pooled (``9 * len(dilations)`` values)::

        aff_ij = softmax_j(mean_channels -|I_i - I_j| / (1e-8 + 0.1 * sigma_i))
        m_i <- sum_j aff_ij m_j                      (``iters`` times, every channel)

    Args:
        image: ``[B, 3, H, W]`` float16, bfloat16, float32 or float64, any range (GETAM feeds the
            raw 0-255 crop).
        masks: ``[B, C, h, w]``, same dtypes; resized to ``(H, W)`` bilinearly
            (``align_corners=True``) when ``(h, w) != (H, W)``.
        dilations: ring dilations, ints >= 1, at most ``wsss_fast.ops.par.MAX_DILATIONS`` = 16 of
            them; ``K = 8 * len(dilations)`` neighbours, coordinates clamped to the image
            (replicate padding), any image size.
        iters: number of updates ``m_i <- sum_j aff_ij m_j``, >= 0.

    Returns:
        ``[B, C, H, W]`` in ``masks.dtype``, computed in float32 (float64 when ``image`` or
        ``masks`` is float64). Differentiable on the ``reference`` backend only: the ``torch`` and
        ``cuda`` backends raise if ``image`` or ``masks`` requires a gradient while grad mode is on
        (GETAM runs PAMR under ``torch.no_grad()``).

    Host syncs: two per call on a GPU, for the checks that image and masks are finite; they are
    skipped on meta and fake tensors, under ``torch.compile`` and during CUDA-graph capture.

    Example::

        refined = wsss_fast.pamr(image_0_255, cam_probs, iters=10)
    """
    image, masks, dilations, iters = _checks.image_and_masks(OP, image, masks, dilations, iters)
    backend, impl = _backend.select(OP, _IMPLS, image.device, kernel="pamr_forward")
    if backend != "reference":
        refuse_grad(OP, backend, image, masks)
    return impl(image, masks, dilations=dilations, iters=iters)


# ---------------------------------------------------------------------------------------------
# torch backend: affinities once as [B, K, H, W], built tap by tap; the updates gather tap by tap.


def _pamr_affinity(image: torch.Tensor, dilations: tuple[int, ...]) -> torch.Tensor:
    """``softmax_k(mean_c -|I_i - I_k| / (1e-8 + 0.1 sigma_i))``, ``[B, K, H, W]``."""
    batch, _, height, width = image.shape
    denom = tap_std(image, dilations, with_centre=True).mul_(0.1).add_(1e-8)
    aff = image.new_empty(batch, 8 * len(dilations), height, width)
    for k, tap in enumerate(taps(image, dilations)):
        aff[:, k] = (tap - image).abs_().neg_().div_(denom).mean(dim=1)
    return softmax_over_taps_(aff)


def _pamr_torch(image, masks, *, dilations, iters):
    acc = acc_dtype(image, masks)
    image = image.to(acc)
    state = state_at_image_size(image, masks, acc)
    if iters == 0:
        return state.to(masks.dtype, copy=True)
    return refine(_pamr_affinity(image, dilations), state, dilations, iters).to(masks.dtype)


def _pamr_cuda(image, masks, *, dilations, iters):
    op = torch.ops.wsss_fast.pamr_forward
    return op(image.contiguous(), masks_for_kernel(image, masks), list(dilations), iters).to(
        masks.dtype
    )


_IMPLS = {"reference": reference.pamr, "torch": _pamr_torch, "cuda": _pamr_cuda}


# ---------------------------------------------------------------------------------------------
# The compiled op: a fake kernel for torch.compile, and a clear error instead of a gradient.

if _ext.has_op("pamr_forward"):

    @torch.library.register_fake("wsss_fast::pamr_forward")
    def _pamr_forward_fake(image, masks, dilations, iters):
        return torch.empty_like(masks)

    register_no_backward("pamr_forward")
