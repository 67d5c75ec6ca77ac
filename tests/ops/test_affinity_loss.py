"""affinity_loss on the torch and triton backends against the reference: loss, dq and dk."""

import importlib

import pytest
import torch
from utils import assert_close, backend_devices, saved_tensors, square_saved

import wsss_fast
from wsss_fast.ops import reference as ref

FUSED = backend_devices("torch", "triton")
# The package re-exports the function under the module's name; fetch the module itself.
loss_module = importlib.import_module("wsss_fast.ops.affinity_loss")

# (B, H, N, D, num_prefix): odd N, prefix 0 to 20, a head dim that is not a power of two.
SHAPES = [
    pytest.param(2, 2, 5, 16, 1, id="N5-p1"),
    pytest.param(2, 3, 37, 16, 0, id="N37-p0"),
    pytest.param(2, 2, 37, 16, 2, id="N37-p2"),
    pytest.param(1, 2, 67, 24, 20, id="N67-p20-D24"),
]
LABELS = ["mixed", "one-class", "all-ignored"]
CPU_DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    # The Triton interpreter mis-computes bfloat16 dots (triton-lang/triton#11584): GPU only.
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu),
]


def make_qk(B, H, N, D, *, seed, dtype=torch.float32, device="cpu", fused_layout=True):
    """q, k with head-mean logits of order 1; fused_layout gives the permuted views of a
    [B, N, 3, H, D] qkv projection that timm hands to attention."""
    g = torch.Generator().manual_seed(seed)
    if fused_layout:
        qkv = torch.randn(B, N, 3, H, D, generator=g) * 1.5
        qkv = qkv.to(device, dtype).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1]
    return [(torch.randn(B, H, N, D, generator=g) * 1.5).to(device, dtype) for _ in range(2)]


