#!/usr/bin/env bash
# Create .venv with the pinned torch and build wsss_fast (and its extension) into it.
# Safe to run again: the environment is reused and the extension is rebuilt only when csrc/,
# setup.py, pyproject.toml or the torch version changed.
#
#   WSSS_FAST_TORCH   pip requirement(s) for torch; the default is the CUDA 13 build, matching
#                     nvcc 13 (change it together with your CUDA toolkit's major version)
#   PYTHON            interpreter used to create .venv (default python3)
#   MAX_JOBS          parallel compile jobs (default 2)
#   TORCH_CUDA_ARCH_LIST  GPU targets; unset builds for the visible GPUs, or with none visible for
#                     setup.py's DEFAULT_ARCH_LIST (8.0;8.6;8.9;9.0+PTX)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC=${WSSS_FAST_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
PY=${PYTHON:-python3}
VPY=.venv/bin/python

if [ ! -x "$VPY" ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
echo "[setup] installing $TORCH_SPEC and build tools"
# shellcheck disable=SC2086
"$VPY" -m pip install -q $TORCH_SPEC "setuptools>=64" wheel ninja

stamp_file=.venv/.wsss_fast_build_stamp
# The GPU targets are part of the stamp: a build narrowed for CI is not what a user's build wants.
stamp=$( (cat setup.py pyproject.toml; find csrc -type f | sort | xargs cat; "$VPY" -c "import torch; print(torch.__version__)"; echo "arch=${TORCH_CUDA_ARCH_LIST:-}") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && "$VPY" -c "import wsss_fast._C" 2>/dev/null; then
  echo "[setup] wsss_fast is installed and its extension is up to date"
else
  echo "[setup] building wsss_fast (the CUDA kernels take a few minutes on 2 cores)"
  MAX_JOBS=${MAX_JOBS:-2} "$VPY" -m pip install --no-build-isolation -e ".[dev]"
  echo "$stamp" > "$stamp_file"
fi
