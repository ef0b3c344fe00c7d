// The per-row math of fastlt/reslt_loss.h and fastlt/prior_shifted_ce.h (shared by the CPU and CUDA kernels): the
// gradient formulas against central finite differences of the loss they describe, on one sample row in double.
#include <cmath>
#include <initializer_list>

#include "check.h"
#include "fastlt/prior_shifted_ce.h"
#include "fastlt/reslt_loss.h"

using namespace fastlt;

constexpr int kClasses = 5;

// Softmax probabilities and cross-entropy of a row (two-pass statistics, as the CPU kernels); with eps > 0 the
// cross-entropy is -log(p_y + eps), computed literally as the official ResLT code does.
static void stats(const double* x, double* probabilities, double* cross_entropy_of, int y, double eps = 0.0) {
  double maximum = -INFINITY, sum = 0;
  for (int c = 0; c < kClasses; ++c) maximum = std::fmax(maximum, x[c]);
  for (int c = 0; c < kClasses; ++c) sum += std::exp(x[c] - maximum);
  for (int c = 0; c < kClasses; ++c) probabilities[c] = std::exp(x[c] - maximum) / sum;
  *cross_entropy_of = eps > 0 ? -std::log(probabilities[y] + eps) : cross_entropy(maximum, sum, x[y]);
}

// The header's (CE_eps, r) of a row, from its statistics.
static void header_epsilon_terms(const double* x, int y, double eps, double* loss, double* scale) {
  double maximum = -INFINITY, sum = 0;
  for (int c = 0; c < kClasses; ++c) maximum = std::fmax(maximum, x[c]);
  for (int c = 0; c < kClasses; ++c) sum += std::exp(x[c] - maximum);
  *loss = reslt_loss::epsilon_cross_entropy(maximum, sum, x[y], eps);
  *scale = reslt_loss::epsilon_gradient_scale(maximum, sum, x[y], eps);
}

// ResLT loss of one row with 2 branches, branch 1 in its group only when `in_group`; eps in the branch terms,
// fused_eps in the fused term.
static double reslt_row_loss(const double z[2][kClasses], int y, bool in_group, double ice, double fused_coef,
                             double eps, double fused_eps) {
  double fused[kClasses], p[kClasses], ce0, ce1, ce_fused;
  for (int c = 0; c < kClasses; ++c) fused[c] = z[0][c] + z[1][c];
  stats(z[0], p, &ce0, y, eps);
  stats(z[1], p, &ce1, y, eps);
  stats(fused, p, &ce_fused, y, fused_eps);
  return ice * (ce0 + (in_group ? ce1 : 0.0)) + fused_coef * ce_fused;
}

