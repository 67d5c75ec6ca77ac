"""wsss_fast: fused kernels and training code for transformer-based weakly supervised segmentation.

Ops (DESIGN.md §3) are importable as ``wsss_fast.<op>`` and ``wsss_fast.ops.<op>``; each runs on
the backend chosen by :func:`use_backend`, :func:`set_backend` or ``WSSS_FAST_BACKEND``.
"""

from wsss_fast._backend import (
    BACKENDS,
    BackendError,
    BackendNotImplementedError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from wsss_fast.nn import Capture, capture, patch_timm
from wsss_fast.ops import (
    affinity_loss,
    attention,
    getam_map,
    pamr,
    par,
    propagate,
    random_walk,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendError",
    "BackendNotImplementedError",
    "Capture",
    "affinity_loss",
    "attention",
    "available_backends",
    "capture",
    "get_backend",
    "getam_map",
    "pamr",
    "par",
    "patch_timm",
    "propagate",
    "random_walk",
    "set_backend",
    "use_backend",
]
