"""Compile every Triton kernel (and the CUDA kernels) for sm_80 and sm_90, no GPU needed.

The Triton launches are not listed by hand: each launcher in ``wsss_fast.kernels`` is called on
``meta`` tensors over its inputs' domain (dtype, head dim, export, class count, ...) while its
kernels are swapped for recorders, so the block shapes, warps and stages are whatever the
launcher's own config functions choose, and the argument types and specialisations are those a
real launch would give. Each distinct configuration is then compiled by ``triton.compile`` for a
named ``GPUTarget`` (Triton ships its own ptxas) and measured: registers and spills from
``ptxas -v``, shared memory from the kernel's metadata, tensor-core instructions from the PTX.
The CUDA kernels in ``csrc/cuda`` are compiled by nvcc (``-Xptxas -v``) for the same targets.

    python scripts/compile_tables.py --write          # regenerate bench/results/compile_sm*.json
    python scripts/compile_tables.py --out rows.json  # measure only (what the tests do)

``--write`` keeps the ``reason`` of every configuration that still spills; a new spill gets an
empty reason, which the tests reject until a person writes one. Options select a subset
(``--dtypes``, ``--no-cuda``, ...). Compilation uses a fresh Triton cache unless ``--cache-dir``
names one.
"""

import os

# Compile for real, whatever the caller's environment: under the interpreter @triton.jit gives
# interpreter objects, not compilable JIT functions.
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARCHS = (80, 90)
DTYPE_NAMES = ("float32", "float16", "bfloat16")
KERNEL_MODULES = (
    "wsss_fast.kernels.attention",
    "wsss_fast.kernels.affinity",
    "wsss_fast.kernels.random_walk",
)

# Representative sizes for the runtime arguments: ViT-S/16 at 224 px (one class token, 196
# patches, 6 heads), two images, three layers for propagate. Only the integer specialisation of
# the arguments depends on them (Triton marks ints divisible by 16, and compiles an int equal to
# 1 as a constant); block shapes come from the launchers.
B, H, N, NUM_PREFIX, LAYERS = 2, 6, 197, 1, 3


def table_path(arch: int) -> Path:
    return ROOT / "bench" / "results" / f"compile_sm{arch}.json"


