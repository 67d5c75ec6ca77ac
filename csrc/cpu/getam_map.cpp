// GETAM's gradient-weighted map on CPU, for stacked layers q, k, v, grad_out [L, B, H, N, D]:
//   a = softmax_n(s * q[row] . k[n]), g = grad_out[row] . v[n]       (per l, b, h; length N)
//   map[b, n] = sum_l A[l, b, n] * G[l, b, n],  A = mean_h relu(g * a),  G = mean_h relu(g)
// Only the row's logits are formed (L * B * H * N numbers); no N x N buffer exists.
//
// Backward, for grad [B, N] (per l, b, h, n; [x] is 0 where x <= 0, else 1, NaN included, as in
// torch's relu backward):
//   dA = grad * G,  dG = grad * A
//   dg = (dA / H) [g a] a + (dG / H) [g],   da = (dA / H) [g a] g
//   dlogit = a (da - sum_n a da)                                     (softmax backward)
//   dq[row] = s sum_n dlogit[n] k[n],   dk[n] = s dlogit[n] q[row]
//   dgrad_out[row] = sum_n dg[n] v[n],  dv[n] = dg[n] grad_out[row]
// dq and dgrad_out are zero outside `row`.
#include "getam_map.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "wsss_fast.h"

namespace {

// Tokens per task in the passes that combine heads; small enough to spread B * N over threads.
constexpr int64_t kTokenBlock = 256;

using wsss_fast::getam_map::Dims;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// NaN passes through, as in torch.relu (`x > 0 ? x : 0` would turn it into 0).
template <typename acc_t>
inline acc_t relu(acc_t x) {
  return x < acc_t(0) ? acc_t(0) : x;
}

// relu's derivative as torch's backward takes it: 0 where x <= 0, 1 elsewhere, NaN included.
template <typename acc_t>
inline bool relu_passes(acc_t x) {
  return !(x <= acc_t(0));
}

// x . y over D elements, with four partial sums so the loop is not one serial add chain.
template <typename scalar_t, typename acc_t>
acc_t dot(const acc_t* __restrict x, const scalar_t* __restrict y, int64_t D) {
  acc_t s[4] = {0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    for (int i = 0; i < 4; ++i) s[i] += x[d + i] * static_cast<acc_t>(y[d + i]);
  }
  for (; d < D; ++d) s[0] += x[d] * static_cast<acc_t>(y[d]);
  return (s[0] + s[1]) + (s[2] + s[3]);
}

template <typename scalar_t, typename acc_t>
std::vector<acc_t> load_row(const scalar_t* x, int64_t D) {
  std::vector<acc_t> r(D);
  for (int64_t d = 0; d < D; ++d) r[d] = static_cast<acc_t>(x[d]);
  return r;
}

// For every (l, b, h): a[n] = softmax_n(scale * q[row] . k[n]) and g[n] = grad_out[row] . v[n],
// written to a, g [L * B * H, N]. The softmax denominator is summed in double: it is N terms.
template <typename scalar_t, typename acc_t>
void row_softmax_and_grad(const scalar_t* q, const scalar_t* k, const scalar_t* v,
                          const scalar_t* go, const Dims& dm, acc_t scale, int64_t row, acc_t* a,
                          acc_t* g) {
  const int64_t N = dm.N, D = dm.D;
  at::parallel_for(0, dm.lbh(), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t off = i * N * D;
      const std::vector<acc_t> q_row = load_row<scalar_t, acc_t>(q + off + row * D, D);
      const std::vector<acc_t> go_row = load_row<scalar_t, acc_t>(go + off + row * D, D);
      acc_t* a_i = a + i * N;
      acc_t* g_i = g + i * N;
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      for (int64_t n = 0; n < N; ++n) {
        a_i[n] = scale * dot(q_row.data(), k + off + n * D, D);
        g_i[n] = dot(go_row.data(), v + off + n * D, D);
        m = std::max(m, a_i[n]);
      }
      double z = 0;
      for (int64_t n = 0; n < N; ++n) {
        a_i[n] = std::exp(a_i[n] - m);
        z += a_i[n];
      }
      for (int64_t n = 0; n < N; ++n) a_i[n] = static_cast<acc_t>(a_i[n] / z);
    }
  });
}

