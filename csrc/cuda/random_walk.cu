// Random-walk refinement on CUDA: `steps` launches of a tiled product of the state with
// T = aff^beta / colsum(aff^beta) (forward, x <- x T) or T^T (backward, x <- x T^T). T is evaluated
// as r^beta / colsum(r^beta) with r_ij = aff_ij / max_i aff_ij (the same matrix): r lies in [0, 1]
// with a 1 in every column, so neither the power nor the column sums over- or underflow, where
// aff^beta itself is inf for aff near 1e5 and 0 for aff below 1e-6 at beta = 8. A pre-pass finds
// each column's maximum and 1 / colsum(r^beta); each step raises r to beta as aff tiles are loaded,
// so no [M, M] buffer exists; aff is read once per step per block of 64 output columns, for all
// rows of x at once.
//
// Recomputing r^beta at every step costs, per aff element and step, one IEEE division and a
// log2/exp2 pair (three special-function ops, ~24 FMA slots at 16 SFU vs 128 FMA lanes per SM
// cycle), against the 2 * C FLOPs of the element's products; no extra bytes move. Storing T instead
// would need a [B, M, M] float32 buffer (552 MB per image at PSA's M = 11750) and, for 16-bit aff,
// double the bytes each step reads; the op exists to avoid that buffer, so the power is recomputed.
//
// The stream comes from c10/cuda rather than ATen/cuda/CUDAContext.h: the latter pulls in the
// cuBLAS and cuSPARSE headers, which a CUDA toolkit without those libraries lacks.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "random_walk.h"
#include "wsss_fast.h"

