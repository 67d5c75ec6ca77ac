#!/usr/bin/env bash
# The first GPU run in one command: build, `pytest -m gpu`, every benchmark at reduced rounds,
# a results file, a markdown summary and a one-screen verdict. Needs no network.
#
#   bash scripts/gpu_check.sh            on a machine with an NVIDIA GPU
#   bash scripts/gpu_check.sh --dry-run  print the phases and their time boxes, run nothing
#
# Results go to $OUT when it is set, else to bench/results/:
#   <gpu>_<rev>.json   versions, phases, every gpu test and timed case, the verdict
#   <gpu>_<rev>.md     the summary: verdict, phases, a table per benchmark group
#   <gpu>_<rev>.log    everything printed
#   gpu_check_raw.tar.gz  (only under $OUT) the raw junit / pytest-benchmark files
# They are rewritten after every phase, so a run cut short keeps what it measured. Each phase has
# a time box; one that fails or overruns is recorded and the next phase still runs, and the
# verdict is printed at the end whatever happened.
#
# Environment (all optional):
#   PYTHON               interpreter with a CUDA torch (default: .venv/bin/python when it has
#                        torch, else python3)
#   GPU_CHECK_ROUNDS     timed rounds per benchmark case (default 3)
#   GPU_CHECK_BUDGET     seconds for all phases together (default 540); a phase's box is cut to
#                        what is left, and a phase with under 10 s left is skipped
#   GPU_CHECK_BUILD      auto (default: build unless this tree's extension is built, has CUDA
#                        kernels and is newer than csrc/ and setup.py), always, never
#   GPU_CHECK_WORK       folder for the raw outputs (default: a new temporary folder)
#   GPU_CHECK_SUITES     the benchmark suites to run, in order (default: all five, see below)
#   GPU_CHECK_BENCH_K    a pytest -k expression for every suite (e.g. "bfloat16 and not vits")
#   GPU_CHECK_TESTS      what `pytest -m gpu` runs (default: tests)
#   GPU_CHECK_WORKERS    pytest-xdist workers for the gpu tests, when xdist is installed
#                        (default: half the cores, at most 8)
#   GPU_CHECK_ALLOW_CPU  1: run without a GPU, benchmarks in smoke mode (checks this script)
#   WSSS_FAST_REVISION   the revision in the file name, where the tree has no .git
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  -h | --help)
    sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
  "") ;;
  *)
    echo "gpu_check: unknown argument '$1' (use --dry-run or --help)" >&2
    exit 2
    ;;
esac

