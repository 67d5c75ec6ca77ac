// Shared by the CPU and CUDA entry points of par/pamr: the device-independent argument checks and
// PAR's position weights (each entry point checks its own device and device-specific limits).
#pragma once

#include <vector>

#include "wsss_fast.h"

namespace wsss_fast {
namespace par {

// The most dilations a call takes (the published 6 and then some). The CUDA kernels receive their
// tap tables by value, as kernel arguments of at most 4 KB, which bounds the table; the CPU
// kernels share the limit so that both backends accept the same calls. wsss_fast/ops/par.py's
// MAX_DILATIONS must match.
constexpr int kMaxDilations = 16;

// image: contiguous [B, 3, H, W]; masks: contiguous [B, C, H, W] on image's device; both floating.
inline void check_inputs(const char* op, const at::Tensor& image, const at::Tensor& masks,
                         at::IntArrayRef dilations, int64_t iters) {
  CHECK_DEVICE(masks, image);
  CHECK_DIM(image, 4);
  CHECK_DIM(masks, 4);
  const int64_t B = image.size(0), H = image.size(2), W = image.size(3), C = masks.size(1);
  CHECK_SHAPE(image, B, 3, H, W);
  CHECK_SHAPE(masks, B, C, H, W);
  CHECK_CONTIGUOUS(image);
  CHECK_CONTIGUOUS(masks);
  CHECK_FLOATING(image);
  CHECK_FLOATING(masks);
  TORCH_CHECK(!dilations.empty(), op, ": dilations must not be empty");
  TORCH_CHECK(static_cast<int64_t>(dilations.size()) <= kMaxDilations, op, ": at most ",
              kMaxDilations, " dilations are supported, got ", dilations.size(),
              "; pass fewer (a dilation >= max(H, W) acts like max(H, W))");
  for (const int64_t d : dilations) {
    TORCH_CHECK(d >= 1, op, ": every dilation must be >= 1, got ", d);
  }
  TORCH_CHECK(iters >= 0, op, ": iters must be >= 0, got ", iters);
}

// PAR's w_pos-weighted position softmax over the K ring taps, [K] (defined in cpu/par.cpp).
std::vector<double> par_position_weights(const std::vector<int64_t>& dilations, double w_pos);

}  // namespace par
}  // namespace wsss_fast