namespace {

constexpr int kTileN = 64;  // output columns per block, one per threadIdx.x
constexpr int kGroups = 4;  // threadIdx.y: groups of x rows that share each aff tile
constexpr int kTileK = 32;  // reduction indices per shared-memory tile
constexpr int kThreads = kTileN * kGroups;
constexpr int kLdw = kTileN + 1;  // the pad makes backward's transposed tile stores conflict-free
constexpr int kLoads = kTileK * kTileN / kThreads;  // aff elements each thread loads per tile
// Rows of x per thread for which a kernel is compiled; 4 * 21 = 84 rows cover COCO's C = 81 in
// one pass over aff, larger C runs in chunks of 84 rows.
constexpr int kRowsPerThread[] = {1, 2, 4, 6, 12, 21};
constexpr int kMaxRows = kGroups * 21;
// A split of the reduction gets at least this many tiles, so partial sums stay a small fraction
// of the traffic; splits only fill SMs that B * ceil(M / 64) blocks would leave idle.
constexpr int64_t kMinTilesPerSplit = 8;
constexpr int kColsumY = 16;  // threadIdx.y of the column-sum kernel: rows summed in parallel

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// r^beta for r in [0, 1]. exp2(beta * log2(r)) costs a few instructions against powf's dozens;
// log2f(0) = -inf gives 0^beta = 0 for beta > 0 without a branch.
__device__ __forceinline__ float pow_beta(float a, float beta, bool beta_is_one) {
  return beta_is_one ? a : exp2f(beta * log2f(a));
}
__device__ __forceinline__ double pow_beta(double a, double beta, bool beta_is_one) {
  return beta_is_one ? a : pow(a, beta);
}

// col_max[b, j] = max_i aff[b, i, j] and inv_s[b, j] = 1 / sum_i (aff[b, i, j] / col_max[b,
// j])^beta, in two passes over the column. A block covers 32 columns; its warps read 32 consecutive
// columns of one row at a time and reduce rows threadIdx.y, threadIdx.y + 16, ... Each r^beta is
// computed exactly as the step kernel computes it, so the columns of T sum to 1 up to the final
// rounding. The sums are kept in double: this pass runs once per call and is memory-bound, while an
// error in a column sum compounds over the steps. An all-zero column gives 0 / 0 = NaN, as the
// formula does.
template <typename aff_t, typename acc_t>
__global__ void __launch_bounds__(32 * kColsumY)
    _random_walk_colstats_kernel(const aff_t* __restrict__ aff, acc_t* __restrict__ col_max,
                                 double* __restrict__ inv_s, int64_t M, acc_t beta,
                                 bool beta_is_one) {
  __shared__ acc_t part_max[kColsumY][32];
  __shared__ double part_sum[kColsumY][32];
  const int64_t col_tiles = ceil_div(M, 32);
  const int64_t b = blockIdx.x / col_tiles;
  const int64_t j = (blockIdx.x % col_tiles) * 32 + threadIdx.x;
  const aff_t* col = aff + b * M * M + j;
  acc_t m = acc_t(0);
  if (j < M) {
    for (int64_t i = threadIdx.y; i < M; i += kColsumY) {
      const acc_t a = static_cast<acc_t>(col[i * M]);
      m = a > m ? a : m;
    }
  }
  part_max[threadIdx.y][threadIdx.x] = m;
  __syncthreads();
#pragma unroll
  for (int y = 0; y < kColsumY; ++y)
    m = part_max[y][threadIdx.x] > m ? part_max[y][threadIdx.x] : m;
  double s = 0;
  if (j < M) {
    for (int64_t i = threadIdx.y; i < M; i += kColsumY) {
      s += pow_beta(static_cast<acc_t>(col[i * M]) / m, beta, beta_is_one);
    }
  }
  part_sum[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && j < M) {
    double total = 0;
#pragma unroll
    for (int y = 0; y < kColsumY; ++y) total += part_sum[y][threadIdx.x];
    col_max[b * M + j] = m;
    inv_s[b * M + j] = 1.0 / total;
  }
}

template <typename aff_t, typename acc_t>
struct StepArgs {
  const aff_t* aff;      // [B, M, M]
  const acc_t* x;        // [B, C, M], the state before this step
  const acc_t* col_max;  // [B, M]
  const double* inv_s;   // [B, M]
  acc_t* out;            // [B, C, M], or [splits, B, C, M] partial sums
  int64_t B, C, M;
  int64_t c0;               // first row of x handled by this launch
  int64_t tiles_per_split;  // reduction tiles per blockIdx.y
  acc_t beta;
  bool beta_is_one;
  bool normalise_out;  // forward without splits: apply inv_s here instead of in the split sum
};

// Tile coordinates (k: reduction, n: output column) of a thread's m-th aff load. A warp reads 32
// consecutive elements of one aff row: along n = j in forward (tile rows are aff rows i), along
// k = j in backward (tile rows are the output's aff rows i).
template <bool kBackward>
__device__ __forceinline__ void tile_coords(int tid, int m, int& k, int& n) {
  if (kBackward) {
    k = tid % kTileK;
    n = tid / kTileK + m * (kThreads / kTileK);
  } else {
    k = tid / kTileN + m * (kThreads / kTileN);
    n = tid % kTileN;
  }
}

// One step for rows [c0, c0 + rows) of x, over the reduction range of split blockIdx.y, with
// r[b, i, j] = aff[b, i, j] / col_max[b, j] (so r^beta <= 1 and the sums stay below M max|x|):
//   forward:  out[b, c, n] = inv_s[b, n] * sum_k x[b, c, k] * r[b, k, n]^beta
//   backward: out[b, c, n] = sum_k r[b, n, k]^beta * (x[b, c, k] * inv_s[b, k])
// (forward: un-normalised partial sums when the reduction is split). inv_s is double so that
// scaling rounds once, like a division (with M = 1, x stays exact instead of drifting an ulp per
// step), without a division's slow path and registers in the loop. Both directions stage the tile
// as w_s[k][n] = r^beta so the inner product is the same; thread (tx, ty) owns column n0 + tx and
// rows r * 4 + ty, so a warp reads one broadcast x_s element and 32 consecutive w_s elements.
// R = 21 would take ~140 registers and fit one block per SM; capping it at 128 (two blocks, a few
// bytes of spill) keeps more aff loads in flight. A minimum of 0 leaves smaller R to ptxas, which
// then stays under 85 registers (three blocks per SM).
template <typename aff_t, typename acc_t, bool kBackward, int R>
__global__ void __launch_bounds__(kThreads, R > 12 ? 2 : 0)
    _random_walk_step_kernel(const StepArgs<aff_t, acc_t> p) {
  __shared__ acc_t w_s[kTileK * kLdw];
  __shared__ __align__(16) acc_t x_s[kGroups * R * kTileK];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTileN + tx;
  const int64_t M = p.M;
  const int64_t n_tiles = ceil_div(M, kTileN);
  const int64_t b = blockIdx.x / n_tiles;
  const int64_t n0 = (blockIdx.x % n_tiles) * kTileN;
  const int64_t k_begin = blockIdx.y * p.tiles_per_split * kTileK;
  const int64_t k_end_split = k_begin + p.tiles_per_split * kTileK;
  const int64_t k_end = k_end_split < M ? k_end_split : M;
  const int64_t rows_left = p.C - p.c0;
  const int rows = rows_left < kGroups * R ? static_cast<int>(rows_left) : kGroups * R;
  const aff_t* aff = p.aff + b * M * M;
  const acc_t* x = p.x + (b * p.C + p.c0) * M;
  const acc_t* col_max = p.col_max + b * M;
  const double* inv_s = p.inv_s + b * M;

  // Raw aff values of the next tile, loaded one tile ahead so their latency overlaps the FMAs, and
  // the maximum of the column of aff they lie in: all of a thread's loads of a tile share it (the
  // column is n in forward, k in backward, and tile_coords keeps both fixed over m).
  aff_t next[kLoads];
  acc_t next_max;
  auto load_tile = [&](int64_t k0) {
    {
      int k, n;
      tile_coords<kBackward>(tid, 0, k, n);
      const int64_t col = kBackward ? k0 + k : n0 + n;
      next_max = col < M ? col_max[col] : acc_t(1);  // padding elements are 0 / 1 = 0
    }
#pragma unroll
    for (int m = 0; m < kLoads; ++m) {
      int k, n;
      tile_coords<kBackward>(tid, m, k, n);
      const int64_t gk = k0 + k, gn = n0 + n;
      // k_end (not M) bounds the split's range, so no element is summed by two splits.
      next[m] = (gk < k_end && gn < M) ? aff[kBackward ? gn * M + gk : gk * M + gn] : aff_t(0);
    }
  };

  acc_t acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = acc_t(0);

  load_tile(k_begin);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
#pragma unroll
    for (int m = 0; m < kLoads; ++m) {
      int k, n;
      tile_coords<kBackward>(tid, m, k, n);
      w_s[k * kLdw + n] = pow_beta(static_cast<acc_t>(next[m]) / next_max, p.beta, p.beta_is_one);
    }
    // Padding rows and columns past k_end are zero, so they add nothing below.
    for (int e = tid; e < kGroups * R * kTileK; e += kThreads) {
      const int c = e / kTileK;
      const int64_t gk = k0 + e % kTileK;
      acc_t v = acc_t(0);
      if (c < rows && gk < k_end) {
        v = x[c * M + gk];
        if (kBackward) v = static_cast<acc_t>(v * inv_s[gk]);
      }
      x_s[e] = v;
    }
    __syncthreads();
    if (k0 + kTileK < k_end) load_tile(k0 + kTileK);
    // Summing each tile separately before adding it to acc keeps the rounding chains at
    // kTileK + M / kTileK terms instead of M.
    acc_t tile_acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) tile_acc[r] = acc_t(0);
#pragma unroll
    for (int k = 0; k < kTileK; k += 4) {
      acc_t w[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) w[q] = w_s[(k + q) * kLdw + tx];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const acc_t* xr = x_s + (r * kGroups + ty) * kTileK + k;
#pragma unroll
        for (int q = 0; q < 4; ++q) tile_acc[r] += xr[q] * w[q];
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] += tile_acc[r];
    // The next iteration overwrites w_s and x_s.
    __syncthreads();
  }

  const int64_t n = n0 + tx;
  if (n < M) {
    const double scale = p.normalise_out ? inv_s[n] : 1.0;
    acc_t* out = p.out + blockIdx.y * p.B * p.C * M + (b * p.C + p.c0) * M + n;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int c = r * kGroups + ty;
      if (c < rows) out[c * M] = static_cast<acc_t>(acc[r] * scale);
    }
  }
}

