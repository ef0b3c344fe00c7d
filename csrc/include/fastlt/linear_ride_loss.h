// Per-class math of fastlt::linear_ride_loss (the experts' classifiers fused with RIDE's loss, docs/methods.md 3.2): a
// chunk of classes' logits comes from a GEMM, and the softmax statistics of each term of ride_loss.h are merged over
// the chunks (softmax_stats.h). Shared by the CPU and CUDA kernels.
#pragma once

#include "fastlt/ride_loss.h"
#include "fastlt/softmax_stats.h"

namespace fastlt {
namespace linear_ride_loss {

// z_c = (x . w_c) * column_scale_c + b_c, column_scale_c = scale / ||w_c|| for the cosine classifier (1 without
// normalisation), bias 0 when absent: the weight's normalisation becomes a column scale of the GEMM's result.
template <typename A>
FASTLT_HOST_DEVICE A chunk_logit(A dot, A column_scale, A bias) {
  return dot * column_scale + bias;
}

// A running value defined relative to a softmax maximum (the KL gap sum_c exp(v_c - max)(v_c - u_c)) moved from
// maximum `from` to maximum `to` >= from; an empty running value (from = -inf) stays 0.
template <typename A>
FASTLT_HOST_DEVICE A rescale(A value, A from, A to) {
  return from == static_cast<A>(-INFINITY) ? A(0) : value * exponential(from - to);
}

// The cosine classifier's weight gradient, row-local: with p = column_scale_c * dz^T x (the GEMM) and
// radial = w_c . p, d w_c = p - w_c * radial / ||w_c||^2, where 1 / ||w_c||^2 = (column_scale_c / scale)^2 (no
// radial term when F.normalize's eps clamped the norm).
template <typename A>
FASTLT_HOST_DEVICE A radial_coefficient(A radial, A column_scale, A scale, bool norm_above_eps) {
  const A inverse_norm = column_scale / scale;
  return norm_above_eps ? radial * inverse_norm * inverse_norm : A(0);
}

}  // namespace linear_ride_loss
}  // namespace fastlt
