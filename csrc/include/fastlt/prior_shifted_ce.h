// Per-row math of fastlt::prior_shifted_ce (Balanced Softmax / logit adjustment over E experts, docs/methods.md 8.1
// and 6.5). For one kept sample row with label y and the per-expert logit shifts shift_k[c] (tau_k * log(pi_c)):
//   row_terms[k] = coef * CE(x_k, y),   x_k = z_k + shift_k,   the row's loss = sum_k row_terms[k],
//   coef = 1 / N under "mean" (N = the number of kept rows), 1 under "sum" and "none";
// and d loss / d z_k[c] = coef * (softmax(x_k)_c - [c == y]).
// A row whose label is ignore_index is not kept: its terms and gradient are 0.
#pragma once

#include "fastlt/softmax_stats.h"

namespace fastlt {
namespace prior_shifted_ce {

// coef of the header comment (reduction: fastlt::Reduction). No kept row gives 0 rather than a division by zero,
// so an all-ignored batch's loss and gradient are 0 instead of NaN.
template <typename A>
FASTLT_HOST_DEVICE A row_coefficient(int64_t kept_rows, int64_t reduction) {
  if (kept_rows == 0) return A(0);
  return reduction == kReductionMean ? A(1) / static_cast<A>(kept_rows) : A(1);
}

template <typename A>
FASTLT_HOST_DEVICE A logit_gradient(A coefficient, A probability, bool is_target) {
  return coefficient * (probability - (is_target ? A(1) : A(0)));
}

}  // namespace prior_shifted_ce
}  // namespace fastlt
