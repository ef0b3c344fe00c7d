// CPU kernel of fastlt::prior_shifted_ce: OpenMP (at::parallel_for) over sample rows; each expert row is shifted by
// its tau_k * log(pi) into L1-resident scratch, its softmax computed with vectorised exp straight into the gradient
// row, and the row's terms and d loss / d logits finished in the same pass. Ignored rows (label == ignore_index) are
// skipped: zero terms, zero gradient. Per-row math: fastlt/prior_shifted_ce.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/softmax_vectorized.h"
#include "fastlt/prior_shifted_ce.h"
#include "loss_checks.h"

namespace fastlt {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> prior_shifted_ce(const at::Tensor& expert_logits,
                                                                const at::Tensor& target,
                                                                const at::Tensor& logit_shifts, int64_t reduction,
                                                                int64_t ignore_index, bool compute_grad) {
  check_reduction(reduction, "fastlt.prior_shifted_ce");
  const at::Tensor shifts = check_prior_shifted_ce_inputs(expert_logits, target, logit_shifts, ignore_index);
  TORCH_CHECK(expert_logits.device().is_cpu(),
              "fastlt.prior_shifted_ce (CPU kernel): expert_logits must be a CPU tensor");
  const int64_t E = expert_logits.size(0), B = expert_logits.size(1), C = expert_logits.size(2);
  const int64_t sE = expert_logits.stride(0), sB = expert_logits.stride(1), sC = expert_logits.stride(2);
  at::Tensor grad = compute_grad ? empty_with_huge_pages({E, B, C}, expert_logits.options())
                                 : at::empty({0}, expert_logits.options());
  at::Tensor row_losses = at::empty({B}, shifts.options());
  at::Tensor row_terms = at::empty({B, E}, shifts.options());
  // Per-thread scratch, [C] each: the shifted logits and their exp (unless written straight into the gradient).
  constexpr int64_t scratch_rows = 2;
  at::Tensor scratch = at::empty({at::get_num_threads(), scratch_rows * C}, shifts.options());
  const at::Tensor target_contiguous = target.contiguous();  // a strided [B] view is read by index
  const int64_t* labels = target_contiguous.data_ptr<int64_t>();
  const int64_t kept_rows = B - std::count(labels, labels + B, ignore_index);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, expert_logits.scalar_type(), "fastlt_prior_shifted_ce_cpu", [&] {
        using A = acc_t<scalar_t>;
        const scalar_t* logits = expert_logits.data_ptr<scalar_t>();
        const A* shift_table = shifts.data_ptr<A>();
        const A coefficient = prior_shifted_ce::row_coefficient<A>(kept_rows, reduction);
        scalar_t* grad_out = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
        A* losses = row_losses.data_ptr<A>();
        A* terms = row_terms.data_ptr<A>();
        const A* no_scale = nullptr;

        at::parallel_for(0, B, rows_per_task(E * C), [&](int64_t b0, int64_t b1) {
          A* shifted = scratch.data_ptr<A>() + at::get_thread_num() * scratch_rows * C;
          A* exp_scratch = shifted + C;
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t y = labels[b];
            if (y == ignore_index) {  // not kept: y is no class, and the row adds nothing
              losses[b] = A(0);
              std::fill(terms + b * E, terms + (b + 1) * E, A(0));
              if (grad_out != nullptr)
                for (int64_t k = 0; k < E; ++k) std::fill_n(grad_out + (k * B + b) * C, C, scalar_t(0));
              continue;
            }
            A loss = A(0);
            for (int64_t k = 0; k < E; ++k) {
              const A* row = contiguous_row<scalar_t, A>(logits + k * sE + b * sB, sC, C, shifted);
              add_rows(row, shift_table + k * C, shifted, C);
              scalar_t* out = grad_out == nullptr ? nullptr : grad_out + (k * B + b) * C;
              A* exp_row = (out != nullptr && std::is_same_v<scalar_t, A>) ? reinterpret_cast<A*>(out) : exp_scratch;
              const A maximum = row_max(shifted, no_scale, C);
              const A sum = exp_shifted(shifted, no_scale, maximum, exp_row, C);
              const A term = coefficient * cross_entropy(maximum, sum, shifted[y]);
              terms[b * E + k] = term;
              loss += term;
              if (out == nullptr) continue;
              const A probability_scale = A(1) / sum;
              const A target_probability = exp_row[y] * probability_scale;
              scaled_rows(exp_row, coefficient * probability_scale, static_cast<const A*>(nullptr), A(0), exp_row, C);
              exp_row[y] = prior_shifted_ce::logit_gradient(coefficient, target_probability, true);
              if (!std::is_same_v<scalar_t, A>)
                for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(exp_row[c]);
            }
            losses[b] = loss;
          }
        });
      });
  // Row losses are summed after the parallel part: the result does not depend on how rows were split.
  const at::Tensor loss = reduction == kReductionNone ? row_losses : row_losses.sum();
  return {loss, grad, row_terms};  // fp32 loss and terms for fp16/bf16, as ride_loss
}

}  // namespace cpu
}  // namespace fastlt

TORCH_LIBRARY_FRAGMENT(fastlt, m) {
  m.def(
      "prior_shifted_ce(Tensor expert_logits, Tensor target, Tensor logit_shifts, int reduction, int ignore_index, "
      "bool compute_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlt, CPU, m) { m.impl("prior_shifted_ce", &fastlt::cpu::prior_shifted_ce); }
