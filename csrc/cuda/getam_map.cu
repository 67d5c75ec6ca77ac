// GETAM's gradient-weighted map on CUDA, for stacked layers q, k, v, grad_out [L, B, H, N, D]
// (the formulas of forward and backward are written out in csrc/cpu/getam_map.cpp):
//   a = softmax_n(s * q[row] . k[n]), g = grad_out[row] . v[n]      (per l, b, h)
//   map[b, n] = sum_l mean_h relu(g a) * mean_h relu(g)
// It is a few GEMVs, so it is memory-bound: each pass streams the k and v rows once with 16-byte
// loads, and the only intermediates are per-token numbers ([L * B * H, N]) and per-block partial
// sums, never N x N. Every reduction runs in a fixed order (no atomics): results are
// deterministic.
//
// Forward, three launches:
//   dots   (l, b, h, 64-row chunk): logits and g for the chunk's rows, and the chunk's softmax
//          partial (max, sum exp);
//   lse    (l, b, h): log-sum-exp from the chunk partials;
//   map    (b, 256 tokens): a = exp(logit - lse), the head means, the sum over layers.
// Backward, five: dots and lse again (recomputed rather than saved), then
//   token  (l, b, 256 tokens): the head means, then per head dg, u = a * da and per-warp sums of u;
//   rows   (l, b, h, 64-row chunk): dlogit = a * da - a * sum_n u, dk and dv rows, and the chunk's
//          partial sums of dq[row] and dgrad_out[row];
//   rowsum (l, b, h, d): the partials summed into dq[row] and dgrad_out[row].
//
// The stream comes from c10/cuda rather than ATen/cuda/CUDAContext.h: the latter pulls in the
// cuBLAS and cuSPARSE headers, which a CUDA toolkit without those libraries lacks.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "getam_map.h"
#include "wsss_fast.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerBlock = 64;  // rows of k and v per block in the dots and rows kernels
constexpr int kMaxHeadDim = 256;
// A row is split over `tpr` lanes (a power of two <= 32), each taking vectors j = lane, lane + tpr,
// ...; with D <= kMaxHeadDim that is at most kMaxElemsPerLane elements per lane.
constexpr int kMaxElemsPerLane = kMaxHeadDim / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGrid = (int64_t{1} << 31) - 1;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// NaN passes through, as in torch.relu (`x > 0 ? x : 0` would turn it into 0).
template <typename acc_t>
__device__ __forceinline__ acc_t relu(acc_t x) {
  return x < acc_t(0) ? acc_t(0) : x;
}

// relu's derivative as torch's backward takes it: 0 where x <= 0, 1 elsewhere, NaN included.
template <typename acc_t>
__device__ __forceinline__ bool relu_passes(acc_t x) {
  return !(x <= acc_t(0));
}

// Merges the softmax partial (m2, z2) into (m, z), where z = sum exp(x - m) over a set of x;
// (-inf, 0) is the empty set.
template <typename acc_t>
__device__ __forceinline__ void combine(acc_t& m, acc_t& z, acc_t m2, acc_t z2) {
  const acc_t mx = m > m2 ? m : m2;
  if (mx == static_cast<acc_t>(-INFINITY)) return;
  z = z * exp_acc(m - mx) + z2 * exp_acc(m2 - mx);
  m = mx;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

// V consecutive elements moved as one 16-byte access (V = 16 / sizeof(T)), or one element (V = 1).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T val[V];
};

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* __restrict__ p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <typename acc_t>
struct Args {
  int64_t L, B, H, N, D;
  int64_t row;
  acc_t scale;
  int nvec;          // D / V vectors per row
  int tpr;           // lanes per row: the smallest power of two >= nvec, at most 32
  int64_t n_chunks;  // ceil(N / kRowsPerBlock): blocks per (l, b, h) of the dots and rows kernels
  int64_t n_tok;     // ceil(N / kThreads): blocks per (b) or (l, b) of the map and token kernels
  int64_t n_parts;   // n_tok * kWarps: warp partial sums of u per (l, b, h)
};

// Loads q[row] and grad_out[row] of this (l, b, h) into shared memory in acc_t.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_query_rows(const scalar_t* __restrict__ q,
                                                const scalar_t* __restrict__ go, int64_t off,
                                                const Args<acc_t>& p, acc_t* q_s, acc_t* go_s) {
  for (int d = threadIdx.x; d < p.D; d += kThreads) {
    q_s[d] = static_cast<acc_t>(q[off + p.row * p.D + d]);
    go_s[d] = static_cast<acc_t>(go[off + p.row * p.D + d]);
  }
}