// out[b, c, n] = (normalise ? inv_s[b, n] : 1) * sum_z part[z, b, c, n], in a fixed order so the
// result does not depend on scheduling.
template <typename acc_t>
__global__ void _random_walk_split_sum_kernel(const acc_t* __restrict__ part,
                                              const double* __restrict__ inv_s,
                                              acc_t* __restrict__ out, int64_t splits, int64_t C,
                                              int64_t M, int64_t total, bool normalise) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    acc_t s = acc_t(0);
    for (int64_t z = 0; z < splits; ++z) s += part[z * total + idx];
    if (normalise) s = static_cast<acc_t>(s * inv_s[idx / (C * M) * M + idx % M]);
    out[idx] = s;
  }
}

template <typename aff_t, typename acc_t, bool kBackward, int R>
void launch_step_r(dim3 grid, cudaStream_t stream, const StepArgs<aff_t, acc_t>& p) {
  _random_walk_step_kernel<aff_t, acc_t, kBackward, R>
      <<<grid, dim3(kTileN, kGroups), 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The smallest compiled row count per thread that covers `rows` rows of x.
template <typename aff_t, typename acc_t, bool kBackward>
void launch_step(int64_t rows, dim3 grid, cudaStream_t stream, const StepArgs<aff_t, acc_t>& p) {
  const int64_t per_thread = ceil_div(rows, kGroups);
  static_assert(kRowsPerThread[5] * kGroups == kMaxRows, "kMaxRows must match the largest R");
  if (per_thread <= kRowsPerThread[0]) {
    launch_step_r<aff_t, acc_t, kBackward, kRowsPerThread[0]>(grid, stream, p);
  } else if (per_thread <= kRowsPerThread[1]) {
    launch_step_r<aff_t, acc_t, kBackward, kRowsPerThread[1]>(grid, stream, p);
  } else if (per_thread <= kRowsPerThread[2]) {
    launch_step_r<aff_t, acc_t, kBackward, kRowsPerThread[2]>(grid, stream, p);
  } else if (per_thread <= kRowsPerThread[3]) {
    launch_step_r<aff_t, acc_t, kBackward, kRowsPerThread[3]>(grid, stream, p);
  } else if (per_thread <= kRowsPerThread[4]) {
    launch_step_r<aff_t, acc_t, kBackward, kRowsPerThread[4]>(grid, stream, p);
  } else {
    launch_step_r<aff_t, acc_t, kBackward, kRowsPerThread[5]>(grid, stream, p);
  }
}

template <typename aff_t, typename acc_t>
void run(const at::Tensor& aff, const at::Tensor& x0, at::Tensor (&buf)[2], double beta,
         int64_t steps, bool backward) {
  const int64_t B = x0.size(0), C = x0.size(1), M = x0.size(2);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const acc_t beta_acc = static_cast<acc_t>(beta);
  const bool beta_is_one = beta == 1.0;
  constexpr int64_t kMaxGrid = (int64_t{1} << 31) - 1;

  at::Tensor col_max = at::empty({B, M}, x0.options());
  at::Tensor inv_s = at::empty({B, M}, x0.options().dtype(at::kDouble));
  const int64_t colsum_blocks = B * ceil_div(M, 32);
  TORCH_CHECK(colsum_blocks <= kMaxGrid, "random_walk: B * ceil(M / 32) must be < 2^31");
  _random_walk_colstats_kernel<aff_t, acc_t>
      <<<static_cast<unsigned>(colsum_blocks), dim3(32, kColsumY), 0, stream>>>(
          aff.data_ptr<aff_t>(), col_max.data_ptr<acc_t>(), inv_s.data_ptr<double>(), M, beta_acc,
          beta_is_one);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t blocks = B * ceil_div(M, kTileN);
  TORCH_CHECK(blocks <= kMaxGrid, "random_walk: B * ceil(M / 64) must be < 2^31");
  int sm_count = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, aff.get_device()));
  const int64_t sms = sm_count;
  const int64_t k_tiles = ceil_div(M, kTileK);
  int64_t splits =
      std::max<int64_t>(1, std::min(ceil_div(2 * sms, blocks), k_tiles / kMinTilesPerSplit));
  const int64_t tiles_per_split = ceil_div(k_tiles, splits);
  splits = ceil_div(k_tiles, tiles_per_split);  // no split is left empty
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
  const int64_t total = B * C * M;
  at::Tensor partial = splits > 1 ? at::empty({splits, B, C, M}, x0.options()) : at::Tensor();
  const int sum_blocks = static_cast<int>(std::min<int64_t>(ceil_div(total, 256), 8 * sms));

  const acc_t* src = x0.data_ptr<acc_t>();
  for (int64_t s = 0; s < steps; ++s) {
    acc_t* dst = buf[s % 2].data_ptr<acc_t>();
    StepArgs<aff_t, acc_t> p{aff.data_ptr<aff_t>(),
                             src,
                             col_max.data_ptr<acc_t>(),
                             inv_s.data_ptr<double>(),
                             splits > 1 ? partial.data_ptr<acc_t>() : dst,
                             B,
                             C,
                             M,
                             /*c0=*/0,
                             tiles_per_split,
                             beta_acc,
                             beta_is_one,
                             /*normalise_out=*/!backward && splits == 1};
    for (p.c0 = 0; p.c0 < C; p.c0 += kMaxRows) {
      const int64_t rows = std::min<int64_t>(C - p.c0, kMaxRows);
      if (backward) {
        launch_step<aff_t, acc_t, true>(rows, grid, stream, p);
      } else {
        launch_step<aff_t, acc_t, false>(rows, grid, stream, p);
      }
    }
    if (splits > 1) {
      _random_walk_split_sum_kernel<acc_t><<<sum_blocks, 256, 0, stream>>>(
          partial.data_ptr<acc_t>(), inv_s.data_ptr<double>(), dst, splits, C, M, total,
          /*normalise=*/!backward);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    src = dst;
  }
}

