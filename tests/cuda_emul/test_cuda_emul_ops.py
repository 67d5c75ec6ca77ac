"""The CUDA kernels of csrc/cuda run on the CPU under the CUDA emulation, against the reference.

Each test calls the cuda backend's own GPU test from tests/ops with backend ``cuda`` on CPU
tensors while ``build.route()`` makes the emulated CUDA code (the real launch code and kernels,
compiled for the host) the CPU kernels of ``torch.ops.wsss_fast.*``: the same cases, dtypes, seeds
and tolerances, through the same Python layer, forward and every gradient.

Sizes: the emulation runs one OS thread per CUDA thread, so every __syncthreads and warp shuffle
costs every thread a sleep and a wake-up (about 4 us each on 2 cores). Cases whose cost would not
fit the suite's budget run scaled down, keeping what each case is for (N, D, the row, L, B, the
dtypes), and their ids end in ``scaled``:
- getam_map: the cases with N >= 197 and L * B * H > 4 keep 2 heads (1 when L * B > 2), and the
  N = 785 size test 2 of its 12 heads;
- random_walk: M = 257 takes 3 steps instead of 12; the 300-step case keeps 300 steps for
  float32 and takes 60 for the other dtypes.
float16 runs getam_map's cheap cases only (bfloat16 takes the same path everywhere), and par/pamr
pair the masks' dtype with the image range instead of crossing them. The GPU-only size tests
(PSA's M = 4099, 160 x 193 images), the float64 gradcheck of the compiled op (thousands of calls)
and getam_map's opcheck (its fake kernels are Python, tested on the CPU kernels) are left out.
"""

import pytest
import torch
from ops import test_getam_map as gpu_getam
from ops import test_par as gpu_par
from ops import test_random_walk as gpu_rw
from utils import assert_close

from cuda_emul import build
from wsss_fast.ops import reference as ref


@pytest.fixture
def emulated():
    with build.route():
        yield


def _params_of(test, argnames):
    """The parameters of the GPU test's own ``parametrize(argnames, ...)``."""
    for mark in test.pytestmark:
        if mark.name == "parametrize" and mark.args[0] == argnames:
            return mark.args[1]
    raise LookupError(f"{test.__name__} has no parametrize({argnames!r})")


def _scaled(params, scale):
    """``params`` with each case's values passed through ``scale`` (None: unchanged)."""
    out = []
    for p in params:
        new = scale(p.id, tuple(p.values))
        if new is None:
            out.append(p)
        else:
            out.append(pytest.param(*new, id=f"{p.id}-scaled", marks=p.marks))
    return out


# -- random_walk ----------------------------------------------------------------------------------


def _rw_dtype_cases():
    """Every (case, dtype) pair of the GPU test; the expensive cases scaled per SCALED."""
    out = []
    for case in gpu_rw.CASES:
        for dt in gpu_rw.DTYPES:
            B, M, C, steps, beta = case.values
            first_dtype = dt is gpu_rw.DTYPES[0]
            scaled = False
            if M == 257:
                steps, scaled = 3, True
            elif steps == 300 and not first_dtype:
                steps, scaled = 60, True
            suffix = "-scaled" if scaled else ""
            out.append(
                pytest.param(*dt.values, B, M, C, steps, beta, id=f"{case.id}{suffix}-{dt.id}")
            )
    return out


@pytest.mark.parametrize("aff_dtype,cam_dtype,B,M,C,steps,beta", _rw_dtype_cases())
def test_emul_random_walk_forward(emulated, aff_dtype, cam_dtype, B, M, C, steps, beta):
    gpu_rw.test_forward_matches_reference("cuda", "cpu", aff_dtype, cam_dtype, B, M, C, steps, beta)


@pytest.mark.parametrize(
    "B,M,C,steps",
    [
        pytest.param(1, 513, 90, 2, id="M513-C90-s2"),  # two reduction splits, two row chunks
    ],
)
def test_emul_random_walk_split_reduction_and_row_chunks(emulated, B, M, C, steps):
    # Not in the GPU test's cases: M >= 481 splits the reduction over blockIdx.y when blocks
    # would leave SMs idle (then the split-sum kernel runs), C > 84 takes two passes of rows.
    gpu_rw.test_forward_matches_reference(
        "cuda", "cpu", torch.float32, torch.float32, B, M, C, steps, 8.0
    )


@pytest.mark.parametrize(
    "M,C,steps", _params_of(gpu_rw.test_grad_cam_matches_reference, "M,C,steps")
)
def test_emul_random_walk_grad_cam(emulated, M, C, steps):
    gpu_rw.test_grad_cam_matches_reference("cuda", "cpu", M, C, steps)


@pytest.mark.parametrize(
    "lo,hi", _params_of(gpu_rw.test_extreme_affinity_scales_stay_finite, "lo,hi")
)
def test_emul_random_walk_extreme_affinity_scales(emulated, lo, hi):
    gpu_rw.test_extreme_affinity_scales_stay_finite("cuda", "cpu", lo, hi)


def test_emul_random_walk_non_contiguous(emulated):
    gpu_rw.test_non_contiguous_inputs("cuda", "cpu")


def test_emul_random_walk_float64(emulated):
    gpu_rw.test_compiled_op_float64("cpu")


def test_emul_random_walk_entry_checks(emulated):
    gpu_rw.test_compiled_op_checks_name_the_tensor("cpu")


def test_emul_random_walk_opcheck(emulated):
    gpu_rw.test_opcheck_registered_ops("cpu")


