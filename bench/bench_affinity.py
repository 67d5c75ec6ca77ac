"""AReAM's affinity ops: fused backends against the published way of computing them.

Providers:
- ``reference``: what AReAM's code does: the pre-softmax logits of the layers involved stacked
  as ``[L, B, H, N, N]``; for the loss, per layer the head mean, the sigmoid of the patch block
  and the int64 label matrix ``[B, P, P]`` (``seg_to_aff``) with float masks; for propagation,
  the softmax of the stacked logits, the head mean, the weighted layer sum, the ``[p:, p:]``
  block and ``einsum("bmn,bcn->bcm")``. Everything is kept for backward.
- ``torch``, ``triton``: ``wsss_fast.affinity_loss`` (summed over the deep layers, then averaged
  as AReAM does) and ``wsss_fast.propagate`` (all shallow layers in one call) on that backend.
Ops: ``affinity_loss`` over 5 deep layers (MCTformer's layers 7..11) and ``propagate`` over
7 shallow layers, DeiT-S (H = 6, D = 64) with MCTformer's 20 class tokens and 21 CAM channels.
Shapes: crops 224, 448, 672 (N = 216, 804, 1784), B = 8 and 64. Modes: ``fwd``, ``fwd+bwd``
(gradients with respect to q, k, and the CAM for propagation).
Recorded per case: median time (pytest-benchmark), peak memory above the inputs, TFLOP/s of the
GEMM work (loss: ``2 B Np^2 H D`` per layer forward; propagation: ``2 B H Np N (D + C)`` per
layer forward; backward 2.5x the forward). A case that runs out of GPU memory is skipped with
"out of memory" as the reason.
"""

import pytest
import torch
from harness import SMOKE, run_and_measure

import wsss_fast
from wsss_fast import _backend

H, D, PREFIX, C = 6, 64, 20, 21
DEEP_LAYERS, SHALLOW_LAYERS = 5, 7
CROPS = {37: 37} if SMOKE else {224: 216, 448: 804, 672: 1784}  # crop -> N
BATCHES = [1] if SMOKE else [8, 64]
DTYPES = [torch.float32] if SMOKE else [torch.bfloat16, torch.float32]
PROVIDERS = ["reference", "torch", "triton"]
MODES = ["fwd", "fwd+bwd"]
IGNORE = 255


def make_inputs(L, B, N, device, dtype):
    """L layers of q, k as views of per-layer fused qkv projections (what timm produces), a
    CAM [B, C, Np] and token labels [B, Np] with 21 classes and about 30% ignored."""
    # Drawn on the device: drawing gigabytes on the CPU took most of a GPU run (gpu_check.sh).
    g = torch.Generator(device).manual_seed(0)
    qs, ks = [], []
    for _ in range(L):
        qkv = torch.randn(B, N, 3, H, D, generator=g, device=device).to(dtype)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        qs.append(qkv[0].requires_grad_())
        ks.append(qkv[1].requires_grad_())
    Np = N - PREFIX
    cam = torch.rand(B, C, Np, generator=g, device=device).requires_grad_()
    labels = torch.randint(0, C, (B, Np), generator=g, device=device)
    labels[torch.rand(B, Np, generator=g, device=device) < 0.3] = IGNORE
    return qs, ks, cam, labels


def published_affinity_loss(qs, ks, labels):
    """AReAM's loss over the deep layers from stacked per-head logits and int64 label pairs."""
    s = D**-0.5
    logits = torch.stack([q @ k.transpose(-2, -1) * s for q, k in zip(qs, ks)])  # [L, B, H, N, N]
    P = labels.shape[1]
    rows = labels.unsqueeze(1).expand(-1, P, -1)
    target = (rows == rows.transpose(1, 2)).long()  # [B, P, P] int64
    ignored = labels == IGNORE
    target[ignored.unsqueeze(1) | ignored.unsqueeze(2)] = IGNORE
    pos, neg = (target == 1).float(), (target == 0).float()
    total = 0
    for layer in range(logits.shape[0]):
        z = torch.sigmoid(logits[layer].mean(1)[:, PREFIX:, PREFIX:]).float()
        total = total + 0.5 * (pos * (1 - z)).sum() / (pos.sum() + 1)
        total = total + 0.5 * (neg * z).sum() / (neg.sum() + 1)
    return total / logits.shape[0]


