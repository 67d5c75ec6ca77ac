"""getam_map on the torch and cuda backends against the reference: values, gradients, saved state.

The op computes in float32 (float64) whatever the input dtype and returns float32 (float64), so
its float32 map is held to the tight float32 tolerance against the float64 reference evaluated on
the same (rounded) inputs. Gradients come back in the input dtype; float16/bfloat16 gradients
follow the low-precision policy of tests/utils.py, where PyTorch's own error is the rounding of
the float32 result (the reference, too, computes in float32 and rounds once).
"""

import pytest
import torch
from utils import assert_close, backend_devices, saved_tensors, square_saved

import wsss_fast
from wsss_fast import _ext
from wsss_fast.ops import reference as ref

FUSED = backend_devices("torch", "cuda")
NAMES = ("q", "k", "v", "grad_out")

# (L, B, H, N, D, row, ndim): ndim 4 means [B, H, N, D] inputs (L must be 1). N from 1 to 257,
# rows first and last, D = 6 (no 16-byte vectors), 16, 64 and 128.
CASES = [
    pytest.param(1, 1, 1, 1, 16, 0, 4, id="N1-H1-D16-4d"),
    pytest.param(1, 2, 3, 5, 16, 4, 4, id="N5-H3-D16-last-4d"),
    pytest.param(3, 2, 3, 5, 64, 0, 5, id="L3-N5-H3-D64"),
    pytest.param(1, 2, 12, 197, 64, 0, 4, id="N197-H12-D64-4d"),
    pytest.param(3, 1, 12, 197, 16, 196, 5, id="L3-N197-H12-D16-last"),
    pytest.param(1, 1, 1, 257, 64, 0, 5, id="L1-N257-H1-D64"),
    pytest.param(3, 2, 3, 257, 64, 256, 5, id="L3-N257-H3-D64-last"),
    pytest.param(1, 1, 12, 257, 16, 0, 4, id="N257-H12-D16-4d"),
    pytest.param(3, 1, 3, 33, 6, 7, 5, id="L3-N33-H3-D6"),
    pytest.param(1, 2, 2, 70, 128, 69, 4, id="N70-H2-D128-last-4d"),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]


def make_inputs(L, B, H, N, D, *, ndim=5, row=0, seed=0, dtype=torch.float32, device="cpu"):
    """q, k, v, grad_out ``[L, B, H, N, D]`` (or ``[B, H, N, D]`` for ndim=4, L = 1).

    v is nudged so that no ``g = grad_out[row] . v[n]`` lies within 0.2 of relu's kink: there the
    gradient jumps, and backends that round differently would pick different sides.
    """
    assert ndim == 5 or L == 1
    g = torch.Generator().manual_seed(seed)
    q, k, v, go = (torch.randn(L, B, H, N, D, generator=g, dtype=torch.float64) for _ in range(4))
    go_row = go[..., row : row + 1, :]
    gdot = (go_row * v).sum(-1, keepdim=True)
    unit = go_row / go_row.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    near = gdot.abs() < 0.2
    v = v + near * torch.where(gdot >= 0, 1.0, -1.0) * 0.4 * unit
    out = [t.to(device, dtype) for t in (q, k, v, go)]
    return [t[0] for t in out] if ndim == 4 else out


def call(backend, *inputs, **kwargs):
    with wsss_fast.use_backend(backend):
        return wsss_fast.getam_map(*inputs, **kwargs)


