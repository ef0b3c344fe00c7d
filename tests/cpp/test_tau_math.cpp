// The per-row math of tau_normalize and tau_sweep (csrc/include/fastlt/tau_*.h) shared by the CPU and CUDA kernels.
#include <cstdint>
#include <initializer_list>
#include <limits>

#include "check.h"
#include "fastlt/tau_normalize.h"
#include "fastlt/tau_sweep.h"

using namespace fastlt;

// Loss L(w) = sum_d g_d * y_d(w) with y = w * ||w||^-tau; its gradient from the shared formula vs finite differences.
static void check_gradient(const double* w, const double* g, int D, double tau) {
  double sum_squares = 0, dot = 0;
  for (int d = 0; d < D; ++d) sum_squares += w[d] * w[d], dot += g[d] * w[d];
  const double scale = tau_normalize::row_scale(sum_squares, tau, 1e-12);
  const double coefficient = tau_normalize::row_grad_weight_coefficient(sum_squares, dot, tau, 1e-12);
  auto loss = [&](const double* v) {
    double ss = 0, out = 0;
    for (int d = 0; d < D; ++d) ss += v[d] * v[d];
    const double s = tau_normalize::row_scale(ss, tau, 1e-12);
    for (int d = 0; d < D; ++d) out += g[d] * v[d] * s;
    return out;
  };
  for (int d = 0; d < D; ++d) {
    double plus[8], minus[8];
    for (int i = 0; i < D; ++i) plus[i] = minus[i] = w[i];
    plus[d] += 1e-6;
    minus[d] -= 1e-6;
    CHECK_NEAR(scale * g[d] - coefficient * w[d], (loss(plus) - loss(minus)) / 2e-6, 1e-7);
  }
}

int main() {
  // row_scale: ||(3, 4)|| = 5.
  CHECK_NEAR(tau_normalize::row_scale(25.0, 1.0, 1e-12), 0.2, 1e-15);
  CHECK_NEAR(tau_normalize::row_scale(25.0, 0.0, 1e-12), 1.0, 0);
  CHECK_NEAR(tau_normalize::row_scale(25.0, 2.0, 1e-12), 0.04, 1e-15);
  CHECK_NEAR(tau_normalize::row_scale(0.0, 1.0, 1e-3), 1e3, 1e-12);  // clamped by eps
  CHECK(tau_normalize::row_grad_weight_coefficient(0.0, 1.0, 1.0, 1e-3) == 0.0);
  // A row holding a NaN: NaN scale and gradient (not eps ** -tau); tau = 0 still leaves the row unchanged.
  const double nan_norm = std::numeric_limits<double>::quiet_NaN();
  CHECK(std::isnan(tau_normalize::row_scale(nan_norm, 1.0, 1e-12)));
  CHECK(tau_normalize::row_scale(nan_norm, 0.0, 1e-12) == 1.0);
  CHECK(std::isnan(tau_normalize::row_grad_weight_coefficient(nan_norm, 1.0, 0.0, 1e-12)));
  const double w[5] = {0.3, -1.2, 0.7, 2.0, -0.1}, g[5] = {1.0, 0.5, -2.0, 0.25, 3.0};
  for (double tau : {0.0, 0.3, 1.0, 1.7}) check_gradient(w, g, 5, tau);

  // argmax semantics: first index wins ties, NaN wins, first NaN wins.
  CHECK(argmax_better(1.0, 3, 0.0, -1));  // anything beats "nothing seen"
  CHECK(!argmax_better(2.0, 5, 2.0, 1));
  CHECK(argmax_better(2.0, 1, 2.0, 5));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  CHECK(argmax_better(nan, 7, 1e300, 0));
  CHECK(!argmax_better(1e300, 0, nan, 7));
  CHECK(argmax_better(nan, 2, nan, 7));

  // scan: raw logits rescaled per class, with bias.
  const double raw[4] = {1.0, 4.0, 3.0, 4.0};
  const double scales[4] = {1.0, 0.5, 1.0, 0.5};
  double best = 0;
  int64_t index = -1;
  tau_sweep::scan<double>(raw, scales, nullptr, 0, 4, 1, &best, &index);
  CHECK(index == 2 && best == 3.0);
  const double bias[4] = {0.0, 1.5, 0.0, 1.5};  // 3.5 at 1 and 3: the first wins
  index = -1;
  tau_sweep::scan<double>(raw, scales, bias, 0, 4, 1, &best, &index);
  CHECK(index == 1 && best == 3.5);
  // A strided scan (as one CUDA thread does) then a merge gives the same answer.
  double best_even = 0, best_odd = 0;
  int64_t even = -1, odd = -1;
  tau_sweep::scan<double>(raw, scales, bias, 0, 4, 2, &best_even, &even);
  tau_sweep::scan<double>(raw, scales, bias, 1, 4, 2, &best_odd, &odd);
  CHECK((argmax_better(best_odd, odd, best_even, even) ? odd : even) == 1);
  return report("tau math");
}
