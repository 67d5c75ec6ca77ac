// Shared by the CPU and CUDA entry points of random_walk: the device-independent argument checks
// (each entry point checks its own device first).
#pragma once

#include "wsss_fast.h"

// aff: contiguous [B, M, M]; x (the CAM forward, the output gradient backward): contiguous
// [B, C, M] on aff's device; both floating; beta > 0, steps >= 0. A macro, not a function, so
// that the messages name the caller's tensors (cam or grad_out).
#define WSSS_FAST_CHECK_RANDOM_WALK(aff, x, beta, steps)                 \
  do {                                                                   \
    CHECK_DEVICE(x, aff);                                                \
    CHECK_DIM(aff, 3);                                                   \
    CHECK_DIM(x, 3);                                                     \
    const int64_t B = (aff).size(0), M = (aff).size(1), C = (x).size(1); \
    CHECK_SHAPE(aff, B, M, M);                                           \
    CHECK_SHAPE(x, B, C, M);                                             \
    CHECK_CONTIGUOUS(aff);                                               \
    CHECK_CONTIGUOUS(x);                                                 \
    CHECK_FLOATING(aff);                                                 \
    CHECK_FLOATING(x);                                                   \
    TORCH_CHECK((beta) > 0, "beta must be > 0, got ", (beta));           \
    TORCH_CHECK((steps) >= 0, "steps must be >= 0, got ", (steps));      \
  } while (0)
