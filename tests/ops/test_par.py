"""par and pamr on the torch and cuda backends against the reference: values, dtypes, errors, memory."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from utils import assert_close, backend_devices

import wsss_fast
from wsss_fast import _ext
from wsss_fast.ops import reference as ref

FUSED = backend_devices("torch", "cuda")
DEFAULT = (1, 2, 4, 8, 12, 24)
OPS = [pytest.param("par", id="par"), pytest.param("pamr", id="pamr")]

# (B, C, image size, mask size, dilations, iters): odd sizes, images smaller than the largest
# dilation, C from 1 to 81, masks given at a smaller size (the resize path), custom dilations.
CASES = [
    pytest.param(1, 1, (5, 6), (5, 6), DEFAULT, 10, id="5x6-C1-it10"),
    pytest.param(2, 21, (13, 17), (13, 17), DEFAULT, 10, id="13x17-C21-it10"),
    pytest.param(1, 81, (32, 29), (32, 29), DEFAULT, 1, id="32x29-C81-it1"),
    pytest.param(2, 21, (13, 17), (7, 9), DEFAULT, 10, id="13x17-C21-resized_from_7x9-it10"),
    pytest.param(1, 3, (32, 29), (32, 29), (1, 3, 7), 10, id="32x29-C3-d1,3,7-it10"),
    pytest.param(2, 4, (5, 6), (5, 6), (2, 5), 0, id="5x6-C4-d2,5-it0"),
]
MASK_DTYPES = [
    pytest.param(torch.float32, id="masks32"),
    pytest.param(torch.bfloat16, id="masks16b"),
]


def make_inputs(
    B,
    C,
    image_size,
    mask_size,
    *,
    seed,
    scale=1.0,
    device="cpu",
    image_dtype=torch.float32,
    masks_dtype=torch.float32,
):
    """An image in [0, scale) and mask-like values in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    image = scale * torch.rand(B, 3, *image_size, generator=g)
    masks = torch.rand(B, C, *mask_size, generator=g)
    return image.to(device, image_dtype), masks.to(device, masks_dtype)


def run(op, backend, image, masks, **kwargs):
    with wsss_fast.use_backend(backend):
        return getattr(wsss_fast, op)(image, masks, **kwargs)


def expected(op, image, masks, **kwargs):
    """The reference in float64 on the same (rounded) input values."""
    return getattr(ref, op)(image.double(), masks.double(), **kwargs)