def make_labels(B, Np, *, seed, kind="mixed", device="cpu"):
    """int64 token labels: VOC-like class ids with about half the tokens ignored (255)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "all-ignored":
        return torch.full((B, Np), 255, device=device)
    classes = torch.tensor([0, 7, 20]) if kind == "mixed" else torch.tensor([4])
    labels = classes[torch.randint(0, len(classes), (B, Np), generator=g)]
    ignored = torch.rand(B, Np, generator=g) < (0.5 if kind == "mixed" else 0.3)
    return torch.where(ignored, 255, labels).to(device)


def eager_lowp(q, k, labels, num_prefix):
    """The reference's computation done by PyTorch in q's dtype (the error yardstick)."""
    s = q.shape[-1] ** -0.5
    z = torch.sigmoid((q @ k.transpose(-2, -1)).mean(1) * s)[:, num_prefix:, num_prefix:]
    same = labels[:, :, None] == labels[:, None, :]
    valid = (labels != 255)[:, :, None] & (labels != 255)[:, None, :]
    pos, neg = (same & valid).to(q.dtype), (~same & valid).to(q.dtype)
    return 0.5 * (pos * (1 - z)).sum() / (pos.sum() + 1) + 0.5 * (neg * z).sum() / (neg.sum() + 1)


def loss_and_grads(fn, q, k):
    q, k = (t.detach().requires_grad_() for t in (q, k))
    loss = fn(q, k)
    return loss.detach(), torch.autograd.grad(loss, (q, k))


def on_backend(backend, labels, num_prefix, **kwargs):
    def fn(q, k):
        with wsss_fast.use_backend(backend):
            return wsss_fast.affinity_loss(q, k, labels, num_prefix=num_prefix, **kwargs)

    return fn


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("kind", LABELS)
@pytest.mark.parametrize("B,H,N,D,num_prefix", SHAPES)
def test_matches_reference(backend, device, dtype, kind, B, H, N, D, num_prefix):
    seed = N + num_prefix
    q, k = make_qk(B, H, N, D, seed=seed, dtype=dtype, device=device, fused_layout=(N % 2 == 1))
    labels = make_labels(B, N - num_prefix, seed=seed, kind=kind, device=device)
    loss, grads = loss_and_grads(on_backend(backend, labels, num_prefix), q, k)
    exp_loss, exp_grads = loss_and_grads(
        lambda q, k: ref.affinity_loss(q.double(), k.double(), labels, num_prefix=num_prefix),
        q,
        k,
    )
    assert loss.shape == () and loss.dtype == torch.float32
    # The loss is accumulated in float32 from the inputs as given, whatever their dtype.
    assert_close(loss, exp_loss.float(), name="loss")
    if kind == "all-ignored":
        assert loss.item() == 0.0
        for name, g in zip(("dq", "dk"), grads):
            assert torch.isfinite(g).all() and not g.any(), f"{name} must be exactly zero"
        return
    assert grads[0].abs().max() > 0, "the case must have a gradient for the test to mean anything"
    if dtype == torch.float32:
        for name, a, e in zip(("dq", "dk"), grads, exp_grads):
            assert_close(a, e.float(), name=name)
        return
    _, low_grads = loss_and_grads(lambda q, k: eager_lowp(q, k, labels, num_prefix), q, k)
    for name, a, e, lo in zip(("dq", "dk"), grads, exp_grads, low_grads):
        assert a.dtype == dtype
        assert_close(a, e, name=name, lowp=lo)


@pytest.mark.parametrize("backend,device", FUSED)
def test_large_awkward_size(backend, device):
    # N = 197 (a 224 crop with a class token): Np = 196 is no multiple of 64, 32 or 16 + 1.
    q, k = make_qk(2, 2, 197, 16, seed=3, dtype=torch.float16, device=device)
    labels = make_labels(2, 196, seed=3, device=device)
    loss, grads = loss_and_grads(on_backend(backend, labels, 1), q, k)
    exp_loss, exp_grads = loss_and_grads(
        lambda q, k: ref.affinity_loss(q.double(), k.double(), labels, num_prefix=1), q, k
    )
    _, low_grads = loss_and_grads(lambda q, k: eager_lowp(q, k, labels, 1), q, k)
    assert_close(loss, exp_loss.float(), name="loss")
    for name, a, e, lo in zip(("dq", "dk"), grads, exp_grads, low_grads):
        assert_close(a, e, name=name, lowp=lo)


@pytest.mark.parametrize("backend,device", FUSED)
def test_custom_scale_and_prefix_gradients_are_zero(backend, device):
    q, k = make_qk(2, 2, 9, 16, seed=4, device=device)
    labels = make_labels(2, 7, seed=4, device=device)
    loss, (dq, dk) = loss_and_grads(on_backend(backend, labels, 2, scale=0.7), q, k)
    exp_loss, exp_grads = loss_and_grads(
        lambda q, k: ref.affinity_loss(q.double(), k.double(), labels, num_prefix=2, scale=0.7),
        q,
        k,
    )
    assert_close(loss, exp_loss.float(), name="loss")
    assert_close(dq, exp_grads[0].float(), name="dq")
    assert_close(dk, exp_grads[1].float(), name="dk")
    assert not dq[:, :, :2].any() and not dk[:, :, :2].any()


def test_pair_counts_closed_form():
    labels = make_labels(3, 50, seed=5)
    n_pos, n_neg = loss_module.pair_counts(labels)
    pos = neg = 0
    for row in labels.tolist():
        for a in row:
            for b in row:
                if a != 255 and b != 255:
                    pos += a == b
                    neg += a != b
    assert (int(n_pos), int(n_neg)) == (pos, neg)
    assert n_pos.dtype == torch.int64


@pytest.mark.parametrize("backend,device", FUSED)
def test_saves_only_q_k_and_labels(backend, device):
    B, H, N, D, p = 1, 2, 40, 16, 1
    q, k = (
        t.requires_grad_() for t in make_qk(B, H, N, D, seed=0, device=device, fused_layout=False)
    )
    labels = make_labels(B, N - p, seed=0, device=device)
    with wsss_fast.use_backend(backend), saved_tensors() as log:
        wsss_fast.affinity_loss(q, k, labels, num_prefix=p)
    assert square_saved(log, N) == []
    assert square_saved(log, N - p) == []
    shapes = sorted(tuple(t.shape) for t in log)
    assert shapes == sorted([(B, H, N, D)] * 2 + [(B, N - p)]), shapes


def test_reference_keeps_patch_by_patch_tensors():
    # The contrast that makes the test above able to fail: the eager loss keeps [B, Np, Np].
    q, k = (t.requires_grad_() for t in make_qk(1, 2, 40, 16, seed=0))
    with saved_tensors() as log:
        ref.affinity_loss(q, k, make_labels(1, 39, seed=0), num_prefix=1)
    assert square_saved(log, 39)


def test_torch_backend_chunking_bounds_rows(monkeypatch):
    q, k = make_qk(2, 2, 29, 16, seed=6)
    labels = make_labels(2, 28, seed=6)
    whole, whole_grads = loss_and_grads(on_backend("torch", labels, 1), q, k)
    monkeypatch.setattr(importlib.import_module("wsss_fast.ops._chunks"), "_budget", 1)
    assert loss_module._chunk_rows(2, 28) == 1
    chunked, chunked_grads = loss_and_grads(on_backend("torch", labels, 1), q, k)
    assert_close(chunked, whole, name="loss")
    for name, a, e in zip(("dq", "dk"), chunked_grads, whole_grads):
        assert_close(a, e, name=name)


@pytest.mark.parametrize("num_prefix", [0, 2], ids=lambda p: f"prefix{p}")
def test_gradcheck_torch_backend_float64(num_prefix):
    q, k = (t.double().requires_grad_() for t in make_qk(2, 2, 7, 3, seed=7))
    fn = on_backend("torch", make_labels(2, 7 - num_prefix, seed=7), num_prefix)
    assert torch.autograd.gradcheck(fn, (q, k))
    assert torch.autograd.gradgradcheck(fn, (q, k))


@pytest.mark.parametrize("backend,device", FUSED)
def test_double_backward_matches_reference(backend, device):
    q, k = make_qk(1, 2, 13, 16, seed=8, device=device)
    labels = make_labels(1, 12, seed=8, device=device)

    def second_order(fn):
        qq, kk = (t.clone().requires_grad_() for t in (q, k))
        first = torch.autograd.grad(fn(qq, kk), (qq, kk), create_graph=True)
        return torch.autograd.grad(sum((g**2).sum() for g in first), (qq, kk))

    got = second_order(on_backend(backend, labels, 1))
    expected = second_order(lambda q, k: ref.affinity_loss(q, k, labels, num_prefix=1))
    for name, a, e in zip(("d2q", "d2k"), got, expected):
        assert_close(a, e, name=name, rtol=1e-4)


@pytest.mark.parametrize("backend,device", FUSED)
def test_torch_compile(backend, device):
    q, k = make_qk(1, 2, 11, 16, seed=9, device=device)
    labels = make_labels(1, 10, seed=9, device=device)

    def model(q, k):
        return wsss_fast.affinity_loss(q * 2, k, labels, num_prefix=1) * 3

    with wsss_fast.use_backend(backend):
        compiled = torch.compile(model, backend="aot_eager", fullgraph=(backend == "triton"))
        qc = q.clone().requires_grad_()
        got = compiled(qc, k)
        got.backward()
        qe = q.clone().requires_grad_()
        expected = model(qe, k)
        expected.backward()
    assert_close(got, expected, name="compiled loss")
    assert_close(qc.grad, qe.grad, name="compiled dq")


def test_opcheck_triton_custom_ops():
    if "triton" not in wsss_fast.available_backends():
        pytest.fail("triton must be available in the test environment (TRITON_INTERPRET=1 on CPU)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = make_qk(1, 2, 9, 16, seed=10, device=device)
    labels = make_labels(1, 8, seed=10, device=device)
    op = torch.ops.wsss_fast.affinity_loss_triton.default
    torch.library.opcheck(op, (q.requires_grad_(), k, labels, 1, 0.25))
    grad = torch.tensor(1.5, device=device)
    bwd = torch.ops.wsss_fast.affinity_loss_triton_backward.default
    torch.library.opcheck(bwd, (q.detach(), k, labels, grad, 1, 0.25))


def test_real_timm_deit_layers():
    """The loss on q, k captured from a patched DeiT (timm's strides and scale) equals the
    reference on the same tensors, on every backend."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=48, depth=3)
    wsss_fast.patch_timm(model.eval())
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), wsss_fast.capture(model, keep_qkv=True) as cap:
        model(images)
    labels = make_labels(2, 9, seed=11)
    scale = model.blocks[0].attn.scale
    for q, k in zip(cap.q, cap.k):
        expected = ref.affinity_loss(q.double(), k.double(), labels, num_prefix=1, scale=scale)
        for backend in ("torch", "triton"):
            with wsss_fast.use_backend(backend):
                got = wsss_fast.affinity_loss(q, k, labels, num_prefix=1)
            assert_close(got, expected.float(), name=f"loss ({backend})")


