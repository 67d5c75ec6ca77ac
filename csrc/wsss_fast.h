// Argument checks shared by the C++ entry points, in the FlashAttention style: each names the
// tensor and says what was expected. User-facing validation lives in the Python layer; these
// guard the kernels against callers that bypass it.
#pragma once

#include <ATen/ATen.h>

#define CHECK_CPU(x) \
  TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define CHECK_CUDA(x) \
  TORCH_CHECK((x).device().is_cuda(), #x " must be a CUDA tensor, got ", (x).device())
#define CHECK_DEVICE(x, y)                                                                     \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device, got ", \
              (x).device(), " and ", (y).device())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_DIM(x, n) \
  TORCH_CHECK((x).dim() == (n), #x " must be ", (n), "-D, got shape ", (x).sizes())
#define CHECK_SHAPE(x, ...)                                                                \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}),                               \
              #x " must have shape (" #__VA_ARGS__ ") = ", at::IntArrayRef({__VA_ARGS__}), \
              ", got ", (x).sizes())
#define CHECK_FLOATING(x)                                                                 \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||        \
                  (x).scalar_type() == at::kBFloat16 || (x).scalar_type() == at::kDouble, \
              #x " must be float16, bfloat16, float32 or float64, got ", (x).scalar_type())
