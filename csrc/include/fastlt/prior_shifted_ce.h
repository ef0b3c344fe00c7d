// Per-row math of fastlt::prior_shifted_ce (Balanced Softmax / logit adjustment over E experts). For one sample row
// with label y and the per-expert logit shifts shift_k[c] = tau_k * log(pi_c):
//   loss = sum_k (1/B) * CE(x_k, y),   x_k = z_k + shift_k
// and d loss / d z_k[c] = (1/B) * (softmax(x_k)_c - [c == y]).
#pragma once

#include "fastlt/softmax_stats.h"

namespace fastlt {
namespace prior_shifted_ce {

template <typename A>
FASTLT_HOST_DEVICE A logit_gradient(A inverse_batch, A probability, bool is_target) {
  return inverse_batch * (probability - (is_target ? A(1) : A(0)));
}

}  // namespace prior_shifted_ce
}  // namespace fastlt