@pytest.mark.parametrize(
    "labels,num_prefix,error,match",
    [
        (
            torch.zeros(2, 8, dtype=torch.int64),
            1,
            ValueError,
            r"labels must be \[B, N - num_prefix\]",
        ),
        (torch.zeros(2, 7, dtype=torch.int32), 1, TypeError, "labels has dtype torch.int32"),
        (torch.full((2, 7), -1), 1, ValueError, "labels must be >= 0"),
        (torch.zeros(2, 7, dtype=torch.int64), 8, ValueError, r"num_prefix must be in \[0, 8\)"),
    ],
    ids=["bad-shape", "int32", "negative", "prefix-too-large"],
)
def test_invalid_arguments(labels, num_prefix, error, match):
    q, k = make_qk(2, 2, 8, 16, seed=0)
    with pytest.raises(error, match=match):
        wsss_fast.affinity_loss(q, k, labels, num_prefix=num_prefix)


def test_triton_rejects_float64():
    if "triton" not in wsss_fast.available_backends():
        pytest.fail("triton must be available in the test environment")
    q, k = make_qk(1, 2, 7, 16, seed=0, dtype=torch.float64)
    with wsss_fast.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        wsss_fast.affinity_loss(q, k, make_labels(1, 6, seed=0), num_prefix=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_aream_shape(dtype):
    # DeiT-S at a 448 crop (N = 804 with 20 class tokens), B = 8: n_pos ~ 10^6, where a gradient
    # factor 0.5 / (n_pos + 1) would underflow float16 unless the kernels rescale it.
    q, k = make_qk(8, 6, 804, 64, seed=12, dtype=dtype, device="cuda")
    labels = make_labels(8, 784, seed=12, device="cuda")
    loss, grads = loss_and_grads(on_backend("triton", labels, 20), q, k)
    exp_loss, exp_grads = loss_and_grads(
        lambda q, k: ref.affinity_loss(q.double(), k.double(), labels, num_prefix=20), q, k
    )
    assert_close(loss, exp_loss.float(), name="loss", rtol=1e-5)
    for name, a, e in zip(("dq", "dk"), grads, exp_grads):
        assert_close(a, e, name=name)
