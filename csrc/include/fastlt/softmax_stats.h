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

// Cross-entropy -log softmax(x)_y from the row statistics and the target's logit x_y.
template <typename A>
FASTLT_HOST_DEVICE A cross_entropy(A maximum, A shifted_sum, A target_logit) {
  return log_sum_exp(maximum, shifted_sum) - target_logit;
}

}  // namespace fastlt
