"""scripts/gpu_check.sh and its pieces, checked without a GPU.

The verdict table is fed hand-written pytest-benchmark JSON, harness JSONL and junit XML whose
expected rows are worked out by hand below; the script runs for real on the CPU (its
GPU_CHECK_ALLOW_CPU mode, benchmarks in smoke mode) to check the phase, time-box and report glue.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_report = _load("wsss_gpu_report", ROOT / "bench" / "gpu_report.py")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "WSSS_FAST_"))}
    env.pop("OUT", None)
    env.update(PYTHON=sys.executable, **extra)
    return env


# ------------------------------------------------------------------------------- fake results


def _junit(cases: list[tuple[str, str, str, str]]) -> str:
    """cases: (classname, name, outcome, message) -> junit XML as pytest writes it."""
    body = []
    for cls, name, outcome, msg in cases:
        inner = {
            "passed": "",
            "failed": f"<failure message={quoteattr(msg)}>trace</failure>",
            "skipped": f'<skipped type="pytest.skip" message={quoteattr(msg)}>skip</skipped>',
        }[outcome]
        attrs = f"classname={quoteattr(cls)} name={quoteattr(name)}"
        body.append(f'<testcase {attrs} time="0.1">{inner}</testcase>')
    return (
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">'
        + "".join(body)
        + "</testsuite></testsuites>"
    )


def _pb_case(name: str, group: str, median: float, **extra) -> dict:
    """One benchmark as pytest-benchmark's --benchmark-json writes it (the fields we read)."""
    return {
        "group": group,
        "name": name,
        "fullname": f"bench/bench_attention.py::{name}",
        "params": None,
        "stats": {"min": median, "max": median, "mean": median, "stddev": 0.0, "rounds": 3,
                  "median": median, "iqr": 0.0, "ops": 1 / median},
        "extra_info": extra,
    }  # fmt: skip


