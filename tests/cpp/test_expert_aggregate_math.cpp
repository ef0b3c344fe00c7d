// The per-row math of expert_aggregate (csrc/include/fastlt/expert_aggregate.h) that the CPU and CUDA kernels share.
#include "check.h"
#include "fastlt/expert_aggregate.h"

using namespace fastlt::expert_aggregate;

int main() {
  double unweighted[4], coef[4];
  // Plain mean over 4 experts.
  CHECK(row_coefficients<double>(4, kMean, nullptr, nullptr, unweighted, coef) == 4);
  for (int k = 0; k < 4; ++k) CHECK_NEAR(coef[k], 0.25, 0);
  // Sum ignores the count.
  row_coefficients<double>(4, kSum, nullptr, nullptr, unweighted, coef);
  for (int k = 0; k < 4; ++k) CHECK_NEAR(coef[k], 1.0, 0);
  // Routed mean: two of four experts active, weighted.
  const bool active[4] = {true, false, true, false};
  const double weights[4] = {2.0, 5.0, 4.0, 7.0};
  CHECK(row_coefficients<double>(4, kMean, weights, active, unweighted, coef) == 2);
  CHECK_NEAR(unweighted[0], 0.5, 0);
  CHECK_NEAR(unweighted[1], 0.0, 0);
  CHECK_NEAR(coef[0], 1.0, 0);
  CHECK_NEAR(coef[1], 0.0, 0);
  CHECK_NEAR(coef[2], 2.0, 0);
  // No active expert: zero coefficients and a zero count (the kernels refuse such rows before this point).
  const bool none[2] = {false, false};
  CHECK(row_coefficients<double>(2, kMean, nullptr, none, unweighted, coef) == 0);
  CHECK(coef[0] == 0.0 && coef[1] == 0.0);
  // One element of [E=3, B, C] logits with expert stride 10: sum_k coef_k * z_k in order k = 0..2.
  const float logits[21] = {1.f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2.f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4.f};
  const float c3[3] = {0.5f, 0.25f, 1.0f};
  const float element = aggregate_element<float, float>(logits, 10, 3, c3);
  CHECK_NEAR(element, 0.5 + 0.5 + 4.0, 0);
  return report("expert_aggregate math");
}
