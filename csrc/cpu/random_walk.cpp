// Random-walk refinement on CPU: `steps` products of the state with the column-stochastic
// T = aff^beta / colsum(aff^beta) (forward, x <- x T) or with T^T (backward, x <- x T^T), evaluated
// as r^beta / colsum(r^beta) with r_ij = aff_ij / max_i aff_ij: the same matrix, but r lies in
// [0, 1] with a 1 in every column, so neither the power nor the sums over- or underflow.
#include "random_walk.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "wsss_fast.h"

namespace {

// Output columns per task: a [kRowChunk, kBlockCols] accumulator stays in L1/L2 while the
// task streams its [M, kBlockCols] strip of W once per row chunk.
constexpr int64_t kBlockCols = 64;
constexpr int64_t kRowChunk = 96;
// Products summed into a block partial before it joins the running total, so rounding chains are
// kSumBlock + M / kSumBlock terms instead of M (the walk compounds them over the steps).
constexpr int64_t kSumBlock = 128;
// Elements per task below which splitting a loop over threads costs more than it saves.
constexpr int64_t kMinTaskElems = 16384;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename acc_t>
inline acc_t pow_beta(acc_t a, acc_t beta, bool beta_is_one) {
  return beta_is_one ? a : std::pow(a, beta);
}

// Writes W for one batch element so that both directions are the same product
// y[c, n] = sum_k x[c, k] W[k, n]: W = T (forward) or W = T^T (backward), with
// T[i, j] = r[i, j]^beta / sum_i r[i, j]^beta and r[i, j] = aff[i, j] / max_i aff[i, j]. The column
// sums and the normalisation run in double and T is rounded once: this runs once per batch element,
// while an error in T compounds over the steps (with M = 1, T = 1 exactly instead of 1 +- 1 ulp).
// An all-zero column gives 0 / 0 = NaN, as the formula does.
template <typename aff_t, typename acc_t>
void materialise(const aff_t* aff, acc_t* w, int64_t M, acc_t beta, bool transpose) {
  const bool beta_is_one = beta == acc_t(1);
  const int64_t n_blocks = ceil_div(M, kBlockCols);
  if (!transpose) {
    // Column maxima by blocks of columns, so each task reads aff row by row.
    std::vector<acc_t> col_max(M, acc_t(0));
    at::parallel_for(0, n_blocks, 1, [&](int64_t blk0, int64_t blk1) {
      const int64_t j0 = blk0 * kBlockCols, j1 = std::min(M, blk1 * kBlockCols);
      for (int64_t i = 0; i < M; ++i) {
        for (int64_t j = j0; j < j1; ++j) {
          col_max[j] = std::max(col_max[j], static_cast<acc_t>(aff[i * M + j]));
        }
      }
    });
    const int64_t row_grain = std::max<int64_t>(1, kMinTaskElems / M);
    at::parallel_for(0, M, row_grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = 0; j < M; ++j) {
          w[i * M + j] =
              pow_beta(static_cast<acc_t>(aff[i * M + j]) / col_max[j], beta, beta_is_one);
        }
      }
    });
    // Column sums by blocks of columns, so each task reads W row by row.
    std::vector<double> sums(M), inv_s(M);
    at::parallel_for(0, n_blocks, 1, [&](int64_t blk0, int64_t blk1) {
      const int64_t j0 = blk0 * kBlockCols, j1 = std::min(M, blk1 * kBlockCols);
      for (int64_t i = 0; i < M; ++i) {
        for (int64_t j = j0; j < j1; ++j) sums[j] += w[i * M + j];
      }
      for (int64_t j = j0; j < j1; ++j) inv_s[j] = 1.0 / sums[j];
    });
    at::parallel_for(0, M, row_grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = 0; j < M; ++j) w[i * M + j] = static_cast<acc_t>(w[i * M + j] * inv_s[j]);
      }
    });
  } else {
    // A task owns rows [j0, j1) of W = T^T: it transposes them in from aff's columns, then
    // scales each row (a column of aff) by its maximum, raises it to beta and normalises it.
    at::parallel_for(0, n_blocks, 1, [&](int64_t blk0, int64_t blk1) {
      const int64_t j0 = blk0 * kBlockCols, j1 = std::min(M, blk1 * kBlockCols);
      for (int64_t i = 0; i < M; ++i) {
        for (int64_t j = j0; j < j1; ++j) w[j * M + i] = static_cast<acc_t>(aff[i * M + j]);
      }
      for (int64_t j = j0; j < j1; ++j) {
        acc_t* row = w + j * M;
        const acc_t m = *std::max_element(row, row + M);
        for (int64_t i = 0; i < M; ++i) row[i] = pow_beta(row[i] / m, beta, beta_is_one);
        double s = 0;
        for (int64_t i = 0; i < M; ++i) s += row[i];
        const double inv = 1.0 / s;
        for (int64_t i = 0; i < M; ++i) row[i] = static_cast<acc_t>(row[i] * inv);
      }
    });
  }
}

