"""attention on the torch and triton backends against the reference: out, exports, gradients."""

import importlib
import math

import pytest
import torch
from utils import assert_close, backend_devices, saved_tensors, square_saved

import wsss_fast
from wsss_fast.ops import reference as ref

FUSED = backend_devices("torch", "triton")
# The package re-exports the function under the module's name; fetch the module itself.
attention_module = importlib.import_module("wsss_fast.ops.attention")

# (B, H, N, D): N not a multiple of any block size; one larger awkward N per D.
SHAPES = [
    pytest.param(1, 1, 1, 16, id="N1-D16"),
    pytest.param(2, 3, 37, 16, id="N37-D16"),
    pytest.param(1, 2, 67, 32, id="N67-D32"),
    pytest.param(1, 2, 197, 64, id="N197-D64"),
    pytest.param(1, 1, 45, 128, id="N45-D128"),
]
EXPORTS = [
    pytest.param(None, 1, id="no-export"),
    pytest.param("mean", 1, id="mean"),
    pytest.param("rows", 1, id="rows1"),
    pytest.param("rows", 3, id="rows3"),
]
CPU_DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    # The Triton interpreter mis-computes bfloat16 dots (triton-lang/triton#11584): GPU only.
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu),
]


def make_qkv(B, H, N, D, *, seed, dtype=torch.float32, device="cpu", fused_layout=False):
    """q, k, v with logits of order 1-5; fused_layout gives permuted views of a [B, N, 3, H, D] qkv."""
    g = torch.Generator().manual_seed(seed)
    if fused_layout:
        qkv = torch.randn(B, N, 3, H, D, generator=g) * 1.5
        qkv = qkv.to(device, dtype).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]
    return [(torch.randn(B, H, N, D, generator=g) * 1.5).to(device, dtype) for _ in range(3)]


def eager_lowp(q, k, v, export, num_rows):
    """The same computation done by PyTorch in q's dtype (the error yardstick of the policy)."""
    s = q.shape[-1] ** -0.5
    p = torch.softmax((q @ k.transpose(-2, -1)) * s, dim=-1)
    out = p @ v
    if export == "mean":
        return out, p.mean(1)
    if export == "rows":
        return out, p[:, :, :num_rows]
    return (out,)


