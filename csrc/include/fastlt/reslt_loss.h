// Per-row math of fastlt::reslt_loss (ResLT, methods.md 4.4). For one sample row with label y and K branch logits
// z_b, g_b = group_masks[b][y], s = sum_b z_b:
//   loss = ice_coef * sum_b g_b * CE(z_b, y) + fused_coef * CE(s, y),
//   ice_coef = beta / sum_{b,i} g_b(y_i)  (one joint normaliser over branches and samples),  fused_coef = (1-beta) / B
// and d loss / d z_b[c] = ice_coef * g_b * (softmax(z_b)_c - [c == y]) + fused_coef * (softmax(s)_c - [c == y]).
#pragma once

#include "fastlt/softmax_stats.h"

namespace fastlt {
namespace reslt_loss {

// The loss coefficients of the header comment; an empty group total (no sample in any group) gives ice_coef = 0.
template <typename A>
FASTLT_HOST_DEVICE A ice_coefficient(A beta, int64_t in_group_total) {
  return in_group_total > 0 ? beta / static_cast<A>(in_group_total) : A(0);
}
template <typename A>
FASTLT_HOST_DEVICE A fused_coefficient(A beta, int64_t batch) {
  return (A(1) - beta) / static_cast<A>(batch);
}

// d loss / d z_b[c] from the branch's and the fused logits' softmax probabilities of class c.
template <typename A>
FASTLT_HOST_DEVICE A logit_gradient(A ice_coef, bool in_group, A branch_probability, A fused_coef,
                                    A fused_probability, bool is_target) {
  const A indicator = is_target ? A(1) : A(0);
  const A branch_term = in_group ? ice_coef * (branch_probability - indicator) : A(0);
  return branch_term + fused_coef * (fused_probability - indicator);
}

}  // namespace reslt_loss
}  // namespace fastlt
