"""random_walk: iterated fused kernels against dense squaring of T (what PSA and IRN do).

Providers:
- ``squaring``: T = aff**beta / column sums, squared log2(steps) times, then cam @ T (PSA's
  ``logt = 6`` is 64 steps) -- three M x M buffers alive at the peak;
- ``torch``, ``triton``, ``cuda``: ``wsss_fast.random_walk`` on that backend (``steps``
  applications; the fused kernels keep no M x M buffer beyond the input).
Shapes: C = 21 (VOC), steps = 64, beta = 8, M from 1024 to 11750 (a 500x375 image at stride 4).
Recorded: median time (pytest-benchmark), peak memory above the inputs, GPU and versions;
for ``squaring`` TFLOP/s of its products (``log2(steps)`` squarings at ``2 M^3`` and ``cam @ T`` at
``2 C M^2``), for the walks GB/s of the ``aff`` reads they cannot avoid (once for the column sums
and once per step: ``(steps + 1) M^2`` elements; the ``[C, M]`` vectors are left out).
"""

import math

import pytest
import torch
from harness import HAS_GPU, SMOKE, run_and_measure

import wsss_fast

SIZES = [64] if SMOKE else [1024, 4096, 11750]
C, STEPS, BETA = 21, 64, 8.0
PROVIDERS = ["squaring", "torch", "triton", "cuda"]


def dense_squaring(aff: torch.Tensor, cam: torch.Tensor, beta: float, steps: int) -> torch.Tensor:
    t = aff.float().pow(beta)
    t = t / t.sum(dim=1, keepdim=True)
    for _ in range(int(math.log2(steps))):
        t = torch.bmm(t, t)
    return torch.bmm(cam.float(), t)


def make_inputs(M: int, device: str, aff_dtype: torch.dtype):
    # Drawn on the device: drawing gigabytes on the CPU took most of a GPU run (gpu_check.sh).
    g = torch.Generator(device).manual_seed(0)
    aff = torch.rand(1, M, M, generator=g, device=device) * 0.9
    aff.diagonal(dim1=1, dim2=2).fill_(1.0)
    cam = torch.rand(1, C, M, generator=g, device=device)
    return aff.to(aff_dtype), cam


@pytest.mark.parametrize("aff_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M", SIZES, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_random_walk(benchmark, device, provider, M, aff_dtype):
    if provider == "squaring" and aff_dtype != torch.float32:
        pytest.skip("the published code squares in float32 only")
    if provider != "squaring" and wsss_fast._backend.unavailable_reason(provider, device):
        pytest.skip(wsss_fast._backend.unavailable_reason(provider, device))
    if SMOKE and provider == "triton" and aff_dtype == torch.bfloat16:
        pytest.skip("smoke run: one interpreted Triton case is enough")
    aff, cam = make_inputs(M, device, aff_dtype)
    if provider == "squaring":
        fn = lambda: dense_squaring(aff, cam, BETA, STEPS)  # noqa: E731
    else:

        def fn():
            with wsss_fast.use_backend(provider):
                return wsss_fast.random_walk(aff, cam, beta=BETA, steps=STEPS)

    benchmark.group = f"random_walk M={M} C={C} steps={STEPS} aff={str(aff_dtype)[6:]}"
    benchmark.extra_info.update(provider=provider, M=M, C=C, steps=STEPS, aff_dtype=str(aff_dtype))
    if provider == "squaring":
        work = dict(flops=int(math.log2(STEPS)) * 2 * M**3 + 2 * C * M * M)
    else:
        work = dict(bytes_moved=(STEPS + 1) * M * M * aff.element_size())
    rounds = 3 if M > 8000 and provider == "squaring" else 5
    out = run_and_measure(benchmark, fn, rounds=rounds, **work)
    assert out.shape == cam.shape and bool(torch.isfinite(out).all())
    if HAS_GPU:
        # Peak memory counted in M x M float32 buffers beyond the inputs.
        benchmark.extra_info["extra_mxm_buffers"] = round(
            benchmark.extra_info["peak_memory_bytes"] / (4 * M * M), 2
        )
