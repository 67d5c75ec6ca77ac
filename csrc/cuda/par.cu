// PAR (AReAM/AFA) and PAMR (GETAM) pixel-adaptive refinement on CUDA. One kernel computes the
// [B, K, H, W] affinities to the K = 8 x len(dilations) ring neighbours once (a thread per pixel);
// each of the `iters` updates m_i <- sum_k aff[k, i] m[tap_k(i)] is one launch of a gather kernel
// (a thread per pixel and chunk of channels) between two ping-pong buffers, so the
// [B, C, K, H, W] tensor the published code unfolds at every iteration never exists. Coordinates
// are clamped (replicate padding). The tap tables travel by value as kernel arguments, so a call
// makes no host-to-device copy: it never waits for the device and can be captured in a CUDA graph.
//
// The stream comes from c10/cuda rather than ATen/cuda/CUDAContext.h: the latter pulls in the
// cuBLAS and cuSPARSE headers, which a CUDA toolkit without those libraries lacks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "par.h"
#include "wsss_fast.h"

namespace {

constexpr int kThreads = 256;
// Channels per thread of the update kernel for which a kernel is compiled: each thread reads the
// K affinities of its pixel once per chunk, so C = 21 (VOC) reads them once; COCO's C = 81 runs in
// four chunks of 21.
constexpr int kChannelsPerThread[] = {1, 2, 4, 8, 16, 21};
constexpr int kMaxChannels = 21;
constexpr int64_t kMaxGrid = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxGridYZ = 65535;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

__device__ __forceinline__ int clamp_coord(int v, int n) { return min(max(v, 0), n - 1); }

constexpr int kMaxRing = 8 * wsss_fast::par::kMaxDilations;    // ring taps: 8 per dilation
constexpr int kMaxWindow = 9 * wsss_fast::par::kMaxDilations;  // with the centre: 9 per dilation

// Flat index in an H x W plane of tap t = (dy, dx) of pixel (y, x), coordinates clamped.
__device__ __forceinline__ int64_t tap_index(int2 t, int y, int x, int H, int W) {
  return static_cast<int64_t>(clamp_coord(y + t.x, H)) * W + clamp_coord(x + t.y, W);
}

// Full-precision exp, abs and sqrt for either accumulation type (no fast-math intrinsics: the
// affinities are computed once, and the tests hold float32 to float64 within ~1e-5).
__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }
__device__ __forceinline__ float abs_acc(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_acc(double v) { return fabs(v); }
__device__ __forceinline__ float sqrt_acc(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_acc(double v) { return sqrt(v); }

// The ring taps (x: dy, y: dx), 8 per dilation, row-major; the first K entries are used.
struct RingTaps {
  int2 tap[kMaxRing];
};

// Passed by value (3.2 KB for double, within the 4 KB kernel-argument limit of older toolkits).
template <typename acc_t>
struct AffinityArgs {
  const acc_t* image;  // [B, 3, H, W]
  acc_t* aff;          // [B, K, H, W]
  int64_t B;
  int H, W, K, S;
  RingTaps ring;
  int2 sig_taps[kMaxWindow];  // [S] taps over which sigma is taken (PAR: the ring; PAMR: + centres)
  acc_t pos[kMaxRing];        // [K] PAR's w_pos-weighted position softmax; unused by PAMR
};
static_assert(sizeof(AffinityArgs<double>) <= 4096, "kernel arguments must fit in 4 KB");

// aff[b, :, y, x] for one pixel per thread:
//   PAR:  aff_k = softmax_k(mean_c -(|I_c - I_c[tap_k]| / (sigma_c + 1e-8) / 0.3)^2) + pos_k,
//         sigma_c the unbiased std of I_c over the K ring taps;
//   PAMR: aff_k = softmax_k(mean_c -|I_c - I_c[tap_k]| / (1e-8 + 0.1 sigma_c)),
//         sigma_c the unbiased std of I_c over the 3x3 windows with centre at every dilation.
// Two passes give sigma (mean, then squared deviations) of I_c[tap] - I_c: the same std, but
// differences of nearby values are exact while a running sum of raw values far from 0 (an image
// + 1e6) rounds their spread away; torch's backend does the same. The logits are staged in aff
// itself, whose reads and writes are coalesced across the threads of a row.
template <typename acc_t, bool kPar>
__global__ void __launch_bounds__(kThreads) _par_affinity_kernel(const AffinityArgs<acc_t> p) {
  const int64_t HW = static_cast<int64_t>(p.H) * p.W;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.B * HW) return;
  const int64_t b = idx / HW, pix = idx % HW;
  const int y = static_cast<int>(pix / p.W), x = static_cast<int>(pix % p.W);
  const acc_t* img = p.image + b * 3 * HW;

  acc_t centre[3], mean[3] = {0, 0, 0}, ss[3] = {0, 0, 0}, denom[3];
#pragma unroll
  for (int ch = 0; ch < 3; ++ch) centre[ch] = img[ch * HW + pix];
  for (int s = 0; s < p.S; ++s) {
    const int64_t q = tap_index(p.sig_taps[s], y, x, p.H, p.W);
#pragma unroll
    for (int ch = 0; ch < 3; ++ch) mean[ch] += img[ch * HW + q] - centre[ch];
  }
#pragma unroll
  for (int ch = 0; ch < 3; ++ch) mean[ch] /= static_cast<acc_t>(p.S);
  for (int s = 0; s < p.S; ++s) {
    const int64_t q = tap_index(p.sig_taps[s], y, x, p.H, p.W);
#pragma unroll
    for (int ch = 0; ch < 3; ++ch) {
      const acc_t dev = (img[ch * HW + q] - centre[ch]) - mean[ch];
      ss[ch] += dev * dev;
    }
  }
#pragma unroll
  for (int ch = 0; ch < 3; ++ch) {
    const acc_t sigma = sqrt_acc(ss[ch] / static_cast<acc_t>(p.S - 1));
    denom[ch] = kPar ? sigma + acc_t(1e-8) : acc_t(1e-8) + acc_t(0.1) * sigma;
  }

  acc_t* out = p.aff + b * p.K * HW + pix;
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int k = 0; k < p.K; ++k) {
    const int64_t q = tap_index(p.ring.tap[k], y, x, p.H, p.W);
    acc_t l = 0;
#pragma unroll
    for (int ch = 0; ch < 3; ++ch) {
      const acc_t diff = abs_acc(centre[ch] - img[ch * HW + q]);
      if (kPar) {
        const acc_t u = diff / denom[ch] / acc_t(0.3);
        l += -(u * u);
      } else {
        l += -diff / denom[ch];
      }
    }
    l = l / acc_t(3);
    out[k * HW] = l;
    mx = max(mx, l);
  }
  acc_t sum = 0;
  for (int k = 0; k < p.K; ++k) {
    const acc_t e = exp_acc(out[k * HW] - mx);
    out[k * HW] = e;
    sum += e;
  }
  for (int k = 0; k < p.K; ++k) out[k * HW] = out[k * HW] / sum + (kPar ? p.pos[k] : acc_t(0));
}

