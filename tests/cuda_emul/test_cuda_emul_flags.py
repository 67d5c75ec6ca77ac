"""The CUDA emulation reports what would fail on hardware: each flag fires on a planted bug.

The kernels are in planted.cu, compiled with the kernels of csrc/cuda. Every planted bug has a
correct twin that must run and give the right answer, so a flag that fired on everything (or an
emulator that ran nothing) would fail here too.
"""

import pytest
import torch

from cuda_emul import build


@pytest.fixture(scope="module")
def planted():
    build.load()
    return torch.ops.wsss_fast_emul_test.planted


def test_emul_flag_grid_y_over_65535(planted):
    assert planted("grid_y_65535")[0].item() == 65535  # every block ran once
    with pytest.raises(RuntimeError, match=r"\[cuda_emul:launch-config\] grid \(1, 70000, 1\)"):
        planted("grid_y_70000")


def test_emul_flag_dynamic_smem_over_48kb_without_opt_in(planted):
    # Thread t reads element t + 1 of the 64 KB buffer that the block filled with indices.
    assert planted("smem_64k_opt_in").tolist() == [float(t + 1) for t in range(64)]
    with pytest.raises(
        RuntimeError,
        match=r"\[cuda_emul:dynamic-smem\] 65536 bytes .* exceed 48 KB without "
        r"cudaFuncSetAttribute",
    ):
        planted("smem_64k_no_opt_in")


def test_emul_flag_dynamic_smem_written_past_its_size(planted):
    with pytest.raises(RuntimeError, match=r"\[cuda_emul:dynamic-smem\] a thread wrote past"):
        planted("smem_write_past")


def test_emul_flag_shuffle_with_partial_mask(planted):
    assert planted("shfl_full_mask").tolist() == [496.0] * 64  # 0 + 1 + ... + 31 in every lane
    # Whichever lane gets there first: one left out of the mask calls it, or one in it reads a
    # lane outside (xor 16).
    with pytest.raises(
        RuntimeError,
        match=r"\[cuda_emul:shuffle-mask\] lane \d+ (calls __shfl_xor_sync .* with mask 0xffff, "
        r"which leaves it out|reads lane \d+ in __shfl_xor_sync .* outside mask 0xffff)",
    ):
        planted("shfl_partial_mask")


def test_emul_flag_shuffle_from_exited_lane(planted):
    with pytest.raises(RuntimeError, match=r"\[cuda_emul:shuffle-exited\]"):
        planted("shfl_exited_lane")


def test_emul_flag_barrier_reached_by_part_of_the_block(planted):
    # Thread t reads what thread t + 1 stored before the barrier.
    assert planted("barrier_all")[:32].tolist() == [float((t + 1) % 32) for t in range(32)]
    with pytest.raises(RuntimeError, match=r"\[cuda_emul:partial-barrier\]"):
        planted("barrier_partial")


def test_emul_flag_deadlock(planted):
    with pytest.raises(
        RuntimeError,
        match=r"\[cuda_emul:deadlock\] .* 48 of 64 threads at __syncthreads .* warp 0 lanes "
        r"0xffff0000 in __shfl_xor_sync",
    ):
        planted("deadlock")


def test_emul_constant_memory_and_struct_arguments(planted):
    # c_table = {1, 2, 3, 4} copied with cudaMemcpyToSymbolAsync, scaled by a struct argument.
    out = planted("constant_and_struct")
    assert out[:10].tolist() == [0.5, 1.0, 1.5, 2.0, 0.5, 1.0, 1.5, 2.0, 0.5, 1.0]
    assert not out[10:].any()


def test_emul_engine_recovers_after_a_flag(planted):
    # A failed launch leaves the worker pool ready for the next one.
    with pytest.raises(RuntimeError, match="partial-barrier"):
        planted("barrier_partial")
    assert planted("shfl_full_mask").tolist() == [496.0] * 64
