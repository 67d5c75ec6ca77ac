"""Loading of the compiled extension ``wsss_fast._C``; importing wsss_fast never fails without it."""

from __future__ import annotations

import importlib

import torch

_C = None
_LOAD_ERROR: str | None = None

try:
    _C = importlib.import_module("wsss_fast._C")  # registers the wsss_fast::* ops
except ImportError as exc:  # missing or built against another torch
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def loaded() -> bool:
    return _C is not None


def load_error() -> str | None:
    """Why ``wsss_fast._C`` could not be imported, with the fix; None when it loaded."""
    if _C is not None:
        return None
    return (
        f"the compiled extension wsss_fast._C could not be imported ({_LOAD_ERROR}). Build it "
        "with `bash scripts/setup_env.sh`, or `pip install --no-build-isolation -e .` in an "
        "environment that already has torch; rebuild after upgrading torch."
    )


def has_op(op: str) -> bool:
    """Whether the loaded extension defines ``wsss_fast::<op>`` (one built before it does not)."""
    return _C is not None and hasattr(torch.ops.wsss_fast, op)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the registered op ``wsss_fast::<op>`` has a kernel for ``dispatch_key`` (CPU, CUDA)."""
    if not has_op(op):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"wsss_fast::{op}", dispatch_key)


def missing_kernel(op: str, device_type: str) -> str | None:
    """None if ``wsss_fast::<op>`` has a kernel for ``device_type`` tensors, else why and the fix."""
    key = "CUDA" if device_type == "cuda" else "CPU"
    if has_kernel(op, key):
        return None
    return load_error() or (
        f"wsss_fast._C has no {key} kernel for {op} (it was built before the op was added); "
        "rebuild it with `pip install --no-build-isolation -e .`"
    )


def build_info() -> dict:
    """What setup.py decided when it built the extension (empty when it was never run)."""
    try:
        from wsss_fast._build_info import BUILD_INFO
    except ImportError:
        return {}
    return dict(BUILD_INFO)
