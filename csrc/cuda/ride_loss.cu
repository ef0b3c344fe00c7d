// CUDA kernel of fastlt::ride_loss: one block per sample row b, threads over classes. The block keeps online
// (max, sum) softmax statistics of each expert's margin logits z' and tempered logits u = z / T and of the tempered
// expert mean v, merges them over the block, and writes the row's loss and d loss / d logits in the same launch.
// Per-element math: fastlt/ride_loss.h and fastlt/softmax_stats.h (the functions the CPU kernel runs, plus the online
// form of the softmax statistics, which the CPU kernel computes in two passes instead).
//
// Reads per row: the E expert rows once for the mean (diversity term only), then per expert once for its statistics
// and once more for its gradient; the second read is of the C values this block just read, so it is served by L2.
// v is kept in a [B, C] accumulation-dtype scratch between the passes (it needs every expert, which a per-expert
// pass would otherwise re-read E times). A row whose label is ignore_index gets zero terms and a zero gradient and
// nothing else; the normalisers of docs/methods.md 6.5 reach the kernel as per-row CE coefficients and one diversity
// coefficient, computed on the device.
#include <ATen/ops/empty.h>

#include <torch/library.h>

#include "cuda/cuda_common.cuh"
#include "fastlt/ride_loss.h"
#include "loss_checks.h"

namespace fastlt {
namespace cuda {
namespace {

// ce_coefs: [B] w_{y_b} / W under mean (w = 1 without DRW), w_{y_b} otherwise; 0 for an ignored row.
// div_coef: device scalar lambda * Tbar^2 / N under mean, lambda * Tbar^2 otherwise (nullptr: no diversity term;
// mean_scratch is unused then). row_terms: [B, 2E]. grad: contiguous [E, B, C] or nullptr when no gradient is wanted.
template <typename T, typename A>
__global__ void ride_loss_rows(const T* logits, int64_t sE, int64_t sB, int64_t sC, int E, int64_t B, int64_t C,
                               const int64_t* labels, int64_t ignore_index, const A* margins, const A* ce_coefs,
                               const A* inverse_temperature, const A* div_coef_ptr, A* mean_scratch, A* row_losses,
                               A* row_terms, T* grad) {
  __shared__ SoftmaxStats<A> stats_buffer[kThreads];
  __shared__ A sum_buffer[kThreads];
  const int64_t b = blockIdx.x;
  const int64_t y = labels[b];
  A* terms = row_terms + b * 2 * E;
  if (y == ignore_index) {  // the whole block returns here, before any barrier
    for (int k = 0; grad != nullptr && k < E; ++k)
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) grad[(k * B + b) * C + c] = T(0);
    for (int t = threadIdx.x; t < 2 * E; t += blockDim.x) terms[t] = A(0);
    if (threadIdx.x == 0) row_losses[b] = A(0);
    return;
  }
  const A margin = margins[y];
  const A ce_coef = ce_coefs[b];
  const bool diversity = div_coef_ptr != nullptr;
  const A div_coef = diversity ? *div_coef_ptr : A(0);
  const T* row = logits + b * sB;
  A* mean_logits = diversity ? mean_scratch + b * C : nullptr;

  // Tempered expert mean v and its softmax statistics (the KL target p = softmax(v), detached).
  SoftmaxStats<A> mean_stats = empty_softmax_stats<A>();
  if (diversity) {
    const A inverse_experts = A(1) / static_cast<A>(E);
    SoftmaxStats<A> partial = empty_softmax_stats<A>();
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      A total = static_cast<A>(row[c * sC]);
      for (int k = 1; k < E; ++k) total += static_cast<A>(row[k * sE + c * sC]);  // experts in order, as the CPU
      const A v = ride_loss::tempered_mean_logit(total, inverse_experts, inverse_temperature[c]);
      mean_logits[c] = v;
      add_to_softmax_stats(partial, v);
    }
    mean_stats = block_softmax_stats(partial, stats_buffer);  // its __syncthreads also publishes mean_logits
  }
  const A inverse_mean_sum = A(1) / mean_stats.shifted_sum;

