"""attention: fused backends against eager attention (what published WSSS code does) and SDPA.

Providers:
- ``reference``: eager attention in the input dtype, as timm's non-fused path and the published
  code run it: ``P = softmax(q k^T s)`` materialised and kept for backward, ``P.mean(1)`` for the
  mean export, ``P[:, :, :num_rows]`` for the rows export;
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (cannot export: no-export only);
- ``torch``, ``triton``: ``wsss_fast.attention`` on that backend.
Modes: ``fwd``, ``bwd`` (backward of a forward done outside the timing), ``fwd+bwd``.
Shapes: ViT-S (H = 6) and ViT-B (H = 12), D = 64, N in 197, 785, 1025, 3137, B = 16384 // N.
Recorded per case: median time (pytest-benchmark), peak memory above the inputs, TFLOP/s with the
FlashAttention convention (forward ``4 B H N^2 D``, backward 2.5x that).
"""

import pytest
import torch
import torch.nn.functional as F
from harness import SMOKE, run_and_measure

import wsss_fast
from wsss_fast import _backend

HEADS = {"vits": 6, "vitb": 12}
SIZES = [37] if SMOKE else [197, 785, 1025, 3137]
MODELS = ["vits"] if SMOKE else ["vits", "vitb"]
DTYPES = [torch.float32] if SMOKE else [torch.bfloat16, torch.float32]
PROVIDERS = ["reference", "sdpa", "torch", "triton"]
MODES = ["fwd", "bwd", "fwd+bwd"]
EXPORTS = [None, "mean", "rows"]
D = 64


def eager(q, k, v, export):
    p = torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
    out = p @ v
    if export == "mean":
        return out, p.mean(1)
    if export == "rows":
        return out, p[:, :, :1]
    return out


def provider_fn(provider, export):
    if provider == "reference":
        return lambda q, k, v: eager(q, k, v, export)
    if provider == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)

    def fused(q, k, v):
        with wsss_fast.use_backend(provider):
            return wsss_fast.attention(q, k, v, export=export)

    return fused


def flops(B, H, N, mode):
    fwd = 4 * B * H * N * N * D
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("N", SIZES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("export", EXPORTS, ids=lambda e: f"export-{e}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_attention(benchmark, device, provider, mode, export, model, N, dtype):
    if provider == "sdpa" and export is not None:
        pytest.skip("SDPA cannot export affinities")
    if provider in ("torch", "triton") and _backend.unavailable_reason(provider, device):
        pytest.skip(_backend.unavailable_reason(provider, device))
    if SMOKE and provider == "triton" and mode != "fwd+bwd":
        pytest.skip("smoke run: one interpreted Triton mode is enough")
    H = HEADS[model]
    B = 1 if SMOKE else max(1, 16384 // N)
    # Drawn on the device: drawing gigabytes on the CPU took most of a GPU run (gpu_check.sh).
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (
        torch.randn(B, H, N, D, generator=g, device=device).to(dtype).requires_grad_()
        for _ in range(3)
    )
    fn = provider_fn(provider, export)

    def grads_of(outs):
        outs = outs if isinstance(outs, tuple) else (outs,)
        return [torch.ones_like(o) for o in outs], outs

    if mode == "fwd":
        run = lambda: fn(q, k, v)  # noqa: E731
    elif mode == "bwd":
        ones, outs = grads_of(fn(q, k, v))
        run = lambda: torch.autograd.grad(outs, (q, k, v), ones, retain_graph=True)  # noqa: E731
    else:

        def run():
            ones, outs = grads_of(fn(q, k, v))
            return torch.autograd.grad(outs, (q, k, v), ones)

    benchmark.group = f"attention {model} N={N} {str(dtype)[6:]} {mode} export={export}"
    benchmark.extra_info.update(
        provider=provider,
        mode=mode,
        export=export,
        model=model,
        B=B,
        H=H,
        N=N,
        D=D,
        dtype=str(dtype),
    )
    result = run_and_measure(benchmark, run, flops=flops(B, H, N, mode))
    assert result is not None
