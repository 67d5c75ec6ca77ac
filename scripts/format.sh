#!/usr/bin/env bash
# Format everything in place: ruff for Python, clang-format for csrc/.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check --fix .
.venv/bin/ruff format .
find csrc \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' \) -print0 | xargs -0 .venv/bin/clang-format -i
