// Per-row math of fastlt::tau_normalize: y_j = w_j * s_j with s_j = max(||w_j||_2, eps) ** -tau.
// Backward (n = ||w_j||): dL/dw_j = s_j * g_j - c_j * w_j with c_j = tau * s_j * (g_j . w_j) / n^2 when n >= eps,
// and c_j = 0 when the norm is clamped to eps or tau = 0 (then s_j is a constant).
// A row holding a NaN has a NaN norm: its output and gradient are NaN, as the eager reference's (the max with eps
// must not turn a NaN norm into eps). pow(x, 0) = 1 for every x, so tau = 0 leaves even such a row unchanged.
#pragma once

#include "fastlt/common.h"

namespace fastlt {
namespace tau_normalize {

// max(norm, eps) that keeps a NaN norm.
template <typename A>
FASTLT_HOST_DEVICE A clamp_norm(A norm, A eps) {
  return norm < eps ? eps : norm;
}

template <typename A>
FASTLT_HOST_DEVICE A row_scale(A sum_squares, A tau, A eps) {
  return power(clamp_norm(square_root(sum_squares), eps), -tau);
}

template <typename A>
FASTLT_HOST_DEVICE A row_grad_weight_coefficient(A sum_squares, A grad_dot_weight, A tau, A eps) {
  const A norm = square_root(sum_squares);
  if (norm != norm) return norm;
  if (tau == A(0) || norm < eps) return A(0);
  return tau * power(norm, -tau) * grad_dot_weight / sum_squares;
}

}  // namespace tau_normalize
}  // namespace fastlt
