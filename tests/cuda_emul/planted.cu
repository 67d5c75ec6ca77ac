// Tiny kernels for test_cuda_emul_flags.py: each hardware failure the emulator reports, planted on
// purpose, next to a correct kernel that must run and give the right answer (so the flags are not
// raised by everything). Compiled by build.py like the kernels of csrc/cuda, so the same launch
// rewrite and CUDA stand-ins apply; registered as torch.ops.wsss_fast_emul_test.planted(case).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <string>

namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// Counts the blocks that ran.
__global__ void _planted_count_blocks_kernel(int* count) {
  if (threadIdx.x == 0) atomicAdd(count, 1);
}

// Each thread writes its index to dynamic shared memory and reads its neighbour's after the
// barrier. kOptIn only makes the two launches distinct kernels for cudaFuncSetAttribute.
template <int kOptIn>
__global__ void _planted_smem_kernel(float* out, int n, int write_past) {
  extern __shared__ __align__(16) float buf[];
  const int t = threadIdx.x;
  for (int i = t; i < n; i += blockDim.x) buf[i] = static_cast<float>(i);
  if (write_past && t == 0) buf[n] = 1.0f;  // one element past the launch's dynamic smem
  __syncthreads();
  out[t] = buf[(t + 1) % n];
}

// Sum over the warp by xor shuffles with `mask`; lanes >= exit_from return first.
__global__ void _planted_warp_sum_kernel(float* out, unsigned mask, int exit_from) {
  const int lane = threadIdx.x % 32;
  if (lane >= exit_from) return;
  float v = static_cast<float>(lane);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o);
  out[threadIdx.x] = v;
}

// Static shared memory and a barrier that only threads below `sync_below` reach.
__global__ void _planted_barrier_kernel(float* out, int sync_below) {
  __shared__ float s[64];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (static_cast<int>(threadIdx.x) < sync_below) __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Lanes 16..31 of warp 0 shuffle while every other thread waits at the barrier: neither can
// complete.
__global__ void _planted_deadlock_kernel(float* out) {
  float v = 1.0f;
  if (threadIdx.x >= 16 && threadIdx.x < 32) v = __shfl_xor_sync(kFullMask, v, 1);
  if (threadIdx.x < 16 || threadIdx.x >= 32) __syncthreads();
  out[threadIdx.x] = v;
}

// For the sanitizer builds only (test_cuda_emul_sanitize.py): thread t reads what thread t + 1
// wrote without a barrier in between (a data race), and thread t writes out[t + 1] (one element
// past the end of out).
__global__ void _planted_race_kernel(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}
__global__ void _planted_out_of_bounds_kernel(float* out) { out[threadIdx.x + 1] = 1.0f; }

// Constant memory filled with cudaMemcpyToSymbol and a struct passed by value.
__constant__ float c_table[4];
struct Affine {
  float scale;
  int n;
};
__global__ void _planted_constant_kernel(float* out, const Affine a) {
  const int i = threadIdx.x;
  if (i < a.n) out[i] = c_table[i % 4] * a.scale;
}

at::Tensor planted(const std::string& which) {
  at::Tensor out = at::zeros({64}, at::kFloat);
  float* o = out.data_ptr<float>();
  const cudaStream_t stream = nullptr;
  if (which == "grid_y_65535" || which == "grid_y_70000") {
    at::Tensor count = at::zeros({1}, at::kInt);
    const unsigned y = which == "grid_y_65535" ? 65535u : 70000u;
    _planted_count_blocks_kernel<<<dim3(1, y), 1, 0, stream>>>(count.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    out[0] = count.item<int>();
  } else if (which == "smem_64k_opt_in") {
    const int n = 16 * 1024;  // 64 KB of floats
    C10_CUDA_CHECK(cudaFuncSetAttribute(_planted_smem_kernel<1>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(n * sizeof(float))));
    _planted_smem_kernel<1><<<1, 64, n * sizeof(float), stream>>>(o, n, 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (which == "smem_64k_no_opt_in") {
    const int n = 16 * 1024;
    _planted_smem_kernel<0><<<1, 64, n * sizeof(float), stream>>>(o, n, 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (which == "smem_write_past") {
    _planted_smem_kernel<0><<<1, 64, 64 * sizeof(float), stream>>>(o, 64, 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (which == "shfl_full_mask") {
    _planted_warp_sum_kernel<<<1, 64, 0, stream>>>(o, kFullMask, 32);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (which == "shfl_partial_mask") {
    _planted_warp_sum_kernel<<<1, 32, 0, stream>>>(o, 0x0000ffffu, 32);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (which == "shfl_exited_lane") {
    _planted_warp_sum_kernel<<<1, 32, 0, stream>>>(o, kFullMask, 16);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (which == "barrier_all") {
    _planted_barrier_kernel<<<1, 32, 0, stream>>>(o, 32);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (which == "barrier_partial") {
    _planted_barrier_kernel<<<1, 32, 0, stream>>>(o, 16);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (which == "deadlock") {
    _planted_deadlock_kernel<<<1, 64, 0, stream>>>(o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (which == "constant_and_struct") {
    const float table[4] = {1.0f, 2.0f, 3.0f, 4.0f};
    C10_CUDA_CHECK(
        cudaMemcpyToSymbolAsync(c_table, table, sizeof(table), 0, cudaMemcpyHostToDevice, stream));
    _planted_constant_kernel<<<1, 64, 0, stream>>>(o, Affine{0.5f, 10});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (which == "smem_race") {
    _planted_race_kernel<<<1, 64, 0, stream>>>(o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (which == "global_out_of_bounds") {
    _planted_out_of_bounds_kernel<<<1, 64, 0, stream>>>(o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    TORCH_CHECK(false, "unknown planted case ", which);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(wsss_fast_emul_test, m) { m.def("planted(str which) -> Tensor", &planted); }
