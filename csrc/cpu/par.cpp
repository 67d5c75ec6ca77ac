// PAR (AReAM/AFA) and PAMR (GETAM) pixel-adaptive refinement on CPU. The [B, K, H, W] affinities
// to the K = 8 x len(dilations) ring neighbours of every pixel are computed once; each of the
// `iters` updates m_i <- sum_k aff[k, i] m[tap_k(i)] then gathers the neighbours from the previous
// state (two ping-pong buffers), so the [B, C, K, H, W] tensor the published code unfolds at every
// iteration never exists. Coordinates are clamped (replicate padding). Parallel over (b, y) rows.
#include "par.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "wsss_fast.h"

// PAR's position term w_pos * softmax_k(-(len_k / (sigma_p + 1e-8) / 0.3)^2), with len_k the
// offset length of ring tap k (d on the axes, sqrt(2) d on the diagonals) and sigma_p the unbiased
// std of the K lengths. It depends on the dilations only, so it is computed once, in double, on
// the host; cuda/par.cu uses it too.
std::vector<double> wsss_fast::par::par_position_weights(const std::vector<int64_t>& dilations,
                                                         double w_pos) {
  std::vector<double> len;
  for (const int64_t dilation : dilations) {
    const double d = static_cast<double>(dilation);
    for (const double dy : {-d, 0.0, d}) {
      for (const double dx : {-d, 0.0, d}) {
        if (dy != 0 || dx != 0) len.push_back(std::hypot(dy, dx));
      }
    }
  }
  const int64_t K = static_cast<int64_t>(len.size());
  double mean = 0;
  for (const double l : len) mean += l;
  mean /= K;
  double ss = 0;
  for (const double l : len) ss += (l - mean) * (l - mean);
  const double sigma = std::sqrt(ss / (K - 1));
  std::vector<double> logit(K), out(K);
  double mx = -std::numeric_limits<double>::infinity(), sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    const double t = len[k] / (sigma + 1e-8) / 0.3;
    logit[k] = -(t * t);
    mx = std::max(mx, logit[k]);
  }
  for (int64_t k = 0; k < K; ++k) sum += std::exp(logit[k] - mx);
  for (int64_t k = 0; k < K; ++k) out[k] = w_pos * std::exp(logit[k] - mx) / sum;
  return out;
}

