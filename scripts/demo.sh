#!/usr/bin/env bash
# The main job on a fresh machine: set-up, what this installation can do, then the AReAM demo:
# train on the built-in synthetic data set (made on first use under data/synthetic), CAMs and
# pseudo masks of its train split, mIoU, overlays (about 10 minutes on a 2-core CPU, after the set-up).
# Extra arguments go to `wsss-fast demo` (e.g. --out DIR, --method getam, train.epochs=2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/wsss-fast info
.venv/bin/wsss-fast demo --method aream --out runs/demo_aream "$@"
