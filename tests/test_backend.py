"""Backend choice: names, precedence, availability, and the errors that say how to fix things."""

import os
import subprocess
import sys

import pytest
import torch

import wsss_fast
from wsss_fast import _backend, _ext


def test_reference_and_torch_are_always_available():
    names = wsss_fast.available_backends()
    assert names[:2] == ["reference", "torch"]
    assert set(names) <= set(wsss_fast.BACKENDS)


def test_triton_availability_follows_the_interpreter_switch():
    names = wsss_fast.available_backends()
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        assert "triton" in names
    assert (
        _backend.unavailable_reason("triton", "cpu") is None
        or os.environ.get("TRITON_INTERPRET") != "1"
    )


def test_cuda_backend_available_when_extension_loaded():
    assert ("cuda" in wsss_fast.available_backends()) == _ext.loaded()


def test_precedence_context_over_global_over_environment(monkeypatch):
    monkeypatch.setenv("WSSS_FAST_BACKEND", "reference")
    assert wsss_fast.get_backend() == "reference"
    wsss_fast.set_backend("torch")
    assert wsss_fast.get_backend() == "torch"
    with wsss_fast.use_backend("cuda"):
        assert wsss_fast.get_backend() == "cuda"
        with wsss_fast.use_backend("reference"):
            assert wsss_fast.get_backend() == "reference"
        assert wsss_fast.get_backend() == "cuda"
    assert wsss_fast.get_backend() == "torch"
    wsss_fast.set_backend(None)
    assert wsss_fast.get_backend() == "reference"
    monkeypatch.delenv("WSSS_FAST_BACKEND")
    assert wsss_fast.get_backend() == "auto"


def test_environment_variable_selects_the_implementation(monkeypatch):
    aff = torch.rand(1, 6, 6) + torch.eye(6)
    cam = torch.rand(1, 2, 6)
    monkeypatch.setenv("WSSS_FAST_BACKEND", "reference")
    # The reference is the only backend that keeps T per step for autograd: visible in the graph.
    out = wsss_fast.random_walk(aff.requires_grad_(), cam, beta=2.0, steps=2)
    assert "RandomWalkFunction" not in type(out.grad_fn).__name__
    monkeypatch.setenv("WSSS_FAST_BACKEND", "torch")
    out = wsss_fast.random_walk(aff, cam, beta=2.0, steps=2)
    assert "RandomWalkFunction" in type(out.grad_fn).__name__


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="reference, torch, triton, cuda, auto"):
        wsss_fast.set_backend("flash")
    with pytest.raises(ValueError, match="unknown backend"):
        with wsss_fast.use_backend("cudnn"):
            pass


