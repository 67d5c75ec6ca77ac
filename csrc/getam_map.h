// Shared by the CPU and CUDA entry points of getam_map: the argument checks that do not depend on
// the device (each entry point checks its own device and device-specific limits first).
#pragma once

#include "wsss_fast.h"

namespace wsss_fast {
namespace getam_map {

struct Dims {
  int64_t L, B, H, N, D;
  int64_t lbh() const { return L * B * H; }
};

// q, k, v, grad_out: contiguous [L, B, H, N, D] of one floating dtype on q's device.
inline Dims check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& grad_out, int64_t row) {
  CHECK_DEVICE(k, q);
  CHECK_DEVICE(v, q);
  CHECK_DEVICE(grad_out, q);
  CHECK_DIM(q, 5);
  const Dims dm{q.size(0), q.size(1), q.size(2), q.size(3), q.size(4)};
  CHECK_SHAPE(k, dm.L, dm.B, dm.H, dm.N, dm.D);
  CHECK_SHAPE(v, dm.L, dm.B, dm.H, dm.N, dm.D);
  CHECK_SHAPE(grad_out, dm.L, dm.B, dm.H, dm.N, dm.D);
  CHECK_CONTIGUOUS(q);
  CHECK_CONTIGUOUS(k);
  CHECK_CONTIGUOUS(v);
  CHECK_CONTIGUOUS(grad_out);
  CHECK_FLOATING(q);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  grad_out.scalar_type() == q.scalar_type(),
              "q, k, v and grad_out must have one dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type(), " and ", grad_out.scalar_type());
  TORCH_CHECK(0 <= row && row < dm.N, "row must be in [0, N = ", dm.N, "), got ", row);
  return dm;
}

}  // namespace getam_map
}  // namespace wsss_fast