// logits[i, n] = s * q[row] . k[n] and g[i, n] = grad_out[row] . v[n] for the block's rows of
// i = (l, b, h), and the block's softmax partial stats[block] = (max, sum exp(logit - max)).
// Lane group `group` of a warp owns row base + group and lane `lig` of it vectors lig, lig + tpr,
// ...; the group's partial dot products meet by xor shuffles.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
    _getam_map_dots_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                           const scalar_t* __restrict__ v, const scalar_t* __restrict__ go,
                           acc_t* __restrict__ logits, acc_t* __restrict__ gdot,
                           acc_t* __restrict__ stats, const Args<acc_t> p) {
  constexpr int kIters = kMaxElemsPerLane / V;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* q_s = reinterpret_cast<acc_t*>(smem);
  acc_t* go_s = q_s + p.D;
  __shared__ acc_t m_s[kWarps], z_s[kWarps];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t i = blockIdx.x / p.n_chunks, chunk = blockIdx.x % p.n_chunks;
  const int64_t N = p.N, D = p.D, off = i * N * D;
  load_query_rows(q, go, off, p, q_s, go_s);
  __syncthreads();

  const int tpr = p.tpr, rows_per_warp = 32 / tpr, group = lane / tpr, lig = lane % tpr;
  const int64_t n0 = chunk * kRowsPerBlock;
  const int64_t n1 = n0 + kRowsPerBlock < N ? n0 + kRowsPerBlock : N;
  acc_t m = static_cast<acc_t>(-INFINITY), z = 0;
  // The loop bound depends on the warp only, so every lane reaches the shuffles.
  for (int64_t base = n0 + warp * rows_per_warp; base < n1; base += kWarps * rows_per_warp) {
    const int64_t n = base + group;
    acc_t sq = 0, sg = 0;
    if (n < n1) {
      const scalar_t* k_n = k + off + n * D;
      const scalar_t* v_n = v + off + n * D;
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int j = lig + it * tpr;
        if (j < p.nvec) {
          const Vec<scalar_t, V> kv = load_vec<scalar_t, V>(k_n + j * V);
          const Vec<scalar_t, V> vv = load_vec<scalar_t, V>(v_n + j * V);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            sq += static_cast<acc_t>(kv.val[e]) * q_s[j * V + e];
            sg += static_cast<acc_t>(vv.val[e]) * go_s[j * V + e];
          }
        }
      }
    }
    for (int o = tpr / 2; o > 0; o >>= 1) {
      sq += __shfl_xor_sync(kFullMask, sq, o);
      sg += __shfl_xor_sync(kFullMask, sg, o);
    }
    if (n < n1 && lig == 0) {
      const acc_t s = sq * p.scale;
      logits[i * N + n] = s;
      gdot[i * N + n] = sg;
      combine(m, z, s, acc_t(1));
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const acc_t m2 = __shfl_xor_sync(kFullMask, m, o);
    const acc_t z2 = __shfl_xor_sync(kFullMask, z, o);
    combine(m, z, m2, z2);
  }
  if (lane == 0) {
    m_s[warp] = m;
    z_s[warp] = z;
  }
  __syncthreads();
  if (tid == 0) {
    for (int w = 1; w < kWarps; ++w) combine(m, z, m_s[w], z_s[w]);
    stats[2 * blockIdx.x] = m;
    stats[2 * blockIdx.x + 1] = z;
  }
}

// lse[i] = log sum_n exp(logits[i, n]) from the chunk partials of i = (l, b, h).
template <typename acc_t>
__global__ void _getam_map_lse_kernel(const acc_t* __restrict__ stats, acc_t* __restrict__ lse,
                                      int64_t count, int64_t n_chunks) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  acc_t m = static_cast<acc_t>(-INFINITY), z = 0;
  for (int64_t c = 0; c < n_chunks; ++c) {
    combine(m, z, stats[2 * (i * n_chunks + c)], stats[2 * (i * n_chunks + c) + 1]);
  }
  lse[i] = m + log_acc(z);
}

