// A CPU emulation of the CUDA execution model, for running the unmodified kernels of csrc/cuda on
// a machine without a GPU (see tests/cuda_emul/build.py, which compiles them against this header).
//
// Execution: every CUDA thread of a block is an OS thread (a pool reused across launches); the
// blocks of a grid run one after another, so a kernel's static `__shared__` arrays, which become
// function-local statics, are per block. __syncthreads is a barrier of the block's threads, warp
// shuffles an exchange among the lanes of a warp, launches are synchronous.
//
// Beyond running the kernels, the layer reports what would fail on hardware, each as an error
// whose message starts with a tag (tests match on it):
//   [cuda_emul:launch-config]   block or grid dimensions outside the hardware limits
//                               (grid y/z over 65535, block over 1024 threads, ...)
//   [cuda_emul:dynamic-smem]    more than 48 KB of dynamic shared memory without
//                               cudaFuncSetAttribute(..., MaxDynamicSharedMemorySize, ...), or
//                               more than any GPU offers; bytes written past the launch's size
//   [cuda_emul:shuffle-mask]    a lane calls a *_sync warp intrinsic with a mask that leaves it
//                               out, reads a lane outside the mask, or lanes disagree on the mask
//   [cuda_emul:shuffle-exited]  a warp intrinsic names a lane that has exited
//   [cuda_emul:partial-barrier] __syncthreads reached by only part of a block (a thread exited
//                               while others wait, or threads wait at different __syncthreads)
//   [cuda_emul:deadlock]        every live thread of a block waits and nothing can complete
// Deliberately stricter than hardware: lanes of one warp may not run two shuffles with different
// masks at the same time. Not modelled: memory ordering weaker than the OS threads' (races are
// found by the ThreadSanitizer build instead), warp-synchronous code without *_sync intrinsics.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

// ---------------------------------------------------------------------------------------------
// Qualifiers. `__shared__` becomes `static`: blocks run one at a time, so a function-local static
// is the block's shared memory (not zeroed between blocks, as on hardware it is not initialised).
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define __constant__
#define __managed__

// ---------------------------------------------------------------------------------------------
// Vector types and built-in variables.
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half(float v) { return __half(v); }
inline float __half2float(__half v) { return static_cast<float>(v); }
inline __nv_bfloat16 __float2bfloat16(float v) { return __nv_bfloat16(v); }
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(v); }

// ---------------------------------------------------------------------------------------------
// Device math: CUDA's overloads of min/max (fminf/fmaxf for floating point) and intrinsics.
#define CUDA_EMUL_MINMAX(T)                        \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
CUDA_EMUL_MINMAX(int)
CUDA_EMUL_MINMAX(unsigned int)
CUDA_EMUL_MINMAX(long)
CUDA_EMUL_MINMAX(unsigned long)
CUDA_EMUL_MINMAX(long long)
CUDA_EMUL_MINMAX(unsigned long long)
#undef CUDA_EMUL_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline int __float2int_rn(float x) { return static_cast<int>(lrintf(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, sizeof f);
  return f;
}
inline int __float_as_int(float f) {
  int v;
  std::memcpy(&v, &f, sizeof v);
  return v;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int v;
  std::memcpy(&v, &f, sizeof v);
  return v;
}
inline long long __double_as_longlong(double d) {
  long long v;
  std::memcpy(&v, &d, sizeof v);
  return v;
}
inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, sizeof d);
  return d;
}
inline int __popc(unsigned int v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(v)); }
inline int __clzll(long long v) {
  return v == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(v));
}
inline int __ffs(int v) { return __builtin_ffs(v); }
inline unsigned int __brev(unsigned int v) {
  v = ((v >> 1) & 0x55555555u) | ((v & 0x55555555u) << 1);
  v = ((v >> 2) & 0x33333333u) | ((v & 0x33333333u) << 2);
  v = ((v >> 4) & 0x0f0f0f0fu) | ((v & 0x0f0f0f0fu) << 4);
  v = ((v >> 8) & 0x00ff00ffu) | ((v & 0x00ff00ffu) << 8);
  return (v >> 16) | (v << 16);
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// Atomics are relaxed read-modify-writes, as on the GPU; ordering comes from barriers.
template <typename T, typename Op>
inline T cuda_emul_atomic_update(T* address, Op op) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load(std::memory_order_relaxed);
  while (!ref.compare_exchange_weak(old, op(old), std::memory_order_relaxed)) {
  }
  return old;
}
#define CUDA_EMUL_ATOMICS(T)                                                                      \
  inline T atomicAdd(T* a, T v) {                                                                 \
    return std::atomic_ref<T>(*a).fetch_add(v, std::memory_order_relaxed);                        \
  }                                                                                               \
  inline T atomicExch(T* a, T v) {                                                                \
    return std::atomic_ref<T>(*a).exchange(v, std::memory_order_relaxed);                         \
  }                                                                                               \
  inline T atomicMax(T* a, T v) {                                                                 \
    return cuda_emul_atomic_update(a, [v](T x) { return x < v ? v : x; });                        \
  }                                                                                               \
  inline T atomicMin(T* a, T v) {                                                                 \
    return cuda_emul_atomic_update(a, [v](T x) { return v < x ? v : x; });                        \
  }                                                                                               \
  inline T atomicCAS(T* a, T expected, T desired) {                                               \
    std::atomic_ref<T>(*a).compare_exchange_strong(expected, desired, std::memory_order_relaxed); \
    return expected;                                                                              \
  }