def published_propagate(qs, ks, cam):
    """AReAM's shallow-layer refinement from the stacked softmax of all layers' logits."""
    s = D**-0.5
    logits = torch.stack([q @ k.transpose(-2, -1) * s for q, k in zip(qs, ks)])
    attn = torch.softmax(logits.float(), dim=-1).mean(2)  # [L, B, N, N]
    affinity = attn.mean(0)[:, PREFIX:, PREFIX:]
    return torch.einsum("bmn,bcn->bcm", affinity, cam)


def fused_affinity_loss(provider):
    def fn(qs, ks, labels):
        with wsss_fast.use_backend(provider):
            losses = [
                wsss_fast.affinity_loss(q, k, labels, num_prefix=PREFIX) for q, k in zip(qs, ks)
            ]
        return sum(losses) / len(losses)

    return fn


def fused_propagate(provider):
    def fn(qs, ks, cam):
        with wsss_fast.use_backend(provider):
            return wsss_fast.propagate(qs, ks, cam, num_prefix=PREFIX)

    return fn


def gemm_flops(op, L, B, N, mode):
    Np = N - PREFIX
    fwd = L * (2 * B * Np * Np * H * D if op == "affinity_loss" else 2 * B * H * Np * N * (D + C))
    return fwd if mode == "fwd" else 3.5 * fwd


def _skip_unavailable(provider, device):
    if provider != "reference" and _backend.unavailable_reason(provider, device):
        pytest.skip(_backend.unavailable_reason(provider, device))


def _measure(benchmark, run, op, L, B, N, mode):
    try:
        result = run_and_measure(benchmark, run, flops=gemm_flops(op, L, B, N, mode))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip("out of memory")
    assert result is not None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("crop", list(CROPS), ids=lambda c: f"crop{c}")
@pytest.mark.parametrize("B", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_affinity_loss(benchmark, device, provider, mode, B, crop, dtype):
    _skip_unavailable(provider, device)
    N = CROPS[crop]
    qs, ks, _, labels = make_inputs(DEEP_LAYERS, B, N, device, dtype)
    if provider == "reference":
        fn = published_affinity_loss
    else:
        fn = fused_affinity_loss(provider)
    if mode == "fwd":
        run = lambda: fn(qs, ks, labels)  # noqa: E731
    else:
        run = lambda: torch.autograd.grad(fn(qs, ks, labels), [*qs, *ks])  # noqa: E731
    benchmark.group = f"affinity_loss crop={crop} B={B} {str(dtype)[6:]} {mode}"
    benchmark.extra_info.update(
        op="affinity_loss",
        provider=provider,
        mode=mode,
        L=DEEP_LAYERS,
        B=B,
        H=H,
        N=N,
        D=D,
        num_prefix=PREFIX,
        crop=crop,
        dtype=str(dtype),
    )
    _measure(benchmark, run, "affinity_loss", DEEP_LAYERS, B, N, mode)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("crop", list(CROPS), ids=lambda c: f"crop{c}")
@pytest.mark.parametrize("B", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_propagate(benchmark, device, provider, mode, B, crop, dtype):
    _skip_unavailable(provider, device)
    N = CROPS[crop]
    qs, ks, cam, _ = make_inputs(SHALLOW_LAYERS, B, N, device, dtype)
    fn = published_propagate if provider == "reference" else fused_propagate(provider)
    if mode == "fwd":

        def run():
            with torch.no_grad():  # AReAM refines its online pseudo labels without gradients
                return fn(qs, ks, cam)
    else:

        def run():
            out = fn(qs, ks, cam)
            return torch.autograd.grad(out, [*qs, *ks, cam], torch.ones_like(out))

    benchmark.group = f"propagate crop={crop} B={B} {str(dtype)[6:]} {mode}"
    benchmark.extra_info.update(
        op="propagate",
        provider=provider,
        mode=mode,
        L=SHALLOW_LAYERS,
        B=B,
        H=H,
        N=N,
        D=D,
        C=C,
        num_prefix=PREFIX,
        crop=crop,
        dtype=str(dtype),
    )
    _measure(benchmark, run, "propagate", SHALLOW_LAYERS, B, N, mode)