template <typename scalar_t, typename acc_t>
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& go,
             const Dims& dm, double scale, int64_t row, at::Tensor& out) {
  const int64_t B = dm.B, H = dm.H, N = dm.N;
  std::vector<acc_t> a(dm.lbh() * N), g(dm.lbh() * N);
  row_softmax_and_grad<scalar_t, acc_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                        v.data_ptr<scalar_t>(), go.data_ptr<scalar_t>(), dm,
                                        static_cast<acc_t>(scale), row, a.data(), g.data());
  acc_t* out_ptr = out.data_ptr<acc_t>();
  const acc_t heads = static_cast<acc_t>(H);
  const int64_t n_blocks = ceil_div(N, kTokenBlock);
  at::parallel_for(0, B * n_blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n_blocks, n0 = (t % n_blocks) * kTokenBlock;
      for (int64_t n = n0; n < std::min(N, n0 + kTokenBlock); ++n) {
        acc_t total = 0;
        for (int64_t l = 0; l < dm.L; ++l) {
          acc_t sum_ga = 0, sum_g = 0;
          for (int64_t h = 0; h < H; ++h) {
            const int64_t idx = ((l * B + b) * H + h) * N + n;
            sum_ga += relu(g[idx] * a[idx]);
            sum_g += relu(g[idx]);
          }
          total += (sum_ga / heads) * (sum_g / heads);
        }
        out_ptr[b * N + n] = total;
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& go, const Dims& dm, double scale, int64_t row, at::Tensor& dq,
              at::Tensor& dk, at::Tensor& dv, at::Tensor& dgo) {
  const int64_t B = dm.B, H = dm.H, N = dm.N, D = dm.D;
  const scalar_t *q_ptr = q.data_ptr<scalar_t>(), *k_ptr = k.data_ptr<scalar_t>();
  const scalar_t *v_ptr = v.data_ptr<scalar_t>(), *go_ptr = go.data_ptr<scalar_t>();
  const acc_t scale_acc = static_cast<acc_t>(scale);
  // a, then g overwritten by dg, and u = a * da, each [L * B * H, N].
  std::vector<acc_t> a(dm.lbh() * N), g(dm.lbh() * N), u(dm.lbh() * N);
  row_softmax_and_grad<scalar_t, acc_t>(q_ptr, k_ptr, v_ptr, go_ptr, dm, scale_acc, row, a.data(),
                                        g.data());

  // Per token: the head means A and G of each layer, then each head's dg and a * da.
  const acc_t* grad_ptr = grad.data_ptr<acc_t>();
  const acc_t heads = static_cast<acc_t>(H);
  const int64_t n_blocks = ceil_div(N, kTokenBlock);
  at::parallel_for(0, dm.L * B * n_blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lb = t / n_blocks, b = lb % B, n0 = (t % n_blocks) * kTokenBlock;
      for (int64_t n = n0; n < std::min(N, n0 + kTokenBlock); ++n) {
        acc_t sum_ga = 0, sum_g = 0;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t idx = (lb * H + h) * N + n;
          sum_ga += relu(g[idx] * a[idx]);
          sum_g += relu(g[idx]);
        }
        const acc_t gr = grad_ptr[b * N + n];
        const acc_t d_ga = gr * (sum_g / heads) / heads;  // d map / d relu(g_h a_h)
        const acc_t d_g = gr * (sum_ga / heads) / heads;  // d map / d relu(g_h)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t idx = (lb * H + h) * N + n;
          const acc_t ah = a[idx], gh = g[idx];
          const bool on = relu_passes(gh * ah);
          const acc_t da = on ? d_ga * gh : acc_t(0);
          g[idx] = (on ? d_ga * ah : acc_t(0)) + (relu_passes(gh) ? d_g : acc_t(0));
          u[idx] = ah * da;
        }
      }
    }
  });

  // Per (l, b, h): softmax backward, then the rank-one products into dk, dv and the row sums
  // into dq[row], dgrad_out[row] (those two sums run in double: they cancel over N terms).
  scalar_t *dq_ptr = dq.data_ptr<scalar_t>(), *dk_ptr = dk.data_ptr<scalar_t>();
  scalar_t *dv_ptr = dv.data_ptr<scalar_t>(), *dgo_ptr = dgo.data_ptr<scalar_t>();
  at::parallel_for(0, dm.lbh(), 1, [&](int64_t i0, int64_t i1) {
    std::vector<double> dq_row(D), dgo_row(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t off = i * N * D;
      const std::vector<acc_t> q_row = load_row<scalar_t, acc_t>(q_ptr + off + row * D, D);
      const std::vector<acc_t> go_row = load_row<scalar_t, acc_t>(go_ptr + off + row * D, D);
      const acc_t *a_i = a.data() + i * N, *dg_i = g.data() + i * N, *u_i = u.data() + i * N;
      double c = 0;
      for (int64_t n = 0; n < N; ++n) c += u_i[n];
      const acc_t c_acc = static_cast<acc_t>(c);
      std::fill(dq_row.begin(), dq_row.end(), 0.0);
      std::fill(dgo_row.begin(), dgo_row.end(), 0.0);
      for (int64_t n = 0; n < N; ++n) {
        const acc_t dlogit = scale_acc * (u_i[n] - a_i[n] * c_acc);
        const acc_t dgn = dg_i[n];
        const scalar_t* k_n = k_ptr + off + n * D;
        const scalar_t* v_n = v_ptr + off + n * D;
        scalar_t* dk_n = dk_ptr + off + n * D;
        scalar_t* dv_n = dv_ptr + off + n * D;
        for (int64_t d = 0; d < D; ++d) {
          dk_n[d] = static_cast<scalar_t>(dlogit * q_row[d]);
          dv_n[d] = static_cast<scalar_t>(dgn * go_row[d]);
          dq_row[d] += dlogit * static_cast<acc_t>(k_n[d]);
          dgo_row[d] += dgn * static_cast<acc_t>(v_n[d]);
        }
      }
      for (int64_t d = 0; d < D; ++d) {
        dq_ptr[off + row * D + d] = static_cast<scalar_t>(dq_row[d]);
        dgo_ptr[off + row * D + d] = static_cast<scalar_t>(dgo_row[d]);
      }
    }
  });
}