CUDA_EMUL_ATOMICS(float)
CUDA_EMUL_ATOMICS(double)
CUDA_EMUL_ATOMICS(int)
CUDA_EMUL_ATOMICS(unsigned int)
CUDA_EMUL_ATOMICS(unsigned long long)
#undef CUDA_EMUL_ATOMICS
#define CUDA_EMUL_INT_ATOMICS(T)                                           \
  inline T atomicSub(T* a, T v) {                                          \
    return std::atomic_ref<T>(*a).fetch_sub(v, std::memory_order_relaxed); \
  }                                                                        \
  inline T atomicAnd(T* a, T v) {                                          \
    return std::atomic_ref<T>(*a).fetch_and(v, std::memory_order_relaxed); \
  }                                                                        \
  inline T atomicOr(T* a, T v) {                                           \
    return std::atomic_ref<T>(*a).fetch_or(v, std::memory_order_relaxed);  \
  }                                                                        \
  inline T atomicXor(T* a, T v) {                                          \
    return std::atomic_ref<T>(*a).fetch_xor(v, std::memory_order_relaxed); \
  }
CUDA_EMUL_INT_ATOMICS(int)
CUDA_EMUL_INT_ATOMICS(unsigned int)
CUDA_EMUL_INT_ATOMICS(unsigned long long)
#undef CUDA_EMUL_INT_ATOMICS
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---------------------------------------------------------------------------------------------
// Host runtime surface: errors, streams, device attributes, memory copies.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxBlockDimY = 3,
  cudaDevAttrMaxBlockDimZ = 4,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
struct cudaDeviceProp {
  char name[256];
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  size_t sharedMemPerMultiprocessor;
  int warpSize;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  int multiProcessorCount;
  int major;
  int minor;
};

