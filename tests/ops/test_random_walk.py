"""random_walk on every backend against the reference: values, gradients, errors, saved state."""

import pytest
import torch
from utils import assert_close, backend_devices, saved_tensors, square_saved

import wsss_fast
from wsss_fast import _ext
from wsss_fast.ops import reference as ref

FUSED = backend_devices("torch", "triton", "cuda")

# (B, M, C, steps, beta): M not a multiple of any block size, C from 1 to 81, steps 0 to 300.
CASES = [
    pytest.param(1, 1, 1, 3, 8.0, id="M1-C1-s3"),
    pytest.param(2, 7, 21, 5, 8.0, id="M7-C21-s5"),
    pytest.param(1, 100, 81, 2, 10.0, id="M100-C81-s2"),
    pytest.param(2, 257, 21, 12, 8.0, id="M257-C21-s12"),
    pytest.param(1, 64, 3, 0, 8.0, id="M64-C3-s0"),
    pytest.param(1, 33, 2, 300, 1.5, id="M33-C2-s300"),
]
DTYPES = [
    pytest.param(torch.float32, torch.float32, id="aff32-cam32"),
    pytest.param(torch.bfloat16, torch.float32, id="aff16b-cam32"),
    pytest.param(torch.float16, torch.float16, id="aff16-cam16"),
    pytest.param(torch.float32, torch.bfloat16, id="aff32-cam16b"),
]


