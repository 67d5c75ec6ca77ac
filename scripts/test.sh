#!/usr/bin/env bash
# The test suite, as CI runs it: set-up, lint (ruff, clang-format), then pytest over tests/ and a
# smoke run of bench/ (tiny sizes, no timing) when there is no GPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
echo "[test] ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "[test] clang-format"
find csrc \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' \) -print0 | xargs -0 .venv/bin/clang-format --dry-run -Werror
echo "[test] pytest"
WSSS_FAST_BENCH_SMOKE=1 .venv/bin/python -m pytest tests bench --benchmark-disable "$@"