namespace cuda_emul {

// The emulated device: an H100/H200-class part (sm_90), whose SM count can be changed with
// WSSS_FAST_EMUL_SMS to steer launch code that sizes grids by it.
constexpr size_t kStaticSmemLimit = 48 * 1024;
constexpr size_t kOptinSmemLimit = 227 * 1024;
constexpr unsigned kMaxGridX = 2147483647u;
constexpr unsigned kMaxGridYZ = 65535u;
// Kernel parameters: 32764 bytes since CUDA 12.1 on Volta and newer (4 KB before).
constexpr size_t kMaxParamBytes = 32764;

inline int sm_count() {
  const char* env = std::getenv("WSSS_FAST_EMUL_SMS");
  return env != nullptr && std::atoi(env) > 0 ? std::atoi(env) : 132;
}

inline cudaDeviceProp* device_properties() {
  static cudaDeviceProp prop = [] {
    cudaDeviceProp p{};
    std::snprintf(p.name, sizeof p.name, "cuda_emul (CPU emulation of an sm_90 GPU)");
    p.sharedMemPerBlock = kStaticSmemLimit;
    p.sharedMemPerBlockOptin = kOptinSmemLimit;
    p.sharedMemPerMultiprocessor = 228 * 1024;
    p.warpSize = 32;
    p.maxThreadsPerBlock = 1024;
    p.maxThreadsDim[0] = p.maxThreadsDim[1] = 1024;
    p.maxThreadsDim[2] = 64;
    p.maxGridSize[0] = static_cast<int>(kMaxGridX);
    p.maxGridSize[1] = p.maxGridSize[2] = static_cast<int>(kMaxGridYZ);
    p.multiProcessorCount = sm_count();
    p.major = 9;
    p.minor = 0;
    return p;
  }();
  prop.multiProcessorCount = sm_count();
  return &prop;
}

// Dynamic shared memory sizes opted into with cudaFuncSetAttribute, per kernel.
inline std::mutex& attr_mutex() {
  static std::mutex m;
  return m;
}
inline std::unordered_map<const void*, int>& max_dynamic_smem() {
  static auto* m = new std::unordered_map<const void*, int>();
  return *m;
}

}  // namespace cuda_emul

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    default:
      return "unspecified launch failure";
  }
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int) {
  *prop = *cuda_emul::device_properties();
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  const cudaDeviceProp& p = *cuda_emul::device_properties();
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock:
      *value = p.maxThreadsPerBlock;
      break;
    case cudaDevAttrMaxBlockDimX:
    case cudaDevAttrMaxBlockDimY:
    case cudaDevAttrMaxBlockDimZ:
      *value = p.maxThreadsDim[attr - cudaDevAttrMaxBlockDimX];
      break;
    case cudaDevAttrMaxGridDimX:
    case cudaDevAttrMaxGridDimY:
    case cudaDevAttrMaxGridDimZ:
      *value = p.maxGridSize[attr - cudaDevAttrMaxGridDimX];
      break;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = static_cast<int>(p.sharedMemPerBlock);
      break;
    case cudaDevAttrWarpSize:
      *value = 32;
      break;
    case cudaDevAttrMultiProcessorCount:
      *value = p.multiProcessorCount;
      break;
    case cudaDevAttrComputeCapabilityMajor:
      *value = p.major;
      break;
    case cudaDevAttrComputeCapabilityMinor:
      *value = p.minor;
      break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = static_cast<int>(p.sharedMemPerMultiprocessor);
      break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(p.sharedMemPerBlockOptin);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > cuda_emul::kOptinSmemLimit) {
      return cudaErrorInvalidValue;
    }
    std::lock_guard<std::mutex> lock(cuda_emul::attr_mutex());
    cuda_emul::max_dynamic_smem()[reinterpret_cast<const void*>(func)] = value;
  }
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind) {
  std::memmove(dst, src, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind,
                                   cudaStream_t = nullptr) {
  return cudaMemcpy(dst, src, n, kind);
}
inline cudaError_t cudaMemset(void* dst, int value, size_t n) {
  std::memset(dst, value, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* dst, int value, size_t n, cudaStream_t = nullptr) {
  return cudaMemset(dst, value, n);
}
// `__constant__` variables are ordinary globals; copies into them are checked against their size.
template <typename T>
inline cudaError_t cudaMemcpyToSymbol(const T& symbol, const void* src, size_t count,
                                      size_t offset = 0, cudaMemcpyKind = cudaMemcpyHostToDevice) {
  if (offset + count > sizeof(T)) return cudaErrorInvalidValue;
  std::memcpy(reinterpret_cast<unsigned char*>(const_cast<T*>(&symbol)) + offset, src, count);
  return cudaSuccess;
}
template <typename T>
inline cudaError_t cudaMemcpyToSymbolAsync(const T& symbol, const void* src, size_t count,
                                           size_t offset = 0,
                                           cudaMemcpyKind kind = cudaMemcpyHostToDevice,
                                           cudaStream_t = nullptr) {
  return cudaMemcpyToSymbol(symbol, src, count, offset, kind);
}
template <typename T>
inline cudaError_t cudaMemcpyFromSymbol(void* dst, const T& symbol, size_t count, size_t offset = 0,
                                        cudaMemcpyKind = cudaMemcpyDeviceToHost) {
  if (offset + count > sizeof(T)) return cudaErrorInvalidValue;
  std::memcpy(dst, reinterpret_cast<const unsigned char*>(&symbol) + offset, count);
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// The execution engine.
namespace cuda_emul {

// Thrown inside worker threads to unwind a kernel after a failure anywhere in its block.
struct Abort {};

inline void futex_wait(std::atomic<uint32_t>& word, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, nullptr,
          nullptr, 0);
}
inline void futex_wake_all(std::atomic<uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
          nullptr, 0);
}

inline std::string hex(uint32_t v) {
  std::ostringstream s;
  s << "0x" << std::hex << v;
  return s.str();
}

struct Site {
  const char* file;
  int line;
  const char* kernel;
};

struct Config {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  Config() : Config(dim3(), dim3()) {}
  Config(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr)
      : grid(g), block(b), smem(s), stream(st) {}
};

struct WarpState {
  uint32_t existing = 0;  // lanes that exist (the last warp of a block may be partial)
  uint32_t exited = 0;
  uint32_t arrived = 0;  // lanes waiting in the current exchange
  uint32_t mask = 0;
  int line = 0;
  const char* what = nullptr;
  std::atomic<uint32_t> gen{0};
  // Two buffers: a lane may write the next exchange's value before a slower lane has read this
  // one's, never before every lane has read the previous one.
  alignas(16) unsigned char slots[2][32][8];
};

struct BlockState {
  std::mutex mu;
  int nthreads = 0;
  int exited = 0;
  int blocked = 0;  // threads waiting in a barrier or an exchange
  int bar_arrived = 0;
  int bar_line = 0;
  int bar_count = 0;  // __syncthreads_count's sum
  int bar_result[2] = {0, 0};
  std::atomic<uint32_t> bar_gen{0};
  std::vector<std::unique_ptr<WarpState>> warps;
};

struct Launch {
  Site site;
  Config cfg;
  void (*trampoline)(const void* kernel, const void* params) = nullptr;
  const void* kernel = nullptr;
  const void* params = nullptr;
  int nthreads = 0;
  uint64_t nblocks = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  BlockState block;
  std::atomic<uint32_t> block_seq{0};  // index of the running block, low 32 bits
  std::atomic<bool> aborted{false};
  std::atomic<uint32_t> done{0};
  std::mutex err_mu;
  std::string error;
};

// Bytes past the dynamic shared memory checked after each block for stray writes; none under
// AddressSanitizer, which then sees the buffer at its exact size and reports reads past it too.
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kSmemCanary = 0;
#else
constexpr size_t kSmemCanary = 64;
#endif
constexpr unsigned char kCanaryByte = 0xA5;

// What a worker thread knows about the thread it currently emulates.
struct ThreadCtx {
  Launch* launch = nullptr;
  int tid = 0;  // linear thread index in the block
  int lane = 0;
  int warp = 0;
  uint64_t block = 0;
};
inline thread_local ThreadCtx ctx;

inline std::string where(const Launch& L) {
  std::ostringstream s;
  s << " (kernel " << L.site.kernel << " launched at " << L.site.file << ":" << L.site.line
    << ", block (" << blockIdx.x << ", " << blockIdx.y << ", " << blockIdx.z << "), thread ("
    << threadIdx.x << ", " << threadIdx.y << ", " << threadIdx.z << "))";
  return s.str();
}

// Records the first failure, wakes every waiting thread of the block so that it unwinds.
inline void abort_launch(Launch& L, const std::string& msg) {
  {
    std::lock_guard<std::mutex> lock(L.err_mu);
    if (L.error.empty()) L.error = msg;
  }
  L.aborted.store(true);
  L.block.bar_gen.fetch_add(1, std::memory_order_release);
  futex_wake_all(L.block.bar_gen);
  for (auto& w : L.block.warps) {
    w->gen.fetch_add(1, std::memory_order_release);
    futex_wake_all(w->gen);
  }
  L.block_seq.fetch_add(1, std::memory_order_release);
  futex_wake_all(L.block_seq);
}

[[noreturn]] inline void fail(Launch& L, const std::string& msg) {
  abort_launch(L, msg + where(L));
  throw Abort{};
}

inline Launch& current(const char* what) {
  if (ctx.launch == nullptr) {
    throw std::runtime_error(std::string("[cuda_emul] ") + what +
                             " called outside a kernel launched through cuda_emul::launch");
  }
  return *ctx.launch;
}

// Caller holds L.block.mu and is about to wait: if no thread of the block can run any more, the
// block is deadlocked.
inline void check_deadlock(Launch& L) {
  BlockState& B = L.block;
  if (B.blocked < B.nthreads - B.exited) return;
  std::ostringstream s;
  s << "[cuda_emul:deadlock] every live thread of the block waits and none can proceed: ";
  if (B.bar_arrived > 0) {
    s << B.bar_arrived << " of " << B.nthreads << " threads at __syncthreads (line " << B.bar_line
      << ")";
  }
  for (size_t w = 0; w < B.warps.size(); ++w) {
    const WarpState& W = *B.warps[w];
    if (W.arrived != 0) {
      s << "; warp " << w << " lanes " << hex(W.arrived) << " in " << W.what << " (line " << W.line
        << ", mask " << hex(W.mask) << ") waiting for lanes "
        << hex(W.mask & W.existing & ~W.arrived);
    }
  }
  fail(L, s.str());
}

// Waits until `word` moves on from `seen`; unwinds if the launch was aborted meanwhile.
inline void wait_for(Launch& L, std::atomic<uint32_t>& word, uint32_t seen) {
  while (word.load(std::memory_order_acquire) == seen) futex_wait(word, seen);
  if (L.aborted.load()) throw Abort{};
}

inline int syncthreads_impl(int pred, int line) {
  Launch& L = current("__syncthreads");
  BlockState& B = L.block;
  std::unique_lock<std::mutex> lock(B.mu);
  if (L.aborted.load()) throw Abort{};
  if (B.exited > 0) {
    fail(L, "[cuda_emul:partial-barrier] __syncthreads (line " + std::to_string(line) +
                ") reached by only part of the block: " + std::to_string(B.exited) + " of " +
                std::to_string(B.nthreads) + " threads have exited");
  }
  if (B.bar_arrived == 0) {
    B.bar_line = line;
    B.bar_count = 0;
  } else if (B.bar_line != line) {
    fail(L,
         "[cuda_emul:partial-barrier] threads of one block wait at different __syncthreads "
         "(line " +
             std::to_string(line) + " and line " + std::to_string(B.bar_line) + ")");
  }
  B.bar_count += pred != 0;
  const uint32_t gen = B.bar_gen.load(std::memory_order_relaxed);
  if (++B.bar_arrived == B.nthreads) {
    B.bar_result[gen & 1] = B.bar_count;
    B.bar_arrived = 0;
    B.blocked -= B.nthreads - 1;
    B.bar_gen.store(gen + 1, std::memory_order_release);
    lock.unlock();
    futex_wake_all(B.bar_gen);
    return B.bar_result[gen & 1];
  }
  ++B.blocked;
  check_deadlock(L);
  lock.unlock();
  wait_for(L, B.bar_gen, gen);
  return B.bar_result[gen & 1];
}

// One exchange among the lanes named in `mask`: every lane deposits `size` bytes of `in`; returns
// the slot array of this exchange once all of them have.
inline const unsigned char (*warp_exchange(uint32_t mask, const void* in, size_t size,
                                           const char* what, int line))[8] {
  Launch& L = current(what);
  BlockState& B = L.block;
  WarpState& W = *B.warps[ctx.warp];
  const int lane = ctx.lane;
  std::unique_lock<std::mutex> lock(B.mu);
  if (L.aborted.load()) throw Abort{};
  if (((mask >> lane) & 1u) == 0) {
    fail(L, std::string("[cuda_emul:shuffle-mask] lane ") + std::to_string(lane) + " calls " +
                what + " (line " + std::to_string(line) + ") with mask " + hex(mask) +
                ", which leaves it out (on hardware: undefined behaviour)");
  }
  if ((mask & W.exited) != 0) {
    fail(L, std::string("[cuda_emul:shuffle-exited] ") + what + " (line " + std::to_string(line) +
                ") with mask " + hex(mask) + " names lanes " + hex(mask & W.exited) +
                " that have exited");
  }
  if (W.arrived == 0) {
    W.mask = mask;
    W.line = line;
    W.what = what;
  } else if (W.mask != mask || W.line != line || W.what != what) {
    fail(L, std::string("[cuda_emul:shuffle-mask] lanes of warp ") + std::to_string(ctx.warp) +
                " diverge: lane " + std::to_string(lane) + " calls " + what + " (line " +
                std::to_string(line) + ", mask " + hex(mask) + ") while lanes " + hex(W.arrived) +
                " wait in " + W.what + " (line " + std::to_string(W.line) + ", mask " +
                hex(W.mask) + ")");
  }
  const uint32_t gen = W.gen.load(std::memory_order_relaxed);
  std::memcpy(W.slots[gen & 1][lane], in, size);
  W.arrived |= 1u << lane;
  const uint32_t need = mask & W.existing;
  if (W.arrived == need) {
    W.arrived = 0;
    B.blocked -= __builtin_popcount(need) - 1;
    W.gen.store(gen + 1, std::memory_order_release);
    lock.unlock();
    futex_wake_all(W.gen);
    return W.slots[gen & 1];
  }
  ++B.blocked;
  check_deadlock(L);
  lock.unlock();
  wait_for(L, W.gen, gen);
  return W.slots[gen & 1];
}

enum class ShflKind { kIdx, kXor, kDown, kUp };

template <typename T>
inline T shuffle(ShflKind kind, const char* what, uint32_t mask, T var, int arg, int width,
                 int line) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "warp shuffles move values of at most 8 bytes");
  Launch& L = current(what);
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail(L, std::string("[cuda_emul:shuffle-mask] ") + what + " width " + std::to_string(width) +
                " is not a power of two in [1, 32]");
  }
  const auto slots = warp_exchange(mask, &var, sizeof(T), what, line);
  const int lane = ctx.lane, base = lane & ~(width - 1);
  int src = lane;
  switch (kind) {
    case ShflKind::kIdx:
      src = base + (arg & (width - 1));
      break;
    case ShflKind::kXor:
      src = lane ^ arg;
      if (src >= base + width) src = lane;
      break;
    case ShflKind::kDown:
      src = lane + arg < base + width ? lane + arg : lane;
      break;
    case ShflKind::kUp:
      src = lane - arg >= base ? lane - arg : lane;
      break;
  }
  const uint32_t present = mask & current(what).block.warps[ctx.warp]->existing;
  if (src < 0 || src > 31 || ((present >> src) & 1u) == 0) {
    fail(L, std::string("[cuda_emul:shuffle-mask] lane ") + std::to_string(lane) + " reads lane " +
                std::to_string(src) + " in " + what + " (line " + std::to_string(line) +
                "), outside mask " + hex(mask) + " (on hardware: an undefined value)");
  }
  T out;
  std::memcpy(&out, slots[src], sizeof(T));
  return out;
}