def test_emul_random_walk_large_awkward_size(emulated):
    # M = 1025 on 132 SMs: 17 column blocks, the reduction split in 4.
    gpu_rw.test_large_awkward_size("cuda", "cpu")


# -- par / pamr -----------------------------------------------------------------------------------


# The kernels compute in the accumulation dtype whatever the masks' dtype, so the masks' dtype and
# the image range are paired rather than crossed: every case runs in both dtypes and both ranges.
MASKS_AND_RANGE = [
    pytest.param(torch.float32, 1.0, id="range1-masks32"),
    pytest.param(torch.bfloat16, 255.0, id="range255-masks16b"),
]
assert {p.values[0] for p in gpu_par.MASK_DTYPES} == {p.values[0] for p in MASKS_AND_RANGE}


@pytest.mark.parametrize("masks_dtype,scale", MASKS_AND_RANGE)
@pytest.mark.parametrize("B,C,image_size,mask_size,dilations,iters", gpu_par.CASES)
@pytest.mark.parametrize("op", gpu_par.OPS)
def test_emul_par_pamr(
    emulated, op, B, C, image_size, mask_size, dilations, iters, masks_dtype, scale
):
    gpu_par.test_matches_reference(
        op, B, C, image_size, mask_size, dilations, iters, scale, masks_dtype, "cuda", "cpu"
    )


@pytest.mark.parametrize("w_pos", _params_of(gpu_par.test_par_w_pos, "w_pos"))
def test_emul_par_w_pos(emulated, w_pos):
    gpu_par.test_par_w_pos("cuda", "cpu", w_pos)


@pytest.mark.parametrize(
    "image_dtype,masks_dtype", _params_of(gpu_par.test_dtypes, "image_dtype,masks_dtype")
)
@pytest.mark.parametrize("op", gpu_par.OPS)
def test_emul_par_pamr_dtypes(emulated, op, image_dtype, masks_dtype):
    gpu_par.test_dtypes(op, image_dtype, masks_dtype, "cuda", "cpu")


@pytest.mark.parametrize("op", gpu_par.OPS)
def test_emul_par_pamr_non_contiguous(emulated, op):
    gpu_par.test_non_contiguous_inputs(op, "cuda", "cpu")


@pytest.mark.parametrize("op", gpu_par.OPS)
def test_emul_par_pamr_image_far_from_zero(emulated, op):
    gpu_par.test_image_far_from_zero(op, "cuda", "cpu")


@pytest.mark.parametrize("op", gpu_par.OPS)
def test_emul_par_pamr_zero_iterations(emulated, op):
    gpu_par.test_zero_iterations_return_a_copy(op, "cuda", "cpu")


def test_emul_pamr_huge_dilation(emulated):
    gpu_par.test_pamr_huge_dilation_clamps_like_the_image_extent("cuda", "cpu")


@pytest.mark.parametrize("op", gpu_par.OPS)
def test_emul_par_pamr_opcheck(emulated, op):
    gpu_par.test_opcheck_registered_ops(op, "cpu")


# -- getam_map ------------------------------------------------------------------------------------


def _getam_scale(case_id, values):
    L, B, H, N, D, row, ndim = values
    if N >= 197 and L * B * H > 4:
        return (L, B, 1 if L * B > 2 else 2, N, D, row, ndim)
    return None


def _getam_cases():
    """Every (case, dtype) pair of the GPU test, but float16 only where the case is cheap: it
    takes the same 16-byte-vector path as bfloat16, which runs everywhere."""
    out = []
    for case in _scaled(gpu_getam.CASES, _getam_scale):
        L, B, H, N, D, row, ndim = case.values
        for dt in gpu_getam.DTYPES:
            if dt.values[0] == torch.float16 and L * B * H * N * D > 20000:
                continue
            out.append(pytest.param(dt.values[0], *case.values, id=f"{case.id}-{dt.id}"))
    return out


@pytest.mark.parametrize("dtype,L,B,H,N,D,row,ndim", _getam_cases())
def test_emul_getam_map_forward_and_grads(emulated, dtype, L, B, H, N, D, row, ndim):
    gpu_getam.test_forward_and_grads_match_reference("cuda", "cpu", dtype, L, B, H, N, D, row, ndim)


def test_emul_getam_map_scale(emulated):
    gpu_getam.test_explicit_scale_and_default_scale("cuda", "cpu")


def test_emul_getam_map_non_contiguous(emulated):
    # Non-contiguous inputs take the single-element (not 16-byte vector) loads.
    gpu_getam.test_non_contiguous_inputs("cuda", "cpu")


@pytest.mark.parametrize(
    "where", _params_of(gpu_getam.test_nan_inputs_give_nan_where_the_reference_does, "where")
)
def test_emul_getam_map_nan_inputs(emulated, where):
    gpu_getam.test_nan_inputs_give_nan_where_the_reference_does("cuda", "cpu", where)


def test_emul_getam_map_float64(emulated):
    gpu_getam.test_compiled_op_float64("cpu")


def test_emul_getam_map_large_awkward_size(emulated):
    # The GPU test's N = 785 (ViT-B at 448 px plus the class token) with 2 of its 12 heads.
    inputs = gpu_getam.make_inputs(2, 1, 2, 785, 64, seed=10)
    out = gpu_getam.call("cuda", *inputs)
    expected = ref.getam_map(*(t.double() for t in inputs))
    assert_close(out, expected.float(), name="map")
