// CPU kernel of fastlt::reslt_loss: OpenMP (at::parallel_for) over sample rows; each row's K branch rows are read
// once into L2-resident scratch, the softmax statistics of the summed logits and of the branches whose group holds
// the label computed with vectorised exp, and the loss, its K + 1 row terms and d loss / d logits written in the same
// pass. Rows labelled ignore_index are skipped (zero terms and gradient). Per-row math: fastlt/reslt_loss.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/softmax_vectorized.h"
#include "fastlt/reslt_loss.h"
#include "loss_checks.h"

namespace fastlt {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> reslt_loss(const at::Tensor& branch_logits, const at::Tensor& target,
                                                          const at::Tensor& group_masks, double beta, double log_eps,
                                                          double fused_log_eps, int64_t reduction, int64_t ignore_index,
                                                          bool compute_grad) {
  check_reduction(reduction, "fastlt.reslt_loss");
  const at::Tensor masks =
      check_reslt_loss_inputs(branch_logits, target, group_masks, beta, log_eps, fused_log_eps, ignore_index);
  TORCH_CHECK(branch_logits.device().is_cpu(), "fastlt.reslt_loss (CPU kernel): branch_logits must be a CPU tensor");
  const int64_t K = branch_logits.size(0), B = branch_logits.size(1), C = branch_logits.size(2);
  const int64_t sK = branch_logits.stride(0), sB = branch_logits.stride(1), sC = branch_logits.stride(2);
  const auto acc_options = branch_logits.options().dtype(accumulate_dtype(branch_logits));
  at::Tensor grad = compute_grad ? empty_with_huge_pages({K, B, C}, branch_logits.options())
                                 : at::empty({0}, branch_logits.options());
  at::Tensor row_losses = at::empty({B}, acc_options);
  at::Tensor row_terms = at::empty({B, K + 1}, acc_options);  // K branch terms, then the fused term
  // Per-thread scratch, [C] each: K logit rows (when not contiguous fp32/fp64), K branch softmax rows, the summed
  // logits, their exp and one gradient row.
  const int64_t scratch_rows = 2 * K + 3;
  at::Tensor scratch = at::empty({at::get_num_threads(), scratch_rows * C}, acc_options);
  const bool* in_group = masks.data_ptr<bool>();
  const at::Tensor target_contiguous = target.contiguous();  // a strided [B] view is read by index
  const int64_t* labels = target_contiguous.data_ptr<int64_t>();
  // The normalisers: the kept rows, and the (branch, kept row) pairs whose group holds the row's label.
  int64_t in_group_total = 0, kept_rows = 0;
  for (int64_t b = 0; b < B; ++b) {
    if (labels[b] == ignore_index) continue;
    ++kept_rows;
    for (int64_t k = 0; k < K; ++k) in_group_total += in_group[k * C + labels[b]];
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, branch_logits.scalar_type(), "fastlt_reslt_loss_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* logits = branch_logits.data_ptr<scalar_t>();
    const A ice_coef = reslt_loss::ice_coefficient<A>(static_cast<A>(beta), in_group_total, reduction);
    const A fused_coef = reslt_loss::fused_coefficient<A>(static_cast<A>(beta), kept_rows, reduction);
    const A eps = static_cast<A>(log_eps), fused_eps = static_cast<A>(fused_log_eps);
    scalar_t* grad_out = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    A* losses = row_losses.data_ptr<A>();
    A* all_terms = row_terms.data_ptr<A>();
    const A* no_scale = nullptr;

    at::parallel_for(0, B, rows_per_task(K * C), [&](int64_t b0, int64_t b1) {
      A* thread_scratch = scratch.data_ptr<A>() + at::get_thread_num() * scratch_rows * C;
      A* staging = thread_scratch;      // K rows
      A* branch_exp = staging + K * C;  // K rows
      A* fused_logits = branch_exp + K * C;
      A* fused_exp = fused_logits + C;
      A* gradient = fused_exp + C;
      const A* rows[kMaxExperts];
      bool member[kMaxExperts];
      A branch_sum[kMaxExperts];
      A branch_scale[kMaxExperts];  // epsilon_gradient_scale of each in-group branch
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t y = labels[b];
        A* terms = all_terms + b * (K + 1);
        if (y == ignore_index) {  // y is no class: never an index
          std::fill_n(terms, K + 1, A(0));
          losses[b] = A(0);
          if (grad_out != nullptr)
            for (int64_t k = 0; k < K; ++k) std::fill_n(grad_out + (k * B + b) * C, C, scalar_t(0));
          continue;
        }
        for (int64_t k = 0; k < K; ++k)
          rows[k] = contiguous_row<scalar_t, A>(logits + k * sK + b * sB, sC, C, staging + k * C);
        const A* fused = rows[0];
        if (K > 1) {
          add_rows(rows[0], rows[1], fused_logits, C);
          for (int64_t k = 2; k < K; ++k) add_rows(fused_logits, rows[k], fused_logits, C);
          fused = fused_logits;
        }
        const A fused_max = row_max(fused, no_scale, C);
        const A fused_sum = exp_shifted(fused, no_scale, fused_max, fused_exp, C);
        terms[K] = fused_coef * reslt_loss::epsilon_cross_entropy(fused_max, fused_sum, fused[y], fused_eps);
        A loss = terms[K];
        for (int64_t k = 0; k < K; ++k) {
          member[k] = in_group[k * C + y];
          terms[k] = A(0);
          if (!member[k]) continue;  // outside its group a branch only feeds the fused term
          const A branch_max = row_max(rows[k], no_scale, C);
          branch_sum[k] = exp_shifted(rows[k], no_scale, branch_max, branch_exp + k * C, C);
          terms[k] = ice_coef * reslt_loss::epsilon_cross_entropy(branch_max, branch_sum[k], rows[k][y], eps);
          loss += terms[k];
          branch_scale[k] = reslt_loss::epsilon_gradient_scale(branch_max, branch_sum[k], rows[k][y], eps);
        }
        losses[b] = loss;
        if (grad_out == nullptr) continue;
        const A inv_fused_sum = A(1) / fused_sum;
        const A fused_grad_coef =
            fused_coef * reslt_loss::epsilon_gradient_scale(fused_max, fused_sum, fused[y], fused_eps);
        for (int64_t k = 0; k < K; ++k) {
          const A* branch_row = member[k] ? branch_exp + k * C : nullptr;
          const A inv_branch_sum = member[k] ? A(1) / branch_sum[k] : A(0);
          const A branch_grad_coef = member[k] ? ice_coef * branch_scale[k] : A(0);
          scalar_t* out = grad_out + (k * B + b) * C;
          A* row_gradient = std::is_same_v<scalar_t, A> ? reinterpret_cast<A*>(out) : gradient;
          scaled_rows(fused_exp, fused_grad_coef * inv_fused_sum, branch_row, branch_grad_coef * inv_branch_sum,
                      row_gradient, C);
          row_gradient[y] =
              reslt_loss::logit_gradient(branch_grad_coef, member[k], member[k] ? branch_row[y] * inv_branch_sum : A(0),
                                         fused_grad_coef, fused_exp[y] * inv_fused_sum, true);
          if (!std::is_same_v<scalar_t, A>)
            for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(gradient[c]);
        }
      }
    });
  });
  // Row losses are summed after the parallel part: the result does not depend on how rows were split.
  return {reduction == kReductionNone ? row_losses : row_losses.sum(), grad, row_terms};  // fp32 for fp16/bf16
}

}  // namespace cpu
}  // namespace fastlt

TORCH_LIBRARY_FRAGMENT(fastlt, m) {
  m.def(
      "reslt_loss(Tensor branch_logits, Tensor target, Tensor group_masks, float beta, float log_eps, "
      "float fused_log_eps, int reduction, int ignore_index, bool compute_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlt, CPU, m) { m.impl("reslt_loss", &fastlt::cpu::reslt_loss); }