@pytest.fixture
def fake_work(tmp_path):
    """A work folder as gpu_check.sh leaves it after a run with some failures."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "phases.tsv").write_text(
        "build\tok\t0\t120\t\n"
        "info\tok\t0\t5\t\n"
        "tests\tfail\t1\t80\t\n"
        "bench_attention\ttimeout\t124\t150\t\n"
        "bench_random_walk\tok\t0\t40\t\n"
    )
    (work / "info.json").write_text(
        json.dumps({"gpu": {"name": "NVIDIA H100 80GB HBM3"}, "torch": "2.11.0", "triton": "3.6"})
    )
    ops = "tests.ops.test_attention"
    (work / "tests_gpu.xml").write_text(
        _junit(
            [
                (ops, "test_matches_reference[N37-fp16-triton-cuda]", "passed", ""),
                (ops, "test_matches_reference[N197-bf16-triton-cuda]", "passed", ""),
                (
                    ops,
                    "test_matches_reference[N785-bf16-triton-cuda]",
                    "failed",
                    "assert 0.1 < 0.01",
                ),
                (ops, "test_matches_reference[N1-bf16-cuda-cuda]", "skipped", "no CUDA kernel"),
                ("tests.ops.test_random_walk", "test_gpu_psa_size[cuda]", "passed", ""),
            ]
        )
    )
    ga, gb = "attention vitb N=197 bf16 fwd", "attention vitb N=3137 bf16 fwd"
    # Group A: reference 4 ms, triton 2 ms (2x); group B: reference 12 ms, triton 1.5 ms (8x).
    # Triton's speedup is the geometric mean, sqrt(2 * 8) = 4.0x; its best case is B's 300.
    (work / "bench_attention.json").write_text(
        json.dumps(
            {
                "benchmarks": [
                    _pb_case("bench_attention[reference-fwd-N197]", ga, 4e-3, tflops=75.0),
                    _pb_case("bench_attention[triton-fwd-N197]", ga, 2e-3, tflops=150.0),
                    _pb_case("bench_attention[reference-fwd-N3137]", gb, 12e-3, tflops=25.0),
                    _pb_case("bench_attention[triton-fwd-N3137]", gb, 1.5e-3, tflops=300.0),
                ]
            }
        )
    )
    cls = "bench.bench_attention"
    (work / "bench_attention.xml").write_text(
        _junit(
            [
                (cls, "bench_attention[reference-fwd-N197]", "passed", ""),
                (cls, "bench_attention[triton-fwd-N197]", "passed", ""),
                (cls, "bench_attention[reference-fwd-N3137]", "passed", ""),
                (cls, "bench_attention[triton-fwd-N3137]", "passed", ""),
                (
                    cls,
                    "bench_attention[triton-bwd-N3137]",
                    "failed",
                    "RuntimeError: out of resource",
                ),
                (cls, "bench_attention[sdpa-fwd-N197]", "skipped", "SDPA cannot export affinities"),
            ]
        )
    )
    # random_walk: JSONL records only (no pytest-benchmark JSON, no junit: the phase was cut
    # short), the last line cut off mid-write. squaring 100 ms, cuda 5 ms: 20x.
    records = [
        {"name": "bench_random_walk[squaring-M11750-fp32]", "group": "rw M=11750",
         "stats": {"median": 0.1, "rounds": 3}, "extra_info": {"provider": "squaring", "tflops": 50.0}},
        {"name": "bench_random_walk[cuda-M11750-fp32]", "group": "rw M=11750",
         "stats": {"median": 0.005, "rounds": 3}, "extra_info": {"provider": "cuda", "gbps": 2500.0}},
    ]  # fmt: skip
    (work / "bench_random_walk.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records) + '{"name": "bench_random_walk[tri'
    )
    return work


def _row(lines: list[str], op: str, backend: str) -> list[str]:
    found = [ln.split() for ln in lines if ln.split()[:2] == [op, backend]]
    assert len(found) == 1, f"no single row for {op}/{backend} in:\n" + "\n".join(lines)
    return found[0]


# ---------------------------------------------------------------------------------------- units


def test_slug():
    assert gpu_report.slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert gpu_report.slug("NVIDIA H200") == "h200"
    assert gpu_report.slug("Tesla V100-SXM2-16GB") == "tesla-v100-sxm2-16gb"
    assert gpu_report.slug("  ") == "unknown-gpu"


def test_op_backend_from_ids():
    ob = gpu_report.op_backend
    assert ob("bench.bench_cuda_ops", "bench_refine[pamr-cuda-448x448]") == ("pamr", "cuda")
    assert ob("bench.bench_attention", "bench_attention[sdpa-fwd-export-None]") == (
        "attention",
        "sdpa",
    )
    assert ob("tests.ops.test_par", "test_gpu_large_image[par-cuda]") == ("par", "cuda")
    assert ob("tests.ops.test_par", "test_gpu_peak_memory[pamr-cuda]") == ("pamr", "cuda")
    assert ob("tests.ops.test_attention", "test_gpu_vit_shapes_bf16[785]") == ("attention", "-")
    assert ob("bench.bench_methods", "test_crt_step[fused-(336, 16)]") == ("crt_step", "fused")


def test_verdict_table_from_fake_results(fake_work, tmp_path, capsys):
    results = tmp_path / "results"
    rep = gpu_report.report(str(fake_work), str(results), "h100-80gb-hbm3_abc", print_verdict=True)
    lines = capsys.readouterr().out.splitlines()

    assert lines[0].split()[2:5] == ["NVIDIA", "H100", "80GB"]
    assert "tests FAIL 80s" in lines[1] and "bench_attention TIMEOUT 150s" in lines[1]

    # attention/triton: tests 2 passed, 1 failed, 0 skipped; bench 2 timed, 1 failed; best case
    # 300 TFLOP/s at 1.50 ms; 4.0x the reference.
    tri = _row(lines, "attention", "triton")
    assert tri[2:5] == ["FAIL", "2/1/0", "2/1/0"]
    assert tri[5:10] == ["300.0", "TFLOP/s", "1.50", "ms", "4.0x"]
    assert tri[10] == "fwd-N3137"
    ref = _row(lines, "attention", "reference")
    assert ref[2:5] == ["pass", "0/0/0", "2/0/0"] and ref[9] == "-"
    sdpa = _row(lines, "attention", "sdpa")
    assert sdpa[2:5] == ["SKIP", "0/0/0", "0/0/1"]
    assert "SDPA cannot export affinities" in " ".join(sdpa)
    cuda_t = _row(lines, "attention", "cuda")  # a test-only row
    assert cuda_t[2:4] == ["SKIP", "0/0/1"]
    rw = _row(lines, "random_walk", "cuda")
    assert rw[2:10] == ["pass", "1/0/0", "1/0/0", "2500.0", "GB/s", "5.00", "ms", "20.0x"]

    failed = [ln for ln in lines if ln.startswith("FAILED")]
    assert failed == [
        "FAILED tests.ops.test_attention::test_matches_reference[N785-bf16-triton-cuda]: "
        "assert 0.1 < 0.01",
        "FAILED bench_attention[triton-bwd-N3137]: RuntimeError: out of resource",
    ]
    assert lines[-1].startswith("VERDICT: FAIL (phase tests fail (rc 1); ")
    assert "phase bench_attention timeout (rc 124)" in lines[-1]
    assert "1 gpu test(s) failed; 1 benchmark case(s) failed" in lines[-1]
    assert lines[-1].endswith("3 gpu tests passed, 6 benchmark cases timed)")
    assert len(lines) < 40, "the verdict must fit on one screen"

    saved = json.loads((results / "h100-80gb-hbm3_abc.json").read_text())
    assert saved["schema"] == "wsss_fast.gpu_check/1" and saved["verdict"]["pass"] is False
    assert saved["gpu"] == "NVIDIA H100 80GB HBM3"
    assert saved == json.loads(json.dumps(rep))
    timed = {b["name"]: b["stats"]["median"] for b in saved["benchmarks"] if b["stats"]}
    assert timed["bench_random_walk[cuda-M11750-fp32]"] == 0.005
    md = (results / "h100-80gb-hbm3_abc.md").read_text()
    assert "| attention vitb N=3137 bf16 fwd | triton | 1.50 ms | 300.0 |" in md
    assert "| attention vitb N=3137 bf16 fwd | triton | 1.50 ms | 300.0 | - | - | 8.00x |" in md


def test_verdict_passes_when_everything_ran(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "phases.tsv").write_text("build\tskipped\t\t0\tup to date\ntests\tok\t0\t30\t\n")
    (work / "tests_gpu.xml").write_text(
        _junit([("tests.ops.test_par", "test_gpu_large_image[par-cuda]", "passed", "")])
    )
    rep = gpu_report.report(str(work), str(tmp_path / "r"), "x", print_verdict=True)
    last = capsys.readouterr().out.splitlines()[-1]
    assert rep["verdict"]["pass"] is True
    assert last == "VERDICT: PASS (1 gpu tests passed, 0 benchmark cases timed)"


def test_verdict_fails_when_every_gpu_test_skipped(tmp_path, capsys):
    """A GPU run whose gpu tests all skip tested nothing on the GPU: that is no pass."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "phases.tsv").write_text("tests\tok\t0\t30\t\n")
    (work / "tests_gpu.xml").write_text(
        _junit([("tests.ops.test_par", "test_gpu_large_image[par-cuda]", "skipped", "no GPU")])
    )
    gpu_report.report(str(work), str(tmp_path / "r"), "x", print_verdict=True)
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == "VERDICT: FAIL (no gpu test passed; 0 gpu tests passed, 0 benchmark cases timed)"


