#!/usr/bin/env bash
# The main job on a fresh machine: set-up, then what this installation can do. Extra arguments go
# to `wsss-fast demo` (for example --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/wsss-fast info
.venv/bin/wsss-fast demo "$@"