at::Tensor random_walk_cuda(const at::Tensor& aff, const at::Tensor& x, double beta, int64_t steps,
                            bool backward) {
  if (steps == 0) return x.clone();
  if (x.numel() == 0) return at::empty_like(x);
  const c10::cuda::CUDAGuard device_guard(aff.device());
  const bool use_double = aff.scalar_type() == at::kDouble || x.scalar_type() == at::kDouble;
  // The state between steps stays in the accumulation dtype; x0 may alias x, so it is only read.
  const at::Tensor x0 = x.to(use_double ? at::kDouble : at::kFloat);
  at::Tensor buf[2] = {at::empty_like(x0), steps > 1 ? at::empty_like(x0) : at::Tensor()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, aff.scalar_type(), "random_walk_cuda",
                                  [&] {
                                    using aff_t = scalar_t;
                                    if (use_double) {
                                      run<aff_t, double>(aff, x0, buf, beta, steps, backward);
                                    } else if constexpr (!std::is_same_v<aff_t, double>) {
                                      run<aff_t, float>(aff, x0, buf, beta, steps, backward);
                                    }
                                  });
  return buf[(steps - 1) % 2].to(x.scalar_type());
}

}  // namespace

at::Tensor random_walk_forward_cuda(const at::Tensor& aff, const at::Tensor& cam, double beta,
                                    int64_t steps) {
  CHECK_CUDA(aff);
  WSSS_FAST_CHECK_RANDOM_WALK(aff, cam, beta, steps);
  return random_walk_cuda(aff, cam, beta, steps, /*backward=*/false);
}

at::Tensor random_walk_backward_cuda(const at::Tensor& aff, const at::Tensor& grad_out, double beta,
                                     int64_t steps) {
  CHECK_CUDA(aff);
  WSSS_FAST_CHECK_RANDOM_WALK(aff, grad_out, beta, steps);
  return random_walk_cuda(aff, grad_out, beta, steps, /*backward=*/true);
}

TORCH_LIBRARY_IMPL(wsss_fast, CUDA, m) {
  m.impl("random_walk_forward", &random_walk_forward_cuda);
  m.impl("random_walk_backward", &random_walk_backward_cuda);
}
