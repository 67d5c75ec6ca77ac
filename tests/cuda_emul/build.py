"""Build the CUDA kernels of ``csrc/cuda`` for the host, against the emulation in ``cuda_emul.h``.

The kernel files are compiled unmodified except for two textual rewrites of a copy:

- ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
  ``::cuda_emul::launch(site, kernel, ::cuda_emul::Config(grid, block, smem, stream), args)``;
- ``extern __shared__ T name[];`` becomes ``T* const name = ::cuda_emul::dynamic_smem<T>();``
  (a declaration that no macro can turn into the launch's buffer: ``__shared__`` is ``static``
  for the static arrays, and ``extern static`` does not compile).

Everything else is the real code: the launch code, its grid arithmetic and checks, the kernels.
CUDA headers resolve to the stand-ins in ``include/`` (first on the include path), which run
launches through the emulator; ``CHECK_CUDA`` accepts CPU tensors, the emulated device. The
TORCH_LIBRARY_IMPL(wsss_fast, CUDA, m) blocks register under ``wsss_fast_emul`` for CPU tensors,
with the schemas of ``csrc/ops.cpp``, so the emulated ops are ``torch.ops.wsss_fast_emul.*`` and
never clash with the real extension. ``route()`` makes them the CPU kernels of
``torch.ops.wsss_fast.*`` for a while, so the whole Python stack of the ``cuda`` backend runs on
top of the CUDA launch code.

All sources go into one translation unit (each ``.cu`` file in a namespace of its own), so the
torch headers are parsed once. The library is cached under torch's extension directory, keyed on
the hash of everything that goes into it; ``WSSS_FAST_EMUL_SANITIZE=address|thread`` selects a
sanitizer build (loadable only in a process started with the sanitizer runtime preloaded; see
test_cuda_emul_sanitize.py). That is why g++ is called here directly rather than through
torch.utils.cpp_extension.load, which loads what it builds into the building process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp_extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# WSSS_FAST_EMUL_CSRC points the build at another copy of csrc/ (a planted bug, a branch).
CSRC = Path(os.environ.get("WSSS_FAST_EMUL_CSRC") or ROOT / "csrc").resolve()
NAMESPACE = "wsss_fast_emul"
# Host code the kernel files call (PAR's position weights live with the CPU kernels).
HOST_SOURCES = [CSRC / "cpu" / "par.cpp"]
PLANTED = HERE / "planted.cu"

SANITIZERS = {
    None: ["-O1"],
    "address": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,alignment"],
    "thread": ["-O1", "-g", "-fsanitize=thread"],
}
RUNTIME = {"address": "libasan.so", "thread": "libtsan.so"}


def kernel_sources() -> list[Path]:
    return sorted((CSRC / "cuda").glob("*.cu"))


# ---------------------------------------------------------------------------------------------
# Source rewriting.


def _mask_comments_and_strings(src: str) -> str:
    """``src`` with comments and string/char literals blanked (same length, newlines kept)."""
    out = list(src)
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            j += 1
        else:
            i += 1
            continue
        for k in range(i, min(j, n)):
            if out[k] != "\n":
                out[k] = " "
        i = j
    return "".join(out)


def _match_forward(masked: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket closing the one at ``start``."""
    depth = 0
    for i in range(start, len(masked)):
        if masked[i] == open_:
            depth += 1
        elif masked[i] == close:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_}{close} at offset {start}")


def _kernel_start(masked: str, end: int) -> int:
    """Start of the kernel expression (``name`` or ``ns::name<targs>``) ending at ``end``."""
    i = end
    while i > 0 and masked[i - 1].isspace():
        i -= 1
    if masked[i - 1] == ">":  # template arguments: walk back to the matching '<'
        depth = 0
        while i > 0:
            i -= 1
            if masked[i] == ">":
                depth += 1
            elif masked[i] == "<":
                depth -= 1
                if depth == 0:
                    break
        while i > 0 and masked[i - 1].isspace():
            i -= 1
    while i > 0 and (masked[i - 1].isalnum() or masked[i - 1] in "_:"):
        i -= 1
    return i


