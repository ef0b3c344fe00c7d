// CUDA kernel of fastlt::reslt_loss: one block per sample row b, threads over classes. The block keeps online
// (max, sum) softmax statistics of the summed logits s = sum_b z_b and of each branch whose group holds the label,
// merges them over the block, and writes the row's loss, its K + 1 row terms and d loss / d logits in the same launch;
// the gradient pass walks classes and writes every branch's gradient at c from the one fused probability of c. A row
// labelled ignore_index only writes zeros.
// Per-element math: fastlt/reslt_loss.h and fastlt/softmax_stats.h (the code the CPU kernel runs).
#include <ATen/ops/empty.h>

#include <torch/library.h>

#include "cuda/cuda_common.cuh"
#include "fastlt/reslt_loss.h"
#include "loss_checks.h"

namespace fastlt {
namespace cuda {
namespace {

// sum_k z_k[c], branches in order as the CPU kernel adds them.
template <typename T, typename A>
__device__ A fused_logit(const T* row, int64_t sK, int64_t sC, int K, int64_t c) {
  A total = static_cast<A>(row[c * sC]);
  for (int k = 1; k < K; ++k) total += static_cast<A>(row[k * sK + c * sC]);
  return total;
}

// in_group: contiguous [K, C] group masks; in_group_total and kept_rows: device scalars, the normalisers G and N of
// ice_coefficient / fused_coefficient. row_terms: [B, K + 1]. grad: contiguous [K, B, C] or nullptr when no gradient
// is wanted.
template <typename T, typename A>
__global__ void reslt_loss_rows(const T* logits, int64_t sK, int64_t sB, int64_t sC, int K, int64_t B, int64_t C,
                                const int64_t* labels, const bool* in_group, const int64_t* in_group_total,
                                const int64_t* kept_rows, int64_t reduction, int64_t ignore_index, A beta, A eps,
                                A fused_eps, A* row_losses, A* row_terms, T* grad) {
  __shared__ SoftmaxStats<A> stats_buffer[kThreads];
  __shared__ A branch_max[kMaxExperts], inverse_branch_sum[kMaxExperts], branch_grad_coef[kMaxExperts];
  __shared__ A fused_grad_coef;
  const int64_t b = blockIdx.x;
  const int64_t y = labels[b];
  A* terms = row_terms + b * (K + 1);
  if (y == ignore_index) {  // the whole block returns: y is no class, never an index
    for (int64_t k = threadIdx.x; k <= K; k += blockDim.x) terms[k] = A(0);
    if (threadIdx.x == 0) row_losses[b] = A(0);
    if (grad != nullptr)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x) grad[(k * B + b) * C + c] = T(0);
    return;
  }
  const A ice_coef = reslt_loss::ice_coefficient<A>(beta, *in_group_total, reduction);
  const A fused_coef = reslt_loss::fused_coefficient<A>(beta, *kept_rows, reduction);
  const T* row = logits + b * sB;

  SoftmaxStats<A> partial = empty_softmax_stats<A>();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    add_to_softmax_stats(partial, fused_logit<T, A>(row, sK, sC, K, c));
  const SoftmaxStats<A> fused_stats = block_softmax_stats(partial, stats_buffer);
  A loss = A(0);  // meaningful in thread 0
  if (threadIdx.x == 0) {
    const A fused_target = fused_logit<T, A>(row, sK, sC, K, y);
    loss = fused_coef *
           reslt_loss::epsilon_cross_entropy(fused_stats.maximum, fused_stats.shifted_sum, fused_target, fused_eps);
    terms[K] = loss;
    fused_grad_coef = fused_coef * reslt_loss::epsilon_gradient_scale(fused_stats.maximum, fused_stats.shifted_sum,
                                                                      fused_target, fused_eps);
  }

  for (int k = 0; k < K; ++k) {
    if (!in_group[k * C + y]) {  // outside its group a branch only feeds the fused term (same for the block)
      if (threadIdx.x == 0) terms[k] = A(0);
      continue;
    }
    const T* branch = row + k * sK;
    SoftmaxStats<A> branch_partial = empty_softmax_stats<A>();
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
      add_to_softmax_stats(branch_partial, static_cast<A>(branch[c * sC]));
    const SoftmaxStats<A> stats = block_softmax_stats(branch_partial, stats_buffer);
    if (threadIdx.x == 0) {
      const A target_logit = static_cast<A>(branch[y * sC]);
      terms[k] = ice_coef * reslt_loss::epsilon_cross_entropy(stats.maximum, stats.shifted_sum, target_logit, eps);
      loss += terms[k];
      branch_max[k] = stats.maximum;
      inverse_branch_sum[k] = A(1) / stats.shifted_sum;
      branch_grad_coef[k] =
          ice_coef * reslt_loss::epsilon_gradient_scale(stats.maximum, stats.shifted_sum, target_logit, eps);
    }
  }
  if (threadIdx.x == 0) row_losses[b] = loss;
  if (grad == nullptr) return;
  __syncthreads();  // publishes branch_max / inverse_branch_sum / the gradient coefficients