  A loss = A(0);  // meaningful in thread 0
  for (int k = 0; k < E; ++k) {
    const T* expert = row + k * sE;
    SoftmaxStats<A> ce_partial = empty_softmax_stats<A>(), expert_partial = empty_softmax_stats<A>();
    A gap_partial = A(0);
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const A z = static_cast<A>(expert[c * sC]);
      add_to_softmax_stats(ce_partial, ride_loss::margin_logit(z, c == y, margin));
      if (diversity) {
        const A u = ride_loss::tempered_logit(z, inverse_temperature[c]);
        add_to_softmax_stats(expert_partial, u);
        const A v = mean_logits[c];
        gap_partial += ride_loss::weighted_gap_term(exponential(v - mean_stats.maximum), v, u);
      }
    }
    const SoftmaxStats<A> ce_stats = block_softmax_stats(ce_partial, stats_buffer);
    SoftmaxStats<A> expert_stats = empty_softmax_stats<A>();
    if (threadIdx.x == 0) {
      const A target_logit = ride_loss::margin_logit(static_cast<A>(expert[y * sC]), true, margin);
      const A ce_term = ce_coef * cross_entropy(ce_stats.maximum, ce_stats.shifted_sum, target_logit);
      terms[k] = ce_term;
      terms[E + k] = A(0);
      loss += ce_term;
    }
    if (diversity) {
      expert_stats = block_softmax_stats(expert_partial, stats_buffer);
      const A gap = block_sum(gap_partial, sum_buffer);
      if (threadIdx.x == 0) {
        const A kl = ride_loss::kl_to_mean(gap, mean_stats.maximum, mean_stats.shifted_sum, expert_stats.maximum,
                                           expert_stats.shifted_sum);
        const A diversity_term = div_coef * kl;
        terms[E + k] = diversity_term;
        loss += diversity_term;
      }
    }
    if (grad == nullptr) continue;
    const A inverse_ce_sum = A(1) / ce_stats.shifted_sum;
    const A inverse_expert_sum = diversity ? A(1) / expert_stats.shifted_sum : A(0);
    T* out = grad + (k * B + b) * C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const A z = static_cast<A>(expert[c * sC]);
      const bool is_target = c == y;
      const A ce_probability =
          exponential(ride_loss::margin_logit(z, is_target, margin) - ce_stats.maximum) * inverse_ce_sum;
      A expert_probability = A(0), mean_probability = A(0);
      if (diversity) {
        expert_probability = exponential(ride_loss::tempered_logit(z, inverse_temperature[c]) - expert_stats.maximum) *
                             inverse_expert_sum;
        mean_probability = exponential(mean_logits[c] - mean_stats.maximum) * inverse_mean_sum;
      }
      out[c] = static_cast<T>(ride_loss::logit_gradient(ce_coef, ce_probability, is_target, div_coef,
                                                        expert_probability, mean_probability, inverse_temperature[c]));
    }
  }
  if (threadIdx.x == 0) row_losses[b] = loss;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> ride_loss(const at::Tensor& expert_logits, const at::Tensor& target,
                                                         const at::Tensor& target_margins,
                                                         const std::optional<at::Tensor>& class_weights,
                                                         const at::Tensor& temperatures, double diversity_factor,
                                                         int64_t reduction, int64_t ignore_index, bool compute_grad) {
  constexpr const char* op = "fastlt.ride_loss";
  check_cuda(expert_logits, op, "expert_logits");  // before the shared checks, so a CPU tensor gets this message
  const c10::cuda::CUDAGuard guard(expert_logits.device());
  check_reduction(reduction, op);
  const auto tables = check_ride_loss_inputs(expert_logits, target, target_margins, class_weights, temperatures,
                                             diversity_factor, ignore_index);
  const at::Tensor labels = target.contiguous();
  const int64_t E = expert_logits.size(0), B = expert_logits.size(1), C = expert_logits.size(2);
  const bool diversity = diversity_factor != 0.0;
  const auto accumulate_options = tables.margins.options();
  at::Tensor grad =
      compute_grad ? at::empty({E, B, C}, expert_logits.options()) : at::empty({0}, expert_logits.options());
  at::Tensor row_losses = at::empty({B}, accumulate_options);
  at::Tensor row_terms = at::empty({B, 2 * E}, accumulate_options);
  const at::Tensor inverse_temperature = tables.temperatures.reciprocal();
  // The per-row and per-batch coefficients stay on the device (no host sync beyond the label range check). Under
  // mean an all-ignored batch (W = N = 0) gets zero coefficients instead of a division by 0.
  const at::Tensor kept = labels != ignore_index;
  at::Tensor ce_coefs = tables.weights.defined()
                            ? tables.weights.index_select(0, labels.masked_fill(kept.logical_not(), 0)).mul_(kept)
                            : kept.to(tables.margins.scalar_type());
  at::Tensor div_coef = diversity ? tables.temperatures.mean().square().mul(diversity_factor) : at::Tensor();
  if (reduction == kReductionMean) {
    const at::Tensor weight_total = ce_coefs.sum(), kept_rows = kept.sum().to(tables.margins.scalar_type());
    ce_coefs = at::where(weight_total > 0, ce_coefs / weight_total, at::zeros_like(ce_coefs));
    if (diversity) div_coef = at::where(kept_rows > 0, div_coef * kept_rows.reciprocal(), at::zeros_like(div_coef));
  }
  const at::Tensor mean_scratch = diversity ? at::empty({B, C}, accumulate_options) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, expert_logits.scalar_type(), "fastlt_ride_loss_cuda", [&] {
    using A = acc_t<scalar_t>;
    ride_loss_rows<scalar_t, A><<<B, kThreads, 0, current_stream()>>>(
        expert_logits.data_ptr<scalar_t>(), expert_logits.stride(0), expert_logits.stride(1), expert_logits.stride(2),
        static_cast<int>(E), B, C, labels.data_ptr<int64_t>(), ignore_index, tables.margins.data_ptr<A>(),
        ce_coefs.data_ptr<A>(), inverse_temperature.data_ptr<A>(), diversity ? div_coef.data_ptr<A>() : nullptr,
        diversity ? mean_scratch.data_ptr<A>() : nullptr, row_losses.data_ptr<A>(), row_terms.data_ptr<A>(),
        compute_grad ? grad.data_ptr<scalar_t>() : nullptr);
  });
  check_launch(op);
  // Deterministic on-device reduction of the row losses (no atomics): fp32 loss for fp16/bf16, as on the CPU.
  return {reduction == kReductionNone ? row_losses : row_losses.sum(), grad, row_terms};
}

}  // namespace cuda
}  // namespace fastlt

TORCH_LIBRARY_IMPL(fastlt, CUDA, m) { m.impl("ride_loss", &fastlt::cuda::ride_loss); }