def test_verdict_with_nothing_run_fails(tmp_path, capsys):
    rep = gpu_report.report(str(tmp_path), str(tmp_path / "r"), "x", print_verdict=True)
    assert rep["verdict"]["pass"] is False
    assert capsys.readouterr().out.splitlines()[-1].startswith("VERDICT: FAIL (no phase ran")


# ------------------------------------------------------------------------------------- harness


def test_harness_records_the_round_clock(tmp_path, monkeypatch):
    """Rounds from WSSS_FAST_BENCH_ROUNDS, one warm-up round on the CPU, per-round times from the
    clock, TFLOP/s and GB/s from the median, one JSONL record per case."""
    harness = _load("wsss_bench_harness", ROOT / "bench" / "harness.py")
    if harness.HAS_GPU:
        pytest.skip("checks the CPU clock path; the GPU path is what gpu_check.sh runs")
    monkeypatch.setattr(harness, "SMOKE", False)
    monkeypatch.setenv("WSSS_FAST_BENCH_ROUNDS", "4")
    record = tmp_path / "rec.jsonl"
    monkeypatch.setenv("WSSS_FAST_BENCH_RECORD", str(record))
    now = [100.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: now[0])
    durations = iter([9.0, 0.5, 0.25, 0.5, 2.0])  # warm-up first, then the 4 timed rounds
    calls = []

    def fn():
        calls.append(1)
        now[0] += next(durations)
        return len(calls)

    node = types.SimpleNamespace(name="bench_x[a]", nodeid="bench/bench_x.py::bench_x[a]")
    bench = harness.FallbackBenchmark(node)
    bench.group = "g"
    out = harness.run_and_measure(bench, fn, rounds=7, flops=2e12, bytes_moved=1e9)
    assert out == 5 and len(calls) == 5
    # Median of 0.5, 0.25, 0.5, 2.0 is 0.5 s: 2e12 / 0.5 = 4 TFLOP/s, 1e9 / 0.5 = 2 GB/s.
    assert bench.extra_info["tflops"] == 4.0 and bench.extra_info["gbps"] == 2.0
    assert bench.extra_info["timer"] == "perf_counter"
    (line,) = record.read_text().splitlines()
    rec = json.loads(line)
    assert rec["name"] == "bench_x[a]" and rec["group"] == "g"
    assert rec["times"] == [0.5, 0.25, 0.5, 2.0]
    assert rec["stats"]["median"] == 0.5 and rec["stats"]["rounds"] == 4
    monkeypatch.setenv("WSSS_FAST_BENCH_ROUNDS", "0")
    with pytest.raises(ValueError, match="WSSS_FAST_BENCH_ROUNDS must be a positive integer"):
        harness.bench_rounds(3)