ROUNDS=${GPU_CHECK_ROUNDS:-3}
BUDGET=${GPU_CHECK_BUDGET:-540}
BUILD_MODE=${GPU_CHECK_BUILD:-auto}
REPORT_RESERVE=15 # seconds kept back from the budget for the last report
for knob in GPU_CHECK_ROUNDS="$ROUNDS" GPU_CHECK_BUDGET="$BUDGET"; do
  if ! [[ ${knob#*=} =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_check: ${knob%%=*} must be a positive integer, got '${knob#*=}'" >&2
    exit 2
  fi
done
case $BUILD_MODE in
  auto | always | never) ;;
  *)
    echo "gpu_check: GPU_CHECK_BUILD must be auto, always or never, got '$BUILD_MODE'" >&2
    exit 2
    ;;
esac
# Phase time boxes in seconds; the estimate behind them is in README.md, "First GPU run".
BOX_BUILD=240
BOX_INFO=60
BOX_TESTS=150
read -r -a BENCH_SUITES <<<"${GPU_CHECK_SUITES:-random_walk cuda_ops affinity attention methods}"
read -r -a TEST_PATHS <<<"${GPU_CHECK_TESTS:-tests}"
BENCH_K=${GPU_CHECK_BENCH_K:-}
declare -A BOX_BENCH=([random_walk]=45 [cuda_ops]=60 [affinity]=60 [attention]=150 [methods]=120)

# --------------------------------------------------------------------------- interpreter
find_python() {
  if [ -n "${PYTHON:-}" ]; then
    echo "$PYTHON"
  elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
    echo .venv/bin/python
  elif command -v python3 >/dev/null && python3 -c "import torch" 2>/dev/null; then
    echo python3
  fi
}
PY=$(find_python)

# The phases' commands, as arrays (set_commands runs once WORK is known).
set_commands() {
  BUILD_CMD=(env "MAX_JOBS=$(nproc)" PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
    "$PY" -m pip install -e . --no-deps --no-build-isolation --no-index)
  # shellcheck disable=SC2016  # $1 and $2 are the inner shell's arguments
  INFO_CMD=(bash -c 'set -o pipefail; ! command -v nvidia-smi >/dev/null || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$1" -m wsss_fast.cli info --json | tee "$2/info.json"' _ "$PY" "$WORK")
  TESTS_CMD=("$PY" -m pytest "${TEST_PATHS[@]}" -m gpu -q -p no:cacheprovider
    "--junitxml=$WORK/tests_gpu.xml")
  # Several workers overlap the Triton compiles, which dominate the gpu tests' time.
  local half=$(($(nproc) / 2))
  local workers=${GPU_CHECK_WORKERS:-$((half < 8 ? half : 8))}
  if ((workers > 1)) && "$PY" -c "import xdist" 2>/dev/null; then
    TESTS_CMD+=(-n "$workers")
  fi
}

bench_command() { # suite: sets BENCH_CMD to the pytest command of bench/bench_<suite>.py
  local s=$1
  BENCH_CMD=(env "WSSS_FAST_BENCH_ROUNDS=$ROUNDS" "WSSS_FAST_BENCH_RECORD=$WORK/bench_$s.jsonl"
    "$PY" -m pytest "bench/bench_$s.py" -q -p no:cacheprovider "--junitxml=$WORK/bench_$s.xml")
  [ -z "$BENCH_K" ] || BENCH_CMD+=(-k "$BENCH_K")
  if [ "$HAVE_PYTEST_BENCHMARK" = 1 ]; then
    BENCH_CMD+=("--benchmark-json=$WORK/bench_$s.json" --benchmark-quiet)
  fi
}

if [ "$DRY_RUN" = 1 ]; then
  WORK=${GPU_CHECK_WORK:-<tmpdir>}
  HAVE_PYTEST_BENCHMARK=1
  if [ -n "$PY" ] && ! "$PY" -c "import pytest_benchmark" 2>/dev/null; then
    HAVE_PYTEST_BENCHMARK=0
  fi
  PY=${PY:-python3}
  set_commands
  echo "gpu_check --dry-run: python $PY, results in ${OUT:-bench/results} as <gpu>_<rev>.{json,md,log}, $ROUNDS rounds per case, budget ${BUDGET}s"
  echo "phase preflight: stop with one line unless $PY sees a CUDA GPU"
  echo "phase build (box ${BOX_BUILD}s, GPU_CHECK_BUILD=$BUILD_MODE): ${BUILD_CMD[*]}"
  echo "phase info (box ${BOX_INFO}s): nvidia-smi; $PY -m wsss_fast.cli info --json"
  echo "phase tests (box ${BOX_TESTS}s): ${TESTS_CMD[*]}"
  for s in "${BENCH_SUITES[@]}"; do
    bench_command "$s"
    echo "phase bench_$s (box ${BOX_BENCH[$s]}s): ${BENCH_CMD[*]}"
  done
  echo "phase report: $PY bench/gpu_report.py report --work $WORK --results ${OUT:-bench/results} --name <gpu>_<rev> --print"
  if [ "$HAVE_PYTEST_BENCHMARK" = 0 ]; then
    echo "note: pytest-benchmark is not importable: the suites time through harness.FallbackBenchmark"
  fi
  exit 0
fi

# --------------------------------------------------------------------------- preflight
if [ -z "$PY" ]; then
  echo "gpu_check: no Python with torch found (tried \$PYTHON, .venv/bin/python, python3); set PYTHON to one with a CUDA build of torch" >&2
  exit 2
fi
GPU_NAME=$("$PY" - 2>/dev/null <<'PYEOF'
try:
    import torch

    print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as e:  # a broken driver or torch: say which, in one line
    print("!" + f"{type(e).__name__}: {e}".splitlines()[0])
PYEOF
)
if [[ $GPU_NAME == "!"* ]]; then
  echo "gpu_check: $PY cannot query the GPU (${GPU_NAME#!}); fix the driver or torch install, or set PYTHON" >&2
  exit 2
fi
if [ -z "$GPU_NAME" ] && [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
  GPU_NAME=cpu
  export WSSS_FAST_BENCH_SMOKE=1
fi
if [ -z "$GPU_NAME" ]; then
  echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU, or use --dry-run to see the phases" >&2
  exit 2
fi

if [ -n "${WSSS_FAST_REVISION:-}" ]; then
  REV=$WSSS_FAST_REVISION
elif REV=$(git rev-parse --short=12 HEAD 2>/dev/null); then
  [ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || REV+="-dirty"
else
  REV=norev
fi
export WSSS_FAST_REVISION=$REV GPU_CHECK_GPU_NAME=$GPU_NAME
NAME="$("$PY" bench/gpu_report.py slug "$GPU_NAME")_$REV"
RESULTS=${OUT:-$ROOT/bench/results}
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/wsss_gpu_check.XXXXXX")}
mkdir -p "$RESULTS" "$WORK"
: >"$WORK/phases.tsv"
LOG="$RESULTS/$NAME.log"
HAVE_PYTEST_BENCHMARK=1
"$PY" -c "import pytest_benchmark" 2>/dev/null || HAVE_PYTEST_BENCHMARK=0
set_commands

write_report() { # [--print]
  "$PY" bench/gpu_report.py report --work "$WORK" --results "$RESULTS" --name "$NAME" "$@"
  local rc=$?
  if [ -n "${OUT:-}" ]; then
    tar -czf "$RESULTS/gpu_check_raw.tar.gz" -C "$WORK" . 2>/dev/null
  fi
  return $rc
}

record() { # name status rc seconds note
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$WORK/phases.tsv"
}

run_phase() { # name box command...: run under a time box, record how it ended, update the report
  local name=$1 box=$2
  shift 2
  local left=$((DEADLINE - $(date +%s) - REPORT_RESERVE))
  if ((left < 10)); then
    echo "=== [$name] skipped: no time left in GPU_CHECK_BUDGET=${BUDGET}s"
    record "$name" skipped "" 0 "no time left in the budget"
    return
  fi
  ((box <= left)) || box=$left
  echo "=== [$name] time box ${box}s: $*"
  local t0 rc status
  t0=$(date +%s)
  # SIGINT first: pytest then stops cleanly and still writes its junit XML and benchmark JSON.
  timeout -s INT -k 20 "$box" "$@"
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=fail ;;
  esac
  local secs=$(($(date +%s) - t0))
  echo "=== [$name] $status (rc $rc) after ${secs}s"
  record "$name" "$status" "$rc" "$secs" ""
  write_report >/dev/null || true
}

needs_build() {
  case $BUILD_MODE in
    always) return 0 ;;
    never) return 1 ;;
  esac
  local so
  so=$("$PY" - "$ROOT" 2>/dev/null <<'PYEOF'
import os
import sys

import wsss_fast._C as c
from wsss_fast import _ext

assert os.path.realpath(c.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep)
assert _ext.has_kernel("random_walk_forward", "CUDA")
print(c.__file__)
PYEOF
  ) || return 0
  [ -n "$(find csrc setup.py -newer "$so" 2>/dev/null | head -n 1)" ]
}

main() {
  START=$(date +%s)
  DEADLINE=$((START + BUDGET))
  echo "gpu_check: $GPU_NAME, revision $REV, python $PY, results $RESULTS/$NAME.*, raw $WORK, $ROUNDS rounds per case, budget ${BUDGET}s"
  if [ "$HAVE_PYTEST_BENCHMARK" = 0 ]; then
    echo "gpu_check: pytest-benchmark is not importable: the suites time through harness.FallbackBenchmark (JSONL records only)"
  fi

  if needs_build; then
    run_phase build "$BOX_BUILD" "${BUILD_CMD[@]}"
  else
    local why="GPU_CHECK_BUILD=never"
    [ "$BUILD_MODE" = never ] || why="the extension has CUDA kernels and is newer than csrc/"
    echo "=== [build] skipped: $why"
    record build skipped "" 0 "$why"
  fi
  run_phase info "$BOX_INFO" "${INFO_CMD[@]}"
  run_phase tests "$BOX_TESTS" "${TESTS_CMD[@]}"
  for s in "${BENCH_SUITES[@]}"; do
    bench_command "$s"
    run_phase "bench_$s" "${BOX_BENCH[$s]}" "${BENCH_CMD[@]}"
  done

  echo "=== [report] $RESULTS/$NAME.json and .md after $(($(date +%s) - START))s"
  write_report --print
  local rc=$?
  if [ ! -s "$RESULTS/$NAME.json" ]; then
    echo "VERDICT: FAIL (bench/gpu_report.py wrote no report, rc $rc; see $LOG)"
  fi
  return $rc
}

# The pipeline waits for tee, so the verdict reaches both the terminal and the log in full.
main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
