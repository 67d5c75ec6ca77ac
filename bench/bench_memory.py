"""The project's memory claims, counted on the meta device (``wsss_fast.memory``): the peak of
one training step with the fused ops against the same step on ``reference`` (the published
behaviour, every N x N attention kept). Not timed, and the same on a CPU as on a GPU.

    .venv/bin/python -m pytest bench/bench_memory.py -q
"""

from pathlib import Path

import pytest

from wsss_fast import memory
from wsss_fast.cli import _load_config

ROOT = Path(__file__).resolve().parents[1]

# (method, crop, batch, at most this fraction of the reference peak)
CLAIMS = [
    ("aream", 448, 8, 1 / 3),
    ("aream", 896, 8, 1 / 10),
    ("getam", 512, 4, 1 / 5),
    pytest.param(
        "crt",
        672,
        16,
        1 / 2,
        marks=pytest.mark.xfail(
            strict=True,
            reason="measured 0.74 (47.2 of 63.9 GiB): what the fused attention removes (the "
            "[B, H, N, N] softmax and its bf16 copy, ~16 GiB) is a quarter of this step; the rest "
            "is the ViT's linear, GELU and residual activations of 25 tiles x 3 block repeats "
            "per image and the ResNet-152 branch, which no attention kernel touches",
        ),
    ),
]


@pytest.mark.parametrize("method,crop,batch,fraction", CLAIMS)
def bench_memory_claim(method, crop, batch, fraction):
    cfg = _load_config(str(ROOT / f"configs/{method}_voc.yaml"), [])
    ref = memory.count_step(cfg, crop=crop, batch=batch, backend="reference")
    fused = memory.count_step(cfg, crop=crop, batch=batch, backend="auto")
    assert fused.phase == ref.phase == ("train" if method == "crt" else "2")
    assert "triton" in fused.backends.values()
    ratio = fused.peak_bytes / ref.peak_bytes
    assert ratio <= fraction, (
        f"{method} crop {crop} batch {batch}: fused {memory.format_bytes(fused.peak_bytes)} is "
        f"{ratio:.3f} of reference {memory.format_bytes(ref.peak_bytes)}, claim <= {fraction:.3f}"
    )