// out[b, n] = sum_l (sum_h relu(g a) / H) * (sum_h relu(g) / H), one thread per token.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    _getam_map_fwd_kernel(const acc_t* __restrict__ logits, const acc_t* __restrict__ gdot,
                          const acc_t* __restrict__ lse, acc_t* __restrict__ out,
                          const Args<acc_t> p) {
  const int64_t b = blockIdx.x / p.n_tok;
  const int64_t n = (blockIdx.x % p.n_tok) * kThreads + threadIdx.x;
  if (n >= p.N) return;
  const acc_t heads = static_cast<acc_t>(p.H);
  acc_t total = 0;
  for (int64_t l = 0; l < p.L; ++l) {
    acc_t sum_ga = 0, sum_g = 0;
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t i = (l * p.B + b) * p.H + h;
      const acc_t a = exp_acc(logits[i * p.N + n] - lse[i]);
      const acc_t g = gdot[i * p.N + n];
      sum_ga += relu(g * a);
      sum_g += relu(g);
    }
    total += (sum_ga / heads) * (sum_g / heads);
  }
  out[b * p.N + n] = total;
}

// Per token of layer l, batch b: the head sums, then for each head dg (written over g), the
// softmax probability a (written over the logit) and u = a * da, with each warp's sum of u over
// its 32 tokens in u_part[i, blk * kWarps + warp]. Threads past N carry zeros so that every lane
// reaches the shuffles.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    _getam_map_bwd_token_kernel(acc_t* __restrict__ logits, acc_t* __restrict__ gdot,
                                acc_t* __restrict__ u, acc_t* __restrict__ u_part,
                                const acc_t* __restrict__ lse, const acc_t* __restrict__ grad,
                                const Args<acc_t> p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t lb = blockIdx.x / p.n_tok, blk = blockIdx.x % p.n_tok, b = lb % p.B;
  const int64_t n = blk * kThreads + threadIdx.x;
  const bool valid = n < p.N;
  const acc_t heads = static_cast<acc_t>(p.H);
  acc_t sum_ga = 0, sum_g = 0;
  if (valid) {
    for (int64_t h = 0; h < p.H; ++h) {
      const int64_t i = lb * p.H + h;
      const acc_t a = exp_acc(logits[i * p.N + n] - lse[i]);
      const acc_t g = gdot[i * p.N + n];
      logits[i * p.N + n] = a;
      sum_ga += relu(g * a);
      sum_g += relu(g);
    }
  }
  const acc_t gr = valid ? grad[b * p.N + n] : acc_t(0);
  const acc_t d_ga = gr * (sum_g / heads) / heads;  // d map / d relu(g_h a_h)
  const acc_t d_g = gr * (sum_ga / heads) / heads;  // d map / d relu(g_h)
  for (int64_t h = 0; h < p.H; ++h) {
    const int64_t i = lb * p.H + h;
    acc_t uu = 0;
    if (valid) {
      const acc_t a = logits[i * p.N + n], g = gdot[i * p.N + n];
      const bool on = relu_passes(g * a);
      const acc_t da = on ? d_ga * g : acc_t(0);
      gdot[i * p.N + n] = (on ? d_ga * a : acc_t(0)) + (relu_passes(g) ? d_g : acc_t(0));
      uu = a * da;
      u[i * p.N + n] = uu;
    }
    uu = warp_sum(uu);
    if (lane == 0) u_part[i * p.n_parts + blk * kWarps + warp] = uu;
  }
}

// For the block's rows of i = (l, b, h), with c = sum_n u[i, n] and dlogit = s (u - a c):
//   dk[n] = dlogit[n] q[row],  dv[n] = dg[n] grad_out[row]
// and the block's partial sums dq_part = sum_n dlogit[n] k[n], dgo_part = sum_n dg[n] v[n].
// Lanes keep their vectors' partial sums in registers over the block's rows; the lane groups of a
// warp meet by xor shuffles and the warps in shared memory, in a fixed order.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
    _getam_map_bwd_rows_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                               const scalar_t* __restrict__ v, const scalar_t* __restrict__ go,
                               const acc_t* __restrict__ prob, const acc_t* __restrict__ u,
                               const acc_t* __restrict__ dg, const acc_t* __restrict__ u_part,
                               scalar_t* __restrict__ dk, scalar_t* __restrict__ dv,
                               acc_t* __restrict__ dq_part, acc_t* __restrict__ dgo_part,
                               const Args<acc_t> p) {
  constexpr int kIters = kMaxElemsPerLane / V;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* q_s = reinterpret_cast<acc_t*>(smem);
  acc_t* go_s = q_s + p.D;
  acc_t* red_q = go_s + p.D;             // [kWarps, D]
  acc_t* red_go = red_q + kWarps * p.D;  // [kWarps, D]
  __shared__ acc_t c_s[kWarps];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t i = blockIdx.x / p.n_chunks, chunk = blockIdx.x % p.n_chunks;
  const int64_t N = p.N, D = p.D, off = i * N * D;

  acc_t c = 0;
  for (int64_t e = tid; e < p.n_parts; e += kThreads) c += u_part[i * p.n_parts + e];
  c = warp_sum(c);
  if (lane == 0) c_s[warp] = c;
  load_query_rows(q, go, off, p, q_s, go_s);
  __syncthreads();
  c = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) c += c_s[w];

  const int tpr = p.tpr, rows_per_warp = 32 / tpr, group = lane / tpr, lig = lane % tpr;
  const int64_t n0 = chunk * kRowsPerBlock;
  const int64_t n1 = n0 + kRowsPerBlock < N ? n0 + kRowsPerBlock : N;
  acc_t dq_acc[kIters * V], dgo_acc[kIters * V];
