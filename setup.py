"""Build wsss_fast._C: C++ CPU kernels always, CUDA kernels whenever torch and nvcc have CUDA.

Environment switches (all optional):
  WSSS_FAST_NO_CUDA=1      build the CPU part only, even when nvcc is present
  TORCH_CUDA_ARCH_LIST     GPU architectures; defaults to the visible GPUs', else to
                           DEFAULT_ARCH_LIST (A100, A10/RTX 30xx, L4/L40/RTX 40xx, H100/H200,
                           and PTX that newer GPUs compile at load time)
  MAX_JOBS                 parallel compile jobs (honoured by torch's ninja build)
  CUDA_HOME                the CUDA toolkit; found from nvcc when unset

Install with `pip install --no-build-isolation -e .` once torch is installed: the extension is
compiled against the torch in the environment (scripts/setup_env.sh does both).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The architectures built when no GPU is visible (a CI runner, a build node): the GPUs users train
# on, plus compute_90 PTX for newer ones. Each adds a device compile of every .cu file.
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"


def say(msg: str) -> None:
    print(f"[wsss_fast setup] {msg}", file=sys.stderr, flush=True)


def find_cuda_home() -> str | None:
    """CUDA_HOME from the environment, else the toolkit that owns nvcc (following wrapper scripts)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    real = os.path.realpath(nvcc)
    home = os.path.dirname(os.path.dirname(real))
    if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return home
    # nvcc may be a small wrapper script that execs the real one: read the path out of it.
    try:
        with open(real, errors="ignore") as f:
            text = f.read(4096)
        m = re.search(r"(/\S+)/bin/nvcc", text)
        if m and os.path.exists(os.path.join(m.group(1), "include", "cuda_runtime.h")):
            return m.group(1)
    except OSError:
        pass
    return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/include/cuda_runtime.h") else None


def nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.check_output(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


cuda_home = find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def decide_cuda() -> tuple[bool, str]:
    if os.environ.get("WSSS_FAST_NO_CUDA", "0") not in ("", "0"):
        return False, "WSSS_FAST_NO_CUDA is set"
    if torch.version.cuda is None:
        return (
            False,
            f"torch {torch.__version__} is a CPU-only build (install the CUDA build of torch)",
        )
    if cuda_home is None:
        return False, "nvcc was not found (put the CUDA toolkit's bin/ on PATH or set CUDA_HOME)"
    nv = nvcc_version(cuda_home)
    if nv is None:
        return False, f"could not run {cuda_home}/bin/nvcc --version"
    if nv.split(".")[0] != torch.version.cuda.split(".")[0]:
        return False, (
            f"nvcc {nv} and torch's CUDA {torch.version.cuda} differ in major version; install a "
            "torch built for your CUDA major version (see README) or set CUDA_HOME"
        )
    return True, f"torch CUDA {torch.version.cuda}, nvcc {nv} at {cuda_home}"


def cuda_targets() -> list[str]:
    """What nvcc is asked for, from torch's reading of TORCH_CUDA_ARCH_LIST: ``sm_XY`` (a cubin)
    and ``compute_XY`` (PTX) entries, which wsss_fast._ext matches against the GPU at run time."""
    try:
        from torch.utils.cpp_extension import _get_cuda_arch_flags

        flags = _get_cuda_arch_flags()
    except Exception as exc:  # a private helper: say so rather than fail the build
        say(f"could not read the CUDA targets back from torch ({exc}); recording none")
        return []
    return sorted({m for f in flags for m in re.findall(r"code=\[?((?:sm|compute)_\w+)", f)})


with_cuda, reason = decide_cuda()
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    os.environ["TORCH_CUDA_ARCH_LIST"] = (
        ";".join(f"{major}.{minor}" for major, minor in caps) if caps else DEFAULT_ARCH_LIST
    )
arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
targets = cuda_targets() if with_cuda else []

if with_cuda:
    say(
        f"building the CPU and CUDA kernels ({reason}; TORCH_CUDA_ARCH_LIST={arch_list}: "
        f"{' '.join(targets)})"
    )
else:
    bar = "!" * 78
    say(bar)
    say(f"NOT building the CUDA kernels: {reason}.")
    say("The 'cuda' backend will run on CPU tensors only; CUDA tensors need a rebuild.")
    say(bar)

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cxx_flags = ["-O3", "-fopenmp"]
define_macros = []
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    define_macros.append(("WSSS_FAST_WITH_CUDA", None))
    ext = CUDAExtension(
        "wsss_fast._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        "wsss_fast._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

build_info = {
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cuda_built": with_cuda,
    "cuda_reason": reason,
    "cuda_home": cuda_home if with_cuda else None,
    "nvcc": nvcc_version(cuda_home) if (with_cuda and cuda_home) else None,
    "arch_list": arch_list or None,
    "cuda_targets": targets,
    "openmp": True,
}
with open(os.path.join(ROOT, "wsss_fast", "_build_info.py"), "w") as f:
    f.write('"""Written by setup.py: how wsss_fast._C was built."""\n\n')
    f.write(f"BUILD_INFO = {build_info!r}\n")

setup(
    packages=[
        "wsss_fast",
        "wsss_fast.ops",
        "wsss_fast.kernels",
        "wsss_fast.nn",
        "wsss_fast.methods",
        "wsss_fast.data",
        "wsss_fast.engine",
        "wsss_fast.eval",
    ],
    package_dir={"wsss_fast.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
)