def rewrite_launches(src: str) -> str:
    """Replace every ``k<<<cfg>>>(args)`` by a call of ``cuda_emul::launch``, keeping line numbers."""
    masked = _mask_comments_and_strings(src)
    pieces, pos = [], 0
    for m in re.finditer(r"<<<", masked):
        if m.start() < pos:
            continue
        k0 = _kernel_start(masked, m.start())
        cfg_end = masked.index(">>>", m.end())
        p0 = cfg_end + 3
        while masked[p0].isspace():
            p0 += 1
        if masked[p0] != "(":
            raise ValueError(f"no argument list after >>> at offset {cfg_end}")
        p1 = _match_forward(masked, p0, "(", ")")
        kernel = src[k0 : m.start()].strip()
        cfg = src[m.end() : cfg_end].strip()
        args = src[p0 + 1 : p1 - 1].strip()
        name = " ".join(kernel.split())
        call = (
            f'::cuda_emul::launch(::cuda_emul::Site{{__FILE__, __LINE__, "{name}"}}, {kernel}, '
            f"::cuda_emul::Config({cfg}){', ' + args if args else ''})"
        )
        newlines = src.count("\n", k0, p1) - call.count("\n")
        pieces += [src[pos:k0], call, "\n" * max(newlines, 0)]
        pos = p1
    pieces.append(src[pos:])
    return "".join(pieces)


_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+([^;\[\]]+?)\s*\b(\w+)\s*\[\s*\]\s*;")


def rewrite_dynamic_smem(src: str) -> str:
    def repl(m: re.Match) -> str:
        type_ = re.sub(r"__align__\s*\(\s*\w+\s*\)", "", m.group(1))
        type_ = " ".join(type_.split())
        return f"{type_}* const {m.group(2)} = ::cuda_emul::dynamic_smem<{type_}>();"

    return _EXTERN_SHARED.sub(repl, src)


_INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)


def _includes(path: Path) -> list[str]:
    return [
        f"<{name}>" if kind == "<" else f'"{name}"'
        for kind, name in _INCLUDE.findall(path.read_text())
    ]