Dims check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& grad_out, int64_t row) {
  CHECK_CPU(q);
  return wsss_fast::getam_map::check_inputs(q, k, v, grad_out, row);
}

at::ScalarType acc_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

at::Tensor getam_map_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& grad_out, double scale, int64_t row) {
  const Dims dm = check_inputs(q, k, v, grad_out, row);
  at::Tensor out = at::zeros({dm.B, dm.N}, q.options().dtype(acc_dtype(q)));
  if (q.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "getam_map_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward<scalar_t, acc_t>(q, k, v, grad_out, dm, scale, row, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> getam_map_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& grad_out, double scale, int64_t row) {
  const Dims dm = check_inputs(q, k, v, grad_out, row);
  CHECK_DEVICE(grad, q);
  CHECK_DIM(grad, 2);
  CHECK_SHAPE(grad, dm.B, dm.N);
  CHECK_FLOATING(grad);
  at::Tensor dq = at::zeros_like(q), dgo = at::zeros_like(grad_out);
  at::Tensor dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0) return {dq, dk, dv, dgo};
  const at::Tensor grad_acc = grad.to(acc_dtype(q)).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "getam_map_backward_cpu", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        backward<scalar_t, acc_t>(grad_acc, q, k, v, grad_out, dm, scale, row, dq, dk, dv, dgo);
      });
  return {dq, dk, dv, dgo};
}

TORCH_LIBRARY_IMPL(wsss_fast, CPU, m) {
  m.impl("getam_map_forward", &getam_map_forward_cpu);
  m.impl("getam_map_backward", &getam_map_backward_cpu);
}
