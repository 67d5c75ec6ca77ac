"""Argument checks shared by the public ops: each error says what was expected and how to fix it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor

LOW_PRECISION = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float32, *LOW_PRECISION)
# float64 is accepted by the reference and torch backends (gradcheck); fused backends say so.
ALL_FLOAT_DTYPES = (*FLOAT_DTYPES, torch.float64)


def tensor(
    op: str,
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int],
    dtypes: Sequence[torch.dtype] = ALL_FLOAT_DTYPES,
    layout: str = "",
) -> torch.Tensor:
    """Check that ``t`` is a non-empty tensor of rank ``ndim`` and one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"wsss_fast.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    shape_txt = f" {layout}" if layout else ""
    if t.dim() not in ranks:
        want = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(
            f"wsss_fast.{op}: {name} must be {want}{shape_txt}, got shape {tuple(t.shape)}"
        )
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(
            f"wsss_fast.{op}: {name} has dtype {t.dtype}; expected one of {names} "
            f"(convert with {name}.float())"
        )
    if t.numel() == 0:
        raise ValueError(f"wsss_fast.{op}: {name} is empty (shape {tuple(t.shape)}){shape_txt}")
    return t


def same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """Check that all tensors live on one device and return it."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"wsss_fast.{op}: inputs must be on one device, got {listing}")
    return first


def values_readable(*tensors: torch.Tensor) -> bool:
    """Whether checks that read tensor values (NaN, ranges, labels) may run here.

    They are skipped on ``meta`` and fake tensors (no values: shape-only runs such as
    ``wsss-fast memory`` and ``torch.compile`` tracing), while ``torch.compile`` traces, and while a
    CUDA graph is being captured (a host sync would break the capture). Everywhere else they run;
    on a GPU each such check costs one device-to-host sync per call, which the op docstrings list.
    """
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t.is_meta or isinstance(t, FakeTensor):
            return False
        if t.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
    return True


def all_finite(op: str, name: str, t: torch.Tensor) -> None:
    """Raise if ``t`` holds NaN or infinity (one host sync on a GPU; skipped where
    :func:`values_readable` says so)."""
    if values_readable(t) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"wsss_fast.{op}: {name} contains NaN or infinite values")


def positive_number(op: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"wsss_fast.{op}: {name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"wsss_fast.{op}: {name} must be a finite number > 0, got {value}")
    return float(value)


def non_negative_int(op: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"wsss_fast.{op}: {name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"wsss_fast.{op}: {name} must be >= 0, got {value}")
    return value


def dtype_for_backend(op: str, backend: str, *tensors: torch.Tensor) -> None:
    """Fused kernels take float32/float16/bfloat16; float64 is for the reference and torch backends."""
    for t in tensors:
        if t.dtype == torch.float64:
            raise TypeError(
                f"wsss_fast.{op}: the {backend!r} backend takes float32, float16 or bfloat16; "
                "float64 (for gradcheck) runs on the 'reference' and 'torch' backends"
            )


def same_shape_and_dtype(op: str, **tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.shape != t0.shape:
            raise ValueError(
                f"wsss_fast.{op}: {name} has shape {tuple(t.shape)} but {name0} has "
                f"{tuple(t0.shape)}; they must match"
            )
        if t.dtype != t0.dtype:
            raise TypeError(
                f"wsss_fast.{op}: {name} is {t.dtype} but {name0} is {t0.dtype}; use one dtype"
            )


def optional_scale(op: str, scale: object) -> float | None:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"wsss_fast.{op}: scale must be a finite number or None, got {scale!r}")
    return float(scale)


def index_in_range(op: str, name: str, value: object, low: int, high: int) -> int:
    """Check ``low <= value < high`` for an int ``value``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"wsss_fast.{op}: {name} must be an int, got {type(value).__name__}")
    if not low <= value < high:
        raise ValueError(f"wsss_fast.{op}: {name} must be in [{low}, {high}), got {value}")
    return value


MAX_DILATIONS = 16
"""The most dilations ``par`` and ``pamr`` take, on every backend: the CUDA kernels receive their
tap tables by value as kernel arguments (no host-to-device copy per call), which bounds them
(``kMaxDilations`` in ``csrc/par.h``)."""


def image_and_masks(
    op: str, image: object, masks: object, dilations: object, iters: object
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], int]:
    """Checks shared by ``par`` and ``pamr``: ``image [B, 3, H, W]``, ``masks [B, C, h, w]``."""
    image = tensor(op, "image", image, ndim=4, layout="[B, 3, H, W]")
    masks = tensor(op, "masks", masks, ndim=4, layout="[B, C, h, w]")
    same_device(op, image=image, masks=masks)
    if image.shape[1] != 3:
        raise ValueError(f"wsss_fast.{op}: image must have 3 channels (RGB), got {image.shape[1]}")
    if masks.shape[0] != image.shape[0]:
        raise ValueError(
            f"wsss_fast.{op}: image and masks must have the same batch size, got "
            f"{image.shape[0]} and {masks.shape[0]}"
        )
    all_finite(op, "image", image)
    all_finite(op, "masks", masks)
    if isinstance(dilations, int) or not dilations:
        raise ValueError(f"wsss_fast.{op}: dilations must be a non-empty sequence of ints")
    for d in dilations:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"wsss_fast.{op}: every dilation must be an int >= 1, got {d!r}")
    if len(dilations) > MAX_DILATIONS:
        raise ValueError(
            f"wsss_fast.{op}: at most {MAX_DILATIONS} dilations are supported, got "
            f"{len(dilations)}; pass fewer (a dilation >= max(H, W) acts like max(H, W))"
        )
    iters = non_negative_int(op, "iters", iters)
    return image, masks, tuple(dilations), iters