#pragma unroll
  for (int e = 0; e < kIters * V; ++e) dq_acc[e] = dgo_acc[e] = acc_t(0);
  for (int64_t n = n0 + warp * rows_per_warp + group; n < n1; n += kWarps * rows_per_warp) {
    const acc_t dlogit = p.scale * (u[i * N + n] - prob[i * N + n] * c);
    const acc_t dgn = dg[i * N + n];
    const int64_t row_off = off + n * D;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int j = lig + it * tpr;
      if (j < p.nvec) {
        const Vec<scalar_t, V> kv = load_vec<scalar_t, V>(k + row_off + j * V);
        const Vec<scalar_t, V> vv = load_vec<scalar_t, V>(v + row_off + j * V);
        Vec<scalar_t, V> dk_v, dv_v;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          dk_v.val[e] = static_cast<scalar_t>(dlogit * q_s[j * V + e]);
          dv_v.val[e] = static_cast<scalar_t>(dgn * go_s[j * V + e]);
          dq_acc[it * V + e] += dlogit * static_cast<acc_t>(kv.val[e]);
          dgo_acc[it * V + e] += dgn * static_cast<acc_t>(vv.val[e]);
        }
        *reinterpret_cast<Vec<scalar_t, V>*>(dk + row_off + j * V) = dk_v;
        *reinterpret_cast<Vec<scalar_t, V>*>(dv + row_off + j * V) = dv_v;
      }
    }
  }
  // Lanes lig, lig + tpr, ... of a warp hold the same vectors (of different rows).
  for (int o = tpr; o < 32; o <<= 1) {
#pragma unroll
    for (int e = 0; e < kIters * V; ++e) {
      dq_acc[e] += __shfl_xor_sync(kFullMask, dq_acc[e], o);
      dgo_acc[e] += __shfl_xor_sync(kFullMask, dgo_acc[e], o);
    }
  }
  if (lane < tpr) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int j = lane + it * tpr;
      if (j < p.nvec) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          red_q[warp * D + j * V + e] = dq_acc[it * V + e];
          red_go[warp * D + j * V + e] = dgo_acc[it * V + e];
        }
      }
    }
  }
  __syncthreads();
  for (int d = tid; d < D; d += kThreads) {
    acc_t sq = 0, sg = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      sq += red_q[w * D + d];
      sg += red_go[w * D + d];
    }
    dq_part[blockIdx.x * D + d] = sq;
    dgo_part[blockIdx.x * D + d] = sg;
  }
}

// dq[i, row, d] = sum_chunk dq_part[i, chunk, d], and the same for dgrad_out.
template <typename scalar_t, typename acc_t>
__global__ void _getam_map_bwd_rowsum_kernel(const acc_t* __restrict__ dq_part,
                                             const acc_t* __restrict__ dgo_part,
                                             scalar_t* __restrict__ dq, scalar_t* __restrict__ dgo,
                                             const Args<acc_t> p, int64_t count) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= count) return;
  const int64_t i = idx / p.D, d = idx % p.D;
  acc_t sq = 0, sg = 0;
  for (int64_t c = 0; c < p.n_chunks; ++c) {
    sq += dq_part[(i * p.n_chunks + c) * p.D + d];
    sg += dgo_part[(i * p.n_chunks + c) * p.D + d];
  }
  const int64_t out = (i * p.N + p.row) * p.D + d;
  dq[out] = static_cast<scalar_t>(sq);
  dgo[out] = static_cast<scalar_t>(sg);
}