// y[c, n] = sum_k x[c, k] W[k, n] for x, y [C, M]. Parallel over blocks of output columns; the
// innermost loop runs along a contiguous row of W into a contiguous accumulator row, so it
// vectorises, and each W element is read once per row chunk.
template <typename acc_t>
void step(const acc_t* __restrict w, const acc_t* __restrict x, acc_t* __restrict y, int64_t C,
          int64_t M) {
  const int64_t n_blocks = ceil_div(M, kBlockCols);
  at::parallel_for(0, n_blocks, 1, [&](int64_t blk0, int64_t blk1) {
    std::vector<acc_t> acc_buf(std::min(C, kRowChunk) * kBlockCols);
    std::vector<acc_t> total_buf(std::min(C, kRowChunk) * kBlockCols);
    acc_t* __restrict acc = acc_buf.data();
    acc_t* __restrict total = total_buf.data();
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t n0 = blk * kBlockCols, nn = std::min(kBlockCols, M - n0);
      for (int64_t c0 = 0; c0 < C; c0 += kRowChunk) {
        const int64_t cn = std::min(kRowChunk, C - c0);
        std::fill(total, total + cn * kBlockCols, acc_t(0));
        for (int64_t kb = 0; kb < M; kb += kSumBlock) {
          std::fill(acc, acc + cn * kBlockCols, acc_t(0));
          for (int64_t k = kb; k < std::min(M, kb + kSumBlock); ++k) {
            const acc_t* __restrict w_row = w + k * M + n0;
            const acc_t* __restrict x_col = x + c0 * M + k;
            for (int64_t c = 0; c < cn; ++c) {
              const acc_t xv = x_col[c * M];
              acc_t* __restrict a = acc + c * kBlockCols;
              if (nn == kBlockCols) {
                for (int64_t n = 0; n < kBlockCols; ++n) a[n] += xv * w_row[n];
              } else {
                for (int64_t n = 0; n < nn; ++n) a[n] += xv * w_row[n];
              }
            }
          }
          for (int64_t e = 0; e < cn * kBlockCols; ++e) total[e] += acc[e];
        }
        for (int64_t c = 0; c < cn; ++c) {
          std::copy(total + c * kBlockCols, total + c * kBlockCols + nn, y + (c0 + c) * M + n0);
        }
      }
    }
  });
}

template <typename aff_t, typename acc_t>
void run(const at::Tensor& aff, const at::Tensor& x0, at::Tensor (&buf)[2], double beta,
         int64_t steps, bool backward) {
  const int64_t B = x0.size(0), C = x0.size(1), M = x0.size(2);
  // One [M, M] buffer, reused for every batch element, so pow runs once per element.
  std::vector<acc_t> w(M * M);
  const aff_t* aff_ptr = aff.data_ptr<aff_t>();
  for (int64_t b = 0; b < B; ++b) {
    materialise(aff_ptr + b * M * M, w.data(), M, static_cast<acc_t>(beta), backward);
    const acc_t* src = x0.data_ptr<acc_t>() + b * C * M;
    for (int64_t s = 0; s < steps; ++s) {
      acc_t* dst = buf[s % 2].data_ptr<acc_t>() + b * C * M;
      step(w.data(), src, dst, C, M);
      src = dst;
    }
  }
}

at::Tensor random_walk_cpu(const at::Tensor& aff, const at::Tensor& x, double beta, int64_t steps,
                           bool backward) {
  if (steps == 0) return x.clone();
  if (x.numel() == 0) return at::empty_like(x);
  const bool use_double = aff.scalar_type() == at::kDouble || x.scalar_type() == at::kDouble;
  // The state between steps stays in the accumulation dtype; x0 may alias x, so it is only read.
  const at::Tensor x0 = x.to(use_double ? at::kDouble : at::kFloat);
  at::Tensor buf[2] = {at::empty_like(x0), steps > 1 ? at::empty_like(x0) : at::Tensor()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, aff.scalar_type(), "random_walk_cpu",
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

at::Tensor random_walk_forward_cpu(const at::Tensor& aff, const at::Tensor& cam, double beta,
                                   int64_t steps) {
  CHECK_CPU(aff);
  WSSS_FAST_CHECK_RANDOM_WALK(aff, cam, beta, steps);
  return random_walk_cpu(aff, cam, beta, steps, /*backward=*/false);
}

at::Tensor random_walk_backward_cpu(const at::Tensor& aff, const at::Tensor& grad_out, double beta,
                                    int64_t steps) {
  CHECK_CPU(aff);
  WSSS_FAST_CHECK_RANDOM_WALK(aff, grad_out, beta, steps);
  return random_walk_cpu(aff, grad_out, beta, steps, /*backward=*/true);
}

TORCH_LIBRARY_IMPL(wsss_fast, CPU, m) {
  m.impl("random_walk_forward", &random_walk_forward_cpu);
  m.impl("random_walk_backward", &random_walk_backward_cpu);
}
