// cuda_emul stand-in for c10/cuda/CUDAStream.h: one stream, the emulator's (launches are
// synchronous).
#pragma once

#include <c10/core/Device.h>
#include <cuda_emul.h>

namespace c10 {
namespace cuda {

class CUDAStream {
 public:
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return stream(); }
  c10::DeviceIndex device_index() const { return 0; }
  void synchronize() const {}
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline CUDAStream getStreamFromPool(bool = false, c10::DeviceIndex = -1) { return {}; }

}  // namespace cuda
}  // namespace c10
