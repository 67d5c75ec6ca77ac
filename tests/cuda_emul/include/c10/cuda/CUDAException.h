// cuda_emul stand-in for c10/cuda/CUDAException.h. Launch failures raise where they happen
// (cuda_emul::launch), so the launch check has nothing left to report; C10_CUDA_CHECK still
// checks the status of the runtime calls the emulator provides.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_emul.h>

#define C10_CUDA_CHECK(EXPR)                                                              \
  do {                                                                                    \
    const cudaError_t cuda_emul_status_ = (EXPR);                                         \
    TORCH_CHECK(cuda_emul_status_ == cudaSuccess,                                         \
                "CUDA error: ", cudaGetErrorString(cuda_emul_status_), " (", #EXPR, ")"); \
  } while (0)
#define C10_CUDA_CHECK_WARN(EXPR)                                          \
  do {                                                                     \
    const cudaError_t cuda_emul_status_ = (EXPR);                          \
    if (cuda_emul_status_ != cudaSuccess) {                                \
      TORCH_WARN("CUDA warning: ", cudaGetErrorString(cuda_emul_status_)); \
    }                                                                      \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
