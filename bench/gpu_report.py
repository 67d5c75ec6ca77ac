"""The results file, markdown summary and one-screen verdict of ``scripts/gpu_check.sh``.

Standard library only, so that it runs, and reports, whatever else is broken. It reads the work
folder the script fills:

- ``phases.tsv``: one line per phase, ``name  status  rc  seconds  note`` (tab-separated), with
  status ``ok``, ``fail``, ``timeout`` or ``skipped``;
- ``info.json``: ``wsss-fast info --json`` (GPU, versions, backends, extension build);
- ``tests_gpu.xml``: the junit XML of ``pytest -m gpu``;
- ``bench_<suite>.json`` (pytest-benchmark's ``--benchmark-json``), ``bench_<suite>.jsonl``
  (one record per timed case, written by ``harness.run_and_measure`` as it goes, so a phase cut
  short by its time box keeps what it measured) and ``bench_<suite>.xml`` (junit: which cases
  failed or were skipped).

``report`` writes ``<name>.json`` and ``<name>.md`` into the results folder and, with ``--print``,
prints the verdict: each op x backend with its tests and benchmark cases passed/failed/skipped,
the best throughput (TFLOP/s where the bench file states FLOPs, GB/s where it states bytes), the
median time of that case and the speedup over the published way (``reference``, ``squaring``,
``published``) as a geometric mean over the cases both ran.

    python bench/gpu_report.py slug "NVIDIA H100 80GB HBM3"       # -> h100-80gb-hbm3
    python bench/gpu_report.py report --work DIR --results DIR --name h100_abc123 --print
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import math
import os
import re
import sys
import xml.etree.ElementTree as ET

SCHEMA = "wsss_fast.gpu_check/1"
# Providers that stand for what the published code does; speedups are taken against them.
BASELINES = ("reference", "squaring", "published")
PROVIDERS = ("reference", "squaring", "published", "sdpa", "torch", "triton", "cuda", "fused")
# Ops that a parametrised bench function covers more than one of (bench_refine: par and pamr).
PARAM_OPS = ("par", "pamr")
PHASE_STATES = ("ok", "fail", "timeout", "skipped")


def slug(gpu_name: str) -> str:
    """A file-name-safe GPU name: ``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3``."""
    s = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    s = re.sub(r"^nvidia-", "", s)
    return s or "unknown-gpu"


# ------------------------------------------------------------------------------------- reading


def read_phases(work: str) -> list[dict]:
    phases = []
    path = os.path.join(work, "phases.tsv")
    if not os.path.exists(path):
        return phases
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 4 or not parts[0]:
                continue
            name, status, rc, seconds = parts[:4]
            phases.append(
                {
                    "name": name,
                    "status": status if status in PHASE_STATES else "fail",
                    "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                    "seconds": float(seconds) if _is_number(seconds) else None,
                    "note": parts[4] if len(parts) > 4 else "",
                }
            )
    return phases


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def split_test_id(name: str) -> tuple[str, list[str]]:
    """``bench_x[a-b-c]`` -> (``bench_x``, [a, b, c]); ids are joined by '-' as pytest does."""
    m = re.match(r"^([^\[]+)(?:\[(.*)\])?$", name)
    if not m:
        return name, []
    func, params = m.group(1), m.group(2)
    return func, (params.split("-") if params else [])


def op_backend(module: str, name: str, extra: dict | None = None) -> tuple[str, str]:
    """(op, backend) of a test or benchmark case.

    Benchmarks: the op is the bench function's name without ``bench_``/``test_``, unless
    extra_info names it. Tests: the op is the test module's name without ``test_``
    (``tests/ops/test_attention.py`` -> ``attention``). A ``par``/``pamr`` parameter names the op
    in both. The backend is extra_info's provider, else the first parameter that names one, else
    ``-``.
    """
    extra = extra or {}
    func, params = split_test_id(name)
    if module.split(".")[-1].startswith("bench_") or func.startswith("bench_"):
        op = re.sub(r"^(bench|test)_", "", func)
    else:
        op = re.sub(r"^test_", "", module.split(".")[-1])
    op = next((p for p in params if p in PARAM_OPS), op)
    op = str(extra.get("op") or op)
    backend = extra.get("provider") or next((p for p in params if p in PROVIDERS), "-")
    return op, str(backend)


def read_junit(path: str) -> list[dict]:
    """Test cases of a junit XML: id, module, name, outcome (passed/failed/skipped), message."""
    if not os.path.exists(path):
        return []
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:  # results unknown: that is a failure, not an empty run
        name = os.path.basename(path)
        return [
            {"id": name, "module": "", "name": name, "outcome": "failed",
             "message": f"unreadable junit XML: {e}", "seconds": 0.0}
        ]  # fmt: skip
    cases = []
    for tc in root.iter("testcase"):
        if not tc.get("name"):
            continue  # the entry pytest writes for a test cut off by an interrupt
        outcome, message = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                message = child.get("message") or (child.text or "")
                break
            if child.tag == "skipped":
                outcome = "skipped"
                message = child.get("message") or ""
        module = tc.get("classname", "")
        name = tc.get("name", "")
        cases.append(
            {
                "id": f"{module}::{name}",
                "module": module,
                "name": name,
                "outcome": outcome,
                "message": _first_line(message),
                "seconds": float(tc.get("time") or 0.0),
            }
        )
    return cases


def _first_line(text: str, limit: int = 160) -> str:
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _stats(raw: dict) -> dict:
    keys = ("median", "mean", "min", "max", "stddev", "rounds")
    return {k: raw[k] for k in keys if k in raw}


def read_benchmarks(work: str) -> dict[str, dict]:
    """Timed cases by ``name``: pytest-benchmark JSON files first, then the harness's JSONL
    records for cases the JSON lacks (pytest-benchmark missing, or a phase cut short)."""
    cases: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(work, "bench_*.json"))):
        suite = os.path.basename(path)[: -len(".json")]
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        for b in data.get("benchmarks", []):
            cases[b["name"]] = {
                "suite": suite,
                "name": b["name"],
                "fullname": b.get("fullname", b["name"]),
                "group": b.get("group"),
                "stats": _stats(b.get("stats", {})),
                "extra_info": b.get("extra_info", {}),
            }
    for path in sorted(glob.glob(os.path.join(work, "bench_*.jsonl"))):
        suite = os.path.basename(path)[: -len(".jsonl")]
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut off by a kill
                name = r.get("name")
                if name and name not in cases:
                    cases[name] = {
                        "suite": suite,
                        "name": name,
                        "fullname": r.get("fullname", name),
                        "group": r.get("group"),
                        "stats": _stats(r.get("stats", {})),
                        "extra_info": r.get("extra_info", {}),
                    }
    return cases


# ------------------------------------------------------------------------------------ building


def _case_label(name: str, backend: str) -> str:
    _, params = split_test_id(name)
    return "-".join(p for p in params if p != backend)


def _metric(extra: dict) -> tuple[str, float] | None:
    if extra.get("tflops") is not None:
        return "TFLOP/s", float(extra["tflops"])
    if extra.get("gbps") is not None:
        return "GB/s", float(extra["gbps"])
    return None


def build(work: str, info: dict | None = None) -> dict:
    """Everything the results JSON holds, from the work folder."""
    if info is None:
        info_path = os.path.join(work, "info.json")
        info = {}
        if os.path.exists(info_path):
            try:
                with open(info_path) as f:
                    info = json.load(f)
            except (OSError, json.JSONDecodeError):
                info = {}
    phases = read_phases(work)
    tests = read_junit(os.path.join(work, "tests_gpu.xml"))
    timed = read_benchmarks(work)

    # Benchmark outcomes: junit says passed/failed/skipped; a timed case with no junit entry (the
    # phase was killed before pytest wrote it) counts as passed, since it was measured.
    bench_outcomes: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(work, "bench_*.xml"))):
        for c in read_junit(path):
            bench_outcomes[c["name"]] = c
    benchmarks = []
    for name in sorted(set(timed) | set(bench_outcomes)):
        t = timed.get(name)
        o = bench_outcomes.get(name)
        module = o["module"] if o else (t["suite"] if t else "")
        extra = t["extra_info"] if t else {}
        op, backend = op_backend(module, name, extra)
        outcome = o["outcome"] if o else "passed"
        benchmarks.append(
            {
                "name": name,
                "op": op,
                "backend": backend,
                "outcome": outcome,
                "message": o["message"] if o and outcome != "passed" else "",
                "group": t["group"] if t else None,
                "stats": t["stats"] if t else {},
                "extra_info": extra,
            }
        )

    rows = _rows(tests, benchmarks)
    failures = [t for t in tests if t["outcome"] == "failed"] + [
        b for b in benchmarks if b["outcome"] == "failed"
    ]
    reasons = []
    for p in phases:
        if p["status"] in ("fail", "timeout"):
            reasons.append(f"phase {p['name']} {p['status']} (rc {p['rc']})")
    n_failed_tests = sum(t["outcome"] == "failed" for t in tests)
    n_failed_bench = sum(b["outcome"] == "failed" for b in benchmarks)
    if n_failed_tests:
        reasons.append(f"{n_failed_tests} gpu test(s) failed")
    ran_tests = any(p["name"] == "tests" and p["status"] in ("ok", "fail") for p in phases)
    if ran_tests and not any(t["outcome"] == "passed" for t in tests):
        reasons.append("no gpu test passed")
    if n_failed_bench:
        reasons.append(f"{n_failed_bench} benchmark case(s) failed")
    if not phases:
        reasons.append("no phase ran")
    gpu = info.get("gpu")
    gpu = gpu.get("name") if isinstance(gpu, dict) else os.environ.get("GPU_CHECK_GPU_NAME")
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu,
        "revision": os.environ.get("WSSS_FAST_REVISION"),
        "info": info,
        "phases": phases,
        "verdict": {"pass": not reasons, "reasons": reasons, "rows": rows},
        "tests": {
            "passed": sum(t["outcome"] == "passed" for t in tests),
            "failed": n_failed_tests,
            "skipped": sum(t["outcome"] == "skipped" for t in tests),
            "cases": tests,
        },
        "benchmarks": benchmarks,
        "failures": [{"id": f.get("id") or f["name"], "message": f["message"]} for f in failures],
    }


def _rows(tests: list[dict], benchmarks: list[dict]) -> list[dict]:
    rows: dict[tuple[str, str], dict] = {}

    def row(op: str, backend: str) -> dict:
        key = (op, backend)
        if key not in rows:
            rows[key] = {
                "op": op,
                "backend": backend,
                "tests": {"passed": 0, "failed": 0, "skipped": 0},
                "bench": {"passed": 0, "failed": 0, "skipped": 0},
                "best": None,
                "speedup_vs_baseline": None,
                "skip_reason": "",
            }
        return rows[key]

    for t in tests:
        op, backend = op_backend(t["module"], t["name"])
        row(op, backend)["tests"][t["outcome"]] += 1

    baseline_time: dict[tuple[str, str], float] = {}
    for b in benchmarks:
        med = b["stats"].get("median")
        if b["backend"] in BASELINES and b["group"] and med:
            baseline_time[(b["op"], b["group"])] = med
    ratios: dict[tuple[str, str], list[float]] = {}
    for b in benchmarks:
        r = row(b["op"], b["backend"])
        r["bench"][b["outcome"]] += 1
        if b["outcome"] == "skipped" and not r["skip_reason"]:
            r["skip_reason"] = b["message"]
        med = b["stats"].get("median")
        if b["outcome"] != "passed" or not med:
            continue
        metric = _metric(b["extra_info"])
        best = r["best"]
        score = metric[1] if metric else med  # no metric: the longest-running (largest) case
        if best is None or score > best["_score"]:
            r["best"] = {
                "_score": score,
                "case": _case_label(b["name"], b["backend"]),
                "median_s": med,
                "metric": metric[0] if metric else None,
                "value": metric[1] if metric else None,
                "note": _note(b["extra_info"]),
            }
        base = baseline_time.get((b["op"], b["group"]))
        if base and b["backend"] not in BASELINES:
            ratios.setdefault((b["op"], b["backend"]), []).append(base / med)
    for (op, backend), rs in ratios.items():
        rows[(op, backend)]["speedup_vs_baseline"] = math.exp(
            sum(math.log(x) for x in rs) / len(rs)
        )
    out = []
    for key in sorted(rows):
        r = rows[key]
        if r["best"]:
            r["best"].pop("_score")
        out.append(r)
    return out


def _note(extra: dict) -> str:
    if extra.get("largest_crop") is not None:
        return f"largest crop {extra['largest_crop']}"
    return ""


# ------------------------------------------------------------------------------------- writing


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _counts(c: dict) -> str:
    return f"{c['passed']}/{c['failed']}/{c['skipped']}"


def _row_status(r: dict) -> str:
    if r["tests"]["failed"] or r["bench"]["failed"]:
        return "FAIL"
    if r["tests"]["passed"] or r["bench"]["passed"]:
        return "pass"
    return "SKIP"


def verdict_lines(report: dict, *, max_failures: int = 6) -> list[str]:
    """The one-screen verdict: phases, the op x backend table, the first failures, one line."""
    gpu = report.get("gpu") or "unknown GPU"
    info = report.get("info") or {}
    lines = [
        f"wsss_fast gpu_check  {gpu}  revision {report.get('revision') or 'unknown'}  "
        f"torch {info.get('torch', '?')}  triton {info.get('triton', '?')}"
    ]
    phase_bits = []
    for p in report["phases"]:
        secs = f"{p['seconds']:.0f}s" if p["seconds"] is not None else "?"
        phase_bits.append(
            f"{p['name']} {p['status'].upper() if p['status'] != 'ok' else 'ok'} {secs}"
        )
    lines.append("phases: " + (", ".join(phase_bits) if phase_bits else "none"))
    header = (
        f"{'op':<18} {'backend':<9} {'':<4} {'tests p/f/s':<11} {'bench p/f/s':<11} "
        f"{'best':>16} {'time':>9} {'vs ref':>7}  case"
    )
    lines += [header, "-" * len(header)]
    for r in report["verdict"]["rows"]:
        best = r["best"]
        if best and best["metric"]:
            shown = f"{best['value']:.1f} {best['metric']}"
        elif best and best["note"]:
            shown = best["note"]
        else:
            shown = "-"
        sp = r["speedup_vs_baseline"]
        case = best["case"] if best else (r["skip_reason"] if _row_status(r) == "SKIP" else "")
        # A row whose result is a note (a search) has no meaningful time.
        median = best["median_s"] if best and not best["note"] else None
        lines.append(
            f"{r['op'][:18]:<18} {r['backend'][:9]:<9} {_row_status(r):<4} "
            f"{_counts(r['tests']):<11} {_counts(r['bench']):<11} {shown:>16} "
            f"{_fmt_time(median):>9} {(f'{sp:.1f}x' if sp else '-'):>7}  {case[:32]}"
        )
    fails = report["failures"]
    for f in fails[:max_failures]:
        lines.append(f"FAILED {f['id']}: {f['message']}")
    if len(fails) > max_failures:
        lines.append(f"... and {len(fails) - max_failures} more failures (see the .md summary)")
    v = report["verdict"]
    n_bench = sum(b["outcome"] == "passed" and bool(b["stats"]) for b in report["benchmarks"])
    t = report["tests"]
    tail = f"{t['passed']} gpu tests passed, {n_bench} benchmark cases timed"
    lines.append(
        f"VERDICT: PASS ({tail})"
        if v["pass"]
        else f"VERDICT: FAIL ({'; '.join(v['reasons'])}; {tail})"
    )
    return lines


def markdown(report: dict) -> str:
    info = report.get("info") or {}
    out = [f"# gpu_check: {report.get('gpu') or 'unknown GPU'} at {report.get('revision')}", ""]
    timers = sorted({str(b["extra_info"].get("timer")) for b in report["benchmarks"] if b["stats"]})
    out.append(
        f"Created {report['created']}; torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), "
        f"triton {info.get('triton')}, wsss_fast {info.get('wsss_fast')}. Times are medians over "
        f"rounds, timer: {', '.join(timers) or 'none'} (cuda_events_l2_flush: CUDA events around "
        "each round, L2 flushed before it)."
    )
    out += ["", "## Verdict", "", "```", *verdict_lines(report, max_failures=50), "```", ""]
    out += ["## Phases", "", "| phase | status | rc | seconds | note |", "|---|---|---|---|---|"]
    for p in report["phases"]:
        out.append(f"| {p['name']} | {p['status']} | {p['rc']} | {p['seconds']} | {p['note']} |")
    groups: dict[str, list[dict]] = {}
    for b in report["benchmarks"]:
        if b["stats"].get("median"):
            groups.setdefault(b["group"] or b["op"], []).append(b)
    if groups:
        out += ["", "## Benchmarks", ""]
        out += ["| group | provider | median | TFLOP/s | GB/s | peak MiB | vs ref |"]
        out += ["|---|---|---|---|---|---|---|"]
    for group in sorted(groups):
        cases = groups[group]
        base = next((c["stats"]["median"] for c in cases if c["backend"] in BASELINES), None)
        for c in cases:
            e = c["extra_info"]
            peak = e.get("peak_memory_bytes")
            med = c["stats"]["median"]
            out.append(
                f"| {group} | {c['backend']} | {_fmt_time(med)} | {e.get('tflops', '-')} | "
                f"{e.get('gbps', '-')} | {round(peak / 2**20) if peak is not None else '-'} | "
                f"{f'{base / med:.2f}x' if base else '-'} |"
            )
    return "\n".join(out) + "\n"


def report(work: str, results: str, name: str, *, print_verdict: bool) -> dict:
    rep = build(work)
    os.makedirs(results, exist_ok=True)
    json_path = os.path.join(results, f"{name}.json")
    md_path = os.path.join(results, f"{name}.md")
    # Written under a temporary name and renamed, so a kill mid-write never leaves half a file.
    for path, text in ((json_path, json.dumps(rep, indent=1)), (md_path, markdown(rep))):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    if print_verdict:
        print("\n".join(verdict_lines(rep)))
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("slug", help="file-name-safe GPU name")
    s.add_argument("gpu_name")
    r = sub.add_parser("report", help="write <name>.json and <name>.md; --print the verdict")
    r.add_argument("--work", required=True, help="the folder gpu_check.sh fills")
    r.add_argument("--results", required=True, help="where <name>.json and <name>.md go")
    r.add_argument("--name", required=True, help="file stem, <gpu>_<revision>")
    r.add_argument("--print", action="store_true", dest="print_verdict")
    args = ap.parse_args(argv)
    if args.cmd == "slug":
        print(slug(args.gpu_name))
        return 0
    rep = report(args.work, args.results, args.name, print_verdict=args.print_verdict)
    return 0 if rep["verdict"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
