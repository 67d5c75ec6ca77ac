"""Loading of the compiled extension ``wsss_fast._C``; importing wsss_fast never fails without it."""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import re
import sys
import warnings

import torch

_C = None
_LOAD_ERROR: str | None = None
REBUILD = "pip install --no-build-isolation -e ."


def _binary_present() -> bool:
    """Whether a built ``_C`` file lies in the package (for any Python), as opposed to none."""
    here = os.path.dirname(os.path.abspath(__file__))
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES) + (".so", ".pyd")
    return any(f.startswith("_C.") and f.endswith(suffixes) for f in os.listdir(here))


try:
    _C = importlib.import_module("wsss_fast._C")  # registers the wsss_fast::* ops
except ImportError as exc:  # missing or built against another torch
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    # A binary that is there but does not load (built for another torch or Python) is worth a
    # warning: its ops silently fall back to slower backends. None in sys.modules is a deliberate
    # block (tests), and no binary at all is the documented pure-Python install.
    blocked = "wsss_fast._C" in sys.modules and sys.modules["wsss_fast._C"] is None
    if not blocked and (not isinstance(exc, ModuleNotFoundError) or _binary_present()):
        warnings.warn(
            f"wsss_fast._C exists but could not be imported ({_LOAD_ERROR}); the 'cuda' backend "
            f"is unavailable until it is rebuilt against this torch: `{REBUILD}`",
            RuntimeWarning,
            stacklevel=2,
        )


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
        f"rebuild it with `{REBUILD}`"
    )


def build_info() -> dict:
    """What setup.py decided when it built the extension (empty when it was never run)."""
    try:
        from wsss_fast._build_info import BUILD_INFO
    except ImportError:
        return {}
    return dict(BUILD_INFO)


def cuda_targets() -> list[str]:
    """The GPU code in the extension: ``sm_XY`` cubins and ``compute_XY`` PTX (``[]`` if unknown).

    Builds from before setup.py recorded them are read from their ``TORCH_CUDA_ARCH_LIST``
    (numbered entries only, ``"8.6"`` or ``"9.0+PTX"``).
    """
    info = build_info()
    if "cuda_targets" in info:
        return list(info["cuda_targets"])
    targets = []
    for entry in re.split(r"[;\s]+", info.get("arch_list") or ""):
        m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", entry)
        if m:
            targets.append(f"sm_{m[1]}{m[2]}{m[3]}")
            if m[4]:
                targets.append(f"compute_{m[1]}{m[2]}{m[3]}")
    return targets


def _covers(target: str, capability: tuple[int, int]) -> bool:
    """Whether GPU code ``target`` runs on a device of compute ``capability``, by CUDA's rules:
    a cubin runs on its major version at its minor or above (an ``a`` cubin on its exact version
    only); PTX compiles at load time for its version and every later one (``a`` PTX: exact only)."""
    m = re.fullmatch(r"(sm|compute)_(\d+?)(\d)([a-z]?)", target)
    if m is None:
        return False
    kind, major, minor, suffix = m[1], int(m[2]), int(m[3]), m[4]
    if suffix == "a":
        return (major, minor) == capability
    if kind == "sm":
        return major == capability[0] and minor <= capability[1]
    return (major, minor) <= capability


def arch_mismatch(capability: tuple[int, int], where: str = "this GPU") -> str | None:
    """None if the extension has GPU code that runs on compute ``capability`` (or its targets
    are unknown), else which targets it has and the command that builds for ``where``."""
    targets = cuda_targets()
    if not targets or any(_covers(t, capability) for t in targets):
        return None
    major, minor = capability
    return (
        f"wsss_fast._C was built for {', '.join(targets)}, not for {where} (sm_{major}{minor}); "
        f"rebuild it for this GPU: `TORCH_CUDA_ARCH_LIST={major}.{minor} {REBUILD}`"
    )