def test_harness_gpu_path_times_rounds_by_events(tmp_path, monkeypatch):
    """The GPU branch with the CUDA calls faked: two untimed calls (warm-up, peak memory), then
    each round flushes L2 and is timed from its events, milliseconds turned into seconds."""
    harness = _load("wsss_bench_harness_gpu", ROOT / "bench" / "harness.py")
    gpu_ms = [0.0]  # the fake device clock

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self):
            self.at = gpu_ms[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.at - self.at

    class FakeFlush:
        zeroed = 0

        def zero_(self):
            FakeFlush.zeroed += 1
            gpu_ms[0] += 1000.0  # the flush is enqueued before the start event: never counted

    cuda = harness.torch.cuda
    monkeypatch.setattr(harness, "HAS_GPU", True)
    monkeypatch.setattr(harness, "SMOKE", False)
    monkeypatch.setattr(harness, "_l2_flush_buffer", lambda: FakeFlush())
    monkeypatch.setattr(cuda, "Event", FakeEvent)
    monkeypatch.setattr(cuda, "synchronize", lambda: None)
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(cuda, "memory_allocated", lambda: 100)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda: 400)
    monkeypatch.setattr(cuda, "get_device_name", lambda: "Fake GPU")
    monkeypatch.setenv("WSSS_FAST_BENCH_ROUNDS", "3")
    monkeypatch.delenv("WSSS_FAST_BENCH_RECORD", raising=False)
    calls = []

    def fn():
        calls.append(1)
        gpu_ms[0] += 4.0  # 4 ms of device time per call
        return "out"

    node = types.SimpleNamespace(name="bench_y", nodeid="bench/bench_y.py::bench_y")
    bench = harness.FallbackBenchmark(node)
    clocks = []
    real_use_clock = harness._use_clock
    monkeypatch.setattr(
        harness, "_use_clock", lambda b, c: (clocks.append(c), real_use_clock(b, c))
    )
    assert harness.run_and_measure(bench, fn, flops=8e12) == "out"
    assert len(calls) == 2 + 3 and FakeFlush.zeroed == 3
    assert clocks[0].times == [0.004, 0.004, 0.004] and bench._timer() == pytest.approx(0.012)
    # 8e12 FLOP in 4 ms is 2000 TFLOP/s; peak memory is measured above the baseline.
    assert bench.extra_info["tflops"] == 2000.0
    assert bench.extra_info["peak_memory_bytes"] == 300
    assert bench.extra_info["timer"] == "cuda_events_l2_flush"
    assert bench.extra_info["gpu"] == "Fake GPU"


