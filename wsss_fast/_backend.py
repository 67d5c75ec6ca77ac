"""Backend choice: ``reference``, ``torch``, ``triton``, ``cuda`` or ``auto`` (DESIGN.md §2).

The active backend comes from, first to last: the innermost ``use_backend`` context, the last
``set_backend`` call, the ``WSSS_FAST_BACKEND`` environment variable, and ``auto``. ``auto`` takes,
for the device of the op's tensors, the first backend of the op's preference order that both
implements the op and is available in this process.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from wsss_fast import _ext

BACKENDS = ("reference", "torch", "triton", "cuda")
_CHOICES = (*BACKENDS, "auto")

# Fastest first. On CPU the Triton interpreter is for tests only, never an automatic choice.
DEFAULT_AUTO_ORDER: Mapping[str, Sequence[str]] = {
    "cuda": ("triton", "cuda", "torch", "reference"),
    "cpu": ("cuda", "torch", "reference"),
}

_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "wsss_fast_backend", default=None
)
_global_backend: str | None = None


class BackendError(RuntimeError):
    """A backend was asked for that cannot run this op here; the message says what to do."""


class BackendNotImplementedError(BackendError, NotImplementedError):
    """The op has no implementation on the requested backend yet."""


def _check_name(name: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(_CHOICES)}")
    return name


def get_backend() -> str:
    """The backend name in force now (possibly ``"auto"``)."""
    name = _context_backend.get() or _global_backend or os.environ.get("WSSS_FAST_BACKEND")
    return _check_name(name or "auto")


def set_backend(name: str | None) -> None:
    """Use backend ``name`` from now on in this process; ``None`` clears the choice, so that
    ``WSSS_FAST_BACKEND`` (or ``auto``) applies again."""
    global _global_backend
    _global_backend = None if name is None else _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` inside a ``with`` block::

    with wsss_fast.use_backend("torch"):
        out = wsss_fast.random_walk(aff, cam, beta=8, steps=64)
    """
    token = _context_backend.set(_check_name(name))
    try:
        yield
    finally:
        _context_backend.reset(token)


def unavailable_reason(
    name: str, device_type: str | None = None, device: torch.device | None = None
) -> str | None:
    """None if backend ``name`` can run here (on ``device_type`` when given), else why not and how to fix it.

    For ``cuda`` on CUDA tensors the GPU (``device``, else the current one) must be one the
    extension has GPU code for.
    """
    _check_name(name)
    if name in ("reference", "torch", "auto"):
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (`pip install triton`; Linux only)"
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if device_type == "cpu" and not interpret:
            return (
                "Triton kernels need CUDA tensors; on the CPU they run only under the interpreter "
                "(set TRITON_INTERPRET=1 before importing triton; slow, meant for tests)"
            )
        if device_type in (None, "cuda") and not (torch.cuda.is_available() or interpret):
            return (
                "no CUDA GPU is visible (on the CPU set TRITON_INTERPRET=1 to interpret, for tests)"
            )
        return None
    # name == "cuda": the compiled extension, whose CPU kernels serve CPU tensors.
    err = _ext.load_error()
    if err is not None:
        return err
    if device_type == "cuda" and not _ext.build_info().get("cuda_built", False):
        why = _ext.build_info().get("cuda_reason", "unknown")
        return (
            f"wsss_fast._C was built without its CUDA kernels ({why}); rebuild with nvcc on PATH: "
            "`pip install --no-build-isolation -e .`"
        )
    if device_type == "cuda" and torch.cuda.is_available():
        index = device.index if device is not None else None
        capability = torch.cuda.get_device_capability(index)
        return _ext.arch_mismatch(capability, torch.cuda.get_device_name(index))
    return None


def available_backends() -> list[str]:
    """The backend names usable in this process (for CUDA tensors if a GPU is visible, else CPU)."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return [b for b in BACKENDS if unavailable_reason(b, device_type) is None]


def select(
    op: str,
    impls: Mapping[str, Callable],
    device: torch.device,
    auto_order: Mapping[str, Sequence[str]] = DEFAULT_AUTO_ORDER,
    kernel: str | None = None,
) -> tuple[str, Callable]:
    """Pick the implementation of ``op`` for tensors on ``device``; returns (backend, callable).

    ``kernel`` names the registered ``wsss_fast::<kernel>`` op behind the ``cuda`` backend, so an
    extension built before that op existed counts as unavailable for it (``auto`` moves on).
    """
    name = get_backend()
    device_type = device.type
    # Meta tensors stand for a CUDA device (shape-only runs such as `wsss-fast memory`): the
    # choice a GPU would make, where the fused ops run as their fake kernels.
    order_type = "cuda" if device_type == "meta" else device_type

    def reason(backend: str) -> str | None:
        why = unavailable_reason(backend, device_type, device)
        if why is None and backend == "cuda" and kernel is not None:
            # On meta the op's fake kernel stands in; it exists wherever the op does.
            why = _ext.missing_kernel(kernel, "cpu" if device_type == "meta" else device_type)
        return why

    if name == "auto":
        for cand in auto_order.get(order_type, ("torch", "reference")):
            if cand in impls and reason(cand) is None:
                return cand, impls[cand]
        raise BackendError(f"no backend of wsss_fast.{op} can run on {device_type} tensors")
    if name not in impls:
        have = ", ".join(b for b in BACKENDS if b in impls)
        raise BackendNotImplementedError(
            f"wsss_fast.{op} is not implemented on the {name!r} backend yet (implemented: {have}). "
            f"Choose another with wsss_fast.use_backend(...) or WSSS_FAST_BACKEND."
        )
    why = reason(name)
    if why is not None:
        raise BackendError(f"wsss_fast.{op}: the {name!r} backend cannot run here: {why}")
    return name, impls[name]
