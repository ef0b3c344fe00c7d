// CPU kernel of fastlt::ride_loss: OpenMP (at::parallel_for) over sample rows; each row's E expert rows are read
// once into L2-resident scratch, their softmax statistics computed with vectorised exp, and the loss and
// d loss / d logits written in the same pass. Per-row math: fastlt/ride_loss.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "cpu/softmax_vectorized.h"
#include "fastlt/ride_loss.h"
#include "kernels.h"
#include "loss_checks.h"

namespace fastlt {
namespace cpu {
namespace {

// sum_c mean_exp[c] * (mean_logits[c] - expert[c] * inverse_temperature[c]): the unnormalised KL gap.
template <typename A>
FASTLT_ALWAYS_INLINE A mean_gap_impl(const A* mean_exp, const A* mean_logits, const A* expert,
                                     const A* inverse_temperature, int64_t n) {
  A gap = A(0);
#pragma omp simd reduction(+ : gap)
  for (int64_t c = 0; c < n; ++c)
    gap += ride_loss::weighted_gap_term(mean_exp[c], mean_logits[c],
                                        ride_loss::tempered_logit(expert[c], inverse_temperature[c]));
  return gap;
}

// out[c] = the non-target gradient of ride_loss::logit_gradient; expert_exp == nullptr: no diversity term.
template <typename A>
FASTLT_ALWAYS_INLINE void gradient_row_impl(const A* ce_exp, A inv_ce_sum, A ce_coef, const A* expert_exp,
                                            A inv_expert_sum, const A* mean_exp, A inv_mean_sum,
                                            const A* inverse_temperature, A div_coef, A* out, int64_t n) {
  if (expert_exp == nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) out[c] = ce_coef * (ce_exp[c] * inv_ce_sum);
    return;
  }
#pragma omp simd
  for (int64_t c = 0; c < n; ++c)
    out[c] = ride_loss::logit_gradient(ce_coef, ce_exp[c] * inv_ce_sum, false, div_coef, expert_exp[c] * inv_expert_sum,
                                       mean_exp[c] * inv_mean_sum, inverse_temperature[c]);
}

FASTLT_PER_ISA float mean_gap(const float* a, const float* b, const float* c, const float* d, int64_t n) {
  return mean_gap_impl(a, b, c, d, n);
}
FASTLT_PER_ISA double mean_gap(const double* a, const double* b, const double* c, const double* d, int64_t n) {
  return mean_gap_impl(a, b, c, d, n);
}
FASTLT_PER_ISA void gradient_row(const float* ce_exp, float inv_ce_sum, float ce_coef, const float* expert_exp,
                                 float inv_expert_sum, const float* mean_exp, float inv_mean_sum,
                                 const float* inverse_temperature, float div_coef, float* out, int64_t n) {
  gradient_row_impl(ce_exp, inv_ce_sum, ce_coef, expert_exp, inv_expert_sum, mean_exp, inv_mean_sum,
                    inverse_temperature, div_coef, out, n);
}
FASTLT_PER_ISA void gradient_row(const double* ce_exp, double inv_ce_sum, double ce_coef, const double* expert_exp,
                                 double inv_expert_sum, const double* mean_exp, double inv_mean_sum,
                                 const double* inverse_temperature, double div_coef, double* out, int64_t n) {
  gradient_row_impl(ce_exp, inv_ce_sum, ce_coef, expert_exp, inv_expert_sum, mean_exp, inv_mean_sum,
                    inverse_temperature, div_coef, out, n);
}

// Softmax statistics of z' = z - margin * onehot(y) with exp(z' - max) written to out. The target is handled
// apart so the vector loops stay branch-free and no cancellation enters the sum.
template <typename A>
std::pair<A, A> margin_softmax(const A* logits, int64_t y, A margin, int64_t C, A* out) {
  const A* no_scale = nullptr;
  const A target_logit = logits[y] - margin;
  A maximum = std::max(row_max(logits, no_scale, y), row_max(logits + y + 1, no_scale, C - y - 1));
  maximum = std::max(maximum, target_logit);
  out[y] = std::exp(target_logit - maximum);
  const A sum = exp_shifted(logits, no_scale, maximum, out, y) + out[y] +
                exp_shifted(logits + y + 1, no_scale, maximum, out + y + 1, C - y - 1);
  return {maximum, sum};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ride_loss(const at::Tensor& expert_logits, const at::Tensor& target,
                                             const at::Tensor& target_margins,
                                             const std::optional<at::Tensor>& class_weights,
                                             const at::Tensor& temperatures, double diversity_factor,
                                             bool compute_grad) {
  const auto tables = check_ride_loss_inputs(expert_logits, target, target_margins, class_weights, temperatures);
  TORCH_CHECK(expert_logits.device().is_cpu(), "fastlt.ride_loss (CPU kernel): expert_logits must be a CPU tensor");
  const int64_t E = expert_logits.size(0), B = expert_logits.size(1), C = expert_logits.size(2);
  const int64_t sE = expert_logits.stride(0), sB = expert_logits.stride(1), sC = expert_logits.stride(2);
  const bool diversity = diversity_factor != 0.0;
  at::Tensor grad = compute_grad ? empty_with_huge_pages({E, B, C}, expert_logits.options())
                                 : at::empty({0}, expert_logits.options());
  at::Tensor row_losses = at::empty({B}, tables.margins.options());
  // Per-thread scratch, [C] each: E logit rows (when not contiguous fp32/fp64), E margin-softmax rows, E expert
  // softmax rows, the mean logits, their exp and one gradient row.
  const int64_t scratch_rows = 3 * E + 3;
  at::Tensor scratch = at::empty({at::get_num_threads(), scratch_rows * C}, tables.margins.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, expert_logits.scalar_type(), "fastlt_ride_loss_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* logits = expert_logits.data_ptr<scalar_t>();
    const at::Tensor target_contiguous = target.contiguous();  // a strided [B] view is read by index
    const int64_t* labels = target_contiguous.data_ptr<int64_t>();
    const A* margins = tables.margins.data_ptr<A>();
    const A* weights = tables.weights.defined() ? tables.weights.data_ptr<A>() : nullptr;
    const at::Tensor inverse_temperature_table = tables.temperatures.reciprocal();
    const A* inverse_temperature = inverse_temperature_table.data_ptr<A>();
    const A mean_temperature = tables.temperatures.mean().item<A>();
    A weight_total = A(0);
    for (int64_t b = 0; b < B; ++b) weight_total += weights == nullptr ? A(1) : weights[labels[b]];
    const A div_coef = static_cast<A>(diversity_factor) * mean_temperature * mean_temperature / static_cast<A>(B);
    scalar_t* grad_out = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    A* losses = row_losses.data_ptr<A>();
    const A* no_scale = nullptr;

    at::parallel_for(0, B, rows_per_task(E * C), [&](int64_t b0, int64_t b1) {
      A* thread_scratch = scratch.data_ptr<A>() + at::get_thread_num() * scratch_rows * C;
      A* staging = thread_scratch;             // E rows
      A* ce_exp = staging + E * C;             // E rows
      A* expert_exp = ce_exp + E * C;          // E rows
      A* mean_logits = expert_exp + E * C;
      A* mean_exp = mean_logits + C;
      A* gradient = mean_exp + C;
      const A* rows[kMaxExperts];
      A ce_sum[kMaxExperts], expert_sum[kMaxExperts];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t y = labels[b];
        const A ce_coef = (weights == nullptr ? A(1) : weights[y]) / weight_total;
        A loss = A(0);
        for (int64_t k = 0; k < E; ++k) {
          rows[k] = contiguous_row<scalar_t, A>(logits + k * sE + b * sB, sC, C, staging + k * C);
          const auto [maximum, sum] = margin_softmax<A>(rows[k], y, margins[y], C, ce_exp + k * C);
          ce_sum[k] = sum;
          loss += ce_coef * cross_entropy(maximum, sum, rows[k][y] - margins[y]);
        }
        A mean_sum = A(1);
        if (diversity) {
          const A inv_experts = A(1) / static_cast<A>(E);
          for (int64_t c = 0; c < C; ++c) {
            A total = rows[0][c];
            for (int64_t k = 1; k < E; ++k) total += rows[k][c];
            mean_logits[c] = ride_loss::tempered_mean_logit(total, inv_experts, inverse_temperature[c]);
          }
          const A mean_max = row_max(mean_logits, no_scale, C);
          mean_sum = exp_shifted(mean_logits, no_scale, mean_max, mean_exp, C);
          for (int64_t k = 0; k < E; ++k) {
            const A expert_max = row_max(rows[k], inverse_temperature, C);
            expert_sum[k] = exp_shifted(rows[k], inverse_temperature, expert_max, expert_exp + k * C, C);
            const A gap = mean_gap(mean_exp, mean_logits, rows[k], inverse_temperature, C);
            loss += div_coef * ride_loss::kl_to_mean(gap, mean_max, mean_sum, expert_max, expert_sum[k]);
          }
        }
        losses[b] = loss;
        if (grad_out == nullptr) continue;
        for (int64_t k = 0; k < E; ++k) {
          const A* ce_row = ce_exp + k * C;
          const A* expert_row = diversity ? expert_exp + k * C : nullptr;
          const A inv_ce_sum = A(1) / ce_sum[k];
          const A inv_expert_sum = diversity ? A(1) / expert_sum[k] : A(0);
          const A inv_mean_sum = A(1) / mean_sum;
          scalar_t* out = grad_out + (k * B + b) * C;
          A* row_gradient = std::is_same_v<scalar_t, A> ? reinterpret_cast<A*>(out) : gradient;
          gradient_row(ce_row, inv_ce_sum, ce_coef, expert_row, inv_expert_sum, mean_exp, inv_mean_sum,
                          inverse_temperature, div_coef, row_gradient, C);
          row_gradient[y] = ride_loss::logit_gradient(
              ce_coef, ce_row[y] * inv_ce_sum, true, div_coef, diversity ? expert_row[y] * inv_expert_sum : A(0),
              diversity ? mean_exp[y] * inv_mean_sum : A(0), inverse_temperature[y]);
          if (!std::is_same_v<scalar_t, A>)
            for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(gradient[c]);
        }
      }
    });
  });
  // Row losses are summed after the parallel part: the result does not depend on how rows were split.
  return {row_losses.sum(), grad};  // fp32 loss for fp16/bf16: it may exceed the fp16 range
}

}  // namespace cpu
}  // namespace fastlt
