"""The compiled extension: it loads, its CPU kernels are registered, and its CUDA kernels were
compiled wherever torch and nvcc have CUDA (even with no GPU present)."""

import os
import shutil

import torch

from wsss_fast import _ext


def test_extension_loads():
    assert _ext.loaded(), _ext.load_error()
    assert _ext.has_kernel("random_walk_forward", "CPU")
    assert _ext.has_kernel("random_walk_backward", "CPU")


def test_cuda_kernels_compiled_when_nvcc_is_present():
    info = _ext.build_info()
    assert info, "wsss_fast/_build_info.py is missing: setup.py did not run"
    cuda_possible = (
        torch.version.cuda is not None
        and (shutil.which("nvcc") or os.environ.get("CUDA_HOME"))
        and os.environ.get("WSSS_FAST_NO_CUDA", "0") in ("", "0")
    )
    if cuda_possible:
        assert info["cuda_built"], f"CUDA kernels were not built: {info['cuda_reason']}"
    assert info["cuda_built"] == _ext.has_kernel("random_walk_forward", "CUDA")
    assert info["cuda_built"] == _ext.has_kernel("random_walk_backward", "CUDA")