def test_bad_environment_variable_is_reported(monkeypatch):
    monkeypatch.setenv("WSSS_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        wsss_fast.get_backend()


def test_op_not_implemented_on_backend_says_which_are():
    q = torch.randn(1, 2, 5, 8)
    with (
        wsss_fast.use_backend("cuda"),
        pytest.raises(wsss_fast.BackendNotImplementedError) as info,
    ):
        wsss_fast.attention(q, q, q)
    msg = str(info.value)
    assert "not implemented on the 'cuda' backend yet" in msg
    assert "implemented: reference, torch, triton" in msg


def test_auto_on_cpu_prefers_compiled_kernels():
    impls = {"reference": None, "torch": None, "cuda": None, "triton": None}
    name, _ = _backend.select("random_walk", impls, torch.device("cpu"))
    assert name == ("cuda" if _ext.loaded() else "torch")
    name, _ = _backend.select("attention", {"reference": None}, torch.device("cpu"))
    assert name == "reference"


def test_import_never_fails_without_the_extension():
    # Block `wsss_fast._C` in a fresh interpreter: import works, the cuda backend explains itself.
    code = (
        "import sys; sys.modules['wsss_fast._C'] = None\n"
        "import torch, wsss_fast\n"
        "assert 'cuda' not in wsss_fast.available_backends()\n"
        "aff = torch.rand(1, 4, 4) + torch.eye(4); cam = torch.rand(1, 2, 4)\n"
        "print(wsss_fast.random_walk(aff, cam, beta=2.0, steps=1).shape)\n"
        "try:\n"
        "    with wsss_fast.use_backend('cuda'):\n"
        "        wsss_fast.random_walk(aff, cam, beta=2.0, steps=1)\n"
        "except wsss_fast.BackendError as e:\n"
        "    print('ERROR', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch.Size([1, 2, 4])" in res.stdout
    assert "ERROR" in res.stdout and "pip install --no-build-isolation -e ." in res.stdout


def test_stale_extension_without_the_op_kernel():
    # An extension built before an op existed: auto moves on, an explicit choice says to rebuild.
    impls = {"reference": None, "torch": None, "cuda": None}
    cpu = torch.device("cpu")
    name, _ = _backend.select("new_op", impls, cpu, kernel="no_such_op_forward")
    assert name == "torch"
    with wsss_fast.use_backend("cuda"), pytest.raises(wsss_fast.BackendError, match="rebuild"):
        _backend.select("new_op", impls, cpu, kernel="no_such_op_forward")
    if _ext.loaded():
        assert _backend.select("random_walk", impls, cpu, kernel="random_walk_forward")[0] == "cuda"


@pytest.mark.parametrize(
    "target,capability,runs",
    [
        ("sm_80", (8, 0), True),
        ("sm_80", (8, 6), True),  # a cubin runs on later minors of its major
        ("sm_86", (8, 0), False),
        ("sm_90", (8, 9), False),
        ("sm_90", (10, 0), False),  # but not on another major
        ("compute_90", (12, 0), True),  # PTX compiles for every later GPU
        ("compute_90", (8, 9), False),
        ("sm_90a", (9, 0), True),  # arch-specific code: that GPU only
        ("compute_90a", (10, 0), False),
        ("sm_100", (10, 3), True),
        ("sm_100", (12, 0), False),
    ],
)
def test_gpu_code_coverage_follows_cuda_rules(target, capability, runs):
    assert _ext._covers(target, capability) is runs


@pytest.mark.parametrize(
    "arch_list,targets",
    [
        ("9.0", ["sm_90"]),
        ("8.0;8.6;8.9;9.0+PTX", ["sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]),
        ("7.5 9.0a", ["sm_75", "sm_90a"]),
    ],
)
def test_targets_of_builds_that_recorded_only_the_arch_list(monkeypatch, arch_list, targets):
    monkeypatch.setattr(_ext, "build_info", lambda: {"cuda_built": True, "arch_list": arch_list})
    assert _ext.cuda_targets() == targets


def fake_gpu(monkeypatch, capability, targets=("sm_80", "sm_86", "sm_89", "sm_90", "compute_90")):
    """A visible GPU of compute ``capability`` and an extension built for ``targets``."""
    info = {**_ext.build_info(), "cuda_built": True, "cuda_targets": list(targets)}
    monkeypatch.setattr(_ext, "build_info", lambda: info)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")


@pytest.mark.skipif(not _ext.loaded(), reason="needs the compiled extension")
@pytest.mark.parametrize("capability", [(8, 0), (8, 7), (9, 0), (12, 0)])
def test_auto_takes_cuda_on_a_gpu_the_extension_was_built_for(monkeypatch, capability):
    fake_gpu(monkeypatch, capability)
    impls = {"reference": None, "torch": None, "cuda": None}
    assert _backend.select("op", impls, torch.device("cuda", 0))[0] == "cuda"


@pytest.mark.skipif(not _ext.loaded(), reason="needs the compiled extension")
@pytest.mark.parametrize("capability", [(7, 5), (10, 0)], ids=["sm_75", "sm_100-no-ptx"])
def test_gpu_the_extension_was_not_built_for(monkeypatch, capability):
    # sm_100 is newer than every cubin, and without PTX nothing compiles for it.
    targets = ("sm_80", "sm_86", "sm_89", "sm_90") + (
        ("compute_90",) if capability < (9, 0) else ()
    )
    fake_gpu(monkeypatch, capability, targets)
    impls = {"reference": None, "torch": None, "cuda": None}
    cuda = torch.device("cuda", 0)
    assert _backend.select("op", impls, cuda)[0] == "torch"
    assert "cuda" not in wsss_fast.available_backends()
    with wsss_fast.use_backend("cuda"), pytest.raises(wsss_fast.BackendError) as info:
        _backend.select("op", impls, cuda)
    msg = str(info.value)
    major, minor = capability
    assert f"built for {', '.join(targets)}, not for Test GPU (sm_{major}{minor})" in msg
    assert f"`TORCH_CUDA_ARCH_LIST={major}.{minor} pip install --no-build-isolation -e .`" in msg
