"""Every Triton kernel compiled for sm_80 and sm_90, and the CUDA kernels by nvcc, without a GPU.

``scripts/compile_tables.py`` calls each launcher on meta tensors, compiles what it would launch
for both targets and reports registers, spills (``ptxas -v``), shared memory and tensor-core
instructions. These tests hold the results to the targets' limits and to the committed tables
``bench/results/compile_sm{80,90}.json``: a configuration that spills must be in the table with a
reason, and a table entry whose spill went away must be regenerated.

By default the run covers ``--quick``: both targets for every Triton kernel in every tile choice
of its launcher at the largest head dim / class block, float32 and bfloat16 (float16 compiles
bfloat16's tiles), and the CUDA kernels for sm_90 only (nvcc parsing the torch headers is most of
the cost). ``WSSS_FAST_COMPILE_FULL=1`` compiles the full set the tables hold.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "compile_tables.py"
ARCHS = (80, 90)
# Largest shared memory per block (opt-in) in bytes: A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TENSOR_CORE = {80: "mma", 90: "wgmma"}
REGENERATE = "regenerate the tables: python scripts/compile_tables.py --write"
FULL = os.environ.get("WSSS_FAST_COMPILE_FULL", "0") not in ("", "0")


def _key(row: dict) -> str:
    return json.dumps([row["source"], row["kernel"], row["config"]], sort_keys=True)


def _where(arch: int, row: dict) -> str:
    return f"sm_{arch} {row['source']} {row['kernel']} {json.dumps(row['config'])}"


def load_table(arch: int) -> dict[str, dict]:
    path = ROOT / "bench" / "results" / f"compile_sm{arch}.json"
    return {_key(r): r for r in json.loads(path.read_text())}


def row_problems(arch: int, rows: list[dict], table: dict[str, dict]) -> list[str]:
    """What is wrong with the compiled ``rows`` for ``arch`` against the committed ``table``."""
    out = []
    for r in rows:
        where = _where(arch, r)
        if "error" in r:
            out.append(f"{where}: does not compile: {r['error']}")
            continue
        if r["shared_bytes"] > SHARED_LIMIT[arch]:
            out.append(
                f"{where}: {r['shared_bytes']} bytes of shared memory, over the "
                f"{SHARED_LIMIT[arch]} of sm_{arch}: shrink its blocks or stages"
            )
        t = table.get(_key(r))
        if t is None:
            out.append(
                f"{where}: not in the committed table (a new launch configuration): {REGENERATE}"
            )
        elif r["spills"] != t["spills"]:
            if r["spills"] and not t["spills"]:
                out.append(
                    f"{where}: spills {r['spills']} bytes: fix it, or {REGENERATE} and write "
                    "the reason in the table"
                )
            elif not r["spills"]:
                out.append(f"{where}: no longer spills (table: {t['spills']} bytes): {REGENERATE}")
            else:
                out.append(
                    f"{where}: spills {r['spills']} bytes, table {t['spills']}: {REGENERATE}"
                )
        elif r["spills"] and not t.get("reason"):
            out.append(f"{where}: spills {r['spills']} bytes: write the reason in the table")
        dots, tc = r.get("dot_types", []), r.get("tensor_core")
        if any("16" in d for d in dots):
            if tc is None:
                out.append(f"{where}: a 16-bit tl.dot without tensor-core instructions")
            elif tc != TENSOR_CORE[arch] and not (
                t and t.get("tensor_core") == tc and t.get("reason")
            ):
                out.append(
                    f"{where}: a 16-bit tl.dot on {tc}, not {TENSOR_CORE[arch]}: give it 64-row "
                    f"tiles and a multiple of 4 warps, or {REGENERATE} and write the reason"
                )
            elif t and t.get("tensor_core") != tc:
                out.append(f"{where}: now on {tc}, table {t.get('tensor_core')}: {REGENERATE}")
        if dots and all(d == "f32*f32" for d in dots) and r.get("tensor_core"):
            out.append(
                f"{where}: a float32 dot on tensor cores (TF32?): keep input_precision='ieee'"
            )
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile_sm")
    out = tmp / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--cache-dir", str(tmp / "cache")]
    cmd += ["--jobs", "2"] + ([] if FULL else ["--quick"])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("arch", ARCHS)
def test_compile_triton_and_cuda_kernels_within_limits_and_table(compiled, arch):
    rows = compiled["rows"][str(arch)]
    assert rows, f"nothing compiled for sm_{arch}"
    problems = row_problems(arch, rows, load_table(arch))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("arch", ARCHS)
def test_compile_covers_every_triton_kernel(compiled, arch):
    done = {r["kernel"] for r in compiled["rows"][str(arch)] if r["source"] == "triton"}
    missing = sorted(set(compiled["defined_kernels"]) - done)
    assert not missing, (
        f"sm_{arch}: kernels no launcher call in scripts/compile_tables.py reaches: {missing}; "
        "add the launcher's inputs to its OPS table"
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_compile_tables_list_only_current_configurations(compiled, arch):
    if not FULL:
        pytest.skip("needs the full compile (WSSS_FAST_COMPILE_FULL=1); --quick covers a subset")
    now = {_key(r) for r in compiled["rows"][str(arch)]}
    stale = sorted(set(load_table(arch)) - now)
    assert not stale, f"sm_{arch}: table rows no launcher chooses any more: {REGENERATE}\n" + (
        "\n".join(stale[:20])
    )


def test_compile_cuda_sources(compiled):
    if not compiled["cuda"]:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH): CUDA kernels not compiled")
    assert compiled["cuda_archs"] == (list(ARCHS) if FULL else [90])
    for arch in compiled["cuda_archs"]:
        files = {r["file"] for r in compiled["rows"][str(arch)] if r["source"] == "cuda"}
        expected = {p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu")}
        assert files == expected, f"sm_{arch}: compiled {sorted(files)}, sources {sorted(expected)}"


def test_compile_checks_catch_a_broken_row():
    """The checker itself, on doctored rows: each fault gives its one-line fix."""
    base = dict(
        source="triton",
        kernel="_k",
        config={"BLOCK_M": 64},
        registers=100,
        shared_bytes=1024,
        spills=0,
        spill_loads=0,
        dot_types=["bf16*bf16"],
        tensor_core="wgmma",
    )
    table = {_key(base): dict(base)}
    assert row_problems(90, [base], table) == []
    cases = {
        "does not compile": dict(base, error="CompilationError: boom"),
        "over the": dict(base, shared_bytes=SHARED_LIMIT[90] + 1),
        "spills 16 bytes: fix it": dict(base, spills=16, spill_loads=16),
        "on mma, not wgmma": dict(base, tensor_core="mma"),
        "without tensor-core": dict(base, tensor_core=None),
        "not in the committed table": dict(base, config={"BLOCK_M": 128}),
        "TF32": dict(base, dot_types=["f32*f32"]),
    }
    for expected, row in cases.items():
        got = row_problems(90, [row], table)
        assert len(got) == 1 and expected in got[0], (expected, got)
    spilling = dict(base, spills=8)
    assert "no longer spills" in row_problems(90, [base], {_key(base): spilling})[0]
    assert "write the reason" in row_problems(90, [spilling], {_key(base): spilling})[0]
    with_reason = dict(spilling, reason="fp32 FMA dot at D = 128")
    assert row_problems(90, [spilling], {_key(base): with_reason}) == []
    on_mma = dict(base, tensor_core="mma")
    recorded = dict(on_mma, reason="32-row tiles: wgmma needs 64")
    assert row_problems(90, [on_mma], {_key(base): recorded}) == []
    assert "table mma" in row_problems(90, [base], {_key(base): recorded})[0]
