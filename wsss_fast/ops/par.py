"""``par``: AReAM/AFA pixel-adaptive refinement of masks (DESIGN.md §3.6).

The published code unfolds a ``[B, C, K, H, W]`` neighbour tensor (``K = 8 x len(dilations)``,
48 by default) at every iteration. The ``torch`` and ``cuda`` backends compute the
``[B, K, H, W]`` affinities once and gather each pixel's K neighbours from the previous state at
every iteration instead. The helpers below are shared with ``pamr``, which differs only in its
affinity.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from wsss_fast import _backend, _ext
from wsss_fast.ops import _checks, reference

OP = "par"

MAX_DILATIONS = _checks.MAX_DILATIONS


def par(
    image: torch.Tensor,
    masks: torch.Tensor,
    *,
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24),
    iters: int = 10,
    w_pos: float = 0.01,
) -> torch.Tensor:
    """Refine ``masks`` with colour- and position-aware affinities to 8 ring neighbours per dilation.

    With ``sigma_i`` the unbiased standard deviation, per image channel, of the K neighbour values
    of pixel i, ``len_j`` the offset length of neighbour j (``d`` on the axes, ``sqrt(2) d`` on the
    diagonals) and ``sigma_p`` the unbiased standard deviation of the K lengths::

        colour_ij = mean_channels -(|I_i - I_j| / (sigma_i + 1e-8) / 0.3) ** 2
        position_j = -(len_j / (sigma_p + 1e-8) / 0.3) ** 2
        aff_ij = softmax_j(colour_ij) + w_pos * softmax_j(position_j)
        m_i <- sum_j aff_ij m_j                      (``iters`` times, every channel)

    Args:
        image: ``[B, 3, H, W]`` float16, bfloat16, float32 or float64, any range (AReAM passes the
            de-normalised [0, 1] image at half resolution).
        masks: ``[B, C, h, w]``, same dtypes; resized to ``(H, W)`` bilinearly
            (``align_corners=True``) when ``(h, w) != (H, W)``.
        dilations: ring dilations, ints >= 1, at most ``MAX_DILATIONS`` = 16 of them;
            ``K = 8 * len(dilations)`` neighbours, coordinates clamped to the image (replicate
            padding), any image size.
        iters: number of updates ``m_i <- sum_j aff_ij m_j``, >= 0.
        w_pos: weight of the position term.

    Returns:
        ``[B, C, H, W]`` in ``masks.dtype``, computed in float32 (float64 when ``image`` or
        ``masks`` is float64). Differentiable on the ``reference`` backend only: the ``torch`` and
        ``cuda`` backends raise if ``image`` or ``masks`` requires a gradient while grad mode is on
        (AReAM runs PAR under ``torch.no_grad()``).

    Host syncs: two per call on a GPU, for the checks that image and masks are finite; they are
    skipped on meta and fake tensors, under ``torch.compile`` and during CUDA-graph capture.

    Example::

        refined = wsss_fast.par(image, cam_probs, iters=10)
    """
    image, masks, dilations, iters = _checks.image_and_masks(OP, image, masks, dilations, iters)
    if isinstance(w_pos, bool) or not isinstance(w_pos, (int, float)) or not math.isfinite(w_pos):
        raise ValueError(f"wsss_fast.par: w_pos must be a finite number, got {w_pos!r}")
    backend, impl = _backend.select(OP, _IMPLS, image.device, kernel="par_forward")
    if backend != "reference":
        refuse_grad(OP, backend, image, masks)
    return impl(image, masks, dilations=dilations, iters=iters, w_pos=float(w_pos))


# ---------------------------------------------------------------------------------------------
# Shared with pamr.


def refuse_grad(op: str, backend: str, image: torch.Tensor, masks: torch.Tensor) -> None:
    """Raise when a gradient is requested from a backend that computes none."""
    if torch.is_grad_enabled() and (image.requires_grad or masks.requires_grad):
        raise _backend.BackendNotImplementedError(
            f"wsss_fast.{op}: the {backend!r} backend computes no gradient, but image or masks "
            "requires one. The 'reference' backend is the differentiable one: use "
            "wsss_fast.use_backend('reference'), or run under torch.no_grad() / detach the inputs "
            "(the methods refine without gradients)"
        )


def acc_dtype(image: torch.Tensor, masks: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (image.dtype, masks.dtype) else torch.float32


def taps(
    x: torch.Tensor, dilations: tuple[int, ...], *, with_centre: bool = False
) -> Iterator[torch.Tensor]:
    """``x`` ``[B, C, H, W]`` seen from every tap of the dilated 3x3 windows, borders replicated.

    Yields ``[B, C, H, W]`` views in the reference's order (per dilation, the ring row-major, or
    the full window with ``with_centre``); one padded copy of ``x`` exists at a time. A dilation
    of at least ``max(H, W)`` clamps every tap to the border it points at, exactly as ``max(H, W)``
    does, so the padding is capped there.
    """
    height, width = x.shape[-2:]
    for dilation in dilations:
        d = min(dilation, max(height, width))
        padded = F.pad(x, [d, d, d, d], mode="replicate")
        for dy, dx in reference._window_offsets(d, with_centre=with_centre):
            yield padded[..., d + dy : d + dy + height, d + dx : d + dx + width]


def tap_std(image: torch.Tensor, dilations: tuple[int, ...], *, with_centre: bool) -> torch.Tensor:
    """Unbiased std of each channel over the taps, ``[B, 3, H, W]``, in two passes over them.

    The passes sum ``tap - centre``, not ``tap``: the std is the same, but summing raw values of an
    image far from 0 (``image + 1e6``) loses their spread to float32 rounding of the running sum,
    while differences of nearby values are exact. The compiled kernels do the same.
    """
    n = (9 if with_centre else 8) * len(dilations)
    mean = torch.zeros_like(image)
    for tap in taps(image, dilations, with_centre=with_centre):
        mean += tap - image
    mean /= n
    var = torch.zeros_like(image)
    for tap in taps(image, dilations, with_centre=with_centre):
        var += (tap - image - mean).square_()
    return var.div_(n - 1).sqrt_()


def softmax_over_taps_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over axis 1 of ``[B, K, H, W]``, in place."""
    logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=1, keepdim=True))