namespace {

// Work per task (pixels x neighbours x channels) below which splitting over threads costs more
// than it saves.
constexpr int64_t kMinTaskWork = 1 << 16;

struct Tap {
  int64_t dy, dx;
};

// The taps of a 3x3 window dilated by each d, row-major as the published shift kernels order them:
// the 8 ring taps per dilation, or all 9 with the centre (PAMR's standard deviation). A dilation
// of at least `extent` = max(H, W) clamps every tap to the border it points at, exactly as `extent`
// does, so taps are capped there and coordinates stay far from overflow for any dilation.
std::vector<Tap> window_taps(const std::vector<int64_t>& dilations, bool with_centre,
                             int64_t extent) {
  std::vector<Tap> taps;
  for (const int64_t dilation : dilations) {
    const int64_t d = std::min(dilation, extent);
    for (const int64_t dy : {-d, int64_t{0}, d}) {
      for (const int64_t dx : {-d, int64_t{0}, d}) {
        if (with_centre || dy != 0 || dx != 0) taps.push_back({dy, dx});
      }
    }
  }
  return taps;
}

inline int64_t clamp_coord(int64_t v, int64_t n) {
  return std::min(std::max(v, int64_t{0}), n - 1);
}

// aff[b, :, y, x] for every pixel of rows [r0, r1) of the flattened (b, y) range.
//   PAR:  aff_k = softmax_k(mean_c -(|I_c - I_c[tap_k]| / (sigma_c + 1e-8) / 0.3)^2) + pos_k,
//         sigma_c the unbiased std of I_c over the K ring taps;
//   PAMR: aff_k = softmax_k(mean_c -|I_c - I_c[tap_k]| / (1e-8 + 0.1 sigma_c)),
//         sigma_c the unbiased std of I_c over the 3x3 windows with centre at every dilation.
// sigma is taken over I_c[tap] - I_c, the same std: differences of nearby values are exact, while a
// running sum of raw values far from 0 (an image + 1e6) rounds their spread away. The torch
// backend and cuda/par.cu do the same.
template <typename acc_t, bool kPar>
void affinity_rows(const acc_t* image, acc_t* aff, const std::vector<Tap>& ring,
                   const std::vector<Tap>& sigma_taps, const std::vector<acc_t>& pos, int64_t H,
                   int64_t W, int64_t r0, int64_t r1) {
  const int64_t K = static_cast<int64_t>(ring.size());
  const int64_t S = static_cast<int64_t>(sigma_taps.size());
  const int64_t HW = H * W;
  std::vector<acc_t> logit(K);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / H, y = r % H;
    const acc_t* img = image + b * 3 * HW;
    acc_t* out = aff + b * K * HW + y * W;
    for (int64_t x = 0; x < W; ++x) {
      acc_t centre[3], mean[3] = {0, 0, 0}, ss[3] = {0, 0, 0}, denom[3];
      for (int ch = 0; ch < 3; ++ch) centre[ch] = img[ch * HW + y * W + x];
      for (const Tap& t : sigma_taps) {
        const int64_t q = clamp_coord(y + t.dy, H) * W + clamp_coord(x + t.dx, W);
        for (int ch = 0; ch < 3; ++ch) mean[ch] += img[ch * HW + q] - centre[ch];
      }
      for (int ch = 0; ch < 3; ++ch) mean[ch] /= static_cast<acc_t>(S);
      for (const Tap& t : sigma_taps) {
        const int64_t q = clamp_coord(y + t.dy, H) * W + clamp_coord(x + t.dx, W);
        for (int ch = 0; ch < 3; ++ch) {
          const acc_t dev = (img[ch * HW + q] - centre[ch]) - mean[ch];
          ss[ch] += dev * dev;
        }
      }
      for (int ch = 0; ch < 3; ++ch) {
        const acc_t sigma = std::sqrt(ss[ch] / static_cast<acc_t>(S - 1));
        denom[ch] = kPar ? sigma + acc_t(1e-8) : acc_t(1e-8) + acc_t(0.1) * sigma;
      }
      acc_t mx = -std::numeric_limits<acc_t>::infinity();
      for (int64_t k = 0; k < K; ++k) {
        const int64_t q = clamp_coord(y + ring[k].dy, H) * W + clamp_coord(x + ring[k].dx, W);
        acc_t l = 0;
        for (int ch = 0; ch < 3; ++ch) {
          const acc_t diff = std::abs(centre[ch] - img[ch * HW + q]);
          if (kPar) {
            const acc_t t = diff / denom[ch] / acc_t(0.3);
            l += -(t * t);
          } else {
            l += -diff / denom[ch];
          }
        }
        logit[k] = l / acc_t(3);
        mx = std::max(mx, logit[k]);
      }
      acc_t sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        logit[k] = std::exp(logit[k] - mx);
        sum += logit[k];
      }
      for (int64_t k = 0; k < K; ++k) {
        out[k * HW + x] = logit[k] / sum + (kPar ? pos[k] : acc_t(0));
      }
    }
  }
}

// out[x] += a[x] * src[clamp(x + dx)] over a row of W pixels. The clamped ends are split off so the
// middle is a contiguous, vectorisable loop.
template <typename acc_t>
inline void axpy_shifted(acc_t* __restrict out, const acc_t* __restrict a,
                         const acc_t* __restrict src, int64_t dx, int64_t W) {
  const int64_t lo = std::clamp<int64_t>(-dx, 0, W);      // x < lo reads src[0]
  const int64_t hi = std::clamp<int64_t>(W - dx, lo, W);  // x >= hi reads src[W - 1]
  for (int64_t x = 0; x < lo; ++x) out[x] += a[x] * src[0];
  const acc_t* __restrict s = src + dx;
  for (int64_t x = lo; x < hi; ++x) out[x] += a[x] * s[x];
  for (int64_t x = hi; x < W; ++x) out[x] += a[x] * src[W - 1];
}

