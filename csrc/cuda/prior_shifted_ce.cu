// CUDA kernel of fastlt::prior_shifted_ce: one block per sample row b, threads over classes. Per expert, the block
// keeps online (max, sum) softmax statistics of the shifted logits x = z + shift, merges them over the block, and
// writes the row's terms and d loss / d logits in the same launch (the gradient pass re-reads the C values this block
// just read, from L2). An ignored row (label == ignore_index) only writes zeros. Per-element math:
// fastlt/prior_shifted_ce.h and fastlt/softmax_stats.h.
#include <ATen/ops/empty.h>

#include <torch/library.h>

#include "cuda/cuda_common.cuh"
#include "fastlt/prior_shifted_ce.h"
#include "loss_checks.h"

namespace fastlt {
namespace cuda {
namespace {

// grad: contiguous [E, B, C] or nullptr when no gradient is wanted; row_terms: [B, E]; kept_rows: the number of rows
// whose label is not ignore_index (a device scalar: no host sync).
template <typename T, typename A>
__global__ void prior_shifted_ce_rows(const T* logits, int64_t sE, int64_t sB, int64_t sC, int E, int64_t B, int64_t C,
                                      const int64_t* labels, const A* shifts, int64_t reduction, int64_t ignore_index,
                                      const int64_t* kept_rows, A* row_losses, A* row_terms, T* grad) {
  __shared__ SoftmaxStats<A> stats_buffer[kThreads];
  const int64_t b = blockIdx.x;
  const int64_t y = labels[b];
  if (y == ignore_index) {  // not kept: y is no class, and the row adds nothing
    for (int k = threadIdx.x; k < E; k += blockDim.x) row_terms[b * E + k] = A(0);
    if (threadIdx.x == 0) row_losses[b] = A(0);
    if (grad != nullptr)
      for (int k = 0; k < E; ++k)
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x) grad[(k * B + b) * C + c] = static_cast<T>(0);
    return;
  }
  const A coefficient = prior_shifted_ce::row_coefficient<A>(*kept_rows, reduction);
  A loss = A(0);  // meaningful in thread 0
  for (int k = 0; k < E; ++k) {
    const T* expert = logits + k * sE + b * sB;
    const A* shift = shifts + k * C;
    SoftmaxStats<A> partial = empty_softmax_stats<A>();
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
      add_to_softmax_stats(partial, static_cast<A>(expert[c * sC]) + shift[c]);
    const SoftmaxStats<A> stats = block_softmax_stats(partial, stats_buffer);
    if (threadIdx.x == 0) {
      const A term =
          coefficient * cross_entropy(stats.maximum, stats.shifted_sum, static_cast<A>(expert[y * sC]) + shift[y]);
      row_terms[b * E + k] = term;
      loss += term;
    }
    if (grad == nullptr) continue;
    const A inverse_sum = A(1) / stats.shifted_sum;
    T* out = grad + (k * B + b) * C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const A probability = exponential(static_cast<A>(expert[c * sC]) + shift[c] - stats.maximum) * inverse_sum;
      out[c] = static_cast<T>(prior_shifted_ce::logit_gradient(coefficient, probability, c == y));
    }
  }
  if (threadIdx.x == 0) row_losses[b] = loss;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> prior_shifted_ce(const at::Tensor& expert_logits,
                                                                const at::Tensor& target,
                                                                const at::Tensor& logit_shifts, int64_t reduction,
                                                                int64_t ignore_index, bool compute_grad) {
  constexpr const char* op = "fastlt.prior_shifted_ce";
  check_cuda(expert_logits, op, "expert_logits");  // before the shared checks, so a CPU tensor gets this message
  const c10::cuda::CUDAGuard guard(expert_logits.device());
  check_reduction(reduction, op);
  const at::Tensor shifts = check_prior_shifted_ce_inputs(expert_logits, target, logit_shifts, ignore_index);
  const at::Tensor labels = target.contiguous();
  const int64_t E = expert_logits.size(0), B = expert_logits.size(1), C = expert_logits.size(2);
  at::Tensor grad =
      compute_grad ? at::empty({E, B, C}, expert_logits.options()) : at::empty({0}, expert_logits.options());
  at::Tensor row_losses = at::empty({B}, shifts.options());
  at::Tensor row_terms = at::empty({B, E}, shifts.options());
  const at::Tensor kept_rows = labels.ne(ignore_index).sum();  // the "mean" normaliser, counted on the device
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, expert_logits.scalar_type(), "fastlt_prior_shifted_ce_cuda", [&] {
        using A = acc_t<scalar_t>;
        prior_shifted_ce_rows<scalar_t, A><<<B, kThreads, 0, current_stream()>>>(
            expert_logits.data_ptr<scalar_t>(), expert_logits.stride(0), expert_logits.stride(1),
            expert_logits.stride(2), static_cast<int>(E), B, C, labels.data_ptr<int64_t>(), shifts.data_ptr<A>(),
            reduction, ignore_index, kept_rows.data_ptr<int64_t>(), row_losses.data_ptr<A>(), row_terms.data_ptr<A>(),
            compute_grad ? grad.data_ptr<scalar_t>() : nullptr);
      });
  check_launch(op);
  // Deterministic on-device reduction of the row losses (no atomics): fp32 loss for fp16/bf16, as on the CPU.
  const at::Tensor loss = reduction == kReductionNone ? row_losses : row_losses.sum();
  return {loss, grad, row_terms};
}

}  // namespace cuda
}  // namespace fastlt

TORCH_LIBRARY_IMPL(fastlt, CUDA, m) { m.impl("prior_shifted_ce", &fastlt::cuda::prior_shifted_ce); }