def row_key(row: dict) -> str:
    """The identity of a row across runs: source, kernel and configuration."""
    return json.dumps([row["source"], row["kernel"], row["config"]], sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Recording the launches


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records instead of running."""

    def __init__(self, kernel, sink):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.kernel, args, kwargs))


@contextlib.contextmanager
def _recording(module, sink):
    # Every JIT function of the module is swapped (launchers look them up as module globals),
    # and restored before anything is compiled: kernels resolve their jit helpers by name too.
    import triton

    saved = {n: v for n, v in vars(module).items() if isinstance(v, triton.JITFunction)}
    for name, fn in saved.items():
        setattr(module, name, _Recorder(fn, sink))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def _meta(*shape, dtype):
    import torch

    return torch.empty(shape, device="meta", dtype=dtype)


def _attention_calls(dtype):
    import torch

    from wsss_fast.kernels import attention as kernels
    from wsss_fast.ops.attention import TRITON_HEAD_DIMS

    for D in TRITON_HEAD_DIMS:
        q = _meta(B, H, N, D, dtype=dtype)
        scale = D**-0.5
        out, lse = _meta(B, H, N, D, dtype=dtype), _meta(B, H, N, dtype=torch.float32)
        yield kernels, lambda q=q, s=scale: kernels.attention_fwd(q, q, q, s)
        yield (
            kernels,
            lambda q=q, s=scale, lse=lse: kernels.attention_export_mean(
                q, q, lse, s, torch.float32
            ),
        )
        # Every row count up to N: the launcher picks the row block from it.
        for rows in range(1, N + 1):
            yield (
                kernels,
                lambda q=q, s=scale, lse=lse, r=rows: kernels.attention_export_rows(
                    q, q, lse, s, r, torch.float32
                ),
            )
        for has_mean, has_rows in itertools.product((False, True), repeat=2):
            d_mean = _meta(B, N, N, dtype=torch.float32) if has_mean else None
            d_rows = _meta(B, H, 1, N, dtype=torch.float32) if has_rows else None
            yield (
                kernels,
                lambda q=q, o=out, lse=lse, s=scale, m=d_mean, r=d_rows: kernels.attention_bwd(
                    q, q, q, o, lse, o, s, m, r
                ),
            )


def _head_dims():
    from wsss_fast.ops.attention import TRITON_HEAD_DIMS

    # Largest first, so that each padded-block configuration is represented by its widest head
    # dim (e.g. 127, 63) rather than by D = 1, which Triton would compile as a constant.
    return range(max(TRITON_HEAD_DIMS), 0, -1)


def _affinity_loss_calls(dtype):
    import torch

    from wsss_fast.kernels import affinity as kernels

    labels = _meta(B, N - NUM_PREFIX, dtype=torch.int64)
    scalar = _meta(dtype=torch.float32)
    for D in _head_dims():
        q = _meta(B, H, N, D, dtype=dtype)
        s = D**-0.5
        yield kernels, lambda q=q, s=s: kernels.affinity_loss_fwd(q, q, labels, NUM_PREFIX, s)
        yield (
            kernels,
            lambda q=q, s=s: kernels.affinity_loss_bwd(
                q, q, labels, scalar, scalar, scalar, NUM_PREFIX, s
            ),
        )


def _propagate_calls(dtype):
    import torch

    from wsss_fast.kernels import affinity as kernels
    from wsss_fast.ops.propagate import TRITON_MAX_CLASSES

    weights = _meta(LAYERS, dtype=torch.float32)
    # One class count per padded class block (the launcher's own padding rule): the full D x C
    # grid would take minutes to record and adds no configuration.
    class_counts = {kernels._block(C): C for C in range(1, TRITON_MAX_CLASSES + 1)}.values()
    for D in _head_dims():
        qs = [_meta(B, H, N, D, dtype=dtype) for _ in range(LAYERS)]
        for C in class_counts:
            cam = _meta(B, C, N - NUM_PREFIX, dtype=dtype)
            s = D**-0.5
            yield (
                kernels,
                lambda qs=qs, cam=cam, s=s: kernels.propagate_fwd(
                    qs, qs, cam, weights, NUM_PREFIX, s
                ),
            )
            yield (
                kernels,
                lambda qs=qs, cam=cam, s=s: kernels.propagate_bwd(
                    qs, qs, cam, weights, cam, NUM_PREFIX, s
                ),
            )


def _random_walk_calls(dtype):
    from wsss_fast.kernels import random_walk as kernels

    M = N - NUM_PREFIX
    aff = _meta(B, M, M, dtype=dtype)
    # Class counts past two chunks of the largest class block: every block the launcher picks.
    for C in range(2 * kernels._MAX_BLOCK_C + 1, 0, -1):
        cam = _meta(B, C, M, dtype=dtype)
        yield kernels, lambda cam=cam: kernels.random_walk_fwd(aff, cam, 8.0, 1)
        yield kernels, lambda cam=cam: kernels.random_walk_bwd(aff, cam, 8.0, 1)


OPS = {
    "attention": _attention_calls,
    "affinity_loss": _affinity_loss_calls,
    "propagate": _propagate_calls,
    "random_walk": _random_walk_calls,
}


def _short_type(ty: str) -> str:
    return ty[1:] if ty.startswith("*") else ty


def triton_tasks(arch: int, ops, dtype_names) -> list[dict]:
    """One compile task per distinct (kernel, configuration) the launchers choose for ``arch``.

    A configuration is the kernel's declared constexprs, num_warps, num_stages and the element
    types of its pointer arguments; of the launches that share one, the first is compiled.
    """
    import torch
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binders = {}
    tasks, seen, seen_quick = [], set(), set()
    for op in ops:
        for dtype_name in dtype_names:
            dtype = getattr(torch, dtype_name)
            for module, call in OPS[op](dtype):
                launches = []
                with _recording(module, launches):
                    call()
                for kernel, args, kwargs in launches:
                    # Binding is the slow part; launches that differ only in runtime values
                    # (sizes, strides) are skipped before it.
                    quick = (
                        kernel,
                        tuple(sorted(kwargs.items())),
                        tuple(a.dtype for a in args if isinstance(a, torch.Tensor)),
                    )
                    if quick in seen_quick:
                        continue
                    seen_quick.add(quick)
                    # As JITFunction.run completes the options before binding.
                    kwargs = dict(
                        kwargs,
                        debug=kwargs.get("debug", kernel.debug) or knobs.runtime.debug,
                        instrumentation_mode=knobs.compilation.instrumentation_mode,
                    )
                    if kernel not in binders:
                        binders[kernel] = create_function_from_signature(
                            kernel.signature, kernel.params, backend
                        )
                    bound, spec, opts = binders[kernel](*args, **kwargs)
                    options, signature, constexprs, attrs = kernel._pack_args(
                        backend, kwargs, bound, spec, opts
                    )
                    config = {p.name: bound[p.name] for p in kernel.params if p.is_constexpr}
                    config["num_warps"] = options.num_warps
                    config["num_stages"] = options.num_stages
                    config["pointers"] = ",".join(
                        _short_type(signature[p.name])
                        for p in kernel.params
                        if str(signature[p.name]).startswith("*")
                    )
                    key = (kernel.__name__, json.dumps(config, sort_keys=True))
                    if key in seen:
                        continue
                    seen.add(key)
                    tasks.append(
                        dict(
                            kind="triton",
                            arch=arch,
                            op=op,
                            module=kernel.fn.__module__,
                            kernel=kernel.__name__,
                            config=config,
                            signature=signature,
                            constexprs=constexprs,
                            attrs=attrs,
                            options=dict(options.__dict__),
                        )
                    )
    return tasks


# Constexprs that carry a (padded) problem size rather than a tile the launcher chooses.
SIZE_CONSTEXPRS = ("HEAD_DIM", "BLOCK_D", "BLOCK_C", "MASK_D")
QUICK_DTYPES = ("float32", "bfloat16")


def quick_subset(tasks: list[dict]) -> list[dict]:
    """Per kernel, pointer types and tile choice (blocks, warps, stages, flags), the task with
    the largest problem-size constexprs: the one that needs the most registers and shared memory.
    """
    best = {}
    for t in tasks:
        cfg = t["config"]
        tile = {k: v for k, v in cfg.items() if k not in SIZE_CONSTEXPRS}
        group = (t["arch"], t["kernel"], json.dumps(tile, sort_keys=True))
        size = tuple(int(cfg[k]) for k in SIZE_CONSTEXPRS if k in cfg)
        if group not in best or size > best[group][0]:
            best[group] = (size, t)
    return [t for _, t in best.values()]


def defined_kernels() -> list[str]:
    """Every JIT function named ``*_kernel`` in the kernel modules (what must be compiled)."""
    import triton

    names = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        names += [
            n
            for n, v in vars(module).items()
            if isinstance(v, triton.JITFunction) and n.endswith("_kernel")
        ]
    return sorted(names)


# ---------------------------------------------------------------------------------------------
# ptxas -v


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(
    r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads"
)
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict]:
    """Per entry function (mangled name): registers, spill stores/loads, stack, static smem."""
    out = {}
    # ptxas reports each entry as: Compiling entry ... / Function properties ... / Used ...
    blocks = re.split(r"(?=ptxas info\s*: Compiling entry function)", log)
    for block in blocks:
        entry = _ENTRY.search(block)
        if not entry:
            continue
        name = entry.group(1)
        props = {m.group(1): m for m in _PROPS.finditer(block)}
        used = _USED.search(block)
        p = props.get(name)
        out[name] = dict(
            registers=int(used.group(1)) if used else None,
            static_shared=int(used.group(2) or 0) if used else 0,
            stack=int(p.group(2)) if p else 0,
            spills=int(p.group(3)) if p else 0,
            spill_loads=int(p.group(4)) if p else 0,
        )
    return out


# The operand element types of each tt.dot: "tensor<128x64xbf16> * tensor<64x64xbf16>".
_DOT = re.compile(r"tt\.dot\b[^\n]*?:\s*tensor<(?:\d+x)+(\w+?)>\s*\*\s*tensor<(?:\d+x)+(\w+?)>")


def _compile_triton(task: dict) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(task["module"]), task["kernel"])
    target = GPUTarget("cuda", task["arch"], 32)
    # Triton runs ptxas -v itself and prints its log when asked; nothing else writes here.
    knobs.nvidia.dump_ptxas_log = True
    buf = io.StringIO()
    row = dict(source="triton", kernel=task["kernel"], config=task["config"], op=task["op"])
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            compiled = triton.compile(
                ASTSource(kernel, task["signature"], task["constexprs"], task["attrs"]),
                target=target,
                options=task["options"],
            )
    except Exception as e:  # a kernel that does not compile is a result, not a crash
        # Triton's message is "at line:col:", the source excerpt, then the cause.
        lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
        where = f"{lines[0]} ... {lines[-1]}" if len(lines) > 1 else "".join(lines)
        row["error"] = f"{type(e).__name__}: {where}"[:500]
        return row
    row["compile_s"] = round(time.perf_counter() - start, 2)
    stats = parse_ptxas(buf.getvalue()).get(task["kernel"])
    if stats is None or not compiled.asm.get("cubin"):
        row["error"] = "no cubin or no ptxas -v report for the kernel"
        return row
    ptx = compiled.asm["ptx"]
    dots = _DOT.findall(compiled.asm["ttir"])
    row.update(
        registers=stats["registers"],
        shared_bytes=int(compiled.metadata.shared),
        spills=stats["spills"],
        spill_loads=stats["spill_loads"],
        dot_types=sorted({f"{a}*{b}" for a, b in dots}),
        tensor_core=("wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else None),
    )
    return row


# ---------------------------------------------------------------------------------------------
# CUDA kernels


def cuda_sources() -> list[Path]:
    return sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _nvcc_flags() -> list[str]:
    from torch.utils import cpp_extension

    # The flags setup.py's CUDAExtension compiles with (minus host-only ones).
    flags = list(cpp_extension.COMMON_NVCC_FLAGS)
    flags += ["-std=c++20", "-O3", "-lineinfo", "-DWSSS_FAST_WITH_CUDA"]
    flags += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    flags += [f"-I{p}" for p in cpp_extension.include_paths(device_type="cuda")]
    flags += [f"-I{ROOT / 'csrc'}"]
    return flags


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = res.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _split_cuda_name(demangled: str) -> tuple[str, str]:
    """``void ns::kernel<float, 21>(args)`` -> (``kernel``, ``<float, 21>``)."""
    name = demangled.replace("(anonymous namespace)::", "").removeprefix("void ")
    depth, end = 0, len(name)
    for pos, ch in enumerate(name):
        if depth == 0 and ch in "<(":
            end = pos
            break
        depth += {"<": 1, ">": -1}.get(ch, 0)
    head, rest = name[:end], name[end:]
    tmpl = ""
    if rest.startswith("<"):
        depth = 0
        for j, ch in enumerate(rest):
            depth += {"<": 1, ">": -1}.get(ch, 0)
            if depth == 0:
                tmpl = rest[: j + 1]
                break
    return head.rsplit("::", 1)[-1], tmpl


def _compile_cuda(task: dict) -> list[dict]:
    src, arch = Path(task["source"]), task["arch"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [task["nvcc"], *task["flags"], f"-arch=sm_{arch}", "--cubin", "-Xptxas", "-v"]
        cmd += [str(src), "-o", str(Path(tmp) / "k.cubin")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    base = dict(source="cuda", file=src.name)
    if res.returncode != 0:
        err = (res.stderr.strip().splitlines() or ["nvcc failed"])[-1]
        return [dict(base, kernel=src.name, config="", error=err[:500])]
    stats = parse_ptxas(res.stderr + res.stdout)
    names = _demangle(sorted(stats))
    rows = []
    for mangled, s in sorted(stats.items()):
        kernel, tmpl = _split_cuda_name(names[mangled])
        rows.append(
            dict(
                base,
                kernel=kernel,
                config=tmpl,
                registers=s["registers"],
                shared_bytes=s["static_shared"],
                spills=s["spills"],
                spill_loads=s["spill_loads"],
            )
        )
    return rows


def cuda_tasks(arch: int) -> list[dict]:
    nvcc = find_nvcc()
    if nvcc is None:
        return []
    flags = _nvcc_flags()
    return [
        dict(kind="cuda", arch=arch, source=str(p), nvcc=nvcc, flags=flags) for p in cuda_sources()
    ]


def _run_task(task: dict) -> tuple[int, list[dict]]:
    rows = _compile_cuda(task) if task["kind"] == "cuda" else [_compile_triton(task)]
    return task["arch"], rows


# ---------------------------------------------------------------------------------------------


def measure(archs, ops, dtype_names, with_cuda: bool, jobs: int, quick: bool = False) -> dict:
    tasks = []
    # nvcc spends most of a --quick run's time (the torch headers, ~50 CPU-s per file and
    # target): --quick compiles the CUDA kernels for sm_90 only.
    cuda_archs = [a for a in archs if with_cuda and find_nvcc() and (a == 90 or not quick)]
    for arch in cuda_archs:
        tasks += cuda_tasks(arch)
    for arch in archs:
        triton = triton_tasks(arch, ops, dtype_names)
        tasks += quick_subset(triton) if quick else triton
    rows = {arch: [] for arch in archs}
    # fork: the workers inherit the imported kernel modules (the tasks name them).
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        for arch, got in pool.map(_run_task, tasks):
            rows[arch] += got
    for arch in archs:
        rows[arch].sort(key=row_key)
    return dict(
        rows={str(a): r for a, r in rows.items()},
        defined_kernels=defined_kernels(),
        cuda=bool(with_cuda and find_nvcc()),
        cuda_archs=cuda_archs,
        nvcc=find_nvcc(),
        ops=list(ops),
        dtypes=list(dtype_names),
        quick=quick,
    )


def needs_reason(arch: int, row: dict) -> bool:
    """A spill, or a 16-bit dot that sm_90 runs on mma.sync instead of wgmma."""
    sixteen_bit = any("16" in t for t in row.get("dot_types", []))
    return bool(row["spills"] or row["spill_loads"]) or (
        arch == 90 and sixteen_bit and row.get("tensor_core") == "mma"
    )


_TABLE_FIELDS = ("source", "kernel", "config", "registers", "shared_bytes", "spills", "spill_loads")


def write_tables(result: dict) -> list[str]:
    """Write the committed tables, carrying over reasons; return the spills that lack one."""
    missing = []
    for arch, rows in result["rows"].items():
        path = table_path(int(arch))
        old = {}
        if path.exists():
            old = {row_key(r): r for r in json.loads(path.read_text())}
        table = []
        for r in rows:
            if "error" in r:
                raise SystemExit(f"sm_{arch}: {r['kernel']} {r['config']} failed: {r['error']}")
            t = {f: r[f] for f in _TABLE_FIELDS if f in r}
            if r.get("tensor_core"):
                t["tensor_core"] = r["tensor_core"]
            if needs_reason(int(arch), r):
                t["reason"] = old.get(row_key(r), {}).get("reason", "")
                if not t["reason"]:
                    missing.append(f"sm_{arch} {r['kernel']} {json.dumps(r['config'])}")
            table.append(t)
        path.write_text(json.dumps(table, indent=1) + "\n")
    return missing


def summary() -> str:
    """Markdown lines summarising the committed tables (for the README)."""
    lines = []
    for arch in ARCHS:
        table = json.loads(table_path(arch).read_text())
        for source in ("triton", "cuda"):
            rows = [r for r in table if r["source"] == source]
            if not rows:
                continue
            spilling = [r for r in rows if r["spills"]]
            on_mma = [r for r in rows if arch == 90 and r.get("tensor_core") == "mma"]
            top_r = max(rows, key=lambda r: r["registers"])
            top_s = max(rows, key=lambda r: r["shared_bytes"])
            lines.append(
                f"- sm_{arch}, {source}: {len(rows)} configurations of "
                f"{len({r['kernel'] for r in rows})} kernels; at most {top_r['registers']} "
                f"registers (`{top_r['kernel']}`), {top_s['shared_bytes']} bytes of shared memory "
                f"(`{top_s['kernel']}`); {len(spilling)} spilling"
                + (f" (at most {max(r['spills'] for r in spilling)} bytes)" if spilling else "")
                + (f"; {len(on_mma)} 16-bit on mma.sync, not wgmma" if on_mma else "")
            )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="rewrite bench/results/compile_sm*.json")
    p.add_argument("--out", help="write the measured rows (JSON) here")
    p.add_argument("--arch", type=int, action="append", choices=ARCHS, help="default: both")
    p.add_argument("--op", action="append", choices=list(OPS), help="default: all")
    p.add_argument("--dtypes", default=",".join(DTYPE_NAMES), help="comma-separated")
    p.add_argument("--no-cuda", action="store_true", help="skip the nvcc compiles")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton compiles")
    p.add_argument(
        "--merge",
        action="append",
        metavar="ROWS_JSON",
        help="with --write: write the tables from these --out files (e.g. a Triton-only and a "
        "CUDA-only run) instead of compiling",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"dtypes {', '.join(QUICK_DTYPES)} and, per kernel and tile choice, only the largest "
        "head dim / class block; CUDA for sm_90 only (what the test suite runs)",
    )
    p.add_argument("--summary", action="store_true", help="print a summary of the tables, exit")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--cache-dir", help="Triton cache (default: a fresh temporary directory)")
    args = p.parse_args(argv)

    if args.summary:
        print(summary())
        return
    archs = tuple(args.arch or ARCHS)
    ops = tuple(args.op or OPS)
    dtype_names = tuple(d for d in args.dtypes.split(",") if d)
    if args.quick:
        dtype_names = tuple(d for d in dtype_names if d in QUICK_DTYPES)
    if args.merge:
        if not args.write:
            p.error("--merge goes with --write")
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        result = dict(rows={str(a): [] for a in ARCHS}, cuda=any(r["cuda"] for r in parts))
        for part in parts:
            partial = part["ops"] and (
                set(part["ops"]) != set(OPS) or tuple(part["dtypes"]) != DTYPE_NAMES
            )
            if part.get("quick") or partial:
                raise SystemExit("--merge takes full runs: no --quick, --op or --dtypes")
            for arch, rows in part["rows"].items():
                result["rows"][arch] += rows
        _finish_write(result)
        return
    if args.write and (
        args.arch
        or args.op
        or args.no_cuda
        or args.no_triton
        or args.quick
        or dtype_names != DTYPE_NAMES
    ):
        p.error(
            "--write regenerates the whole tables: drop --arch, --op, --dtypes, --quick, --no-cuda"
        )

    with tempfile.TemporaryDirectory() as tmp:
        # Set before any compile (the workers inherit it): a fresh cache really compiles.
        os.environ["TRITON_CACHE_DIR"] = args.cache_dir or tmp
        start = time.perf_counter()
        ops = () if args.no_triton else ops
        result = measure(archs, ops, dtype_names, not args.no_cuda, args.jobs, args.quick)
        result["seconds"] = round(time.perf_counter() - start, 1)

    n = sum(len(r) for r in result["rows"].values())
    print(f"compiled {n} kernel configurations in {result['seconds']} s", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.write:
        _finish_write(result)


def _finish_write(result: dict) -> None:
    if not result["cuda"]:
        raise SystemExit("--write needs nvcc for the CUDA rows (set CUDA_HOME or PATH)")
    for arch in result["rows"]:
        result["rows"][arch].sort(key=row_key)
    missing = write_tables(result)
    print(summary())
    if missing:
        raise SystemExit(
            "spills without a reason (write one in the table's 'reason' field):\n  "
            + "\n  ".join(missing)
        )


if __name__ == "__main__":
    main()