// One update for channels [c0, c0 + R) of every pixel:
//   dst[b, c, y, x] = sum_k aff[b, k, y, x] * src[b, c, clamp(y + dy_k), clamp(x + dx_k)].
// A thread reads its pixel's K affinities once and gathers each neighbour for its R channels;
// consecutive threads are consecutive pixels of a row, so both the affinity reads and (away from
// the borders) the gathers are coalesced. Grid: (pixel blocks, channel chunks, B).
template <typename acc_t, int R>
__global__ void __launch_bounds__(kThreads)
    _par_step_kernel(const acc_t* __restrict__ aff, const acc_t* __restrict__ src,
                     acc_t* __restrict__ dst, const RingTaps ring, int K, int64_t C, int H, int W) {
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int64_t pix = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pix >= HW) return;
  const int64_t b = blockIdx.z;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * R;
  const int64_t left = C - c0;
  const int rows = left < R ? static_cast<int>(left) : R;
  const int y = static_cast<int>(pix / W), x = static_cast<int>(pix % W);
  const acc_t* a = aff + b * K * HW + pix;
  const acc_t* s = src + (b * C + c0) * HW;

  acc_t acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = acc_t(0);
  for (int k = 0; k < K; ++k) {
    const int64_t q = tap_index(ring.tap[k], y, x, H, W);
    const acc_t w = a[k * HW];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < rows) acc[r] += w * s[r * HW + q];
    }
  }
  acc_t* out = dst + (b * C + c0) * HW + pix;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r < rows) out[r * HW] = acc[r];
  }
}

