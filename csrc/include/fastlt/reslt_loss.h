// Per-row math of fastlt::reslt_loss (ResLT, docs/methods.md 4.4 and 6.5). For one kept sample row with label y and K
// branch logits z_b, g_b = group_masks[b][y], s = sum_b z_b:
//   loss = ice_coef * sum_b g_b * CE_eps(z_b, y) + fused_coef * CE_eps'(s, y)   (K branch terms and the fused term),
//   under "mean": ice_coef = beta / G, G = sum over branches and kept rows of g_b(y_i) (one joint normaliser),
//                 fused_coef = (1 - beta) / N, N = the number of kept rows;
//   under "sum" and "none": ice_coef = beta, fused_coef = 1 - beta.
// A row whose label is ignore_index is not kept: its terms and gradient are 0.
//   CE_eps(x, y) = -log(softmax(x)_y + eps)   (the official code's epsilon; eps = 0: exact CE)
// with eps = log_eps in the branch terms and eps' = fused_log_eps in the fused term: the official CIFAR and iNat
// scripts take the exact CE for the fused term (eps' = 0) and 1e-7 in the branch terms, ImageNet-LT 1e-7 in both.
// With p = softmax(x), d CE_eps / d x_c = -p_y (1[c == y] - p_c) / (p_y + eps) = r * (p_c - [c == y]),
// r = p_y / (p_y + eps) (epsilon_gradient_scale; 1 when eps = 0), so
//   d loss / d z_b[c] = ice_coef * r_b * g_b * (softmax(z_b)_c - [c == y])
//                     + fused_coef * r_s * (softmax(s)_c - [c == y]),
// r_b and r_s the factors of the branch row z_b (with eps) and of the fused row s (with eps').
#pragma once

#include "fastlt/softmax_stats.h"

namespace fastlt {
namespace reslt_loss {

// The loss coefficients of the header comment (reduction: fastlt::Reduction). An empty normaliser (no kept sample in
// any group; every row ignored) gives 0, so such a batch's loss and gradient are 0 instead of NaN.
template <typename A>
FASTLT_HOST_DEVICE A ice_coefficient(A beta, int64_t in_group_total, int64_t reduction) {
  if (in_group_total == 0) return A(0);
  return reduction == kReductionMean ? beta / static_cast<A>(in_group_total) : beta;
}
template <typename A>
FASTLT_HOST_DEVICE A fused_coefficient(A beta, int64_t kept_rows, int64_t reduction) {
  if (kept_rows == 0) return A(0);
  return reduction == kReductionMean ? (A(1) - beta) / static_cast<A>(kept_rows) : A(1) - beta;
}

// CE_eps from the row's softmax statistics and target logit. eps = 0 takes the log-sum-exp form, exact where
// softmax(x)_y underflows; eps > 0 computes -log(p_y + eps) as the official code does (at most -log(eps)).
template <typename A>
FASTLT_HOST_DEVICE A epsilon_cross_entropy(A maximum, A shifted_sum, A target_logit, A eps) {
  if (eps == A(0)) return cross_entropy(maximum, shifted_sum, target_logit);
  return -natural_log(exponential(target_logit - maximum) / shifted_sum + eps);
}

// r = p_y / (p_y + eps): the factor CE_eps's gradient carries over the exact CE's (softmax - onehot).
template <typename A>
FASTLT_HOST_DEVICE A epsilon_gradient_scale(A maximum, A shifted_sum, A target_logit, A eps) {
  if (eps == A(0)) return A(1);
  const A target_probability = exponential(target_logit - maximum) / shifted_sum;
  return target_probability / (target_probability + eps);
}

// d loss / d z_b[c] from the branch's and the fused logits' softmax probabilities of class c; branch_coef and
// fused_coef are ice_coef * r_b and fused_coef * r_s (the coefficients already scaled by the row's epsilon factors).
template <typename A>
FASTLT_HOST_DEVICE A logit_gradient(A branch_coef, bool in_group, A branch_probability, A fused_coef,
                                    A fused_probability, bool is_target) {
  const A indicator = is_target ? A(1) : A(0);
  const A branch_term = in_group ? branch_coef * (branch_probability - indicator) : A(0);
  return branch_term + fused_coef * (fused_probability - indicator);
}

}  // namespace reslt_loss
}  // namespace fastlt
