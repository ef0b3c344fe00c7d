// Per-row math of fastlt::expert_aggregate: out[b, c] = sum_k coef[b, k] * logits[k, b, c], where
//   coef[b, k] = active[b, k] * weight[b, k] / divisor[b],
//   divisor[b] = E (mean), number of active experts of row b (mean with `active`), or 1 (sum).
// The gradient w.r.t. logits is coef[b, k] * grad[b, c]; w.r.t. weight[b, k] it is
// active[b, k] / divisor[b] * sum_c grad[b, c] * logits[k, b, c].
#pragma once

#include "fastlt/common.h"

namespace fastlt {
namespace expert_aggregate {

enum Reduce : int { kMean = 0, kSum = 1 };

// Fills unweighted[k] = active / divisor and coef[k] = unweighted[k] * weight[k] for one row.
// weight_row / active_row may be null (all ones / all active). Returns the number of active experts.
template <typename A>
FASTLT_HOST_DEVICE int row_coefficients(int num_experts, int reduce, const A* weight_row, const bool* active_row,
                                        A* unweighted, A* coef) {
  int num_active = 0;
  for (int k = 0; k < num_experts; ++k) num_active += (active_row == nullptr || active_row[k]) ? 1 : 0;
  const A divisor = reduce == kMean ? A(num_active) : A(1);
  const A inv_divisor = num_active > 0 ? A(1) / divisor : A(0);
  for (int k = 0; k < num_experts; ++k) {
    const bool on = active_row == nullptr || active_row[k];
    unweighted[k] = on ? inv_divisor : A(0);
    coef[k] = weight_row == nullptr ? unweighted[k] : unweighted[k] * weight_row[k];
  }
  return num_active;
}

// One output element: experts are summed in order k = 0..E-1 (every backend uses this order).
template <typename T, typename A>
FASTLT_HOST_DEVICE A aggregate_element(const T* logits_bc, int64_t stride_expert, int num_experts, const A* coef) {
  A acc = A(0);
  for (int k = 0; k < num_experts; ++k) acc += coef[k] * static_cast<A>(logits_bc[k * stride_expert]);
  return acc;
}

}  // namespace expert_aggregate
}  // namespace fastlt
