"""The compiled extension: it loads, its CPU kernels are registered, and its CUDA kernels were
compiled wherever torch and nvcc have CUDA (even with no GPU present)."""

import os
import shutil
import subprocess
import sys

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


def test_build_records_its_gpu_targets():
    info = _ext.build_info()
    if not info.get("cuda_built"):
        assert not _ext.cuda_targets()
        return
    targets = info["cuda_targets"]
    # Every numbered TORCH_CUDA_ARCH_LIST entry became a cubin, and +PTX entries PTX as well.
    for entry in info["arch_list"].replace(" ", ";").split(";"):
        number = entry.removesuffix("+PTX").replace(".", "")
        assert f"sm_{number}" in targets, (entry, targets)
        assert (f"compute_{number}" in targets) == entry.endswith("+PTX"), (entry, targets)


_BROKEN_EXTENSION = """
import importlib.abc, sys, warnings

class Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "wsss_fast._C":  # what a binary built against another torch raises
            raise ImportError("wsss_fast/_C.so: undefined symbol: _ZN3c1017fake_symbolEv")

if sys.argv[1] == "broken":
    sys.meta_path.insert(0, Broken())
else:
    sys.modules["wsss_fast._C"] = None  # no binary: the documented pure-Python install
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch, wsss_fast
    import wsss_fast._ext
    aff = torch.rand(1, 4, 4) + torch.eye(4)
    wsss_fast.random_walk(aff, torch.rand(1, 2, 4), beta=2.0, steps=1)
for w in caught:
    if "wsss_fast._C" in str(w.message):
        print("WARNING", w.category.__name__, w.message)
"""


def test_import_warns_once_when_the_extension_exists_but_fails_to_load():
    res = subprocess.run(
        [sys.executable, "-c", _BROKEN_EXTENSION, "broken"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("WARNING")]
    assert len(lines) == 1, res.stdout
    assert "RuntimeWarning" in lines[0] and "undefined symbol" in lines[0]
    assert "pip install --no-build-isolation -e ." in lines[0]


def test_import_is_silent_without_the_extension():
    res = subprocess.run(
        [sys.executable, "-c", _BROKEN_EXTENSION, "absent"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "WARNING" not in res.stdout