// One update dst[b, c, y, :] = sum_k aff[b, k, y, :] * src[b, c, tap_k(y, :)] for rows [r0, r1).
template <typename acc_t>
void step_rows(const acc_t* aff, const acc_t* src, acc_t* dst, const std::vector<Tap>& ring,
               int64_t C, int64_t H, int64_t W, int64_t r0, int64_t r1) {
  const int64_t K = static_cast<int64_t>(ring.size());
  const int64_t HW = H * W;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / H, y = r % H;
    const acc_t* a = aff + b * K * HW + y * W;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t* s = src + (b * C + c) * HW;
      acc_t* out = dst + (b * C + c) * HW + y * W;
      std::fill(out, out + W, acc_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t yy = clamp_coord(y + ring[k].dy, H);
        axpy_shifted(out, a + k * HW, s + yy * W, ring[k].dx, W);
      }
    }
  }
}

template <typename acc_t>
void run(const at::Tensor& image, const at::Tensor& x0, at::Tensor (&buf)[2], bool par,
         const std::vector<int64_t>& dilations, int64_t iters, double w_pos) {
  const int64_t B = x0.size(0), C = x0.size(1), H = x0.size(2), W = x0.size(3);
  const int64_t extent = std::max(H, W);
  const std::vector<Tap> ring = window_taps(dilations, /*with_centre=*/false, extent);
  const std::vector<Tap> sigma_taps =
      par ? ring : window_taps(dilations, /*with_centre=*/true, extent);
  const int64_t K = static_cast<int64_t>(ring.size());
  std::vector<acc_t> pos;
  if (par) {
    for (const double p : wsss_fast::par::par_position_weights(dilations, w_pos))
      pos.push_back(static_cast<acc_t>(p));
  }
  at::Tensor aff = at::empty({B, K, H, W}, x0.options());
  const acc_t* img = image.data_ptr<acc_t>();
  acc_t* aff_ptr = aff.data_ptr<acc_t>();

  const int64_t S = static_cast<int64_t>(sigma_taps.size());
  const int64_t aff_grain = std::max<int64_t>(1, kMinTaskWork / (W * (K + 2 * S)));
  at::parallel_for(0, B * H, aff_grain, [&](int64_t r0, int64_t r1) {
    if (par) {
      affinity_rows<acc_t, true>(img, aff_ptr, ring, sigma_taps, pos, H, W, r0, r1);
    } else {
      affinity_rows<acc_t, false>(img, aff_ptr, ring, sigma_taps, pos, H, W, r0, r1);
    }
  });

  const int64_t step_grain = std::max<int64_t>(1, kMinTaskWork / (W * K * C));
  const acc_t* src = x0.data_ptr<acc_t>();
  for (int64_t it = 0; it < iters; ++it) {
    acc_t* dst = buf[it % 2].data_ptr<acc_t>();
    at::parallel_for(0, B * H, step_grain, [&](int64_t r0, int64_t r1) {
      step_rows(aff_ptr, src, dst, ring, C, H, W, r0, r1);
    });
    src = dst;
  }
}

at::Tensor refine_cpu(const at::Tensor& image, const at::Tensor& masks, at::IntArrayRef dilations,
                      int64_t iters, double w_pos, bool par) {
  const char* op = par ? "par_forward" : "pamr_forward";
  CHECK_CPU(image);
  wsss_fast::par::check_inputs(op, image, masks, dilations, iters);
  if (iters == 0 || masks.numel() == 0) return masks.clone();

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

at::Tensor par_forward_cpu(const at::Tensor& image, const at::Tensor& masks,
                           at::IntArrayRef dilations, int64_t iters, double w_pos) {
  return refine_cpu(image, masks, dilations, iters, w_pos, /*par=*/true);
}

at::Tensor pamr_forward_cpu(const at::Tensor& image, const at::Tensor& masks,
                            at::IntArrayRef dilations, int64_t iters) {
  return refine_cpu(image, masks, dilations, iters, /*w_pos=*/0.0, /*par=*/false);
}

TORCH_LIBRARY_IMPL(wsss_fast, CPU, m) {
  m.impl("par_forward", &par_forward_cpu);
  m.impl("pamr_forward", &pamr_forward_cpu);
}