template <typename acc_t, int R>
void launch_step_r(int64_t C, int64_t B, int64_t HW, cudaStream_t stream, const acc_t* aff,
                   const acc_t* src, acc_t* dst, const RingTaps& ring, int K, int H, int W) {
  const dim3 grid(static_cast<unsigned>(ceil_div(HW, kThreads)),
                  static_cast<unsigned>(ceil_div(C, R)), static_cast<unsigned>(B));
  _par_step_kernel<acc_t, R><<<grid, kThreads, 0, stream>>>(aff, src, dst, ring, K, C, H, W);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The smallest compiled channel count per thread that covers min(C, kMaxChannels) channels.
template <typename acc_t>
void launch_step(int64_t C, int64_t B, int64_t HW, cudaStream_t stream, const acc_t* aff,
                 const acc_t* src, acc_t* dst, const RingTaps& ring, int K, int H, int W) {
  static_assert(kChannelsPerThread[5] == kMaxChannels, "kMaxChannels must match the largest R");
  const int64_t per_thread = std::min<int64_t>(C, kMaxChannels);
  if (per_thread <= kChannelsPerThread[0]) {
    launch_step_r<acc_t, kChannelsPerThread[0]>(C, B, HW, stream, aff, src, dst, ring, K, H, W);
  } else if (per_thread <= kChannelsPerThread[1]) {
    launch_step_r<acc_t, kChannelsPerThread[1]>(C, B, HW, stream, aff, src, dst, ring, K, H, W);
  } else if (per_thread <= kChannelsPerThread[2]) {
    launch_step_r<acc_t, kChannelsPerThread[2]>(C, B, HW, stream, aff, src, dst, ring, K, H, W);
  } else if (per_thread <= kChannelsPerThread[3]) {
    launch_step_r<acc_t, kChannelsPerThread[3]>(C, B, HW, stream, aff, src, dst, ring, K, H, W);
  } else if (per_thread <= kChannelsPerThread[4]) {
    launch_step_r<acc_t, kChannelsPerThread[4]>(C, B, HW, stream, aff, src, dst, ring, K, H, W);
  } else {
    launch_step_r<acc_t, kChannelsPerThread[5]>(C, B, HW, stream, aff, src, dst, ring, K, H, W);
  }
}

// Writes the taps of a 3x3 window dilated by each d to `out` (x: dy, y: dx), row-major as the
// published shift kernels order them: the 8 ring taps per dilation, or all 9 with the centre
// (PAMR's standard deviation); returns their number. A dilation of at least `extent` = max(H, W)
// clamps every tap to the border it points at, exactly as `extent` does, so taps are capped there
// and fit in int. `out` holds 9 * kMaxDilations, which check_inputs guarantees is enough.
int window_taps(const std::vector<int64_t>& dilations, bool with_centre, int64_t extent,
                int2* out) {
  int n = 0;
  for (const int64_t dilation : dilations) {
    const int d = static_cast<int>(std::min(dilation, extent));
    for (const int dy : {-d, 0, d}) {
      for (const int dx : {-d, 0, d}) {
        if (with_centre || dy != 0 || dx != 0) out[n++] = make_int2(dy, dx);
      }
    }
  }
  return n;
}

template <typename acc_t>
void run(const at::Tensor& image, const at::Tensor& x0, at::Tensor (&buf)[2], bool par,
         const std::vector<int64_t>& dilations, int64_t iters, double w_pos) {
  const int64_t B = x0.size(0), C = x0.size(1), H = x0.size(2), W = x0.size(3), HW = H * W;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t extent = std::max(H, W);

  at::Tensor aff = at::empty({B, static_cast<int64_t>(8 * dilations.size()), H, W}, x0.options());
  AffinityArgs<acc_t> args{};
  args.image = image.data_ptr<acc_t>();
  args.aff = aff.data_ptr<acc_t>();
  args.B = B;
  args.H = static_cast<int>(H);
  args.W = static_cast<int>(W);
  args.K = window_taps(dilations, /*with_centre=*/false, extent, args.ring.tap);
  args.S = par ? window_taps(dilations, /*with_centre=*/false, extent, args.sig_taps)
               : window_taps(dilations, /*with_centre=*/true, extent, args.sig_taps);
  if (par) {
    const std::vector<double> pos = wsss_fast::par::par_position_weights(dilations, w_pos);
    for (int k = 0; k < args.K; ++k) args.pos[k] = static_cast<acc_t>(pos[k]);
  }
  const int64_t aff_blocks = ceil_div(B * HW, kThreads);
  if (par) {
    _par_affinity_kernel<acc_t, true>
        <<<static_cast<unsigned>(aff_blocks), kThreads, 0, stream>>>(args);
  } else {
    _par_affinity_kernel<acc_t, false>
        <<<static_cast<unsigned>(aff_blocks), kThreads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const acc_t* src = x0.data_ptr<acc_t>();
  for (int64_t it = 0; it < iters; ++it) {
    acc_t* dst = buf[it % 2].data_ptr<acc_t>();
    launch_step<acc_t>(C, B, HW, stream, aff.data_ptr<acc_t>(), src, dst, args.ring, args.K,
                       static_cast<int>(H), static_cast<int>(W));
    src = dst;
  }
}

at::Tensor refine_cuda(const at::Tensor& image, const at::Tensor& masks, at::IntArrayRef dilations,
                       int64_t iters, double w_pos, bool par) {
  const char* op = par ? "par_forward" : "pamr_forward";
  CHECK_CUDA(image);
  wsss_fast::par::check_inputs(op, image, masks, dilations, iters);
  const int64_t B = image.size(0), H = image.size(2), W = image.size(3), C = masks.size(1);
  // Tap coordinates are int: y + dy < 2 max(H, W) must fit.
  TORCH_CHECK(H < (1 << 30) && W < (1 << 30), op, ": H and W must be < 2^30");
  TORCH_CHECK(B <= kMaxGridYZ, op, ": batch size must be <= 65535, got ", B);
  TORCH_CHECK(ceil_div(C, kMaxChannels) <= kMaxGridYZ, op, ": too many channels, got ", C);
  TORCH_CHECK(ceil_div(B * H * W, kThreads) <= kMaxGrid, op, ": B * H * W must be < 2^39");
  if (iters == 0 || masks.numel() == 0) return masks.clone();

  const c10::cuda::CUDAGuard device_guard(image.device());
  const bool use_double = image.scalar_type() == at::kDouble || masks.scalar_type() == at::kDouble;
  const at::ScalarType acc = use_double ? at::kDouble : at::kFloat;
  // The state between iterations stays in the accumulation dtype; x0 may alias masks, so it is
  // only read.
  const at::Tensor img = image.to(acc);
  const at::Tensor x0 = masks.to(acc);
  at::Tensor buf[2] = {at::empty_like(x0), iters > 1 ? at::empty_like(x0) : at::Tensor()};
  const std::vector<int64_t> dil(dilations.begin(), dilations.end());
  if (use_double) {
    run<double>(img, x0, buf, par, dil, iters, w_pos);
  } else {
    run<float>(img, x0, buf, par, dil, iters, w_pos);
  }
  return buf[(iters - 1) % 2].to(masks.scalar_type());
}

}  // namespace

at::Tensor par_forward_cuda(const at::Tensor& image, const at::Tensor& masks,
                            at::IntArrayRef dilations, int64_t iters, double w_pos) {
  return refine_cuda(image, masks, dilations, iters, w_pos, /*par=*/true);
}

at::Tensor pamr_forward_cuda(const at::Tensor& image, const at::Tensor& masks,
                             at::IntArrayRef dilations, int64_t iters) {
  return refine_cuda(image, masks, dilations, iters, /*w_pos=*/0.0, /*par=*/false);
}

TORCH_LIBRARY_IMPL(wsss_fast, CUDA, m) {
  m.impl("par_forward", &par_forward_cuda);
  m.impl("pamr_forward", &pamr_forward_cuda);
}
