"""Shared pieces of the benchmarks: device flags, machine info, timing with peak memory."""

import os
import subprocess

import torch

HAS_GPU = torch.cuda.is_available()
SMOKE = os.environ.get("WSSS_FAST_BENCH_SMOKE") == "1" and not HAS_GPU


def git_revision() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rev = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=root, text=True).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root).returncode != 0
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_and_measure(benchmark, fn, *, rounds: int = 5):
    """Time ``fn`` (synchronised) with pytest-benchmark and record its peak memory in extra_info."""

    def call():
        out = fn()
        if HAS_GPU:
            torch.cuda.synchronize()
        return out

    if HAS_GPU:
        call()  # warm-up: compile kernels, fill caches
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated() - base
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
    return benchmark.pedantic(
        call, rounds=1 if SMOKE else rounds, iterations=1, warmup_rounds=0 if SMOKE else 1
    )
