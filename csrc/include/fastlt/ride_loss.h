// Per-row math of fastlt::ride_loss (RIDE stage-1 loss, docs/methods.md 3.2). For one sample row with label y:
//   CE_k  = log_sum_exp(z'_k) - z'_k[y],          z'_k = z_k - target_margin[y] * onehot(y)      (LDAM)
//   KL_k  = sum_c p_c (v_c - u_c) + lse(u) - lse(v),  u = z_k / T, v = mean_k(z_k) / T, p = softmax(v)
//   loss  = sum_k  ce_coef * CE_k + div_coef * KL_k,   ce_coef = w_y / W,  div_coef = lambda Tbar^2 / N
// and d loss / d z_k[c] = ce_coef * (softmax(z'_k)_c - [c == y]) + div_coef * (softmax(u)_c - p_c) / T_c
// (p is detached: no gradient flows through the expert mean). The normalisers (docs/methods.md 6.5): under mean,
// W = sum of w_{y_i} and N = the count over the kept rows i (w = 1 without DRW); W = N = 1 under sum and none. An
// ignored row has no terms and a zero gradient.
#pragma once

#include "fastlt/softmax_stats.h"

namespace fastlt {
namespace ride_loss {

// LDAM: the cross-entropy sees the target logit lowered by its margin.
template <typename A>
FASTLT_HOST_DEVICE A margin_logit(A logit, bool is_target, A target_margin) {
  return is_target ? logit - target_margin : logit;
}

// u_c = z_k[c] / T_c: an expert's logit as the diversity term sees it.
template <typename A>
FASTLT_HOST_DEVICE A tempered_logit(A logit, A inverse_temperature) {
  return logit * inverse_temperature;
}

// v_c = mean_k(z_k[c]) / T_c, from the experts' sum sum_k z_k[c].
template <typename A>
FASTLT_HOST_DEVICE A tempered_mean_logit(A expert_sum, A inverse_experts, A inverse_temperature) {
  return expert_sum * inverse_experts * inverse_temperature;
}

// Class c's term of kl_to_mean's weighted_gap: exp(v_c - mean_max) * (v_c - u_c).
template <typename A>
FASTLT_HOST_DEVICE A weighted_gap_term(A mean_exp, A mean_logit, A expert_tempered_logit) {
  return mean_exp * (mean_logit - expert_tempered_logit);
}

// KL(p || softmax(u)) of one expert, from weighted_gap = sum_c exp(v_c - mean_max) * (v_c - u_c) and the softmax
// statistics of v (the mean) and u (the expert).
template <typename A>
FASTLT_HOST_DEVICE A kl_to_mean(A weighted_gap, A mean_max, A mean_sum, A expert_max, A expert_sum) {
  return weighted_gap / mean_sum + log_sum_exp(expert_max, expert_sum) - log_sum_exp(mean_max, mean_sum);
}

// d loss / d z_k[c] from the three probabilities of class c (see the header comment).
template <typename A>
FASTLT_HOST_DEVICE A logit_gradient(A ce_coef, A ce_probability, bool is_target, A div_coef, A expert_probability,
                                    A mean_probability, A inverse_temperature) {
  return ce_coef * (ce_probability - (is_target ? A(1) : A(0))) +
         div_coef * (expert_probability - mean_probability) * inverse_temperature;
}

}  // namespace ride_loss
}  // namespace fastlt