def run_with_grads(fn, q, k, v, weights):
    """Outputs of fn(q, k, v) and dq, dk, dv of sum(output_i * weights_i)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    outs = fn(q, k, v)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.float() * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, (q, k, v))
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("export,num_rows", EXPORTS)
@pytest.mark.parametrize("B,H,N,D", SHAPES)
def test_matches_reference(backend, device, dtype, export, num_rows, B, H, N, D):
    num_rows = min(num_rows, N)  # N = 1 has one row to export
    q, k, v = make_qkv(
        B, H, N, D, seed=N + D, dtype=dtype, device=device, fused_layout=(N % 2 == 1)
    )
    g = torch.Generator().manual_seed(1)
    out_shapes = [(B, H, N, D)] + (
        [] if export is None else [(B, N, N) if export == "mean" else (B, H, num_rows, N)]
    )
    weights = [torch.randn(s, generator=g).to(device) for s in out_shapes]

    def fused(q, k, v):
        with wsss_fast.use_backend(backend):
            return wsss_fast.attention(q, k, v, export=export, num_rows=num_rows)

    outs, grads = run_with_grads(fused, q, k, v, weights)
    exp_outs, exp_grads = run_with_grads(
        lambda q, k, v: ref.attention(
            q.double(),
            k.double(),
            v.double(),
            export=export,
            num_rows=num_rows,
            export_dtype=torch.float64,
        ),
        q,
        k,
        v,
        weights,
    )
    names = ["out", "export"]
    if dtype == torch.float32:
        for name, a, e in zip(names, outs, exp_outs):
            assert_close(a, e.float(), name=name)
        for name, a, e in zip(("dq", "dk", "dv"), grads, exp_grads):
            assert_close(a, e.float(), name=name, rtol=1e-4, atol=1e-5)
        return
    low_outs, low_grads = run_with_grads(
        lambda q, k, v: eager_lowp(q, k, v, export, num_rows), q, k, v, weights
    )
    assert outs[0].dtype == dtype
    for name, a, e, lo in zip(names, outs, exp_outs, low_outs):
        # Exports come back in float32; compare them at the precision they were computed in.
        assert_close(a.to(dtype), e, name=name, lowp=lo)
    for name, a, e, lo in zip(("dq", "dk", "dv"), grads, exp_grads, low_grads):
        assert_close(a, e, name=name, lowp=lo)


@pytest.mark.parametrize("backend,device", FUSED)
def test_large_awkward_size(backend, device):
    # 1025 = 8 * 128 + 1: one key past every block boundary.
    q, k, v = make_qkv(1, 1, 1025, 16, seed=3, dtype=torch.float16, device=device)
    with wsss_fast.use_backend(backend):
        out, a = wsss_fast.attention(q, k, v, export="mean")
    e_out, e_a = ref.attention(
        q.double(), k.double(), v.double(), export="mean", export_dtype=torch.float64
    )
    lo = eager_lowp(q, k, v, "mean", 1)
    assert_close(out, e_out, name="out", lowp=lo[0])
    assert_close(a.half(), e_a, name="mean export", lowp=lo[1])
    assert_close(a.sum(-1), torch.ones_like(a.sum(-1)), name="row sums", rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("export", [None, "mean", "rows"])
def test_saves_only_qkv_out_and_lse(backend, device, export):
    B, H, N, D = 1, 2, 48, 16
    q, k, v = (t.requires_grad_() for t in make_qkv(B, H, N, D, seed=0, device=device))
    with wsss_fast.use_backend(backend), saved_tensors() as log:
        wsss_fast.attention(q, k, v, export=export, num_rows=2)
    assert square_saved(log, N) == []
    shapes = sorted(tuple(t.shape) for t in log)
    assert shapes == sorted([(B, H, N, D)] * 4 + [(B, H, N)]), shapes
    lse = next(t for t in log if t.dim() == 3)
    assert lse.dtype == torch.float32


def test_reference_keeps_n_by_n_probabilities():
    # The contrast that makes the test above able to fail: eager attention keeps P.
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 48, 16, seed=0))
    with saved_tensors() as log:
        ref.attention(q, k, v, export="mean")
    assert square_saved(log, 48)


def test_torch_backend_chunking_bounds_rows(monkeypatch):
    # A tiny chunk budget forces one query row per chunk; results must not change.
    q, k, v = make_qkv(2, 2, 29, 16, seed=5)
    with wsss_fast.use_backend("torch"):
        whole = wsss_fast.attention(q, k, v, export="mean")
        monkeypatch.setattr(importlib.import_module("wsss_fast.ops._chunks"), "_budget", 1)
        assert attention_module._chunk_rows(q) == 1
        chunked = wsss_fast.attention(q, k, v, export="mean")
    assert_close(chunked[0], whole[0], name="out")
    assert_close(chunked[1], whole[1], name="export")


def test_gradcheck_torch_backend_float64():
    q, k, v = (t.double().requires_grad_() for t in make_qkv(1, 2, 5, 4, seed=2))

    def fn(q, k, v):
        with wsss_fast.use_backend("torch"):
            f64 = torch.float64
            out, a = wsss_fast.attention(q, k, v, export="mean", export_dtype=f64)
            _, r = wsss_fast.attention(q, k, v, export="rows", num_rows=2, export_dtype=f64)
        return out, a, r

    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


@pytest.mark.parametrize("backend,device", FUSED)
def test_double_backward_matches_reference(backend, device):
    q, k, v = make_qkv(1, 2, 21, 16, seed=4, device=device)

    def second_order(fn):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out, a = fn(qq, kk, vv)
        first = torch.autograd.grad((out**2).sum() + (a * 3).sum(), (qq, kk, vv), create_graph=True)
        return torch.autograd.grad(sum((g**2).sum() for g in first), (qq, kk, vv))

    def fused(q, k, v):
        with wsss_fast.use_backend(backend):
            return wsss_fast.attention(q, k, v, export="mean")

    got = second_order(fused)
    expected = second_order(lambda q, k, v: ref.attention(q, k, v, export="mean"))
    for name, a, e in zip(("d2q", "d2k", "d2v"), got, expected):
        assert_close(a, e, name=name, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device", FUSED)
def test_torch_compile(backend, device):
    q, k, v = make_qkv(1, 2, 19, 16, seed=6, device=device)

    def model(q, k, v):
        out, rows = wsss_fast.attention(q, k, v, export="rows", num_rows=1)
        return out.sum(1) * 2 + rows.sum()

    with wsss_fast.use_backend(backend):
        compiled = torch.compile(model, backend="aot_eager", fullgraph=(backend == "triton"))
        qc = q.clone().requires_grad_()
        got = compiled(qc, k, v)
        got.sum().backward()
        qe = q.clone().requires_grad_()
        expected = model(qe, k, v)
        expected.sum().backward()
    assert_close(got, expected, name="compiled out")
    assert_close(qc.grad, qe.grad, name="compiled dq")


def test_opcheck_triton_custom_op():
    if (
        wsss_fast._backend.unavailable_reason("triton", "cpu") is not None
        and not torch.cuda.is_available()
    ):
        pytest.fail("triton must be available in the test environment (TRITON_INTERPRET=1 on CPU)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = make_qkv(1, 2, 9, 16, seed=7, device=device)
    for code, rows in ((0, 1), (1, 1), (2, 2)):
        args = (q.requires_grad_(), k, v, 0.25, code, rows, torch.float32)
        torch.library.opcheck(torch.ops.wsss_fast.attention_triton.default, args)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"export": "max"}, ValueError, "export must be one of"),
        ({"export": "rows", "num_rows": 0}, ValueError, r"num_rows must be in \[1, 8\)"),
        ({"export": "rows", "num_rows": 8}, ValueError, "num_rows"),
        ({"export_dtype": torch.int32}, TypeError, "export_dtype must be a float dtype"),
        ({"scale": float("nan")}, ValueError, "scale must be a finite number"),
    ],
    ids=["bad-export", "rows0", "rows-too-many", "int-export", "nan-scale"],
)
def test_invalid_arguments(kwargs, error, match):
    q, k, v = make_qkv(1, 2, 7, 16, seed=0)
    with pytest.raises(error, match=match):
        wsss_fast.attention(q, k, v, **kwargs)


def test_invalid_tensors():
    q, k, v = make_qkv(1, 2, 7, 16, seed=0)
    with pytest.raises(ValueError, match="k has shape"):
        wsss_fast.attention(q, k[:, :, :5], v)
    with pytest.raises(TypeError, match="v is torch.float16 but q is torch.float32"):
        wsss_fast.attention(q, k, v.half())
    with pytest.raises(ValueError, match=r"q must be 4-D \[B, H, N, D\]"):
        wsss_fast.attention(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        wsss_fast.attention(q.numpy(), k, v)


def test_triton_rejects_unsupported_head_dim_and_float64():
    if "triton" not in wsss_fast.available_backends():
        pytest.fail("triton must be available in the test environment")
    q, k, v = make_qkv(1, 2, 7, 24, seed=0)
    with wsss_fast.use_backend("triton"):
        with pytest.raises(ValueError, match=r"head dim D in \(16, 32, 64, 128\), got 24"):
            wsss_fast.attention(q, k, v)
        q, k, v = make_qkv(1, 2, 7, 16, seed=0, dtype=torch.float64)
        with pytest.raises(TypeError, match="float64"):
            wsss_fast.attention(q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [785, 3137])
def test_gpu_vit_shapes_bf16(N):
    q, k, v = make_qkv(2, 12, N, 64, seed=N, dtype=torch.bfloat16, device="cuda")
    with wsss_fast.use_backend("triton"):
        out, a = wsss_fast.attention(q, k, v, export="mean")
    e_out, e_a = ref.attention(q.float(), k.float(), v.float(), export="mean")
    lo = eager_lowp(q, k, v, "mean", 1)
    assert_close(out, e_out.to(torch.float64), name="out", lowp=lo[0])
    assert math.isclose(float(a.sum(-1).mean()), 1.0, rel_tol=1e-3)
