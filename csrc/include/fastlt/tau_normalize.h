// Per-row math of fastlt::tau_normalize: y_j = w_j * s_j with s_j = max(||w_j||_2, eps) ** -tau.
// Backward (n = ||w_j||): dL/dw_j = s_j * g_j - c_j * w_j with c_j = tau * s_j * (g_j . w_j) / n^2 when n > eps,
// and c_j = 0 when the norm is clamped to eps (then s_j is a constant).
#pragma once

#include "fastlt/common.h"

namespace fastlt {
namespace tau_normalize {

template <typename A>
FASTLT_HOST_DEVICE A row_scale(A sum_squares, A tau, A eps) {
  const A norm = square_root(sum_squares);
  return power(norm > eps ? norm : eps, -tau);
}

template <typename A>
FASTLT_HOST_DEVICE A row_grad_weight_coefficient(A sum_squares, A grad_dot_weight, A tau, A eps) {
  const A norm = square_root(sum_squares);
  if (!(norm > eps)) return A(0);
  return tau * power(norm, -tau) * grad_dot_weight / sum_squares;
}

}  // namespace tau_normalize
}  // namespace fastlt
