"""propagate on the torch and triton backends against the reference: out, dq, dk, dcam, dweights."""

import importlib

import pytest
import torch
from utils import assert_close, backend_devices, saved_tensors, square_saved

import wsss_fast
from wsss_fast.ops import reference as ref

FUSED = backend_devices("torch", "triton")
prop_module = importlib.import_module("wsss_fast.ops.propagate")

# (L, B, H, N, D, num_prefix, C): odd N, prefix 0 to 20, C from 1 to 81 (COCO + background),
# a head dim that is not a power of two.
SHAPES = [
    pytest.param(1, 2, 2, 5, 16, 1, 3, id="L1-N5-p1-C3"),
    pytest.param(3, 2, 2, 37, 16, 2, 21, id="L3-N37-p2-C21"),
    pytest.param(3, 1, 2, 67, 24, 20, 81, id="L3-N67-p20-C81-D24"),
    pytest.param(1, 2, 3, 37, 16, 0, 1, id="L1-N37-p0-C1"),
]
CPU_DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    # The Triton interpreter mis-computes bfloat16 dots (triton-lang/triton#11584): GPU only.
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu),
]


def make_qk(L, B, H, N, D, *, seed, dtype=torch.float32, device="cpu", layout="stacked"):
    """q, k of L layers, as permuted views of fused [B, N, 3, H, D] qkv projections.

    layout: "stacked" gives [L, B, H, N, D] views of one [L, B, N, 3, H, D] tensor; "list" gives
    L separate tensors [B, H, N, D], each from its own projection (captured layers).
    """
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(L, B, N, 3, H, D, generator=g) * 1.5).to(device, dtype)
    if layout == "stacked":
        qkv = qkv.permute(3, 0, 1, 4, 2, 5)  # [3, L, B, H, N, D]
        return qkv[0], qkv[1]
    layers = [qkv[layer].clone().permute(2, 0, 3, 1, 4) for layer in range(L)]
    return [t[0] for t in layers], [t[1] for t in layers]


def make_cam(B, C, Np, *, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, Np, generator=g).to(device, dtype)


def layers_of(x):
    return list(x) if isinstance(x, (list, tuple)) else list(x.unbind(0))


def eager_lowp(q, k, cam, num_prefix, weights, scale=None):
    """The reference's computation done by PyTorch in q's dtype (the error yardstick)."""
    q, k = torch.stack(layers_of(q)), torch.stack(layers_of(k))
    L = q.shape[0]
    w = torch.full((L,), 1.0 / L, dtype=q.dtype) if weights is None else weights.to(q.dtype)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    p = torch.softmax(q @ k.transpose(-2, -1) * s, dim=-1)
    a = (w[:, None, None, None] * p.mean(2)).sum(0)[:, num_prefix:, num_prefix:]
    return torch.einsum("bmn,bcn->bcm", a, cam.to(q.dtype))


def run_with_grads(fn, q, k, cam, weights, dout):
    """out of fn and the gradients of sum(out * dout) by name (dweights only for a tensor)."""
    stacked = isinstance(q, torch.Tensor)
    qs = q.detach().requires_grad_() if stacked else [t.detach().requires_grad_() for t in q]
    ks = k.detach().requires_grad_() if stacked else [t.detach().requires_grad_() for t in k]
    cam = cam.detach().requires_grad_()
    inputs = {"cam": cam}
    if weights is not None:
        weights = weights.detach().requires_grad_()
        inputs["dweights"] = weights
    out = fn(qs, ks, cam, weights)
    leaves = [*(qs if not stacked else [qs]), *(ks if not stacked else [ks]), *inputs.values()]
    grads = torch.autograd.grad((out.double() * dout).sum(), leaves)
    n = 1 if stacked else len(qs)
    named = {"dq": torch.stack(grads[:n]) if not stacked else grads[0]}
    named["dk"] = torch.stack(grads[n : 2 * n]) if not stacked else grads[1]
    named["dcam"] = grads[2 * n]
    if weights is not None:
        named["dweights"] = grads[2 * n + 1]
    return out.detach(), named