int main() {
  const int y = 3;
  const double beta = 0.8;
  CHECK_NEAR(reslt_loss::ice_coefficient(beta, int64_t(4), kReductionMean), 0.2, 1e-15);
  CHECK(reslt_loss::ice_coefficient(beta, int64_t(0), kReductionMean) == 0.0);
  CHECK_NEAR(reslt_loss::fused_coefficient(beta, int64_t(2), kReductionMean), 0.1, 1e-15);
  // Every row ignored: no normaliser, and the coefficients are 0 rather than a division by zero.
  CHECK(reslt_loss::fused_coefficient(beta, int64_t(0), kReductionMean) == 0.0);
  CHECK(reslt_loss::fused_coefficient(beta, int64_t(0), kReductionSum) == 0.0);
  // "sum" and "none" have no normaliser.
  for (int64_t reduction : {int64_t(kReductionSum), int64_t(kReductionNone)}) {
    CHECK(reslt_loss::ice_coefficient(beta, int64_t(4), reduction) == beta);
    CHECK(reslt_loss::fused_coefficient(beta, int64_t(2), reduction) == 1.0 - beta);
  }

  const double ice = reslt_loss::ice_coefficient(beta, int64_t(3), kReductionMean),
               fused_coef = reslt_loss::fused_coefficient(beta, int64_t(2), kReductionMean);
  // eps = 0.05 and 0.5 are of the order of p_y here, so the epsilon changes both the loss and its gradient; the
  // fused term takes its own epsilon (0: the official CIFAR / iNat scripts' exact nn.CrossEntropyLoss).
  for (double eps : {0.0, 1e-7, 0.05, 0.5}) {
    for (bool in_group : {false, true}) {
      const double fused_eps = in_group ? eps : 0.5 - eps;
      double z[2][kClasses] = {{1.0, -2.0, 0.5, 3.0, -0.25}, {0.3, 2.0, -1.0, 0.0, 1.5}};
      double fused[kClasses], fused_p[kClasses], branch_p[kClasses], expected_loss, loss, fused_scale, branch_scale;
      for (int c = 0; c < kClasses; ++c) fused[c] = z[0][c] + z[1][c];
      stats(fused, fused_p, &expected_loss, y, fused_eps);
      header_epsilon_terms(fused, y, fused_eps, &loss, &fused_scale);
      CHECK_NEAR(loss, expected_loss, 1e-12);
      stats(z[1], branch_p, &expected_loss, y, eps);
      header_epsilon_terms(z[1], y, eps, &loss, &branch_scale);
      CHECK_NEAR(loss, expected_loss, 1e-12);
      CHECK(eps > 0 || branch_scale == 1.0);
      CHECK(fused_eps > 0 || fused_scale == 1.0);
      for (int c = 0; c < kClasses; ++c) {
        const double analytic = reslt_loss::logit_gradient(ice * branch_scale, in_group, branch_p[c],
                                                           fused_coef * fused_scale, fused_p[c], c == y);
        const double h = 1e-6, saved = z[1][c];
        z[1][c] = saved + h;
        const double up = reslt_row_loss(z, y, in_group, ice, fused_coef, eps, fused_eps);
        z[1][c] = saved - h;
        const double down = reslt_row_loss(z, y, in_group, ice, fused_coef, eps, fused_eps);
        z[1][c] = saved;
        CHECK_NEAR(analytic, (up - down) / (2 * h), 1e-8);
      }
    }
  }
  // Where softmax_y underflows, eps = 0 keeps the exact log-sum-exp loss and eps > 0 caps it at -log(eps).
  const double far[kClasses] = {0.0, 0.0, 0.0, -800.0, 0.0};
  double capped, capped_scale;
  header_epsilon_terms(far, y, 0.0, &capped, &capped_scale);
  CHECK_NEAR(capped, 800.0 + std::log(4.0), 1e-9);
  header_epsilon_terms(far, y, 1e-7, &capped, &capped_scale);
  CHECK_NEAR(capped, -std::log(1e-7), 1e-12);
  CHECK(capped_scale == 0.0);

  // prior_shifted_ce: coef = 1 / N (kept rows) under "mean", 1 under "sum" and "none", 0 when no row is kept; d/dz of
  // coef * CE(z + shift) is coef * (softmax(z + shift) - onehot).
  CHECK(prior_shifted_ce::row_coefficient<double>(int64_t(4), kReductionMean) == 0.25);
  for (int64_t reduction : {int64_t(kReductionMean), int64_t(kReductionSum), int64_t(kReductionNone)})
    CHECK(prior_shifted_ce::row_coefficient<double>(int64_t(0), reduction) == 0.0);
  CHECK(prior_shifted_ce::row_coefficient<double>(int64_t(4), kReductionSum) == 1.0);
  CHECK(prior_shifted_ce::row_coefficient<double>(int64_t(4), kReductionNone) == 1.0);
  const double inverse_batch = prior_shifted_ce::row_coefficient<double>(int64_t(4), kReductionMean);
  double shifted[kClasses] = {0.5, -1.0, 2.0, 0.0, -3.0}, p[kClasses], ce;
  stats(shifted, p, &ce, y);
  for (int c = 0; c < kClasses; ++c) {
    const double h = 1e-6, saved = shifted[c];
    double q[kClasses], up, down;
    shifted[c] = saved + h;
    stats(shifted, q, &up, y);
    shifted[c] = saved - h;
    stats(shifted, q, &down, y);
    shifted[c] = saved;
    CHECK_NEAR(prior_shifted_ce::logit_gradient(inverse_batch, p[c], c == y), inverse_batch * (up - down) / (2 * h),
               1e-8);
  }
  return report("test_loss_row_math");
}