def check(out, masks, exp, name):
    assert out.dtype == masks.dtype and out.device == masks.device
    if masks.dtype == torch.float32:
        assert_close(out, exp.float(), name=name)
    else:  # held to twice the rounding of the float64 result to that dtype
        assert_close(out, exp, name=name)


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("masks_dtype", MASK_DTYPES)
@pytest.mark.parametrize("scale", [1.0, 255.0], ids=["range1", "range255"])
@pytest.mark.parametrize("B,C,image_size,mask_size,dilations,iters", CASES)
@pytest.mark.parametrize("op", OPS)
def test_matches_reference(
    op, B, C, image_size, mask_size, dilations, iters, scale, masks_dtype, backend, device
):
    for seed in (0, 1):
        image, masks = make_inputs(
            B,
            C,
            image_size,
            mask_size,
            seed=seed,
            scale=scale,
            masks_dtype=masks_dtype,
            device=device,
        )
        kwargs = {"dilations": dilations, "iters": iters}
        out = run(op, backend, image, masks, **kwargs)
        assert out.shape == (B, C, *image_size)
        check(out, masks, expected(op, image, masks, **kwargs), f"{op} {backend} seed {seed}")


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("w_pos", [0.0, 0.3])
def test_par_w_pos(backend, device, w_pos):
    image, masks = make_inputs(2, 5, (11, 8), (11, 8), seed=4, device=device)
    out = run("par", backend, image, masks, dilations=(1, 2, 3), iters=4, w_pos=w_pos)
    exp = expected("par", image, masks, dilations=(1, 2, 3), iters=4, w_pos=w_pos)
    check(out, masks, exp, f"par {backend} w_pos {w_pos}")


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize(
    "image_dtype,masks_dtype",
    [
        pytest.param(torch.float16, torch.float32, id="image16-masks32"),
        pytest.param(torch.bfloat16, torch.float16, id="image16b-masks16"),
        pytest.param(torch.float64, torch.float64, id="image64-masks64"),
        pytest.param(torch.float64, torch.float32, id="image64-masks32"),
    ],
)
@pytest.mark.parametrize("op", OPS)
def test_dtypes(op, image_dtype, masks_dtype, backend, device):
    image, masks = make_inputs(
        2,
        6,
        (9, 14),
        (9, 14),
        seed=5,
        scale=255.0,
        image_dtype=image_dtype,
        masks_dtype=masks_dtype,
        device=device,
    )
    out = run(op, backend, image, masks, iters=5)
    exp = expected(op, image, masks, iters=5)
    if image_dtype == torch.float64 and masks_dtype == torch.float32:
        # Computed in float64 (the image is), returned in float32: one rounding.
        assert_close(out, exp.float(), name=f"{op} {backend}", rtol=2e-7, atol=2e-7)
    else:
        check(out, masks, exp, f"{op} {backend}")


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_inputs(op, backend, device):
    image, masks = make_inputs(2, 7, (12, 10), (12, 10), seed=6, device=device)
    image_t = image.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last
    masks_t = masks.transpose(2, 3).contiguous().transpose(2, 3)
    assert not image_t.is_contiguous() and not masks_t.is_contiguous()
    out = run(op, backend, image_t, masks_t, iters=3)
    check(out, masks, expected(op, image, masks, iters=3), f"{op} {backend}")


@pytest.mark.parametrize("backend,device", FUSED)
def test_pamr_huge_dilation_clamps_like_the_image_extent(backend, device):
    # Every tap of a dilation >= max(H, W) lands on the border, as with max(H, W) itself; the
    # reference cannot pad by 10**12, so it runs with max(H, W).
    image, masks = make_inputs(1, 4, (6, 5), (6, 5), seed=7, scale=255.0, device=device)
    out = run("pamr", backend, image, masks, dilations=(1, 10**12), iters=3)
    check(out, masks, expected("pamr", image, masks, dilations=(1, 6), iters=3), "pamr")


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("op", OPS)
def test_zero_iterations_return_a_copy(op, backend, device):
    image, masks = make_inputs(
        1, 3, (5, 6), (5, 6), seed=8, masks_dtype=torch.float16, device=device
    )
    out = run(op, backend, image, masks, iters=0)
    assert out.dtype == torch.float16 and torch.equal(out, masks)
    assert out.data_ptr() != masks.data_ptr()