inline void on_thread_exit(Launch& L) {
  BlockState& B = L.block;
  std::unique_lock<std::mutex> lock(B.mu);
  WarpState& W = *B.warps[ctx.warp];
  W.exited |= 1u << ctx.lane;
  ++B.exited;
  if (L.aborted.load()) return;
  if (((W.mask >> ctx.lane) & 1u) != 0 && W.arrived != 0) {
    fail(L, std::string("[cuda_emul:shuffle-exited] lane ") + std::to_string(ctx.lane) +
                " exited while lanes " + hex(W.arrived) + " of its warp wait for it in " + W.what +
                " (line " + std::to_string(W.line) + ", mask " + hex(W.mask) + ")");
  }
  if (B.bar_arrived > 0) {
    fail(L, "[cuda_emul:partial-barrier] a thread exited while " + std::to_string(B.bar_arrived) +
                " of " + std::to_string(B.nthreads) + " threads wait at __syncthreads (line " +
                std::to_string(B.bar_line) + ")");
  }
  if (B.exited < B.nthreads) {
    if (B.blocked > 0) check_deadlock(L);
    return;
  }
  // The last thread of the block: reset the block and start the next one.
  B.exited = 0;
  B.blocked = 0;
  for (auto& w : B.warps) {
    w->exited = 0;
    w->arrived = 0;
  }
  for (size_t i = 0; i < kSmemCanary; ++i) {
    if (L.smem[L.smem_bytes + i] != kCanaryByte) {
      fail(L, "[cuda_emul:dynamic-smem] a thread wrote past the " + std::to_string(L.smem_bytes) +
                  " bytes of dynamic shared memory the launch asked for");
    }
  }
  // Shared memory is not initialised on hardware: NaN bytes make reads before writes show.
  std::memset(L.smem, 0xFF, L.smem_bytes);
  lock.unlock();
  L.block_seq.fetch_add(1, std::memory_order_release);
  futex_wake_all(L.block_seq);
}

