// CPU kernel of fastlt::ride_loss: OpenMP (at::parallel_for) over sample rows. A sample's E expert rows stay in L2
// while three vector passes run over them: (1) the softmax shifts and the tempered expert mean, (2) every exp (the
// LDAM-margin CE and the tempered expert softmax: 2E + 1 exps per class) with their sums, the KL gap and the loss,
// (3) d loss / d logits. Pass 2 prefetches the next sample's logit and gradient rows, so DRAM traffic overlaps the
// exp arithmetic that bounds the kernel. A row whose label is ignore_index is skipped: zero terms, zero gradient.
// Per-row math: fastlt/ride_loss.h; reductions and normalisers: docs/methods.md 6.5.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/softmax_vectorized.h"
#include "fastlt/ride_loss.h"
#include "loss_checks.h"

namespace fastlt {
namespace cpu {
namespace {

// Pass 1 over one expert row (a class range that excludes the target): the CE shift max_c z[c], the tempered shift
// max_c z[c] / T_c, and the experts' running total (first expert: stored; others: added), which the last expert turns
// into the tempered mean logits v. maxima = {CE max, tempered max, mean max}, updated in place.
template <typename A>
FASTLT_ALWAYS_INLINE void expert_maxima_impl(const A* logits, const A* inverse_temperature, A* total, bool first,
                                             bool last, A inverse_experts, int64_t n, A* maxima) {
  A ce_max = maxima[0], expert_max = maxima[1], mean_max = maxima[2];
  if (last) {
#pragma omp simd reduction(max : ce_max, expert_max, mean_max)
    for (int64_t c = 0; c < n; ++c) {
      ce_max = logits[c] > ce_max ? logits[c] : ce_max;
      const A u = ride_loss::tempered_logit(logits[c], inverse_temperature[c]);
      expert_max = u > expert_max ? u : expert_max;
      const A expert_total = first ? logits[c] : total[c] + logits[c];
      const A v = ride_loss::tempered_mean_logit(expert_total, inverse_experts, inverse_temperature[c]);
      total[c] = v;
      mean_max = v > mean_max ? v : mean_max;
    }
  } else {
#pragma omp simd reduction(max : ce_max, expert_max)
    for (int64_t c = 0; c < n; ++c) {
      ce_max = logits[c] > ce_max ? logits[c] : ce_max;
      const A u = ride_loss::tempered_logit(logits[c], inverse_temperature[c]);
      expert_max = u > expert_max ? u : expert_max;
      total[c] = first ? logits[c] : total[c] + logits[c];
    }
  }
  maxima[0] = ce_max;
  maxima[1] = expert_max;
  maxima[2] = mean_max;
}

// Pass 2 over one expert row (a class range without the target): ce_exp = exp(z - ce_max) and, with the diversity
// term (inverse_temperature != nullptr), expert_exp = exp(z / T - expert_max) and the unnormalised KL gap
// sum_c exp(v_c - mean_max) (v_c - u_c). sums = {CE sum, expert sum, gap}, updated in place. Each chunk of 256 classes
// first prefetches the same classes of the next sample's row (next_logits, next_out: nullptr for none).
template <typename A>
FASTLT_ALWAYS_INLINE void expert_exps_impl(const A* logits, const A* inverse_temperature, A ce_max, A expert_max,
                                           const A* mean_exp, const A* mean_logits, A* ce_exp, A* expert_exp, int64_t n,
                                           const A* next_logits, A* next_out, A* sums) {
  constexpr int64_t kChunk = 256;
  A ce_sum = sums[0], expert_sum = sums[1], gap = sums[2];
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    prefetch_lines(next_logits == nullptr ? nullptr : next_logits + c0, next_out == nullptr ? nullptr : next_out + c0,
                   c1 - c0);
    if (inverse_temperature == nullptr) {
#pragma omp simd reduction(+ : ce_sum)
      for (int64_t c = c0; c < c1; ++c) {
        const A e = vector_exp(logits[c] - ce_max);
        ce_exp[c] = e;
        ce_sum += e;
      }
      continue;
    }
#pragma omp simd reduction(+ : ce_sum, expert_sum, gap)
    for (int64_t c = c0; c < c1; ++c) {
      const A e = vector_exp(logits[c] - ce_max);
      ce_exp[c] = e;
      ce_sum += e;
      const A u = ride_loss::tempered_logit(logits[c], inverse_temperature[c]);
      const A expert = vector_exp(u - expert_max);
      expert_exp[c] = expert;
      expert_sum += expert;
      gap += ride_loss::weighted_gap_term(mean_exp[c], mean_logits[c], u);
    }
  }
  sums[0] = ce_sum;
  sums[1] = expert_sum;
  sums[2] = gap;
}

// out[c] = the non-target gradient of ride_loss::logit_gradient; expert_exp == nullptr: no diversity term. out may
// be ce_exp itself (the CE exps are kept in the gradient row until it is written).
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

#define FASTLT_RIDE_ROW_FUNCTIONS(A)                                                                                \
  FASTLT_PER_ISA void expert_maxima(const A* logits, const A* inverse_temperature, A* total, bool first, bool last, \
                                    A inverse_experts, int64_t n, A* maxima) {                                      \
    expert_maxima_impl(logits, inverse_temperature, total, first, last, inverse_experts, n, maxima);                \
  }                                                                                                                 \
  FASTLT_PER_ISA void expert_exps(const A* logits, const A* inverse_temperature, A ce_max, A expert_max,            \
                                  const A* mean_exp, const A* mean_logits, A* ce_exp, A* expert_exp, int64_t n,     \
                                  const A* next_logits, A* next_out, A* sums) {                                     \
    expert_exps_impl(logits, inverse_temperature, ce_max, expert_max, mean_exp, mean_logits, ce_exp, expert_exp, n, \
                     next_logits, next_out, sums);                                                                  \
  }                                                                                                                 \
  FASTLT_PER_ISA void gradient_row(const A* ce_exp, A inv_ce_sum, A ce_coef, const A* expert_exp, A inv_expert_sum, \
                                   const A* mean_exp, A inv_mean_sum, const A* inverse_temperature, A div_coef,     \
                                   A* out, int64_t n) {                                                             \
    gradient_row_impl(ce_exp, inv_ce_sum, ce_coef, expert_exp, inv_expert_sum, mean_exp, inv_mean_sum,              \
                      inverse_temperature, div_coef, out, n);                                                       \
  }
FASTLT_RIDE_ROW_FUNCTIONS(float)
FASTLT_RIDE_ROW_FUNCTIONS(double)
#undef FASTLT_RIDE_ROW_FUNCTIONS

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> ride_loss(const at::Tensor& expert_logits, const at::Tensor& target,
                                                         const at::Tensor& target_margins,
                                                         const std::optional<at::Tensor>& class_weights,
                                                         const at::Tensor& temperatures, double diversity_factor,
                                                         int64_t reduction, int64_t ignore_index, bool compute_grad) {
  check_reduction(reduction, "fastlt.ride_loss");
  const auto tables = check_ride_loss_inputs(expert_logits, target, target_margins, class_weights, temperatures,
                                             diversity_factor, ignore_index);
  TORCH_CHECK(expert_logits.device().is_cpu(), "fastlt.ride_loss (CPU kernel): expert_logits must be a CPU tensor");
  const int64_t E = expert_logits.size(0), B = expert_logits.size(1), C = expert_logits.size(2);
  const int64_t sE = expert_logits.stride(0), sB = expert_logits.stride(1), sC = expert_logits.stride(2);
  const bool diversity = diversity_factor != 0.0;
  at::Tensor grad = compute_grad ? empty_with_huge_pages({E, B, C}, expert_logits.options())
                                 : at::empty({0}, expert_logits.options());
  at::Tensor row_losses = at::empty({B}, tables.margins.options());
  at::Tensor row_terms = at::empty({B, 2 * E}, tables.margins.options());  // [b, k]: CE of expert k, [b, E + k]: KL
  // Per-thread scratch, [C] each: E logit rows (when not contiguous fp32/fp64), E CE exp rows (when the gradient
  // rows cannot hold them), E tempered expert exp rows, the tempered mean logits, their exp and one gradient row.
  const int64_t scratch_rows = 3 * E + 3;
  at::Tensor scratch = at::empty({at::get_num_threads(), scratch_rows * C}, tables.margins.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, expert_logits.scalar_type(), "fastlt_ride_loss_cpu", [&] {
    using A = acc_t<scalar_t>;
    constexpr bool kAccumulatesInInputType = std::is_same_v<scalar_t, A>;
    const scalar_t* logits = expert_logits.data_ptr<scalar_t>();
    const at::Tensor target_contiguous = target.contiguous();  // a strided [B] view is read by index
    const int64_t* labels = target_contiguous.data_ptr<int64_t>();
    const A* margins = tables.margins.data_ptr<A>();
    const A* weights = tables.weights.defined() ? tables.weights.data_ptr<A>() : nullptr;
    const at::Tensor inverse_temperature_table = tables.temperatures.reciprocal();
    const A* inverse_temperature = inverse_temperature_table.data_ptr<A>();
    const A* diversity_temperature = diversity ? inverse_temperature : nullptr;  // nullptr: CE only
    const A mean_temperature = tables.temperatures.mean().item<A>();
    // The normalisers under mean (docs/methods.md 6.5): W = the kept rows' DRW weights (their count without DRW)
    // for the CE terms, N = the kept rows for the diversity terms; 1 for sum and none. W = 0 (every row ignored, or
    // zero class weights) or N = 0 gives zero coefficients, not a division by 0.
    const bool mean = reduction == kReductionMean;
    A weight_total = A(0);
    int64_t kept_rows = 0;
    for (int64_t b = 0; b < B; ++b) {
      if (labels[b] == ignore_index) continue;
      weight_total += weights == nullptr ? A(1) : weights[labels[b]];
      ++kept_rows;
    }
    const A ce_normaliser = mean ? weight_total : A(1);
    const A diversity_normaliser = mean ? static_cast<A>(kept_rows) : A(1);
    const A diversity_scale = static_cast<A>(diversity_factor) * mean_temperature * mean_temperature;
    const A div_coef = kept_rows > 0 ? diversity_scale / diversity_normaliser : A(0);
    const A inverse_experts = A(1) / static_cast<A>(E);
    scalar_t* grad_out = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    // fp32/fp64: logit rows are read in place when contiguous, and each gradient row holds its CE exps until the
    // gradient overwrites them (no scratch row between the two passes).
    A* grad_rows = kAccumulatesInInputType && compute_grad ? reinterpret_cast<A*>(grad_out) : nullptr;
    const A* in_place_logits = kAccumulatesInInputType && sC == 1 ? reinterpret_cast<const A*>(logits) : nullptr;
    A* losses = row_losses.data_ptr<A>();
    A* terms = row_terms.data_ptr<A>();
    const A* no_scale = nullptr;
    constexpr A kNoMax = -std::numeric_limits<A>::infinity();

    at::parallel_for(0, B, rows_per_task(E * C), [&](int64_t b0, int64_t b1) {
      A* thread_scratch = scratch.data_ptr<A>() + at::get_thread_num() * scratch_rows * C;
      A* staging = thread_scratch;         // E rows
      A* ce_scratch = staging + E * C;     // E rows
      A* expert_exp = ce_scratch + E * C;  // E rows
      A* mean_logits = expert_exp + E * C;
      A* mean_exp = mean_logits + C;
      A* gradient = mean_exp + C;
      const A* rows[kMaxExperts];
      A ce_max[kMaxExperts], expert_max[kMaxExperts], ce_sum[kMaxExperts], expert_sum[kMaxExperts];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t y = labels[b];
        A* row_terms_b = terms + b * 2 * E;
        if (y == ignore_index) {
          losses[b] = A(0);
          std::fill(row_terms_b, row_terms_b + 2 * E, A(0));
          for (int64_t k = 0; grad_out != nullptr && k < E; ++k)
            std::fill_n(grad_out + (k * B + b) * C, C, static_cast<scalar_t>(0));
          continue;
        }
        // The vector passes run over [0, y) and (y, C), as (first class, count); the target is done by hand.
        const std::pair<int64_t, int64_t> non_target[2] = {{0, y}, {y + 1, C - y - 1}};
        const A margin = margins[y];
        const A ce_coef = ce_normaliser > A(0) ? (weights == nullptr ? A(1) : weights[y]) / ce_normaliser : A(0);

        // Pass 1: the shifts, and the tempered mean logits v (diversity term only).
        A mean_max = kNoMax;
        for (int64_t k = 0; k < E; ++k) {
          rows[k] = contiguous_row<scalar_t, A>(logits + k * sE + b * sB, sC, C, staging + k * C);
          const A* z = rows[k];
          const A target_logit = ride_loss::margin_logit(z[y], true, margin);
          if (!diversity) {
            ce_max[k] = target_logit;
            for (const auto& [c0, n] : non_target) ce_max[k] = std::max(ce_max[k], row_max(z + c0, no_scale, n));
            continue;
          }
          const bool first = k == 0, last = k == E - 1;
          A maxima[3] = {kNoMax, kNoMax, kNoMax};
          for (const auto& [c0, n] : non_target)
            expert_maxima(z + c0, inverse_temperature + c0, mean_logits + c0, first, last, inverse_experts, n, maxima);
          ce_max[k] = std::max(maxima[0], target_logit);
          expert_max[k] = std::max(maxima[1], ride_loss::tempered_logit(z[y], inverse_temperature[y]));
          const A total = first ? z[y] : mean_logits[y] + z[y];
          mean_logits[y] =
              last ? ride_loss::tempered_mean_logit(total, inverse_experts, inverse_temperature[y]) : total;
          if (last) mean_max = std::max(maxima[2], mean_logits[y]);
        }
        const A mean_sum = diversity ? exp_shifted(mean_logits, no_scale, mean_max, mean_exp, C) : A(1);

        // Pass 2: the exps, their sums and the loss, prefetching the next sample's rows.
        const bool has_next = b + 1 < b1;
        A loss = A(0);
        for (int64_t k = 0; k < E; ++k) {
          const A* z = rows[k];
          A* ce_row = grad_rows != nullptr ? grad_rows + (k * B + b) * C : ce_scratch + k * C;
          A* expert_row = expert_exp + k * C;
          const A* next_z = in_place_logits != nullptr && has_next ? in_place_logits + k * sE + (b + 1) * sB : nullptr;
          A* next_out = grad_rows != nullptr && has_next ? grad_rows + (k * B + b + 1) * C : nullptr;
          A sums[3] = {A(0), A(0), A(0)};  // CE sum, expert sum, KL gap
          for (const auto& [c0, n] : non_target)
            expert_exps(z + c0, diversity_temperature == nullptr ? nullptr : diversity_temperature + c0, ce_max[k],
                        expert_max[k], mean_exp + c0, mean_logits + c0, ce_row + c0, expert_row + c0, n,
                        next_z == nullptr ? nullptr : next_z + c0, next_out == nullptr ? nullptr : next_out + c0, sums);
          const A target_logit = ride_loss::margin_logit(z[y], true, margin);
          ce_row[y] = exponential(target_logit - ce_max[k]);
          ce_sum[k] = sums[0] + ce_row[y];
          const A ce_term = ce_coef * cross_entropy(ce_max[k], ce_sum[k], target_logit);
          row_terms_b[k] = ce_term;
          loss += ce_term;
          row_terms_b[E + k] = A(0);
          if (!diversity) continue;
          const A u = ride_loss::tempered_logit(z[y], inverse_temperature[y]);
          expert_row[y] = exponential(u - expert_max[k]);
          expert_sum[k] = sums[1] + expert_row[y];
          const A gap = sums[2] + ride_loss::weighted_gap_term(mean_exp[y], mean_logits[y], u);
          const A kl = ride_loss::kl_to_mean(gap, mean_max, mean_sum, expert_max[k], expert_sum[k]);
          const A diversity_term = div_coef * kl;
          row_terms_b[E + k] = diversity_term;
          loss += diversity_term;
        }
        losses[b] = loss;
        if (grad_out == nullptr) continue;

        // Pass 3: d loss / d logits, over the CE exps in place when the gradient rows hold them.
        for (int64_t k = 0; k < E; ++k) {
          const A* ce_row = grad_rows != nullptr ? grad_rows + (k * B + b) * C : ce_scratch + k * C;
          const A* expert_row = diversity ? expert_exp + k * C : nullptr;
          const A inv_ce_sum = A(1) / ce_sum[k];
          const A inv_expert_sum = diversity ? A(1) / expert_sum[k] : A(0);
          const A inv_mean_sum = A(1) / mean_sum;
          scalar_t* out = grad_out + (k * B + b) * C;
          A* row_gradient = kAccumulatesInInputType ? reinterpret_cast<A*>(out) : gradient;
          const A ce_target = ce_row[y];  // read before the gradient overwrites it
          gradient_row(ce_row, inv_ce_sum, ce_coef, expert_row, inv_expert_sum, mean_exp, inv_mean_sum,
                       inverse_temperature, div_coef, row_gradient, C);
          row_gradient[y] = ride_loss::logit_gradient(
              ce_coef, ce_target * inv_ce_sum, true, div_coef, diversity ? expert_row[y] * inv_expert_sum : A(0),
              diversity ? mean_exp[y] * inv_mean_sum : A(0), inverse_temperature[y]);
          if (!kAccumulatesInInputType)
            for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(gradient[c]);
        }
      }
    });
  });
  // Row losses are summed after the parallel part: the result does not depend on how rows were split.
  // fp32 loss for fp16/bf16: it may exceed the fp16 range.
  return {reduction == kReductionNone ? row_losses : row_losses.sum(), grad, row_terms};
}

}  // namespace cpu
}  // namespace fastlt

TORCH_LIBRARY_FRAGMENT(fastlt, m) {
  m.def(
      "ride_loss(Tensor expert_logits, Tensor target, Tensor target_margins, Tensor? class_weights, "
      "Tensor temperatures, float diversity_factor, int reduction, int ignore_index, bool compute_grad) -> "
      "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlt, CPU, m) { m.impl("ride_loss", &fastlt::cpu::ride_loss); }
