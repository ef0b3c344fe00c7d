// Softmax statistics shared by the fused losses (ride_loss, reslt_loss, prior_shifted_ce) on the CPU and the GPU:
// a row's softmax is described by its maximum and sum_c exp(x_c - max), from which the log-sum-exp follows.
#pragma once

#include "fastlt/common.h"

namespace fastlt {

// exp / log that resolve to the float or double function on both the host and the device.
FASTLT_HOST_DEVICE float exponential(float x) { return expf(x); }
FASTLT_HOST_DEVICE double exponential(double x) { return exp(x); }
FASTLT_HOST_DEVICE float natural_log(float x) { return logf(x); }
FASTLT_HOST_DEVICE double natural_log(double x) { return log(x); }

// log sum_c exp(x_c), given the row maximum and sum_c exp(x_c - maximum).
template <typename A>
FASTLT_HOST_DEVICE A log_sum_exp(A maximum, A shifted_sum) {
  return maximum + natural_log(shifted_sum);
}

// Online form of the same statistics (Milakov & Gimelshein, 2018), for kernels that see a row in pieces (a GPU thread
// strides over classes, then the block merges the partial states). A plain aggregate so it can live in __shared__.
template <typename A>
struct SoftmaxStats {
  A maximum;      // -inf while empty; NaN once a NaN was seen (it then spreads to the sum and everything after)
  A shifted_sum;  // sum of exp(x - maximum) over the elements seen
};

template <typename A>
FASTLT_HOST_DEVICE SoftmaxStats<A> empty_softmax_stats() {
  return {static_cast<A>(-INFINITY), A(0)};
}

// Adds one element: rescales the sum when the maximum moves, so each element costs one exp.
template <typename A>
FASTLT_HOST_DEVICE void add_to_softmax_stats(SoftmaxStats<A>& stats, A x) {
  if (x > stats.maximum || x != x) {
    stats.shifted_sum = stats.shifted_sum * exponential(stats.maximum - x) + A(1);
    stats.maximum = x;
  } else {
    stats.shifted_sum += exponential(x - stats.maximum);
  }
}

// The statistics of the union of two disjoint parts of a row.
template <typename A>
FASTLT_HOST_DEVICE SoftmaxStats<A> merge_softmax_stats(SoftmaxStats<A> a, SoftmaxStats<A> b) {
  const A maximum = (b.maximum > a.maximum || b.maximum != b.maximum) ? b.maximum : a.maximum;
  if (maximum == static_cast<A>(-INFINITY)) return a;  // both empty: exp(-inf - -inf) would be NaN
  return {maximum, a.shifted_sum * exponential(a.maximum - maximum) + b.shifted_sum * exponential(b.maximum - maximum)};
}

// Cross-entropy -log softmax(x)_y from the row statistics and the target's logit x_y.
template <typename A>
FASTLT_HOST_DEVICE A cross_entropy(A maximum, A shifted_sum, A target_logit) {
  return log_sum_exp(maximum, shifted_sum) - target_logit;
}

}  // namespace fastlt
