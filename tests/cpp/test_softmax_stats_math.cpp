// The online softmax statistics of fastlt/softmax_stats.h (the CUDA kernels of the fused losses build them per thread,
// then merge over the block) against the two-pass (max, then sum of exp) form the CPU kernels use.
#include <cmath>
#include <limits>

#include "check.h"
#include "fastlt/softmax_stats.h"

using namespace fastlt;

int main() {
  const double row[] = {3.0, -1.5, 7.25, 7.25, 0.0, -40.0, 2.5};
  const int n = 7;
  double maximum = -INFINITY, sum = 0;
  for (double x : row) maximum = std::fmax(maximum, x);
  for (double x : row) sum += std::exp(x - maximum);

  // Element by element, in order.
  SoftmaxStats<double> whole = empty_softmax_stats<double>();
  for (double x : row) add_to_softmax_stats(whole, x);
  CHECK(whole.maximum == maximum);
  CHECK_NEAR(whole.shifted_sum, sum, 1e-15);

  // As a block of 3 threads does it: strided parts, then merged; an empty part merges as a no-op.
  SoftmaxStats<double> parts[4] = {empty_softmax_stats<double>(), empty_softmax_stats<double>(),
                                   empty_softmax_stats<double>(), empty_softmax_stats<double>()};
  for (int c = 0; c < n; ++c) add_to_softmax_stats(parts[c % 3], row[c]);
  SoftmaxStats<double> merged = merge_softmax_stats(parts[3], parts[0]);
  merged = merge_softmax_stats(merge_softmax_stats(merged, parts[1]), parts[2]);
  CHECK(merged.maximum == maximum);
  CHECK_NEAR(merged.shifted_sum, sum, 1e-15);
  CHECK_NEAR(cross_entropy(merged.maximum, merged.shifted_sum, row[1]), std::log(sum) + maximum - row[1], 1e-15);

  // Two empty parts stay empty (no NaN from -inf - -inf).
  const SoftmaxStats<double> empty = merge_softmax_stats(parts[3], empty_softmax_stats<double>());
  CHECK(empty.maximum == -INFINITY && empty.shifted_sum == 0.0);

  // A NaN anywhere makes the statistics NaN, whether added or merged.
  SoftmaxStats<double> with_nan = whole;
  add_to_softmax_stats(with_nan, std::numeric_limits<double>::quiet_NaN());
  add_to_softmax_stats(with_nan, 100.0);
  CHECK(std::isnan(log_sum_exp(with_nan.maximum, with_nan.shifted_sum)));
  CHECK(std::isnan(merge_softmax_stats(whole, with_nan).shifted_sum));
  CHECK(std::isnan(merge_softmax_stats(with_nan, whole).shifted_sum));

  // float: the same in single precision.
  SoftmaxStats<float> single = empty_softmax_stats<float>();
  for (double x : row) add_to_softmax_stats(single, static_cast<float>(x));
  CHECK_NEAR(single.shifted_sum, sum, 1e-6);
  return report("test_softmax_stats_math");
}