def reference_grads(inputs, weight, **kwargs):
    """The reference's map and its gradients, in float64, on the same input values."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out = ref.getam_map(*leaves, **kwargs)
    grads = torch.autograd.grad((out * weight.double()).sum(), leaves)
    return out.detach(), grads


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,B,H,N,D,row,ndim", CASES)
def test_forward_and_grads_match_reference(backend, device, dtype, L, B, H, N, D, row, ndim):
    for seed in (0, 1):
        inputs = make_inputs(L, B, H, N, D, ndim=ndim, row=row, seed=seed, dtype=dtype)
        inputs = [t.to(device).requires_grad_() for t in inputs]
        weight = torch.randn(B, N, generator=torch.Generator().manual_seed(seed + 7)).to(device)
        out = call(backend, *inputs, row=row)
        assert out.shape == (B, N) and out.dtype == torch.float32 and out.device.type == device
        grads = torch.autograd.grad((out * weight).sum(), inputs)
        expected, expected_grads = reference_grads(inputs, weight, row=row)
        assert_close(out, expected.float(), name=f"{backend} map seed {seed}")
        for name, got, want in zip(NAMES, grads, expected_grads):
            assert got.dtype == dtype
            if dtype == torch.float32:
                want = want.float()
            assert_close(got, want, name=f"{backend} d{name} seed {seed}")


@pytest.mark.parametrize("backend,device", FUSED)
def test_explicit_scale_and_default_scale(backend, device):
    inputs = make_inputs(2, 2, 3, 19, 16, row=3, seed=4, device=device)
    for scale in (None, 0.37):
        out = call(backend, *inputs, scale=scale, row=3)
        want = ref.getam_map(*(t.double() for t in inputs), scale=scale, row=3)
        assert_close(out, want.float(), name=f"map scale={scale}")


@pytest.mark.parametrize("backend,device", FUSED)
def test_non_contiguous_inputs(backend, device):
    base = make_inputs(2, 2, 3, 45, 16, row=5, seed=3, device=device)
    # Same values, stored with N and D swapped; q with a stride of 2 along D.
    strided = [t.transpose(-2, -1).contiguous().transpose(-2, -1) for t in base]
    strided[0] = torch.stack([base[0], torch.zeros_like(base[0])], dim=-1)[..., 0]
    assert not any(t.is_contiguous() for t in strided)
    leaves = [t.requires_grad_() for t in strided]
    weight = torch.randn(2, 45, generator=torch.Generator().manual_seed(1)).to(device)
    out = call(backend, *leaves, row=5)
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    expected, expected_grads = reference_grads(base, weight, row=5)
    assert_close(out, expected.float(), name="map")
    for name, got, want in zip(NAMES, grads, expected_grads):
        assert_close(got, want.float(), name=f"d{name}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_cuda_backend_grads_match_torch_backend(device):
    if wsss_fast._backend.unavailable_reason("cuda", device):
        pytest.skip(wsss_fast._backend.unavailable_reason("cuda", device))
    inputs = make_inputs(3, 2, 12, 197, 64, row=0, seed=5, device=device)
    weight = torch.randn(2, 197, generator=torch.Generator().manual_seed(2)).to(device)
    results = {}
    for backend in ("torch", "cuda"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = call(backend, *leaves)
        results[backend] = (out, torch.autograd.grad((out * weight).sum(), leaves))
    assert_close(results["cuda"][0], results["torch"][0], name="map")
    for name, got, want in zip(NAMES, results["cuda"][1], results["torch"][1]):
        assert_close(got, want, name=f"d{name}")


def test_gradcheck_and_gradgradcheck_torch_backend_float64():
    for ndim, L in ((4, 1), (5, 2)):
        inputs = make_inputs(L, 2, 2, 6, 3, ndim=ndim, row=1, seed=ndim)
        leaves = tuple(t.double().requires_grad_() for t in inputs)
        with wsss_fast.use_backend("torch"):
            fn = lambda *x: wsss_fast.getam_map(*x, scale=0.8, row=1)  # noqa: E731
            assert torch.autograd.gradcheck(fn, leaves)
            assert torch.autograd.gradgradcheck(fn, leaves)


def test_second_order_torch_backend_matches_reference():
    # GETAM trains through the map: the gradient of a function of the first-order gradients.
    inputs = [t.double() for t in make_inputs(2, 2, 3, 11, 8, row=0, seed=6)]
    weight = torch.randn(2, 11, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = {}
    for name, fn in (("reference", ref.getam_map), ("torch", None)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = call("torch", *leaves) if fn is None else fn(*leaves)
        first = torch.autograd.grad((out * weight).sum(), leaves, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in first)
        results[name] = torch.autograd.grad(penalty, leaves)
    for name, got, want in zip(NAMES, results["torch"], results["reference"]):
        assert_close(got, want, name=f"second-order d{name}")


def test_gradcheck_cuda_backend_float64_cpu():
    # The compiled op takes float64 on the CPU too; first order only.
    if wsss_fast._backend.unavailable_reason("cuda", "cpu"):
        pytest.skip(wsss_fast._backend.unavailable_reason("cuda", "cpu"))
    inputs = make_inputs(2, 2, 2, 6, 3, row=2, seed=8)
    leaves = tuple(t.double().requires_grad_() for t in inputs)
    with wsss_fast.use_backend("cuda"):
        assert torch.autograd.gradcheck(
            lambda *x: wsss_fast.getam_map(*x, scale=0.8, row=2), leaves
        )


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_op_float64(device):
    assert _ext.loaded(), _ext.load_error()
    inputs = [t.double() for t in make_inputs(3, 2, 5, 37, 16, row=36, seed=9, device=device)]
    out = torch.ops.wsss_fast.getam_map_forward(*inputs, 0.3, 36)
    assert out.dtype == torch.float64
    assert_close(out, ref.getam_map(*inputs, scale=0.3, row=36), name="map")


@pytest.mark.parametrize("backend,device", backend_devices("cuda"))
def test_cuda_backend_refuses_create_graph(backend, device):
    leaves = [t.requires_grad_() for t in make_inputs(1, 1, 2, 9, 16, device=device)]
    out = call(backend, *leaves)
    with pytest.raises(wsss_fast.BackendNotImplementedError, match="use_backend\\('torch'\\)"):
        torch.autograd.grad(out.sum(), leaves, create_graph=True)


@pytest.mark.parametrize("backend,device", FUSED)
def test_nothing_n_by_n_is_saved(backend, device):
    N = 40  # != D, so a saved [.., N, D] input is not mistaken for N x N
    leaves = [t.requires_grad_() for t in make_inputs(2, 1, 3, N, 16, device=device)]
    with saved_tensors() as log:
        out = call(backend, *leaves)
    assert log, "nothing saved: the op would not be differentiable"
    assert square_saved(log, N) == []
    if backend == "cuda":
        inputs = {t.untyped_storage().data_ptr() for t in leaves}
        extra = [tuple(t.shape) for t in log if t.untyped_storage().data_ptr() not in inputs]
        assert extra == [], f"cuda saved tensors beyond q, k, v, grad_out: {extra}"
    torch.autograd.grad(out.sum(), leaves)  # what was saved suffices


def test_reference_keeps_n_by_n_attention():
    # The contrast that makes the test above meaningful: eager autograd keeps N x N tensors.
    leaves = [t.requires_grad_() for t in make_inputs(2, 1, 3, 40, 16)]
    with saved_tensors() as log:
        ref.getam_map(*leaves)
    assert square_saved(log, 40)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_registered_ops(device, dtype):
    assert _ext.loaded(), _ext.load_error()
    inputs = make_inputs(2, 2, 3, 21, 16, row=20, seed=4, dtype=dtype, device=device)
    torch.library.opcheck(
        torch.ops.wsss_fast.getam_map_forward.default,
        (*(t.clone().requires_grad_() for t in inputs), 0.25, 20),
    )
    grad = torch.randn(2, 21, generator=torch.Generator().manual_seed(0)).to(device)
    torch.library.opcheck(torch.ops.wsss_fast.getam_map_backward.default, (grad, *inputs, 0.25, 20))


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", FUSED)
def test_large_awkward_size(backend, device):
    # ViT-B at 448 px with stride 16 plus the class token: N = 785, H = 12, D = 64.
    inputs = make_inputs(2, 1, 12, 785, 64, seed=10, device=device)
    out = call(backend, *inputs)
    assert_close(out, ref.getam_map(*(t.double() for t in inputs)).float(), name="map")


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda t: (t[0], t[1][..., :-1], t[2], t[3]), ValueError, "k has shape"),
        (lambda t: (t[0], t[1], t[2].half(), t[3]), TypeError, "v is torch.float16"),
        (lambda t: (t[0][0, 0], t[1], t[2], t[3]), ValueError, "q must be 4-D or 5-D"),
        (lambda t: (t[0], t[1], t[2], t[3].long()), TypeError, "dtype torch.int64"),
    ],
    ids=["shape", "dtype-mismatch", "3-D", "int"],
)
def test_invalid_inputs_raise_clear_errors(mutate, error, match):
    inputs = mutate(make_inputs(1, 2, 3, 9, 16))
    with pytest.raises(error, match=match):
        wsss_fast.getam_map(*inputs)


@pytest.mark.parametrize("row", [-1, 9])
def test_row_out_of_range(row):
    with pytest.raises(ValueError, match=r"row must be in \[0, 9\)"):
        wsss_fast.getam_map(*make_inputs(1, 2, 3, 9, 16), row=row)


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize(
    "where",
    [
        pytest.param(("v", (0, 0, 1, 3, 2)), id="v-one-token"),
        pytest.param(("grad_out", (1, 1, 0, 0, 5)), id="grad_out-row"),
        pytest.param(("k", (2, 0, 2, 7, 0)), id="k-one-key"),
    ],
)
def test_nan_inputs_give_nan_where_the_reference_does(backend, device, where):
    # relu(NaN) is NaN in torch, so NaN reaches the map and its gradients; a kernel whose relu
    # is `x > 0 ? x : 0` returned finite numbers instead.
    inputs = make_inputs(3, 2, 3, 11, 16, seed=6)
    name, index = where
    inputs[NAMES.index(name)][index] = float("nan")
    inputs = [t.to(device).requires_grad_() for t in inputs]
    weight = torch.randn(2, 11, generator=torch.Generator().manual_seed(3)).to(device)
    out = call(backend, *inputs)
    expected = ref.getam_map(*(t.detach().double() for t in inputs))
    assert expected.isnan().any() and not expected.isnan().all()  # the case is not degenerate
    assert torch.equal(out.isnan().cpu(), expected.isnan().cpu()), f"{backend} map NaN pattern"
    finite = ~expected.isnan()
    assert_close(out[finite], expected[finite].float(), name=f"{backend} finite map")
    if backend != "torch":
        # The gradients' NaN follow torch's relu backward (NaN passes), as autograd of the torch
        # backend computes them; the reference's differ outside `row`, where it differentiates
        # the NaN softmax of every row it materialised.
        grads = torch.autograd.grad((out * weight).sum(), inputs)
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        torch_grads = torch.autograd.grad((call("torch", *leaves) * weight).sum(), leaves)
        for n, got, want in zip(NAMES, grads, torch_grads):
            assert torch.equal(got.isnan(), want.isnan()), f"{backend} d{n} NaN pattern"
