"""Shared pieces of the benchmarks: device flags, machine info, timing with peak memory.

On a GPU every round is timed by CUDA events recorded around the call, with the L2 cache flushed
(a 256 MiB buffer zeroed) before each round, so that no round finds the previous round's data in
L2. pytest-benchmark records exactly these times: its fixture's timer is replaced by a clock that
advances by the event-measured time of each round (host launch gaps inside the call count; the
flush and the synchronisation do not). On the CPU the same clock reads ``time.perf_counter``.

Environment:
  WSSS_FAST_BENCH_SMOKE=1    no GPU: each case once at a tiny size (the test suite sets it)
  WSSS_FAST_BENCH_ROUNDS=N   timed rounds per case, replacing each case's default (gpu_check.sh)
  WSSS_FAST_BENCH_RECORD=F   append one JSON line per timed case to F as it finishes, so a run
                             cut short keeps what it measured (gpu_check.sh)
  WSSS_FAST_REVISION=REV     the revision to record where the tree has no .git
"""

import json
import os
import statistics
import subprocess
import time

import torch

HAS_GPU = torch.cuda.is_available()
SMOKE = os.environ.get("WSSS_FAST_BENCH_SMOKE") == "1" and not HAS_GPU
# Larger than the L2 of any GPU we target (H100: 50 MB, H200: 60 MB), as triton's do_bench uses.
L2_FLUSH_BYTES = 256 * 2**20


def git_revision() -> str:
    if os.environ.get("WSSS_FAST_REVISION"):
        return os.environ["WSSS_FAST_REVISION"]
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rev = subprocess.check_output(
            ["git", "rev-parse", "HEAD"], cwd=root, text=True, stderr=subprocess.DEVNULL
        ).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root).returncode != 0
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench_rounds(default: int) -> int:
    """Timed rounds for a case: ``WSSS_FAST_BENCH_ROUNDS`` when set, else the case's default."""
    value = os.environ.get("WSSS_FAST_BENCH_ROUNDS")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"WSSS_FAST_BENCH_ROUNDS must be a positive integer, got {value!r}")
    return int(value)


class RoundClock:
    """A timer for pytest-benchmark whose reading advances by the measured time of each round.

    pytest-benchmark takes ``timer()`` before and after each round; the wrapped call adds its own
    measurement in between, so the difference it records is that measurement alone.
    """

    def __init__(self, name: str):
        self.name = name
        self.elapsed = 0.0
        self.times: list[float] = []

    def __call__(self) -> float:
        return self.elapsed

    def __str__(self) -> str:  # what pytest-benchmark writes as the timer's name
        return self.name

    def add(self, seconds: float) -> None:
        self.elapsed += seconds
        self.times.append(seconds)


_flush_buffer = None


def _l2_flush_buffer() -> torch.Tensor:
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    return _flush_buffer


def _timed_round(fn, clock: RoundClock):
    if HAS_GPU:
        flush = _l2_flush_buffer()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def call():
            flush.zero_()
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            clock.add(start.elapsed_time(end) / 1e3)
            return out

    else:

        def call():
            t0 = time.perf_counter()
            out = fn()
            clock.add(time.perf_counter() - t0)
            return out

    return call


def _use_clock(benchmark, clock: RoundClock) -> None:
    # pytest-benchmark has no public way to time with an external clock; its fixture reads the
    # timer from `_timer` each round (5.x; the fallback fixture below has it too).
    if not hasattr(benchmark, "_timer"):
        raise RuntimeError(
            f"{type(benchmark).__module__} has no `_timer` attribute: pin pytest-benchmark<6 or "
            "update bench/harness.py:_use_clock for its API"
        )
    benchmark._timer = clock


def _summary(times: list[float]) -> dict:
    return {
        "median": statistics.median(times),
        "mean": statistics.fmean(times),
        "min": min(times),
        "max": max(times),
        "stddev": statistics.stdev(times) if len(times) > 1 else 0.0,
        "rounds": len(times),
    }


def _record(benchmark, times: list[float]) -> None:
    path = os.environ.get("WSSS_FAST_BENCH_RECORD")
    if not path:
        return
    line = {
        "name": getattr(benchmark, "name", None),
        "fullname": getattr(benchmark, "fullname", None),
        "group": getattr(benchmark, "group", None),
        "stats": _summary(times),
        "times": times,
        "extra_info": benchmark.extra_info,
    }
    with open(path, "a") as f:
        f.write(json.dumps(line, default=str) + "\n")


def run_and_measure(benchmark, fn, *, rounds: int = 5, flops=None, bytes_moved=None):
    """Time ``fn`` with pytest-benchmark; record peak memory, TFLOP/s and GB/s in extra_info.

    ``flops``: the case's floating-point operations (the bench file states its convention);
    ``bytes_moved``: the fewest bytes it must move through device memory. Each gives
    ``tflops`` / ``gbps`` from the median round time. Returns ``fn``'s last result.
    """
    rounds = 1 if SMOKE else bench_rounds(rounds)
    if HAS_GPU:
        _l2_flush_buffer()  # allocated before the baseline, so it is not counted as the op's
        fn()  # warm-up: compile kernels, fill caches
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated() - base
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
        clock, warmup = RoundClock("cuda_events_l2_flush"), 0
    else:
        clock, warmup = RoundClock("perf_counter"), 0 if SMOKE else 1
    _use_clock(benchmark, clock)
    result = benchmark.pedantic(
        _timed_round(fn, clock), rounds=rounds, iterations=1, warmup_rounds=warmup
    )
    times = clock.times[-rounds:]  # the warm-up rounds come first; disabled runs time one call
    median = statistics.median(times)
    benchmark.extra_info["timer"] = str(clock)
    if flops is not None:
        benchmark.extra_info["flop_count"] = flops
        benchmark.extra_info["tflops"] = round(flops / median / 1e12, 2)
    if bytes_moved is not None:
        benchmark.extra_info["byte_count"] = bytes_moved
        benchmark.extra_info["gbps"] = round(bytes_moved / median / 1e9, 1)
    _record(benchmark, times)
    return result


def record_result_only(benchmark) -> None:
    """For a case whose result is in extra_info rather than a time (a search): one empty round
    for pytest-benchmark, and its line in ``WSSS_FAST_BENCH_RECORD``."""
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    _record(benchmark, [0.0])


class FallbackBenchmark:
    """The part of pytest-benchmark's ``benchmark`` fixture the suites use, for machines without
    it: ``pedantic`` runs the rounds, the times reach ``WSSS_FAST_BENCH_RECORD``."""

    def __init__(self, node):
        self.name = node.name
        self.fullname = node.nodeid
        self.group = None
        self.extra_info: dict = {}
        self.stats = None
        self._timer = time.perf_counter

    def pedantic(
        self,
        target,
        args=(),
        kwargs=None,
        setup=None,
        teardown=None,
        rounds=1,
        warmup_rounds=0,
        iterations=1,
    ):
        kwargs = kwargs or {}
        result = None
        for _ in range(warmup_rounds + rounds):
            if setup is not None:
                args, kwargs = setup() or (args, kwargs)
            for _ in range(iterations):
                result = target(*args, **kwargs)
            if teardown is not None:
                teardown(*args, **kwargs)
        return result