// ---------------------------------------------------------------------------------------------
// Host side.

// 16-byte vectors when every row starts on a 16-byte boundary, else single elements.
template <typename scalar_t>
int vector_width(int64_t D, std::initializer_list<const at::Tensor*> tensors) {
  constexpr int kWide = 16 / sizeof(scalar_t);
  if (D % kWide != 0) return 1;
  for (const at::Tensor* t : tensors) {
    if (reinterpret_cast<std::uintptr_t>(t->data_ptr()) % 16 != 0) return 1;
  }
  return kWide;
}

template <typename acc_t>
Args<acc_t> make_args(const at::Tensor& q, double scale, int64_t row, int V) {
  Args<acc_t> p;
  p.L = q.size(0);
  p.B = q.size(1);
  p.H = q.size(2);
  p.N = q.size(3);
  p.D = q.size(4);
  p.row = row;
  p.scale = static_cast<acc_t>(scale);
  p.nvec = static_cast<int>(p.D / V);
  p.tpr = 1;
  while (p.tpr < p.nvec && p.tpr < 32) p.tpr <<= 1;
  p.n_chunks = ceil_div(p.N, kRowsPerBlock);
  p.n_tok = ceil_div(p.N, kThreads);
  p.n_parts = p.n_tok * kWarps;
  const int64_t lbh = p.L * p.B * p.H;
  TORCH_CHECK(lbh * p.n_chunks <= kMaxGrid && p.L * p.B * p.n_tok <= kMaxGrid,
              "getam_map: L * B * H * ceil(N / 64) must be < 2^31, got L, B, H, N = ", p.L, ", ",
              p.B, ", ", p.H, ", ", p.N);
  return p;
}

unsigned grid_1d(int64_t blocks) { return static_cast<unsigned>(blocks); }