// The persistent pool of worker threads; worker i emulates linear thread index i of every block.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: its threads outlive static destructors
    return *pool;
  }

  void run(Launch& L) {
    while (static_cast<int>(workers_.size()) < L.nthreads) spawn();
    for (int i = 0; i < L.nthreads; ++i) {
      Worker& w = *workers_[i];
      w.launch = &L;
      w.go.fetch_add(1, std::memory_order_release);
      futex_wake_all(w.go);
    }
    for (;;) {
      const uint32_t done = L.done.load(std::memory_order_acquire);
      if (static_cast<int>(done) == L.nthreads) break;
      futex_wait(L.done, done);
    }
  }

 private:
  struct Worker {
    int index = 0;
    std::atomic<uint32_t> go{0};
    Launch* launch = nullptr;
  };

  void spawn() {
    workers_.push_back(std::make_unique<Worker>());
    Worker* w = workers_.back().get();
    w->index = static_cast<int>(workers_.size()) - 1;
    std::thread([w] { loop(*w); }).detach();
  }

  static void loop(Worker& w) {
    uint32_t seen = 0;
    for (;;) {
      while (w.go.load(std::memory_order_acquire) == seen) futex_wait(w.go, seen);
      seen = w.go.load(std::memory_order_acquire);
      run_blocks(*w.launch, w.index);
    }
  }

  static void run_blocks(Launch& L, int tid) {
    const dim3 bd = L.cfg.block, gd = L.cfg.grid;
    blockDim = bd;
    gridDim = gd;
    threadIdx = uint3{static_cast<unsigned>(tid) % bd.x, static_cast<unsigned>(tid) / bd.x % bd.y,
                      static_cast<unsigned>(tid) / (bd.x * bd.y)};
    ctx.launch = &L;
    ctx.tid = tid;
    ctx.lane = tid % 32;
    ctx.warp = tid / 32;
    for (uint64_t b = 0; b < L.nblocks; ++b) {
      const uint32_t want = static_cast<uint32_t>(b);
      uint32_t seq;
      while ((seq = L.block_seq.load(std::memory_order_acquire)) != want && !L.aborted.load()) {
        futex_wait(L.block_seq, seq);
      }
      if (L.aborted.load()) break;
      ctx.block = b;
      blockIdx = uint3{static_cast<unsigned>(b % gd.x), static_cast<unsigned>(b / gd.x % gd.y),
                       static_cast<unsigned>(b / (static_cast<uint64_t>(gd.x) * gd.y))};
      try {
        L.trampoline(L.kernel, L.params);
        on_thread_exit(L);
      } catch (const Abort&) {
        break;
      } catch (const std::exception& e) {
        abort_launch(
            L, std::string("[cuda_emul] exception in a kernel thread: ") + e.what() + where(L));
        break;
      }
    }
    ctx = ThreadCtx{};
    L.done.fetch_add(1, std::memory_order_acq_rel);
    futex_wake_all(L.done);
  }

  std::vector<std::unique_ptr<Worker>> workers_;
};

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline std::string dims(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

// Hardware launch checks (cudaErrorInvalidConfiguration and friends), with the failing limit.
inline void check_config(const Site& site, const Config& c, const void* kernel) {
  auto bad = [&](const std::string& tag, const std::string& why) {
    TORCH_CHECK(false, "[cuda_emul:", tag, "] ", why, " (kernel ", site.kernel, " launched at ",
                site.file, ":", site.line, ")");
  };
  const dim3 g = c.grid, b = c.block;
  if (g.x == 0 || g.y == 0 || g.z == 0) bad("launch-config", "grid " + dims(g) + " is empty");
  if (g.x > kMaxGridX || g.y > kMaxGridYZ || g.z > kMaxGridYZ) {
    bad("launch-config", "grid " + dims(g) + " exceeds the limits (2^31 - 1, 65535, 65535)");
  }
  if (b.x == 0 || b.y == 0 || b.z == 0) bad("launch-config", "block " + dims(b) + " is empty");
  if (b.x > 1024 || b.y > 1024 || b.z > 64 || static_cast<uint64_t>(b.x) * b.y * b.z > 1024) {
    bad("launch-config", "block " + dims(b) + " exceeds the limits (1024, 1024, 64; 1024 threads)");
  }
  if (c.smem > kOptinSmemLimit) {
    bad("dynamic-smem", std::to_string(c.smem) + " bytes of dynamic shared memory exceed the " +
                            std::to_string(kOptinSmemLimit) + " any GPU offers a block");
  }
  if (c.smem > kStaticSmemLimit) {
    int allowed = 0;
    {
      std::lock_guard<std::mutex> lock(attr_mutex());
      auto it = max_dynamic_smem().find(kernel);
      if (it != max_dynamic_smem().end()) allowed = it->second;
    }
    if (c.smem > static_cast<size_t>(allowed)) {
      bad("dynamic-smem",
          std::to_string(c.smem) +
              " bytes of dynamic shared memory exceed 48 KB without "
              "cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)" +
              (allowed > 0 ? " (set to " + std::to_string(allowed) + ")" : std::string()));
    }
  }
}

template <typename... P>
void invoke(const void* kernel, const void* params) {
  using Fn = void (*)(P...);
  // Each thread gets its own copy of the arguments, as each reads them from the parameter bank.
  std::apply(reinterpret_cast<Fn>(const_cast<void*>(kernel)),
             *static_cast<const std::tuple<std::decay_t<P>...>*>(params));
}

template <typename P, typename A>
std::decay_t<P> convert_arg(A&& a) {
  return std::forward<A>(a);
}

// What `kernel<<<grid, block, smem, stream>>>(args...)` becomes: checks the configuration, then
// runs every block, one after another, with one OS thread per CUDA thread, and returns when the
// grid has finished (a launch is synchronous). A failure in the kernel raises c10::Error.
template <typename... P, typename... A>
void launch(const Site& site, void (*kernel)(P...), const Config& cfg, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  const void* kernel_ptr = reinterpret_cast<const void*>(kernel);
  check_config(site, cfg, kernel_ptr);
  const std::tuple<std::decay_t<P>...> params(convert_arg<P>(std::forward<A>(args))...);
  if (sizeof(params) > kMaxParamBytes) {
    TORCH_CHECK(false, "[cuda_emul:launch-config] ", sizeof(params),
                " bytes of kernel arguments "
                "exceed the ",
                kMaxParamBytes, " a launch takes (kernel ", site.kernel, " launched at ", site.file,
                ":", site.line, ")");
  }

  std::lock_guard<std::mutex> lock(launch_mutex());
  Launch L;
  L.site = site;
  L.cfg = cfg;
  L.trampoline = &invoke<P...>;
  L.kernel = kernel_ptr;
  L.params = &params;
  L.nthreads = static_cast<int>(cfg.block.x * cfg.block.y * cfg.block.z);
  L.nblocks = static_cast<uint64_t>(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
  L.smem_bytes = cfg.smem;
  std::unique_ptr<unsigned char[]> smem(new unsigned char[cfg.smem + kSmemCanary]);
  L.smem = smem.get();
  std::memset(L.smem, 0xFF, cfg.smem);
  std::memset(L.smem + cfg.smem, kCanaryByte, kSmemCanary);
  L.block.nthreads = L.nthreads;
  const int nwarps = (L.nthreads + 31) / 32;
  for (int w = 0; w < nwarps; ++w) {
    L.block.warps.push_back(std::make_unique<WarpState>());
    const int lanes = std::min(32, L.nthreads - 32 * w);
    L.block.warps.back()->existing = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
  }
  Pool::get().run(L);
  TORCH_CHECK(L.error.empty(), L.error);
}

// The launch's dynamic shared memory (`extern __shared__ T name[];`).
template <typename T>
inline T* dynamic_smem() {
  return reinterpret_cast<T*>(current("extern __shared__").smem);
}

}  // namespace cuda_emul

// ---------------------------------------------------------------------------------------------
// Device intrinsics that synchronise. The call's line (GCC's __builtin_LINE as a default
// argument) identifies the call site, so divergent barriers and shuffles can be told apart.
inline void __syncthreads(int line = __builtin_LINE()) { cuda_emul::syncthreads_impl(1, line); }
inline int __syncthreads_count(int pred, int line = __builtin_LINE()) {
  return cuda_emul::syncthreads_impl(pred, line);
}
inline int __syncthreads_and(int pred, int line = __builtin_LINE()) {
  return cuda_emul::syncthreads_impl(pred, line) ==
         static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
}
inline int __syncthreads_or(int pred, int line = __builtin_LINE()) {
  return cuda_emul::syncthreads_impl(pred, line) > 0;
}
inline void __syncwarp(unsigned mask = 0xffffffffu, int line = __builtin_LINE()) {
  const char dummy = 0;
  cuda_emul::warp_exchange(mask, &dummy, 1, "__syncwarp", line);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src, int width = 32, int line = __builtin_LINE()) {
  return cuda_emul::shuffle(cuda_emul::ShflKind::kIdx, "__shfl_sync", mask, var, src, width, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                         int line = __builtin_LINE()) {
  return cuda_emul::shuffle(cuda_emul::ShflKind::kXor, "__shfl_xor_sync", mask, var, lane_mask,
                            width, line);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                          int line = __builtin_LINE()) {
  return cuda_emul::shuffle(cuda_emul::ShflKind::kDown, "__shfl_down_sync", mask, var,
                            static_cast<int>(delta), width, line);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                        int line = __builtin_LINE()) {
  return cuda_emul::shuffle(cuda_emul::ShflKind::kUp, "__shfl_up_sync", mask, var,
                            static_cast<int>(delta), width, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, int line = __builtin_LINE()) {
  const unsigned char p = pred != 0;
  const auto slots = cuda_emul::warp_exchange(mask, &p, 1, "__ballot_sync", line);
  const cuda_emul::Launch& L = cuda_emul::current("__ballot_sync");
  const unsigned present = mask & L.block.warps[cuda_emul::ctx.warp]->existing;
  unsigned out = 0;
  for (int l = 0; l < 32; ++l) {
    if (((present >> l) & 1u) != 0 && slots[l][0] != 0) out |= 1u << l;
  }
  return out;
}
inline int __any_sync(unsigned mask, int pred, int line = __builtin_LINE()) {
  return __ballot_sync(mask, pred, line) != 0;
}
inline int __all_sync(unsigned mask, int pred, int line = __builtin_LINE()) {
  const cuda_emul::Launch& L = cuda_emul::current("__all_sync");
  const unsigned live = mask & L.block.warps[cuda_emul::ctx.warp]->existing;
  return __ballot_sync(mask, pred, line) == live;
}
inline unsigned __activemask() {
  const cuda_emul::Launch& L = cuda_emul::current("__activemask");
  const cuda_emul::WarpState& W = *L.block.warps[cuda_emul::ctx.warp];
  return W.existing & ~W.exited;
}