def on_backend(backend, num_prefix, **kwargs):
    def fn(q, k, cam, weights):
        with wsss_fast.use_backend(backend):
            return wsss_fast.propagate(q, k, cam, num_prefix=num_prefix, weights=weights, **kwargs)

    return fn


def reference_fn(num_prefix, **kwargs):
    def fn(q, k, cam, weights):
        q5 = torch.stack(layers_of(q)).double()
        k5 = torch.stack(layers_of(k)).double()
        w = None if weights is None else weights.double()
        return ref.propagate(q5, k5, cam.double(), num_prefix=num_prefix, weights=w, **kwargs)

    return fn


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("custom_weights", [False, True], ids=["mean-layers", "weighted"])
@pytest.mark.parametrize("L,B,H,N,D,num_prefix,C", SHAPES)
def test_matches_reference(backend, device, dtype, custom_weights, L, B, H, N, D, num_prefix, C):
    seed = N + C + L
    layout = "list" if custom_weights else "stacked"
    q, k = make_qk(L, B, H, N, D, seed=seed, dtype=dtype, device=device, layout=layout)
    cam = make_cam(B, C, N - num_prefix, seed=seed, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    weights = (torch.rand(L, generator=g) + 0.2).to(device, dtype) if custom_weights else None
    dout = torch.randn(cam.shape, generator=g, dtype=torch.float64).to(device)

    out, grads = run_with_grads(on_backend(backend, num_prefix), q, k, cam, weights, dout)
    exp_out, exp_grads = run_with_grads(reference_fn(num_prefix), q, k, cam, weights, dout)
    assert out.shape == cam.shape and out.dtype == dtype
    assert set(grads) == set(exp_grads)
    if dtype == torch.float32:
        assert_close(out, exp_out.float(), name="out")
        for name, a in grads.items():
            assert_close(a, exp_grads[name].float(), name=name)
        return
    low_out, low_grads = run_with_grads(
        lambda q, k, cam, w: eager_lowp(q, k, cam, num_prefix, w), q, k, cam, weights, dout
    )
    assert_close(out, exp_out, name="out", lowp=low_out)
    for name, a in grads.items():
        assert a.dtype == dtype, name
        assert_close(a, exp_grads[name], name=name, lowp=low_grads[name])


@pytest.mark.parametrize("backend,device", FUSED)
def test_large_awkward_size(backend, device):
    # N = 217: a 224 crop with 20 class tokens and one more token past every block boundary.
    L, B, H, N, D, p, C = 2, 1, 2, 217, 16, 20, 21
    q, k = make_qk(L, B, H, N, D, seed=3, dtype=torch.float16, device=device)
    cam = make_cam(B, C, N - p, seed=3, dtype=torch.float16, device=device)
    dout = torch.randn(cam.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out, grads = run_with_grads(on_backend(backend, p), q, k, cam, None, dout)
    exp_out, exp_grads = run_with_grads(reference_fn(p), q, k, cam, None, dout)
    low_out, low_grads = run_with_grads(
        lambda q, k, cam, w: eager_lowp(q, k, cam, p, w), q, k, cam, None, dout
    )
    assert_close(out, exp_out, name="out", lowp=low_out)
    for name, a in grads.items():
        assert_close(a, exp_grads[name], name=name, lowp=low_grads[name])


@pytest.mark.parametrize("backend,device", FUSED)
def test_mixed_dtypes_and_layer_strides(backend, device):
    """float16 q, k with a float32 CAM; layers with different strides (one contiguous)."""
    L, B, H, N, D, p, C = 2, 2, 2, 23, 16, 1, 5
    q, k = make_qk(L, B, H, N, D, seed=5, dtype=torch.float16, device=device, layout="list")
    q[1], k[0] = q[1].contiguous(), k[0].contiguous()
    cam = make_cam(B, C, N - p, seed=5, device=device)
    with wsss_fast.use_backend(backend):
        out = wsss_fast.propagate(q, k, cam, num_prefix=p, scale=0.3)
    expected = reference_fn(p, scale=0.3)(q, k, cam, None)
    assert out.dtype == torch.float32
    if backend == "torch":  # computes in float32 from the float16 inputs as given
        assert_close(out, expected.float(), name="out")
    else:  # the triton kernels compute the products with the CAM at q's precision
        lowp = eager_lowp(q, k, cam, p, None, scale=0.3)
        assert_close(out.half(), expected, name="out", lowp=lowp)


def test_triton_split_over_layers_and_heads():
    """The forward's (l, h) split into float32 partial outputs (used on big GPUs) is exact."""
    if "triton" not in wsss_fast.available_backends():
        pytest.fail("triton must be available in the test environment (TRITON_INTERPRET=1 on CPU)")
    from wsss_fast.kernels import affinity as kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = make_qk(3, 2, 2, 19, 16, seed=6, device=device, layout="list")
    cam = make_cam(2, 4, 18, seed=6, device=device)
    w = torch.tensor([0.2, 0.5, 0.3], device=device)
    whole = kernels.propagate_fwd(q, k, cam, w, 1, 0.25, num_splits=1)
    split = kernels.propagate_fwd(q, k, cam, w, 1, 0.25, num_splits=4)
    expected = reference_fn(1, scale=0.25)(q, k, cam, w)
    assert_close(whole, expected.float(), name="out, one split")
    assert_close(split, expected.float(), name="out, four splits")


@pytest.mark.parametrize("backend,device", FUSED)
def test_saves_only_inputs_and_never_stacks_layers(backend, device):
    L, B, H, N, D, p, C = 3, 1, 2, 40, 16, 1, 4
    q, k = make_qk(L, B, H, N, D, seed=0, device=device, layout="list")
    q = [t.requires_grad_() for t in q]
    cam = make_cam(B, C, N - p, seed=0, device=device).requires_grad_()
    with wsss_fast.use_backend(backend), saved_tensors() as log:
        wsss_fast.propagate(q, k, cam, num_prefix=p)
    assert square_saved(log, N) == []
    assert square_saved(log, N - p) == []
    shapes = sorted(tuple(t.shape) for t in log)
    assert shapes == sorted([(B, H, N, D)] * (2 * L) + [(B, C, N - p), (L,)]), shapes
    # The saved layers are the caller's tensors themselves: nothing was stacked or copied.
    saved_ptrs = {t.data_ptr() for t in log}
    assert {t.data_ptr() for t in (*q, *k)} <= saved_ptrs


def test_reference_keeps_n_by_n_probabilities():
    q, k = make_qk(2, 1, 2, 40, 16, seed=0)
    q.requires_grad_()
    with saved_tensors() as log:
        ref.propagate(q, k, make_cam(1, 4, 39, seed=0), num_prefix=1)
    assert square_saved(log, 40)


def test_torch_backend_chunking_bounds_rows(monkeypatch):
    q, k = make_qk(2, 2, 2, 29, 16, seed=7)
    cam = make_cam(2, 3, 28, seed=7)
    w = torch.tensor([0.7, 0.4])
    dout = torch.randn(cam.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    whole, whole_grads = run_with_grads(on_backend("torch", 1), q, k, cam, w, dout)
    monkeypatch.setattr(importlib.import_module("wsss_fast.ops._chunks"), "_budget", 1)
    assert prop_module._chunk_rows(2, 2, 29) == 1
    chunked, chunked_grads = run_with_grads(on_backend("torch", 1), q, k, cam, w, dout)
    assert_close(chunked, whole, name="out")
    for name, a in chunked_grads.items():
        assert_close(a, whole_grads[name], name=name)


def test_gradcheck_torch_backend_float64():
    q, k = make_qk(2, 1, 2, 5, 2, seed=8, dtype=torch.float64)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    cam = make_cam(1, 2, 4, seed=8, dtype=torch.float64).requires_grad_()
    w = torch.tensor([0.3, 0.9], dtype=torch.float64, requires_grad=True)
    fn = on_backend("torch", 1)
    assert torch.autograd.gradcheck(fn, (q, k, cam, w))
    assert torch.autograd.gradgradcheck(fn, (q, k, cam, w))
    # Layers as a sequence are separate autograd inputs.
    assert torch.autograd.gradcheck(lambda *t: fn(list(t[:2]), list(t[2:4]), cam, None), (*q, *k))


@pytest.mark.parametrize("backend,device", FUSED)
def test_double_backward_matches_reference(backend, device):
    q, k = make_qk(2, 1, 2, 11, 16, seed=9, device=device)
    cam = make_cam(1, 3, 10, seed=9, device=device)

    def second_order(fn):
        qq, kk, cc = (t.clone().requires_grad_() for t in (q, k, cam))
        first = torch.autograd.grad((fn(qq, kk, cc) ** 2).sum(), (qq, kk, cc), create_graph=True)
        return torch.autograd.grad(sum((g**2).sum() for g in first), (qq, kk, cc))

    got = second_order(lambda q, k, c: on_backend(backend, 1)(q, k, c, None))
    expected = second_order(lambda q, k, c: ref.propagate(q, k, c, num_prefix=1))
    for name, a, e in zip(("d2q", "d2k", "d2cam"), got, expected):
        assert_close(a, e, name=name, rtol=1e-4)


@pytest.mark.parametrize("backend,device", FUSED)
def test_torch_compile(backend, device):
    q, k = make_qk(2, 1, 2, 11, 16, seed=10, device=device, layout="list")
    cam = make_cam(1, 3, 10, seed=10, device=device)

    def model(q0, q1, k0, k1, cam):
        return wsss_fast.propagate([q0 * 2, q1], [k0, k1], cam, num_prefix=1) * 3

    with wsss_fast.use_backend(backend):
        compiled = torch.compile(model, backend="aot_eager", fullgraph=(backend == "triton"))
        cc = cam.clone().requires_grad_()
        got = compiled(*q, *k, cc)
        got.sum().backward()
        ce = cam.clone().requires_grad_()
        expected = model(*q, *k, ce)
        expected.sum().backward()
    assert_close(got, expected, name="compiled out")
    assert_close(cc.grad, ce.grad, name="compiled dcam")


def test_opcheck_triton_custom_ops():
    if "triton" not in wsss_fast.available_backends():
        pytest.fail("triton must be available in the test environment (TRITON_INTERPRET=1 on CPU)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = make_qk(2, 1, 2, 9, 16, seed=11, device=device, layout="list")
    cam = make_cam(1, 3, 8, seed=11, device=device)
    w = torch.tensor([0.25, 0.75], device=device)
    fwd = torch.ops.wsss_fast.propagate_triton.default
    torch.library.opcheck(
        fwd, ([t.requires_grad_() for t in q], k, cam.requires_grad_(), w, 1, 0.25)
    )
    dout = torch.randn(cam.shape, generator=torch.Generator().manual_seed(0)).to(device)
    bwd = torch.ops.wsss_fast.propagate_triton_backward.default
    q = [t.detach() for t in q]
    torch.library.opcheck(bwd, (q, k, cam.detach(), w, dout, 1, 0.25))


@pytest.fixture(scope="module")
def deit_capture():
    """A patched timm DeiT-Tiny at a 48 crop (N = 10: 9 patches and a class token) and what
    ``capture(model, export="mean", keep_qkv=True)`` recorded on two images."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=48)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that attention is far from uniform
        for name, t in model.named_parameters():
            if t.dim() == 1 and name.endswith("weight"):  # norm scales
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
    wsss_fast.patch_timm(model.eval())
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), wsss_fast.capture(model, export="mean", keep_qkv=True) as cap:
        model(images)
    return model, cap


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_real_timm_deit_equals_mean_of_captured_affinities(backend, deit_capture):
    """On a patched DeiT, propagate over the captured q, k of the first layers equals
    ``mean_l (captured head-mean affinity)[:, p:, p:] @ cam``."""
    model, cap = deit_capture
    p, shallow = model.num_prefix_tokens, 7
    assert max(float(a.max()) for a in cap.exports) > 0.5, "attention should be peaked"
    cam = make_cam(2, 21, 9, seed=2)
    affinity = torch.stack(cap.exports[:shallow]).mean(0)[:, p:, p:]
    expected = torch.einsum("bmn,bcn->bcm", affinity.double(), cam.double())
    with torch.no_grad(), wsss_fast.use_backend(backend):
        got = wsss_fast.propagate(cap.q[:shallow], cap.k[:shallow], cam, num_prefix=p)
    assert_close(got, expected.float(), name="propagated cam")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"num_prefix": 9}, ValueError, r"num_prefix must be in \[0, 9\)"),
        ({"num_prefix": 2}, ValueError, r"cam must be \[B, C, N - num_prefix\]"),
        ({"weights": torch.ones(3)}, ValueError, "weights must have L = 2 entries"),
        ({"scale": float("inf")}, ValueError, "scale must be a finite number"),
    ],
    ids=["prefix-too-large", "cam-shape", "weights-length", "inf-scale"],
)
def test_invalid_arguments(kwargs, error, match):
    q, k = make_qk(2, 1, 2, 9, 16, seed=0)
    kwargs = {"num_prefix": 1, **kwargs}
    with pytest.raises(error, match=match):
        wsss_fast.propagate(q, k, make_cam(1, 3, 8, seed=0), **kwargs)


def test_invalid_layers():
    q, k = make_qk(2, 1, 2, 9, 16, seed=0, layout="list")
    cam = make_cam(1, 3, 8, seed=0)
    with pytest.raises(ValueError, match="q has 2 layers but k has 1"):
        wsss_fast.propagate(q, k[:1], cam, num_prefix=1)
    with pytest.raises(ValueError, match=r"q\[1\] has shape"):
        wsss_fast.propagate([q[0], q[1][:, :, :5]], k, cam, num_prefix=1)
    with pytest.raises(ValueError, match="empty sequence of layers"):
        wsss_fast.propagate([], k, cam, num_prefix=1)
    with pytest.raises(ValueError, match=r"q must be 5-D \[L, B, H, N, D\]"):
        wsss_fast.propagate(q[0], k[0], cam, num_prefix=1)


def test_triton_rejects_float64_and_too_many_classes():
    if "triton" not in wsss_fast.available_backends():
        pytest.fail("triton must be available in the test environment")
    q, k = make_qk(1, 1, 2, 9, 16, seed=0)
    with wsss_fast.use_backend("triton"):
        with pytest.raises(ValueError, match="at most 128 CAM channels, got C = 129"):
            wsss_fast.propagate(q, k, make_cam(1, 129, 8, seed=0), num_prefix=1)
        with pytest.raises(TypeError, match="float64"):
            wsss_fast.propagate(q, k, make_cam(1, 3, 8, seed=0, dtype=torch.float64), num_prefix=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_aream_shape(dtype):
    # DeiT-S, 7 shallow layers, 20 class tokens, a 448 crop (N = 804), VOC's 21 CAM channels.
    L, B, H, N, D, p, C = 7, 4, 6, 804, 64, 20, 21
    q, k = make_qk(L, B, H, N, D, seed=12, dtype=dtype, device="cuda", layout="list")
    cam = make_cam(B, C, N - p, seed=12, dtype=dtype, device="cuda")
    dout = torch.randn(cam.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    dout = dout.cuda()
    out, grads = run_with_grads(on_backend("triton", p), q, k, cam, None, dout)
    exp_out, exp_grads = run_with_grads(reference_fn(p), q, k, cam, None, dout)
    low_out, low_grads = run_with_grads(
        lambda q, k, cam, w: eager_lowp(q, k, cam, p, w), q, k, cam, None, dout
    )
    assert_close(out, exp_out, name="out", lowp=low_out)
    for name, a in grads.items():
        assert_close(a, exp_grads[name], name=name, lowp=low_grads[name])
