// Per-row math of fastlt::tau_sweep: for each tau_k the predicted class of a row with raw logits l_j = f . w_j is
//   argmax_j  l_j * s_kj + b_j,      s_kj = max(||w_j||, eps) ** -tau_k   (tau_normalize::row_scale),
// with torch.argmax semantics (first index wins ties; NaN wins). The raw logits are computed once for all taus.
#pragma once

#include "fastlt/common.h"
#include "fastlt/tau_normalize.h"

namespace fastlt {
namespace tau_sweep {

template <typename A>
FASTLT_HOST_DEVICE A score(A raw_logit, A scale, const A* bias, int64_t j) {
  return bias == nullptr ? raw_logit * scale : raw_logit * scale + bias[j];
}

// Scalar reference scan over classes [begin, end) with stride `step` (the CUDA kernel strides by its threads).
template <typename A>
FASTLT_HOST_DEVICE void scan(const A* raw_logits, const A* scales, const A* bias, int64_t begin, int64_t end,
                             int64_t step, A* best, int64_t* best_index) {
  for (int64_t j = begin; j < end; j += step) {
    const A value = score(raw_logits[j], scales[j], bias, j);
    if (argmax_better(value, j, *best, *best_index)) {
      *best = value;
      *best_index = j;
    }
  }
}

}  // namespace tau_sweep
}  // namespace fastlt
