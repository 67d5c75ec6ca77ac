"""Opt-in: the emulated CUDA kernels under AddressSanitizer (+ UBSan's alignment check) and
ThreadSanitizer.

Run with ``WSSS_FAST_SANITIZE=1 .venv/bin/python -m pytest tests/cuda_emul -k sanitize``
(a few minutes on 2 cores: two more builds, then child processes that preload the sanitizer
runtime, which a library built with it needs). Without the variable these tests skip.

- AddressSanitizer finds out-of-bounds and use-after-free accesses of global memory (tensors),
  static and dynamic shared memory (the dynamic buffer is allocated at exactly the launch's size);
  ``-fsanitize=alignment`` finds misaligned vector loads, which fault on a GPU.
- ThreadSanitizer finds data races between the threads of a block: shared memory read and written
  without a __syncthreads in between, or a kernel that relies on the order of threads.
"""

import os
import subprocess
import sys

import pytest

from cuda_emul import build

pytestmark = pytest.mark.skipif(
    os.environ.get("WSSS_FAST_SANITIZE") != "1",
    reason="opt-in: set WSSS_FAST_SANITIZE=1 to run the emulated kernels under AddressSanitizer "
    "and ThreadSanitizer (a few minutes)",
)

OPS_TESTS = "tests/cuda_emul/test_cuda_emul_ops.py"
# One small case per op and direction.
SMALL = [
    "test_emul_random_walk_forward[M7-C21-s5-aff16b-cam32]",
    "test_emul_random_walk_grad_cam[37-21-6]",
    "test_emul_par_pamr[par-13x17-C21-it10-range1-masks32]",
    "test_emul_par_pamr[pamr-13x17-C21-resized_from_7x9-it10-range255-masks16b]",
    "test_emul_getam_map_forward_and_grads[L3-N33-H3-D6-fp32]",
    "test_emul_getam_map_forward_and_grads[N5-H3-D16-last-4d-bf16]",
]
# AddressSanitizer also takes the cases that cross block and chunk boundaries.
ASAN_EXTRA = [
    "test_emul_random_walk_forward[M100-C81-s2-aff32-cam32]",
    "test_emul_random_walk_split_reduction_and_row_chunks[M513-C90-s2]",
    "test_emul_par_pamr[pamr-32x29-C81-it1-range1-masks32]",
    "test_emul_par_pamr_non_contiguous[par]",
    "test_emul_getam_map_forward_and_grads[N70-H2-D128-last-4d-bf16]",
    "test_emul_getam_map_non_contiguous",
]


def _run_child(sanitize, tests):
    build.build(sanitize)  # here, so that the child (sanitizer preloaded) finds it built
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-s",  # sanitizer reports go to fd 2, which pytest would capture and lose on exit
        "-p",
        "no:cacheprovider",
        *(f"{OPS_TESTS}::{t}" for t in tests),
    ]
    done = subprocess.run(
        cmd, env=build.sanitizer_env(sanitize), capture_output=True, text=True, cwd=build.ROOT
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{sanitize} sanitizer run failed:\n{output[-15000:]}"
    assert f"{len(tests)} passed" in output, output[-5000:]
    assert "Sanitizer" not in done.stderr, done.stderr[-15000:]


def _run_planted(sanitize, case):
    """Runs planted.cu's `case` in a child under `sanitize`; returns the child's stderr."""
    build.build(sanitize)
    code = (
        "import sys; sys.path.insert(0, 'tests'); import torch; from cuda_emul import build; "
        f"build.load(); torch.ops.wsss_fast_emul_test.planted({case!r})"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=build.sanitizer_env(sanitize),
        capture_output=True,
        text=True,
        cwd=build.ROOT,
    )
    assert done.returncode != 0, f"{sanitize} sanitizer missed the planted {case}"
    return done.stderr


def test_emul_sanitize_address():
    stderr = _run_planted("address", "global_out_of_bounds")
    assert "AddressSanitizer: heap-buffer-overflow" in stderr, stderr[-5000:]
    assert "_planted_out_of_bounds_kernel" in stderr, stderr[-5000:]
    _run_child("address", SMALL + ASAN_EXTRA)


def test_emul_sanitize_thread():
    stderr = _run_planted("thread", "smem_race")
    assert "ThreadSanitizer: data race" in stderr, stderr[-5000:]
    assert "_planted_race_kernel" in stderr, stderr[-5000:]
    _run_child("thread", SMALL)