def test_bench_suite_runs_without_pytest_benchmark(tmp_path):
    """The fallback fixture carries a suite when the pytest-benchmark plugin is absent."""
    record = tmp_path / "rec.jsonl"
    env = _env(
        WSSS_FAST_BENCH_SMOKE="1",
        WSSS_FAST_BENCH_FALLBACK="1",
        WSSS_FAST_BENCH_RECORD=str(record),
    )
    cmd = [sys.executable, "-m", "pytest", "bench/bench_random_walk.py", "-q", "-p", "no:benchmark"]
    cmd += ["-p", "no:cacheprovider", "-k", "squaring or cuda"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    names = sorted(json.loads(ln)["name"] for ln in record.read_text().splitlines())
    assert names == [
        "bench_random_walk[cuda-M64-bf16]",
        "bench_random_walk[cuda-M64-fp32]",
        "bench_random_walk[squaring-M64-fp32]",
    ]


# -------------------------------------------------------------------------------------- script


def test_script_dry_run_lists_the_phases():
    res = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        env=_env(OUT="/some/out"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    phases = [ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("phase ")]
    phases = [p.rstrip(":") for p in phases]
    assert phases == [
        "preflight",
        "build",
        "info",
        "tests",
        "bench_random_walk",
        "bench_cuda_ops",
        "bench_affinity",
        "bench_attention",
        "bench_methods",
        "report",
    ]
    assert "results in /some/out" in res.stdout
    assert "pip install -e . --no-deps --no-build-isolation" in res.stdout
    assert "WSSS_FAST_BENCH_ROUNDS=3" in res.stdout


def test_script_refuses_without_gpu_in_one_line():
    res = subprocess.run(
        ["bash", str(SCRIPT)],
        env=_env(CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1
    assert res.stderr.startswith("gpu_check: no CUDA GPU visible")
    assert "--dry-run" in res.stderr


def test_script_runs_every_phase_and_reports(tmp_path):
    """The whole script on the CPU: a failing gpu test, one benchmark suite in smoke mode."""
    fake = tmp_path / "test_fake_gpu.py"
    fake.write_text(
        "import pytest\n\n\n@pytest.mark.gpu\ndef test_gpu_ok():\n    pass\n\n\n"
        "@pytest.mark.gpu\ndef test_gpu_broken():\n    assert False, 'deliberately broken'\n\n\n"
        "def test_not_gpu():\n    pass\n"
    )
    out, work = tmp_path / "out", tmp_path / "work"
    env = _env(
        OUT=str(out),
        GPU_CHECK_WORK=str(work),
        GPU_CHECK_ALLOW_CPU="1",
        GPU_CHECK_BUILD="never",
        GPU_CHECK_SUITES="random_walk",
        GPU_CHECK_BENCH_K="squaring or cuda",
        GPU_CHECK_TESTS=str(fake),
        WSSS_FAST_REVISION="testrev",
    )
    res = subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 1, res.stdout[-4000:] + res.stderr[-2000:]
    assert sorted(os.listdir(out)) == [
        "cpu_testrev.json",
        "cpu_testrev.log",
        "cpu_testrev.md",
        "gpu_check_raw.tar.gz",
    ]
    rep = json.loads((out / "cpu_testrev.json").read_text())
    assert [(p["name"], p["status"]) for p in rep["phases"]] == [
        ("build", "skipped"),
        ("info", "ok"),
        ("tests", "fail"),
        ("bench_random_walk", "ok"),
    ]
    assert (rep["tests"]["passed"], rep["tests"]["failed"]) == (1, 1)
    timed = {b["name"]: b for b in rep["benchmarks"] if b["stats"]}
    assert sorted(timed) == [
        "bench_random_walk[cuda-M64-bf16]",
        "bench_random_walk[cuda-M64-fp32]",
        "bench_random_walk[squaring-M64-fp32]",
    ]
    # pytest-benchmark's JSON holds the harness's own round times, not its wall clock.
    recorded = {
        r["name"]: r["stats"]["median"]
        for r in map(json.loads, (work / "bench_random_walk.jsonl").read_text().splitlines())
    }
    assert {n: b["stats"]["median"] for n, b in timed.items()} == recorded
    assert (work / "bench_random_walk.json").exists()
    log = (out / "cpu_testrev.log").read_text()
    assert res.stdout == log
    last = log.splitlines()[-1]
    assert last.startswith("VERDICT: FAIL (phase tests fail (rc 1); 1 gpu test(s) failed")
    # junit's classname holds the test file's path relative to pytest's rootdir, which depends on
    # where the checkout and the temporary folder lie.
    assert re.search(
        r"FAILED (\S+\.)?test_fake_gpu::test_gpu_broken: AssertionError: deliberately broken", log
    ), log
