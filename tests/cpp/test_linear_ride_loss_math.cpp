// The per-class math of fastlt/linear_ride_loss.h (shared by the CPU and CUDA kernels of linear_ride_loss): the
// column-scaled logit, the chunked KL gap (rescaled between softmax maxima) against the one-pass KL, and the cosine
// classifier's row-local weight gradient against central finite differences, in double.
#include <cmath>

#include "check.h"
#include "fastlt/linear_ride_loss.h"

using namespace fastlt;

constexpr int kClasses = 7;
constexpr int kDim = 3;

// KL(softmax(v) || softmax(u)) computed directly.
static double direct_kl(const double* v, const double* u) {
  double v_max = -INFINITY, u_max = -INFINITY, v_sum = 0, u_sum = 0;
  for (int c = 0; c < kClasses; ++c) v_max = std::fmax(v_max, v[c]), u_max = std::fmax(u_max, u[c]);
  for (int c = 0; c < kClasses; ++c) v_sum += std::exp(v[c] - v_max), u_sum += std::exp(u[c] - u_max);
  double kl = 0;
  for (int c = 0; c < kClasses; ++c) {
    const double p = std::exp(v[c] - v_max) / v_sum;
    kl += p * ((v[c] - v_max - std::log(v_sum)) - (u[c] - u_max - std::log(u_sum)));
  }
  return kl;
}

// The kernels' chunked form: statistics of each chunk merged online, the gap rescaled to the merged maximum.
static double chunked_kl(const double* v, const double* u, int split) {
  SoftmaxStats<double> mean = empty_softmax_stats<double>(), expert = empty_softmax_stats<double>();
  double gap = 0;
  const int bounds[3] = {0, split, kClasses};
  for (int chunk = 0; chunk < 2; ++chunk) {
    SoftmaxStats<double> chunk_mean = empty_softmax_stats<double>(), chunk_expert = empty_softmax_stats<double>();
    for (int c = bounds[chunk]; c < bounds[chunk + 1]; ++c) {
      add_to_softmax_stats(chunk_mean, v[c]);
      add_to_softmax_stats(chunk_expert, u[c]);
    }
    double chunk_gap = 0;
    for (int c = bounds[chunk]; c < bounds[chunk + 1]; ++c)
      chunk_gap += ride_loss::weighted_gap_term(std::exp(v[c] - chunk_mean.maximum), v[c], u[c]);
    const SoftmaxStats<double> merged = merge_softmax_stats(mean, chunk_mean);
    gap = linear_ride_loss::rescale(gap, mean.maximum, merged.maximum) +
          linear_ride_loss::rescale(chunk_gap, chunk_mean.maximum, merged.maximum);
    mean = merged;
    expert = merge_softmax_stats(expert, chunk_expert);
  }
  return ride_loss::kl_to_mean(gap, mean.maximum, mean.shifted_sum, expert.maximum, expert.shifted_sum);
}

static double norm(const double* w) { return std::sqrt(w[0] * w[0] + w[1] * w[1] + w[2] * w[2]); }

// dz * z with z = scale * x_hat . w / ||w|| (the cosine logit whose weight gradient the header corrects).
static double cosine_objective(const double* x_hat, const double* w, double scale, double dz) {
  return dz * scale * (x_hat[0] * w[0] + x_hat[1] * w[1] + x_hat[2] * w[2]) / norm(w);
}

int main() {
  CHECK_NEAR(linear_ride_loss::chunk_logit(0.5, 4.0, -1.25), 0.75, 1e-15);
  CHECK(linear_ride_loss::rescale<double>(3.0, -INFINITY, 2.0) == 0.0);  // an empty running gap stays 0
  CHECK_NEAR(linear_ride_loss::rescale(3.0, 1.0, 2.0), 3.0 * std::exp(-1.0), 1e-15);

  // The chunked gap gives the one-pass KL wherever the chunks split the classes, with the maximum in either chunk.
  const double v[kClasses] = {0.3, -1.2, 2.5, 0.1, -0.7, 1.9, 0.0};
  const double u[kClasses] = {-0.4, 0.8, 1.1, 3.0, -2.2, 0.5, 0.9};
  const double expected = direct_kl(v, u);
  for (int split = 1; split < kClasses; ++split) CHECK_NEAR(chunked_kl(v, u, split), expected, 1e-12);

  // Weight gradient: p = column_scale * dz * x_hat (the GEMM), then p - w * radial_coefficient(w . p).
  const double x_hat[kDim] = {0.48, -0.6, 0.64};  // unit norm
  const double w[kDim] = {1.3, 0.4, -2.1};
  const double scale = 30.0, dz = -0.37;
  const double column_scale = scale / norm(w);
  double p[kDim], radial = 0;
  for (int i = 0; i < kDim; ++i) p[i] = column_scale * dz * x_hat[i], radial += w[i] * p[i];
  const double coefficient = linear_ride_loss::radial_coefficient(radial, column_scale, scale, true);
  for (int i = 0; i < kDim; ++i) {
    const double h = 1e-6;
    double plus[kDim] = {w[0], w[1], w[2]}, minus[kDim] = {w[0], w[1], w[2]};
    plus[i] += h;
    minus[i] -= h;
    const double numeric =
        (cosine_objective(x_hat, plus, scale, dz) - cosine_objective(x_hat, minus, scale, dz)) / (2 * h);
    CHECK_NEAR(p[i] - w[i] * coefficient, numeric, 1e-7);
  }
  // Below F.normalize's eps the norm is a constant: no radial term.
  CHECK(linear_ride_loss::radial_coefficient(radial, column_scale, scale, false) == 0.0);
  return report("test_linear_ride_loss_math");
}