def make_inputs(B, M, C, *, seed, aff_dtype=torch.float32, cam_dtype=torch.float32, device="cpu"):
    """Affinity-like inputs: values in [0, 0.9) with a unit diagonal, some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    aff = torch.rand(B, M, M, generator=g) * 0.9
    aff[torch.rand(B, M, M, generator=g) < 0.1] = 0.0
    aff.diagonal(dim1=1, dim2=2).fill_(1.0)
    cam = torch.rand(B, C, M, generator=g)
    return aff.to(device, aff_dtype), cam.to(device, cam_dtype)


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("aff_dtype,cam_dtype", DTYPES)
@pytest.mark.parametrize("B,M,C,steps,beta", CASES)
def test_forward_matches_reference(backend, device, aff_dtype, cam_dtype, B, M, C, steps, beta):
    for seed in (0, 1):
        aff, cam = make_inputs(
            B, M, C, seed=seed, aff_dtype=aff_dtype, cam_dtype=cam_dtype, device=device
        )
        with wsss_fast.use_backend(backend):
            out = wsss_fast.random_walk(aff, cam, beta=beta, steps=steps)
        assert out.dtype == cam.dtype and out.device == cam.device
        # The oracle sees the same (rounded) input values, computed in float64.
        expected = ref.random_walk(aff.double(), cam.double(), beta=beta, steps=steps)
        if cam_dtype == torch.float32:
            assert_close(out, expected.float(), name=f"{backend} out seed {seed}")
        else:
            assert_close(out, expected, name=f"{backend} out seed {seed}")


@pytest.mark.parametrize("backend,device", FUSED)
def test_non_contiguous_inputs(backend, device):
    aff, cam = make_inputs(2, 45, 5, seed=3, device=device)
    aff_t = aff.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major
    cam_t = cam.transpose(1, 2).contiguous().transpose(1, 2)
    assert not aff_t.is_contiguous() and not cam_t.is_contiguous()
    with wsss_fast.use_backend(backend):
        out = wsss_fast.random_walk(aff_t, cam_t, beta=8.0, steps=7)
    assert_close(out, ref.random_walk(aff, cam, beta=8.0, steps=7), name="out")


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("M,C,steps", [(1, 1, 2), (37, 21, 6), (130, 3, 1), (50, 81, 0)])
def test_grad_cam_matches_reference(backend, device, M, C, steps):
    aff, cam = make_inputs(2, M, C, seed=M + C, device=device)
    weight = torch.randn(cam.shape, generator=torch.Generator().manual_seed(9)).to(device)
    cam_ref = cam.clone().requires_grad_()
    (ref.random_walk(aff, cam_ref, beta=8.0, steps=steps) * weight).sum().backward()
    cam = cam.requires_grad_()
    with wsss_fast.use_backend(backend):
        (wsss_fast.random_walk(aff, cam, beta=8.0, steps=steps) * weight).sum().backward()
    assert_close(cam.grad, cam_ref.grad, name="grad cam")


def test_grad_aff_torch_backend_matches_reference():
    aff, cam = make_inputs(2, 23, 4, seed=5)
    weight = torch.randn(cam.shape, generator=torch.Generator().manual_seed(2))
    grads = {}
    for name, fn in (("reference", ref.random_walk), ("torch", None)):
        a = aff.clone().requires_grad_()
        c = cam.clone().requires_grad_()
        if fn is None:
            with wsss_fast.use_backend("torch"):
                out = wsss_fast.random_walk(a, c, beta=3.0, steps=6)
        else:
            out = fn(a, c, beta=3.0, steps=6)
        (out * weight).sum().backward()
        grads[name] = (a.grad, c.grad)
    assert_close(grads["torch"][0], grads["reference"][0], name="grad aff")
    assert_close(grads["torch"][1], grads["reference"][1], name="grad cam")


def test_gradcheck_torch_backend_float64():
    aff, cam = make_inputs(1, 6, 3, seed=11)
    aff = (aff.double() + 0.05).requires_grad_()  # away from 0, where d(a^beta)/da is singular
    cam = cam.double().requires_grad_()
    with wsss_fast.use_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda a, c: wsss_fast.random_walk(a, c, beta=2.5, steps=4), (aff, cam)
        )


@pytest.mark.parametrize("backend,device", backend_devices("triton", "cuda"))
def test_fused_backends_refuse_grad_aff(backend, device):
    aff, cam = make_inputs(1, 9, 2, seed=0, device=device)
    with (
        wsss_fast.use_backend(backend),
        pytest.raises(wsss_fast.BackendNotImplementedError, match="use_backend\\('torch'\\)"),
    ):
        wsss_fast.random_walk(aff.requires_grad_(), cam, beta=8.0, steps=2)


@pytest.mark.parametrize("backend,device", FUSED)
def test_saves_only_its_inputs(backend, device):
    aff, cam = make_inputs(1, 40, 3, seed=1, device=device)
    cam.requires_grad_()
    with wsss_fast.use_backend(backend), saved_tensors() as log:
        wsss_fast.random_walk(aff, cam, beta=8.0, steps=5)
    assert log, "nothing saved: the op would not be differentiable"
    inputs = {aff.untyped_storage().data_ptr(), cam.untyped_storage().data_ptr()}
    extra = [tuple(t.shape) for t in log if t.untyped_storage().data_ptr() not in inputs]
    assert extra == [], f"{backend} saved tensors beyond aff and cam: {extra}"


def test_reference_keeps_the_transition_matrix():
    # The contrast that makes the test above meaningful: eager autograd keeps M x M tensors.
    aff, cam = make_inputs(1, 40, 3, seed=1)
    with saved_tensors() as log:
        ref.random_walk(aff, cam.requires_grad_(), beta=8.0, steps=5)
    assert square_saved(log, 40)


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda a, c: (a - 0.5, c), ValueError, "non-negative"),
        (
            lambda a, c: (a.masked_fill(a > 0.8, float("nan")), c),
            ValueError,
            "non-negative and finite",
        ),
        (lambda a, c: (a.masked_fill(a > 0.8, float("inf")), c), ValueError, "finite"),
        (
            lambda a, c: (a.index_fill(2, torch.tensor([3]), 0.0), c),
            ValueError,
            "column of aff is all zero",
        ),
        (lambda a, c: (a[:, :, :-1], c), ValueError, r"aff must be \[B, M, M\]"),
        (lambda a, c: (a, c[:, :, :-1]), ValueError, r"cam must be \[B, C, M\]"),
        (lambda a, c: (a, c[:1]), ValueError, r"cam must be \[B, C, M\]"),
        (lambda a, c: (a[0], c), ValueError, "aff must be 3-D"),
        (lambda a, c: (a.long(), c), TypeError, "dtype torch.int64"),
        (lambda a, c: (a, c[:, :0]), ValueError, "cam is empty"),
        (lambda a, c: (a, c * float("nan")), ValueError, "cam contains NaN"),
        (lambda a, c: (a, c.numpy()), TypeError, "cam must be a torch.Tensor"),
    ],
    ids=[
        "negative",
        "nan",
        "inf",
        "zero-column",
        "not-square",
        "M-mismatch",
        "B-mismatch",
        "2-D",
        "int",
        "empty",
        "nan-cam",
        "numpy",
    ],
)
def test_invalid_inputs_raise_clear_errors(mutate, error, match):
    aff, cam = make_inputs(2, 10, 3, seed=0)
    aff, cam = mutate(aff, cam)
    with pytest.raises(error, match=match):
        wsss_fast.random_walk(aff, cam, beta=8.0, steps=2)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"beta": 0.0, "steps": 2}, ValueError, "beta must be a finite number > 0"),
        ({"beta": -1.0, "steps": 2}, ValueError, "beta must be a finite number > 0"),
        ({"beta": float("inf"), "steps": 2}, ValueError, "beta"),
        ({"beta": 8.0, "steps": -1}, ValueError, "steps must be >= 0"),
        ({"beta": 8.0, "steps": 2.0}, TypeError, "steps must be an int"),
    ],
    ids=["beta0", "beta-neg", "beta-inf", "steps-neg", "steps-float"],
)
def test_invalid_arguments_raise_clear_errors(kwargs, error, match):
    aff, cam = make_inputs(1, 5, 2, seed=0)
    with pytest.raises(error, match=match):
        wsss_fast.random_walk(aff, cam, **kwargs)


def test_triton_backend_refuses_float64():
    if "triton" not in wsss_fast.available_backends():
        pytest.skip("triton backend not available here")
    aff, cam = make_inputs(1, 5, 2, seed=0)
    with wsss_fast.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        wsss_fast.random_walk(aff.double(), cam.double(), beta=8.0, steps=1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck_registered_ops(device):
    assert _ext.loaded(), _ext.load_error()
    aff, cam = make_inputs(2, 19, 3, seed=4, device=device)
    torch.library.opcheck(
        torch.ops.wsss_fast.random_walk_forward.default, (aff, cam.requires_grad_(), 8.0, 3)
    )
    torch.library.opcheck(
        torch.ops.wsss_fast.random_walk_backward.default, (aff, cam.detach(), 8.0, 3)
    )


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_op_checks_name_the_tensor(device):
    """The C++ entry points' checks (shared by CPU and CUDA) name the caller's tensor."""
    assert _ext.loaded(), _ext.load_error()
    aff, cam = make_inputs(2, 19, 3, seed=4, device=device)
    fwd, bwd = torch.ops.wsss_fast.random_walk_forward, torch.ops.wsss_fast.random_walk_backward
    with pytest.raises(RuntimeError, match=r"cam must have shape \(B, C, M\)"):
        fwd(aff, cam[..., :-1].contiguous(), 8.0, 3)
    with pytest.raises(RuntimeError, match="grad_out must be contiguous"):
        bwd(aff, cam.transpose(0, 1).contiguous().transpose(0, 1), 8.0, 3)
    with pytest.raises(RuntimeError, match=r"aff must have shape \(B, M, M\)"):
        bwd(aff[:, :, :-1].contiguous(), cam, 8.0, 3)
    with pytest.raises(RuntimeError, match="beta must be > 0"):
        fwd(aff, cam, 0.0, 3)
    with pytest.raises(RuntimeError, match="steps must be >= 0"):
        bwd(aff, cam, 8.0, -1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_op_float64(device):
    # The C++ kernels also take float64: the accumulation type follows the inputs.
    aff, cam = make_inputs(1, 17, 4, seed=6, device=device)
    out = torch.ops.wsss_fast.random_walk_forward(aff.double(), cam.double(), 4.0, 9)
    assert out.dtype == torch.float64
    assert_close(out, ref.random_walk(aff.double(), cam.double(), beta=4.0, steps=9), name="out")


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", backend_devices("triton", "cuda"))
def test_large_awkward_size(backend, device):
    # One large size that is 1 past a multiple of every block size, bf16 affinities.
    aff, cam = make_inputs(1, 1025, 21, seed=7, aff_dtype=torch.bfloat16, device=device)
    with wsss_fast.use_backend(backend):
        out = wsss_fast.random_walk(aff, cam, beta=8.0, steps=3)
    assert_close(
        out, ref.random_walk(aff.double(), cam.double(), beta=8.0, steps=3).float(), name="out"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_psa_size(backend):
    # PSA's shape at a 500x375 image: M = 11750 stride-4 tokens would need ~0.5 GB; use 4099.
    aff, cam = make_inputs(1, 4099, 21, seed=8, device="cuda")
    with wsss_fast.use_backend(backend):
        out = wsss_fast.random_walk(aff, cam, beta=8.0, steps=64)
    with wsss_fast.use_backend("torch"):
        expected = wsss_fast.random_walk(aff.double(), cam.double(), beta=8.0, steps=64)
    assert_close(out, expected.float(), name="out", rtol=1e-4, atol=1e-5)


def test_auto_picks_an_available_backend():
    aff, cam = make_inputs(1, 8, 2, seed=0)
    with wsss_fast.use_backend("auto"):
        out = wsss_fast.random_walk(aff, cam, beta=8.0, steps=2)
    assert_close(out, ref.random_walk(aff, cam, beta=8.0, steps=2), name="out")


def transition_float64(aff, beta):
    """``T = aff^beta / colsum`` written out in float64, where ``aff^beta`` neither overflows nor
    underflows for the scales below (1e5^8 = 1e40, 1e-7^8 = 1e-56)."""
    t = aff.double() ** beta
    return t / t.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("backend,device", backend_devices("reference", "torch", "triton", "cuda"))
@pytest.mark.parametrize(
    "lo,hi",
    [pytest.param(1e-7, 1e-6, id="1e-7..1e-6"), pytest.param(0.9e5, 1.1e5, id="near-1e5")],
)
def test_extreme_affinity_scales_stay_finite(backend, device, lo, hi):
    # aff ** 8 is 0 in float32 below ~1e-5.5 (0 / 0 = NaN) and inf above ~6e4: every backend
    # divides each column by its maximum first, which leaves T unchanged.
    g = torch.Generator().manual_seed(21)
    aff = lo + (hi - lo) * torch.rand(2, 37, 37, generator=g)
    cam = torch.rand(2, 5, 37, generator=g)
    weight = torch.randn(2, 5, 37, generator=g)
    cam_leaf = cam.to(device).requires_grad_()
    with wsss_fast.use_backend(backend):
        out = wsss_fast.random_walk(aff.to(device), cam_leaf, beta=8.0, steps=4)
    (grad,) = torch.autograd.grad((out * weight.to(device)).sum(), cam_leaf)
    t = transition_float64(aff, 8.0)
    expected, expected_grad = cam.double(), weight.double()
    for _ in range(4):
        expected = expected @ t
        expected_grad = expected_grad @ t.transpose(1, 2)  # d/dcam sum(w * cam T^4) = w (T^T)^4
    assert_close(out, expected.float(), name=f"{backend} out")
    assert_close(grad, expected_grad.float(), name=f"{backend} grad cam")
