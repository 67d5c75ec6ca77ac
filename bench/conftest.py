"""pytest-benchmark harness: GPU, versions and git revision in every result; skips without a GPU.

Run on a GPU machine and keep the JSON:

    python -m pytest bench/bench_random_walk.py --benchmark-json bench/results/random_walk_h100.json

Without a GPU every benchmark is skipped, unless WSSS_FAST_BENCH_SMOKE=1 (the test suite sets
it): then each runs once at a tiny size on the CPU, so the benchmark code itself stays tested.

Without pytest-benchmark installed (or with WSSS_FAST_BENCH_FALLBACK=1) the ``benchmark`` fixture
is ``harness.FallbackBenchmark``: the same timing, written only to WSSS_FAST_BENCH_RECORD.
"""

import os

from harness import HAS_GPU, SMOKE, FallbackBenchmark, git_revision

if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

try:
    import pytest_benchmark  # noqa: F401

    USE_FALLBACK = os.environ.get("WSSS_FAST_BENCH_FALLBACK") == "1"
except ImportError:
    USE_FALLBACK = True


def pytest_collection_modifyitems(config, items):
    if HAS_GPU or SMOKE:
        return
    skip = pytest.mark.skip(
        reason="benchmarks need a CUDA GPU (set WSSS_FAST_BENCH_SMOKE=1 for a CPU smoke run)"
    )
    for item in items:
        if "bench" in str(item.fspath):
            item.add_marker(skip)


# optionalhook: pytest refuses unknown hooks, and this one exists only with pytest-benchmark.
@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    from wsss_fast.cli import collect_info

    info = collect_info()
    machine_info["wsss_fast"] = {
        "gpu": info["gpu"],
        "torch": info["torch"],
        "torch_cuda": info["torch_cuda"],
        "triton": info["triton"],
        "wsss_fast": info["wsss_fast"],
        "git_revision": git_revision(),
        "extension": info["extension"],
    }


if USE_FALLBACK:

    @pytest.fixture
    def benchmark(request):
        return FallbackBenchmark(request.node)


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_GPU else "cpu"
