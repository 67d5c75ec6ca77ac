"""Benchmarks of the compiled ``cuda``-backend ops against what the published code does.

Each section below benchmarks one op with providers ``reference`` (the eager oracle of
``wsss_fast.ops.reference``, which materialises what the published code materialises), ``torch``
and ``cuda`` (``wsss_fast.<op>`` on that backend). Recorded per case: median time
(pytest-benchmark), peak memory above the inputs and GB/s of the bytes the op cannot avoid moving
(``harness.run_and_measure``; each section states its count), with the GPU name and versions. Under ``WSSS_FAST_BENCH_SMOKE=1`` without a GPU each case runs once at a tiny
size on the CPU.
"""

import pytest
import torch
from harness import SMOKE, run_and_measure

import wsss_fast
from wsss_fast import _backend

# -------------------------------------------------------------------------------- par / pamr
# par (AReAM/AFA) and pamr (GETAM) at crop sizes against the reference, which unfolds the
# [B, C, 48, H, W] neighbour tensor at every iteration: VOC's C = 21, default dilations
# (K = 48), 10 iterations, B = 8. par gets the [0, 1] image, pamr the 0-255 one, as the methods
# feed them. GB/s counts the image read once and the float32 masks read and written once per
# iteration (the 48 neighbour reads are expected to hit cache).

REFINE_SIZES = [(24, 20)] if SMOKE else [(448, 448), (512, 512)]
REFINE_B = 1 if SMOKE else 8
REFINE_C, REFINE_ITERS, REFINE_K = 21, 10, 48


@pytest.mark.parametrize("size", REFINE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("provider", ["reference", "torch", "cuda"])
@pytest.mark.parametrize("op", ["par", "pamr"])
def bench_refine(benchmark, device, op, provider, size):
    why = _backend.unavailable_reason(provider, device)
    if why is not None:
        pytest.skip(why)
    H, W = size
    # Drawn on the device: drawing gigabytes on the CPU took most of a GPU run (gpu_check.sh).
    g = torch.Generator(device).manual_seed(0)
    scale = 1.0 if op == "par" else 255.0
    image = scale * torch.rand(REFINE_B, 3, H, W, generator=g, device=device)
    masks = torch.rand(REFINE_B, REFINE_C, H, W, generator=g, device=device).softmax(dim=1)
    refine = getattr(wsss_fast, op)

    def fn():
        with torch.no_grad(), wsss_fast.use_backend(provider):
            return refine(image, masks, iters=REFINE_ITERS)

    benchmark.group = f"{op} {H}x{W} B={REFINE_B} C={REFINE_C} iters={REFINE_ITERS}"
    benchmark.extra_info.update(
        provider=provider,
        op=op,
        B=REFINE_B,
        C=REFINE_C,
        H=H,
        W=W,
        iters=REFINE_ITERS,
        # What the published code builds at every iteration, for scale.
        neighbour_tensor_bytes=4 * REFINE_B * REFINE_C * REFINE_K * H * W,
    )
    bytes_moved = 4 * REFINE_B * H * W * (3 + 2 * REFINE_C * REFINE_ITERS)
    out = run_and_measure(benchmark, fn, rounds=3, bytes_moved=bytes_moved)
    assert out.shape == masks.shape and bool(torch.isfinite(out).all())


# ---------------------------------------------------------------------------------- getam_map
# GETAM's gradient-weighted map over the 6 layers GETAM sums, at ViT-B shapes (H = 12, D = 64),
# B = 4, N = 257 / 785 / 3137 (256 / 448 / 896 px crops at stride 16, plus the class token).
# Providers:
# - ``published``: what GETAM's code does, per layer: the attention P = softmax(q k^T s) is
#   materialised with requires_grad (the hooked timm block keeps it), out = P v, autograd gives
#   dP = d score / dP (here score = sum(out * grad_out), so dP = grad_out v^T, N x N), then the
#   element-wise formula on row 0, relu(dP[0] * P[0]).mean_h * relu(dP[0]).mean_h, summed over
#   layers;
# - ``torch``, ``cuda``: ``wsss_fast.getam_map`` on the stacked [L, B, H, N, D] tensors, one call.
# Modes: ``fwd`` (the map: CAM generation) and ``fwd+bwd`` (the map and its gradient with respect
# to q, k, v and grad_out, as end-to-end training needs; ``published`` takes dP with
# create_graph=True for that).
# GB/s counts what the op cannot avoid: the map reads k and v once (the query and grad_out rows
# are negligible); with the backward, k and v once more and the four gradients written.

GETAM_SIZES = [17] if SMOKE else [257, 785, 3137]
GETAM_L, GETAM_B, GETAM_H, GETAM_D = 6, 4, 12, 64
GETAM_DTYPES = [torch.float32] if SMOKE else [torch.float32, torch.bfloat16]


def published_getam(q, k, v, grad_out, *, create_graph: bool) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    total = None
    for layer in range(q.shape[0]):
        p = torch.softmax(q[layer] @ k[layer].transpose(-2, -1) * scale, dim=-1)
        if not p.requires_grad:
            p.requires_grad_()
        out = p @ v[layer]
        (dp,) = torch.autograd.grad((out * grad_out[layer]).sum(), p, create_graph=create_graph)
        a, g = p[:, :, 0].float(), dp[:, :, 0].float()
        gmap = torch.relu(g * a).mean(dim=1) * torch.relu(g).mean(dim=1)
        total = gmap if total is None else total + gmap
    return total


@pytest.mark.parametrize("dtype", GETAM_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("N", GETAM_SIZES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["published", "torch", "cuda"])
def bench_getam_map(benchmark, device, provider, mode, N, dtype):
    if provider != "published" and _backend.unavailable_reason(provider, device):
        pytest.skip(_backend.unavailable_reason(provider, device))
    # Drawn on the device: drawing gigabytes on the CPU took most of a GPU run (gpu_check.sh).
    g = torch.Generator(device).manual_seed(0)
    shape = (GETAM_L, GETAM_B, GETAM_H, N, GETAM_D)
    inputs = [torch.randn(shape, generator=g, device=device).to(dtype) for _ in range(4)]
    backward = mode == "fwd+bwd"
    if backward:
        inputs = [t.requires_grad_() for t in inputs]

    def getam(*x):
        if provider == "published":
            return published_getam(*x, create_graph=backward)
        with wsss_fast.use_backend(provider):
            return wsss_fast.getam_map(*x)

    def fn():
        out = getam(*inputs)
        if backward:
            torch.autograd.grad(out.sum(), inputs)
        return out

    benchmark.group = (
        f"getam_map {mode} L={GETAM_L} B={GETAM_B} H={GETAM_H} N={N} D={GETAM_D} {str(dtype)[6:]}"
    )
    benchmark.extra_info.update(
        provider=provider,
        mode=mode,
        L=GETAM_L,
        B=GETAM_B,
        H=GETAM_H,
        N=N,
        D=GETAM_D,
        dtype=str(dtype),
        # One layer's attention in the input dtype: what the published code keeps per layer.
        attention_bytes_per_layer=GETAM_B * GETAM_H * N * N * inputs[0].element_size(),
    )
    full = GETAM_L * GETAM_B * GETAM_H * N * GETAM_D * inputs[0].element_size()
    bytes_moved = (2 + 2 + 4) * full if backward else 2 * full
    out = run_and_measure(benchmark, fn, rounds=3 if N > 1000 else 5, bytes_moved=bytes_moved)
    assert out.shape == (GETAM_B, N) and bool(torch.isfinite(out).all())