def _cpp_string(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def generate(extra_kernel_files: list[Path]) -> str:
    """The one translation unit: the headers, then each source with its registrations redirected."""
    cu_files = [*kernel_sources(), *extra_kernel_files]
    host_files = [CSRC / "ops.cpp", *HOST_SOURCES]
    shims = {str(p.relative_to(HERE / "include")) for p in (HERE / "include").rglob("*.h")}
    seen, real, shim = set(), [], []
    for f in host_files + cu_files:
        for inc in _includes(f):
            if inc in seen:
                continue
            seen.add(inc)
            (shim if inc[1:-1] in shims else real).append(inc)
    real.sort(key=lambda inc: inc != "<Python.h>")  # Python.h first, as it asks
    lines = [
        "// Generated by tests/cuda_emul/build.py; do not edit.",
        *(f"#include {inc}" for inc in real),
        "#include <torch/library.h>",
        "#include <cuda_emul.h>",
        *(f"#include {inc}" for inc in shim),
        "",
        "// The CUDA entry points' device check: the emulated device is the CPU.",
        "#ifdef CHECK_CUDA",
        "#undef CHECK_CUDA",
        "#define CHECK_CUDA(x)                                                        \\",
        '  TORCH_CHECK((x).device().is_cpu(), #x " must be a CUDA tensor (under the CUDA " \\',
        '              "emulation, a CPU tensor), got ", (x).device())',
        "#endif",
        "#undef TORCH_LIBRARY",
        "#undef TORCH_LIBRARY_IMPL",
        f"#define TORCH_LIBRARY(ns, m) TORCH_LIBRARY_FRAGMENT({NAMESPACE}, m)",
        "// The host sources' own registrations (CPU kernels of wsss_fast) are left out.",
        "#define TORCH_LIBRARY_IMPL(ns, k, m) \\",
        "  [[maybe_unused]] static void C10_CONCATENATE(cuda_emul_unregistered_, C10_UID)("
        "torch::Library & m)",
    ]
    for f in host_files:
        lines += [f"#line 1 {_cpp_string(f)}", f.read_text(), ""]
    lines += [
        "#undef TORCH_LIBRARY_IMPL",
        f"#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL({NAMESPACE}, CPU, m, C10_UID)",
    ]
    for f in cu_files:
        body = rewrite_launches(rewrite_dynamic_smem(f.read_text()))
        ns = "cuda_emul_src_" + re.sub(r"\W", "_", f.stem)
        lines += [f"namespace {ns} {{", f"#line 1 {_cpp_string(f)}", body, f"}}  // namespace {ns}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Compiling and loading.


def _flags(sanitize: str | None) -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [HERE / "include", HERE, CSRC]
    return [
        "-std=c++20",
        "-fPIC",
        "-shared",
        "-pthread",
        "-fvisibility=hidden",
        "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *SANITIZERS[sanitize],
        *(f"-I{p}" for p in includes),
        *(f"-isystem{p}" for p in cpp_extension.include_paths()),
        f"-isystem{sysconfig.get_paths()['include']}",
    ]


def _ldflags() -> list[str]:
    libs = cpp_extension.library_paths()
    return [
        *(f"-L{p}" for p in libs),
        *(f"-Wl,-rpath,{p}" for p in libs),
        "-lc10",
        "-ltorch",
        "-ltorch_cpu",
    ]


def build(sanitize: str | None = None, *, verbose: bool = False) -> Path:
    """Compile (or find in the cache) the emulated library; returns the path of the .so."""
    if sanitize not in SANITIZERS:
        raise ValueError(f"sanitize must be one of {list(SANITIZERS)}, got {sanitize!r}")
    source = generate([PLANTED])
    headers = sorted([HERE / "cuda_emul.h", *(HERE / "include").rglob("*.h")])
    key = hashlib.sha256()
    for part in (source, *(p.read_text() for p in headers), *_flags(sanitize), torch.__version__):
        key.update(part.encode())
    name = f"wsss_fast_cuda_emul_{sanitize or 'plain'}_{key.hexdigest()[:16]}"
    out_dir = Path(cpp_extension.get_default_build_root()) / "wsss_fast_cuda_emul"
    so = out_dir / f"{name}.so"
    if so.exists():
        return so
    out_dir.mkdir(parents=True, exist_ok=True)
    cpp = out_dir / f"{name}.cpp"
    cpp.write_text(source)
    tmp = out_dir / f"{name}.{os.getpid()}.so.tmp"
    cmd = ["g++", *_flags(sanitize), str(cpp), "-o", str(tmp), *_ldflags()]
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"building the CUDA emulation failed ({' '.join(cmd)}):\n{done.stderr[-20000:]}"
        )
    os.replace(tmp, so)  # atomic: a concurrent build of the same key writes the same file
    return so


_loaded: dict[str | None, Path] = {}


def load(sanitize: str | None = None) -> str:
    """Build and load the emulated ops; returns their namespace (``torch.ops.<namespace>``).

    ``sanitize`` defaults to ``WSSS_FAST_EMUL_SANITIZE``; a sanitizer build loads only in a
    process that preloads the sanitizer's runtime (``sanitizer_env``).
    """
    if sanitize is None:
        sanitize = os.environ.get("WSSS_FAST_EMUL_SANITIZE") or None
    if _loaded and sanitize not in _loaded:
        raise RuntimeError(
            f"the {next(iter(_loaded)) or 'plain'} build is already loaded in this process; "
            "one build per process (the op namespaces would clash)"
        )
    if sanitize not in _loaded:
        so = build(sanitize)
        torch.ops.load_library(str(so))
        _loaded[sanitize] = so
    return NAMESPACE


def sanitizer_env(sanitize: str) -> dict[str, str]:
    """Environment for a child process that loads the ``sanitize`` build."""

    def lib(name: str) -> str:
        return subprocess.run(
            ["g++", f"-print-file-name={name}"], capture_output=True, text=True
        ).stdout.strip()

    env = dict(os.environ)
    env.update(
        # The runtime first, as it demands; libstdc++ before anything throws (python does not
        # link it, and the runtime's __cxa_throw interceptor needs it loaded).
        LD_PRELOAD=f"{lib(RUNTIME[sanitize])} {lib('libstdc++.so.6')}",
        WSSS_FAST_EMUL_SANITIZE=sanitize,
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
        TSAN_OPTIONS="halt_on_error=1:report_signal_unsafe=0",
        # torch's OpenMP pool (libgomp is not instrumented) would show as races of its own.
        OMP_NUM_THREADS="1",
    )
    return env


# The ops of csrc/ops.cpp that have CUDA kernels.
OPS = (
    "random_walk_forward",
    "random_walk_backward",
    "getam_map_forward",
    "getam_map_backward",
    "par_forward",
    "pamr_forward",
)


@contextlib.contextmanager
def route() -> Iterator[None]:
    """Inside the block, CPU calls of ``torch.ops.wsss_fast.<op>`` run the emulated CUDA code."""
    load()
    lib = torch.library.Library("wsss_fast", "IMPL")
    try:
        for op in OPS:
            lib.impl(op, getattr(getattr(torch.ops, NAMESPACE), op).default, "CPU")
        yield
    finally:
        lib._destroy()