  const A inverse_fused_sum = A(1) / fused_stats.shifted_sum;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const bool is_target = c == y;
    const A fused_probability =
        exponential(fused_logit<T, A>(row, sK, sC, K, c) - fused_stats.maximum) * inverse_fused_sum;
    for (int k = 0; k < K; ++k) {
      const bool member = in_group[k * C + y];
      const A branch_probability =
          member ? exponential(static_cast<A>(row[k * sK + c * sC]) - branch_max[k]) * inverse_branch_sum[k] : A(0);
      grad[(k * B + b) * C + c] =
          static_cast<T>(reslt_loss::logit_gradient(member ? branch_grad_coef[k] : A(0), member, branch_probability,
                                                    fused_grad_coef, fused_probability, is_target));
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> reslt_loss(const at::Tensor& branch_logits, const at::Tensor& target,
                                                          const at::Tensor& group_masks, double beta, double log_eps,
                                                          double fused_log_eps, int64_t reduction, int64_t ignore_index,
                                                          bool compute_grad) {
  constexpr const char* op = "fastlt.reslt_loss";
  check_cuda(branch_logits, op, "branch_logits");  // before the shared checks, so a CPU tensor gets this message
  check_reduction(reduction, op);
  const c10::cuda::CUDAGuard guard(branch_logits.device());
  const at::Tensor masks =
      check_reslt_loss_inputs(branch_logits, target, group_masks, beta, log_eps, fused_log_eps, ignore_index);
  const at::Tensor labels = target.contiguous();
  const int64_t K = branch_logits.size(0), B = branch_logits.size(1), C = branch_logits.size(2);
  at::Tensor grad =
      compute_grad ? at::empty({K, B, C}, branch_logits.options()) : at::empty({0}, branch_logits.options());
  const auto acc_options = branch_logits.options().dtype(accumulate_dtype(branch_logits));
  at::Tensor row_losses = at::empty({B}, acc_options);
  at::Tensor row_terms = at::empty({B, K + 1}, acc_options);  // K branch terms, then the fused term
  // The normalisers, counted on the device (no host sync): the kept rows, and the (branch, kept row) pairs whose group
  // holds the row's label. An ignored row's label is replaced by class 0 before the lookup, then masked out.
  const at::Tensor kept = labels.ne(ignore_index);
  const at::Tensor kept_rows = kept.sum(at::kLong);
  const at::Tensor in_group_total =
      masks.index_select(1, labels.masked_fill(kept.logical_not(), 0)).logical_and(kept).sum(at::kLong);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, branch_logits.scalar_type(), "fastlt_reslt_loss_cuda", [&] {
    using A = acc_t<scalar_t>;
    reslt_loss_rows<scalar_t, A><<<B, kThreads, 0, current_stream()>>>(
        branch_logits.data_ptr<scalar_t>(), branch_logits.stride(0), branch_logits.stride(1), branch_logits.stride(2),
        static_cast<int>(K), B, C, labels.data_ptr<int64_t>(), masks.data_ptr<bool>(),
        in_group_total.data_ptr<int64_t>(), kept_rows.data_ptr<int64_t>(), reduction, ignore_index,
        static_cast<A>(beta), static_cast<A>(log_eps), static_cast<A>(fused_log_eps), row_losses.data_ptr<A>(),
        row_terms.data_ptr<A>(), compute_grad ? grad.data_ptr<scalar_t>() : nullptr);
  });
  check_launch(op);
  // Deterministic on-device reduction of the row losses (no atomics): fp32 loss for fp16/bf16, as on the CPU.
  return {reduction == kReductionNone ? row_losses : row_losses.sum(), grad, row_terms};
}

}  // namespace cuda
}  // namespace fastlt

TORCH_LIBRARY_IMPL(fastlt, CUDA, m) { m.impl("reslt_loss", &fastlt::cuda::reslt_loss); }