class _LargestOutput(TorchDispatchMode):
    """Records the element count of the largest tensor any op returns inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("op", OPS)
def test_torch_backend_builds_no_neighbour_tensor(op):
    B, C, H, W, dilations = 1, 21, 40, 36, (1, 2, 4, 8)
    K = 8 * len(dilations)
    image, masks = make_inputs(B, C, (H, W), (H, W), seed=9)
    with _LargestOutput() as seen:
        run(op, "torch", image, masks, dilations=dilations, iters=2)
    # The [B, K, H, W] affinities or one replicate-padded copy of the state, whichever is larger.
    d = max(dilations)
    assert seen.largest <= max(B * K * H * W, B * C * (H + 2 * d) * (W + 2 * d))
    with _LargestOutput() as seen_ref:
        getattr(ref, op)(image, masks, dilations=dilations, iters=2)
    assert seen_ref.largest >= B * C * K * H * W  # the contrast: what the published code builds


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("grad_input", ["image", "masks"])
def test_gradient_request_raises(op, grad_input, backend, device):
    image, masks = make_inputs(1, 2, (5, 6), (5, 6), seed=10, device=device)
    inputs = {"image": image, "masks": masks}
    inputs[grad_input].requires_grad_()
    with pytest.raises(wsss_fast.BackendNotImplementedError, match="'reference' backend is the"):
        run(op, backend, inputs["image"], inputs["masks"], iters=2)
    with torch.no_grad():  # what the methods do: no gradient asked for, no error
        out = run(op, backend, inputs["image"], inputs["masks"], iters=2)
    check(out, masks, expected(op, image.detach(), masks.detach(), iters=2), f"{op} {backend}")


@pytest.mark.parametrize("op", OPS)
def test_reference_backend_is_differentiable(op):
    image, masks = make_inputs(1, 2, (5, 6), (5, 6), seed=11)
    masks.requires_grad_()
    run(op, "reference", image, masks, iters=2).sum().backward()
    assert masks.grad is not None and bool(torch.isfinite(masks.grad).all())


def _w_pos_nan(kwargs):
    return {**kwargs, "w_pos": float("nan")}


@pytest.mark.parametrize(
    "op,mutate,error,match",
    [
        ("par", lambda i, m, kw: (i, m[:1], kw), ValueError, "same batch size"),
        ("pamr", lambda i, m, kw: (i[:, :2], m, kw), ValueError, "3 channels"),
        ("par", lambda i, m, kw: (i[:, :, :0], m, kw), ValueError, "image is empty"),
        ("pamr", lambda i, m, kw: (i, m[:, :0], kw), ValueError, "masks is empty"),
        ("par", lambda i, m, kw: (i * float("nan"), m, kw), ValueError, "image contains NaN"),
        ("pamr", lambda i, m, kw: (i, m / 0.0, kw), ValueError, "masks contains NaN or inf"),
        ("par", lambda i, m, kw: (i[0], m, kw), ValueError, "image must be 4-D"),
        ("pamr", lambda i, m, kw: (i, m.long(), kw), TypeError, "dtype torch.int64"),
        ("par", lambda i, m, kw: (i, m.numpy(), kw), TypeError, "masks must be a torch.Tensor"),
        ("pamr", lambda i, m, kw: (i, m, {**kw, "dilations": (1, 0)}), ValueError, "int >= 1"),
        ("par", lambda i, m, kw: (i, m, {**kw, "dilations": ()}), ValueError, "non-empty"),
        ("pamr", lambda i, m, kw: (i, m, {**kw, "iters": -1}), ValueError, "iters must be >= 0"),
        ("par", lambda i, m, kw: (i, m, {**kw, "iters": 1.5}), TypeError, "iters must be an int"),
        ("par", lambda i, m, kw: (i, m, _w_pos_nan(kw)), ValueError, "w_pos must be a finite"),
    ],
    ids=[
        "B-mismatch",
        "2-channel-image",
        "empty-image",
        "empty-masks",
        "nan-image",
        "inf-masks",
        "3-D-image",
        "int-masks",
        "numpy-masks",
        "dilation-0",
        "no-dilations",
        "iters-negative",
        "iters-float",
        "w_pos-nan",
    ],
)
def test_invalid_inputs_raise_clear_errors(op, mutate, error, match):
    image, masks = make_inputs(2, 3, (5, 6), (5, 6), seed=0)
    image, masks, kwargs = mutate(image, masks, {"iters": 2})
    with pytest.raises(error, match=match):
        getattr(wsss_fast, op)(image, masks, **kwargs)


@pytest.mark.gpu
def test_inputs_on_two_devices_raise():
    image, masks = make_inputs(1, 2, (5, 6), (5, 6), seed=0)
    with pytest.raises(ValueError, match="one device"):
        wsss_fast.pamr(image.cuda(), masks, iters=1)


def _compiled_args(op, device):
    image, masks = make_inputs(2, 3, (7, 9), (7, 9), seed=12, device=device)
    return (image, masks, [1, 3], 2, 0.01) if op == "par" else (image, masks, [1, 3], 2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("op", OPS)
def test_opcheck_registered_ops(op, device):
    assert _ext.loaded(), _ext.load_error()
    compiled = getattr(torch.ops.wsss_fast, f"{op}_forward").default
    args = _compiled_args(op, device)
    torch.library.opcheck(compiled, args)
    torch.library.opcheck(compiled, (*args[:3], 0, *args[4:]))  # iters = 0: a copy
    with pytest.raises(RuntimeError, match=r"image must have shape \(B, 3, H, W\)"):
        compiled(args[0][:, :2], *args[1:])
    # Called directly with a gradient requested, the op fails at backward with a clear message.
    out = compiled(args[0], args[1].clone().requires_grad_(), *args[2:])
    with pytest.raises(wsss_fast.BackendNotImplementedError, match="'reference' backend"):
        out.sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize("op", OPS)
def test_gpu_large_image(op, backend):
    image, masks = make_inputs(2, 21, (160, 193), (80, 97), seed=13, scale=255.0, device="cuda")
    out = run(op, backend, image, masks, iters=10)
    check(out, masks, expected(op, image, masks, iters=10), f"{op} {backend}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize("op", OPS)
def test_gpu_peak_memory(op, backend):
    B, C, H, W, K = 2, 21, 256, 256, 48
    image, masks = make_inputs(B, C, (H, W), (H, W), seed=14, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run(op, backend, image, masks, iters=3)
    peak = torch.cuda.max_memory_allocated() - base
    aff, state = 4 * B * K * H * W, 4 * B * C * H * W
    # cuda: two ping-pong states; torch: old and new state plus one padded copy (d = 24).
    states = 2 if backend == "cuda" else 2 + (H + 48) * (W + 48) / (H * W)
    assert peak <= aff + states * state + 2**20, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("op", OPS)
def test_image_far_from_zero(op, backend, device):
    # float32 image + 1e6 (steps of 1/16): the colour std over a pixel's taps is taken from tap -
    # centre, exact for nearby values, where a running sum of the raw values rounds to +-2 and
    # left the torch and cuda backends 0.1-0.2 off the reference.
    image, masks = make_inputs(2, 3, (17, 23), (17, 23), seed=15, scale=40.0, device=device)
    image = image + 1e6
    out = run(op, backend, image, masks, dilations=(1, 2, 4), iters=5)
    check(out, masks, expected(op, image, masks, dilations=(1, 2, 4), iters=5), f"{op} {backend}")


@pytest.mark.parametrize("op", OPS)
def test_too_many_dilations_are_refused_by_name(op):
    image, masks = make_inputs(1, 2, (5, 6), (5, 6), seed=0)
    dilations = tuple(range(1, 18))
    with pytest.raises(ValueError, match="at most 16 dilations are supported, got 17"):
        getattr(wsss_fast, op)(image, masks, dilations=dilations, iters=1)
    with wsss_fast.use_backend("reference"):  # on every backend, so that all take the same calls
        with pytest.raises(ValueError, match="at most 16 dilations"):
            getattr(wsss_fast, op)(image, masks, dilations=dilations, iters=1)
    assert _ext.loaded(), _ext.load_error()
    args = (image, masks, list(dilations), 1) + ((0.01,) if op == "par" else ())
    with pytest.raises(RuntimeError, match="at most 16 dilations are supported, got 17"):
        getattr(torch.ops.wsss_fast, f"{op}_forward")(*args)
    assert (
        getattr(torch.ops.wsss_fast, f"{op}_forward")(
            *args[:2], list(dilations[:16]), 1, *args[4:]
        ).shape
        == masks.shape
    )


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_cuda_graph_capture(op):
    # The tap tables are kernel arguments: no host-to-device copy, so a call can be captured.
    image, masks = make_inputs(1, 3, (33, 40), (33, 40), seed=16, device="cuda")
    with wsss_fast.use_backend("cuda"):
        run(op, "cuda", image, masks, iters=3)  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = getattr(wsss_fast, op)(image, masks, iters=3)
    graph.replay()
    torch.cuda.synchronize()
    check(out, masks, expected(op, image, masks, iters=3), f"{op} captured")