def refine(
    aff: torch.Tensor, state: torch.Tensor, dilations: tuple[int, ...], iters: int
) -> torch.Tensor:
    """``iters`` updates ``m_i <- sum_k aff[:, k, i] m[tap_k(i)]`` of ``state`` ``[B, C, H, W]``.

    Accumulates tap by tap into a fresh ``[B, C, H, W]`` tensor: never ``[B, C, K, H, W]``.
    """
    for _ in range(iters):
        out = torch.zeros_like(state)
        for k, tap in enumerate(taps(state, dilations)):
            out.addcmul_(aff[:, k : k + 1], tap)
        state = out
    return state


def state_at_image_size(
    image: torch.Tensor, masks: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``masks`` in ``dtype`` at the image size (the reference's bilinear resize), contiguous."""
    return reference._masks_at_image_size(masks, image, dtype).contiguous()


def masks_for_kernel(image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """What the compiled ops take: ``masks`` as given at the image size, else resized in the
    accumulation dtype as the reference resizes them."""
    if masks.shape[-2:] == image.shape[-2:]:
        return masks.contiguous()
    return state_at_image_size(image, masks, acc_dtype(image, masks))


def register_no_backward(name: str) -> None:
    """Attach to ``wsss_fast::<name>`` a backward that says where the gradient is."""

    def backward(ctx, grad_out):
        raise _backend.BackendNotImplementedError(
            f"wsss_fast::{name} has no gradient; the 'reference' backend of wsss_fast.par and "
            "wsss_fast.pamr is the differentiable one"
        )

    torch.library.register_autograd(
        f"wsss_fast::{name}", backward, setup_context=lambda ctx, inputs, output: None
    )


# ---------------------------------------------------------------------------------------------
# torch backend: affinities once as [B, K, H, W], built tap by tap; the updates gather tap by tap.


def position_weights(dilations: tuple[int, ...], w_pos: float) -> torch.Tensor:
    """``w_pos * softmax_k(-(len_k / (sigma_p + 1e-8) / 0.3) ** 2)``, ``[K]`` float64."""
    offsets = [o for d in dilations for o in reference._window_offsets(d)]
    lengths = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets], dtype=torch.float64)
    return w_pos * torch.softmax(-((lengths / (lengths.std() + 1e-8) / 0.3) ** 2), dim=0)


def _par_affinity(image: torch.Tensor, dilations: tuple[int, ...], w_pos: float) -> torch.Tensor:
    """``softmax_k(colour) + w_pos softmax_k(position)``, ``[B, K, H, W]`` in ``image.dtype``."""
    batch, _, height, width = image.shape
    denom = tap_std(image, dilations, with_centre=False).add_(1e-8)
    aff = image.new_empty(batch, 8 * len(dilations), height, width)
    for k, tap in enumerate(taps(image, dilations)):
        aff[:, k] = ((tap - image).abs_().div_(denom).div_(0.3)).square_().neg_().mean(dim=1)
    softmax_over_taps_(aff)
    return aff.add_(position_weights(dilations, w_pos).to(aff).view(1, -1, 1, 1))


def _par_torch(image, masks, *, dilations, iters, w_pos):
    acc = acc_dtype(image, masks)
    image = image.to(acc)
    state = state_at_image_size(image, masks, acc)
    if iters == 0:
        return state.to(masks.dtype, copy=True)
    aff = _par_affinity(image, dilations, w_pos)
    return refine(aff, state, dilations, iters).to(masks.dtype)


def _par_cuda(image, masks, *, dilations, iters, w_pos):
    op = torch.ops.wsss_fast.par_forward
    out = op(image.contiguous(), masks_for_kernel(image, masks), list(dilations), iters, w_pos)
    return out.to(masks.dtype)


_IMPLS = {"reference": reference.par, "torch": _par_torch, "cuda": _par_cuda}


# ---------------------------------------------------------------------------------------------
# The compiled ops: fake kernels for torch.compile, and a clear error instead of a gradient.

if _ext.has_op("par_forward"):

    @torch.library.register_fake("wsss_fast::par_forward")
    def _par_forward_fake(image, masks, dilations, iters, w_pos):
        return torch.empty_like(masks)

    register_no_backward("par_forward")