// The dots and lse kernels, shared by forward and backward: logits, g and lse of every (l, b, h).
template <typename scalar_t, typename acc_t, int V>
void launch_dots(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& go, const Args<acc_t>& p, at::Tensor& logits, at::Tensor& gdot,
                 at::Tensor& lse, cudaStream_t stream) {
  const int64_t lbh = p.L * p.B * p.H;
  at::Tensor stats = at::empty({lbh * p.n_chunks * 2}, logits.options());
  _getam_map_dots_kernel<scalar_t, acc_t, V>
      <<<grid_1d(lbh * p.n_chunks), kThreads, 2 * p.D * sizeof(acc_t), stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          go.data_ptr<scalar_t>(), logits.data_ptr<acc_t>(), gdot.data_ptr<acc_t>(),
          stats.data_ptr<acc_t>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  _getam_map_lse_kernel<acc_t><<<grid_1d(ceil_div(lbh, kThreads)), kThreads, 0, stream>>>(
      stats.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), lbh, p.n_chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, int V>
void run_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& go, double scale, int64_t row, at::Tensor& out) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Args<acc_t> p = make_args<acc_t>(q, scale, row, V);
  const int64_t lbh = p.L * p.B * p.H;
  at::Tensor logits = at::empty({lbh, p.N}, out.options());
  at::Tensor gdot = at::empty({lbh, p.N}, out.options());
  at::Tensor lse = at::empty({lbh}, out.options());
  launch_dots<scalar_t, acc_t, V>(q, k, v, go, p, logits, gdot, lse, stream);
  _getam_map_fwd_kernel<acc_t><<<grid_1d(p.B * p.n_tok), kThreads, 0, stream>>>(
      logits.data_ptr<acc_t>(), gdot.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
      out.data_ptr<acc_t>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, int V>
void run_backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& go, double scale, int64_t row,
                  at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dgo) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Args<acc_t> p = make_args<acc_t>(q, scale, row, V);
  const int64_t lbh = p.L * p.B * p.H;
  const auto opts = grad.options();
  at::Tensor prob = at::empty({lbh, p.N}, opts);  // logits, then softmax probabilities
  at::Tensor gdot = at::empty({lbh, p.N}, opts);  // g, then dg
  at::Tensor lse = at::empty({lbh}, opts);
  launch_dots<scalar_t, acc_t, V>(q, k, v, go, p, prob, gdot, lse, stream);

  at::Tensor u = at::empty({lbh, p.N}, opts);
  at::Tensor u_part = at::empty({lbh, p.n_parts}, opts);
  _getam_map_bwd_token_kernel<acc_t><<<grid_1d(p.L * p.B * p.n_tok), kThreads, 0, stream>>>(
      prob.data_ptr<acc_t>(), gdot.data_ptr<acc_t>(), u.data_ptr<acc_t>(), u_part.data_ptr<acc_t>(),
      lse.data_ptr<acc_t>(), grad.data_ptr<acc_t>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor dq_part = at::empty({lbh, p.n_chunks, p.D}, opts);
  at::Tensor dgo_part = at::empty({lbh, p.n_chunks, p.D}, opts);
  const size_t rows_smem = (2 + 2 * kWarps) * p.D * sizeof(acc_t);
  _getam_map_bwd_rows_kernel<scalar_t, acc_t, V>
      <<<grid_1d(lbh * p.n_chunks), kThreads, rows_smem, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          go.data_ptr<scalar_t>(), prob.data_ptr<acc_t>(), u.data_ptr<acc_t>(),
          gdot.data_ptr<acc_t>(), u_part.data_ptr<acc_t>(), dk.data_ptr<scalar_t>(),
          dv.data_ptr<scalar_t>(), dq_part.data_ptr<acc_t>(), dgo_part.data_ptr<acc_t>(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t count = lbh * p.D;
  _getam_map_bwd_rowsum_kernel<scalar_t, acc_t>
      <<<grid_1d(ceil_div(count, kThreads)), kThreads, 0, stream>>>(
          dq_part.data_ptr<acc_t>(), dgo_part.data_ptr<acc_t>(), dq.data_ptr<scalar_t>(),
          dgo.data_ptr<scalar_t>(), p, count);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

using wsss_fast::getam_map::Dims;

Dims check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& grad_out, int64_t row) {
  CHECK_CUDA(q);
  const Dims dm = wsss_fast::getam_map::check_inputs(q, k, v, grad_out, row);
  TORCH_CHECK(dm.D <= kMaxHeadDim, "getam_map's CUDA kernels take head dims D <= ", kMaxHeadDim,
              ", got ", dm.D, "; use wsss_fast.use_backend('torch') for larger heads");
  return dm;
}

at::ScalarType acc_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

at::Tensor getam_map_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& grad_out, double scale, int64_t row) {
  const Dims dm = check_inputs(q, k, v, grad_out, row);
  const c10::cuda::CUDAGuard device_guard(q.device());
  at::Tensor out = at::zeros({dm.B, dm.N}, q.options().dtype(acc_dtype(q)));
  if (q.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "getam_map_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int kWide = 16 / sizeof(scalar_t);
    if (vector_width<scalar_t>(dm.D, {&q, &k, &v, &grad_out}) == kWide) {
      run_forward<scalar_t, acc_t, kWide>(q, k, v, grad_out, scale, row, out);
    } else {
      run_forward<scalar_t, acc_t, 1>(q, k, v, grad_out, scale, row, out);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> getam_map_backward_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& grad_out, double scale, int64_t row) {
  const Dims dm = check_inputs(q, k, v, grad_out, row);
  CHECK_DEVICE(grad, q);
  CHECK_DIM(grad, 2);
  CHECK_SHAPE(grad, dm.B, dm.N);
  CHECK_FLOATING(grad);
  const c10::cuda::CUDAGuard device_guard(q.device());
  // dq and dgrad_out are zero outside `row`; every row of dk and dv is written.
  at::Tensor dq = at::zeros_like(q), dgo = at::zeros_like(grad_out);
  at::Tensor dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0) return {dq, dk, dv, dgo};
  const at::Tensor grad_acc = grad.to(acc_dtype(q)).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "getam_map_backward_cuda", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        constexpr int kWide = 16 / sizeof(scalar_t);
        // dk and dv are fresh allocations, so aligned; the inputs decide.
        if (vector_width<scalar_t>(dm.D, {&q, &k, &v, &grad_out, &dk, &dv}) == kWide) {
          run_backward<scalar_t, acc_t, kWide>(grad_acc, q, k, v, grad_out, scale, row, dq, dk, dv,
                                               dgo);
        } else {
          run_backward<scalar_t, acc_t, 1>(grad_acc, q, k, v, grad_out, scale, row, dq, dk, dv,
                                           dgo);
        }
      });
  return {dq, dk, dv, dgo};
}

TORCH_LIBRARY_IMPL(wsss_fast, CUDA, m) {
  m.impl("getam_map_forward", &getam_map_forward_cuda);
  m.impl("getam_map_backward", &getam_map_backward_cuda);
}
