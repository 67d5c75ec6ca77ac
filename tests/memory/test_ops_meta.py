"""Every op runs on meta tensors (shapes only, no host sync), forward and backward, on every
backend that implements it: what lets ``wsss-fast memory`` count a step without a device."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import wsss_fast
from wsss_fast import ops
from wsss_fast.ops import _checks

B, H, N, D, C = 2, 3, 17, 16, 4


def _m(*shape, dtype=torch.float32, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def _qkv(L=None):
    lead = () if L is None else (L,)
    return [_m(*lead, B, H, N, D, grad=True) for _ in range(3)]


# op name -> (call, expected output shape, backends implementing it)
CASES = {
    "attention_mean": (
        lambda: ops.attention(*_qkv(), export="mean"),
        [(B, H, N, D), (B, N, N)],
        ("reference", "torch", "triton"),
    ),
    "attention_rows": (
        lambda: ops.attention(*_qkv(), export="rows", num_rows=2),
        [(B, H, N, D), (B, H, 2, N)],
        ("reference", "torch", "triton"),
    ),
    "affinity_loss": (
        lambda: ops.affinity_loss(*_qkv()[:2], _m(B, N - 1, dtype=torch.int64), num_prefix=1),
        [()],
        ("reference", "torch", "triton"),
    ),
    "propagate": (
        lambda: ops.propagate(*_qkv(2)[:2], _m(B, C, N - 1, grad=True), num_prefix=1),
        [(B, C, N - 1)],
        ("reference", "torch", "triton"),
    ),
    "random_walk": (
        lambda: ops.random_walk(_m(B, N, N), _m(B, C, N, grad=True), beta=8, steps=3),
        [(B, C, N)],
        ("reference", "torch", "triton", "cuda"),
    ),
    "getam_map": (
        lambda: ops.getam_map(*_qkv(), _m(B, H, N, D, grad=True)),
        [(B, N)],
        ("reference", "torch", "cuda"),
    ),
    "par": (
        lambda: ops.par(_m(B, 3, 16, 16), _m(B, C, 16, 16)),
        [(B, C, 16, 16)],
        ("reference", "torch", "cuda"),
    ),
    "pamr": (
        lambda: ops.pamr(_m(B, 3, 16, 16), _m(B, C, 16, 16)),
        [(B, C, 16, 16)],
        ("reference", "torch", "cuda"),
    ),
}
PARAMS = [
    pytest.param(name, backend, id=f"{name}-{backend}")
    for name, (_, _, backends) in CASES.items()
    for backend in (*backends, "auto")
]


@pytest.mark.parametrize("name,backend", PARAMS)
def test_op_runs_on_meta(name, backend):
    call, shapes, _ = CASES[name]
    with wsss_fast.use_backend(backend):
        out = call()
        outs = out if isinstance(out, tuple) else (out,)
        assert [tuple(o.shape) for o in outs] == shapes
        assert all(o.is_meta for o in outs)
        if outs[0].requires_grad:
            sum(o.float().sum() for o in outs).backward()


def test_auto_on_meta_takes_what_a_gpu_would():
    from wsss_fast import _backend

    impls = {"reference": 0, "torch": 1, "triton": 2}
    assert _backend.select("x", impls, torch.device("meta"))[0] == "triton"
    assert _backend.select("x", impls, torch.device("cpu"))[0] == "torch"


def test_value_checks_run_on_real_tensors_only():
    bad = torch.tensor([float("nan")])
    with pytest.raises(ValueError, match="NaN"):
        _checks.all_finite("op", "x", bad)
    _checks.all_finite("op", "x", torch.empty(1, device="meta"))  # nothing to read: skipped
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(bad)
        assert not _checks.values_readable(fake)
        _checks.all_finite("op", "x", fake)
    assert _checks.values_readable(bad)
