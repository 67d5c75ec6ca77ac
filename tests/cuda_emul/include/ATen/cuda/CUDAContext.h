// cuda_emul stand-in for ATen/cuda/CUDAContext.h: the stream and device properties of the
// emulated device.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_emul.h>

namespace at {
namespace cuda {

using c10::cuda::CUDAStream;
using c10::cuda::getCurrentCUDAStream;
using c10::cuda::getDefaultCUDAStream;
using c10::cuda::getStreamFromPool;

inline cudaDeviceProp* getCurrentDeviceProperties() { return cuda_emul::device_properties(); }
inline cudaDeviceProp* getDeviceProperties(int64_t) { return cuda_emul::device_properties(); }
inline int64_t getNumGPUs() { return 1; }
inline bool is_available() { return true; }

}  // namespace cuda
}  // namespace at
