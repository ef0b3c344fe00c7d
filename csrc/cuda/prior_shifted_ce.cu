// CUDA kernel of fastlt::prior_shifted_ce: one block per sample row b, threads over classes. Per expert, the block
// keeps online (max, sum) softmax statistics of the shifted logits x = z + shift, merges them over the block, and
// writes the row's loss and d loss / d logits in the same launch (the gradient pass re-reads the C values this block
// just read, from L2). Per-element math: fastlt/prior_shifted_ce.h and fastlt/softmax_stats.h.
#include <ATen/ops/empty.h>

#include <torch/library.h>

#include "cuda/cuda_common.cuh"
#include "fastlt/prior_shifted_ce.h"
#include "loss_checks.h"

namespace fastlt {
namespace cuda {
namespace {

// grad: contiguous [E, B, C] or nullptr when no gradient is wanted.
template <typename T, typename A>
__global__ void prior_shifted_ce_rows(const T* logits, int64_t sE, int64_t sB, int64_t sC, int E, int64_t B,
                                      int64_t C, const int64_t* labels, const A* shifts, A* row_losses, T* grad) {
  __shared__ SoftmaxStats<A> stats_buffer[kThreads];
  const int64_t b = blockIdx.x;
  const int64_t y = labels[b];
  const A inverse_batch = A(1) / static_cast<A>(B);
  A loss = A(0);  // meaningful in thread 0
  for (int k = 0; k < E; ++k) {
    const T* expert = logits + k * sE + b * sB;
    const A* shift = shifts + k * C;
    SoftmaxStats<A> partial = empty_softmax_stats<A>();
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
      add_to_softmax_stats(partial, static_cast<A>(expert[c * sC]) + shift[c]);
    const SoftmaxStats<A> stats = block_softmax_stats(partial, stats_buffer);
    if (threadIdx.x == 0)
      loss += inverse_batch *
              cross_entropy(stats.maximum, stats.shifted_sum, static_cast<A>(expert[y * sC]) + shift[y]);
    if (grad == nullptr) continue;
    const A inverse_sum = A(1) / stats.shifted_sum;
    T* out = grad + (k * B + b) * C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const A probability = exponential(static_cast<A>(expert[c * sC]) + shift[c] - stats.maximum) * inverse_sum;
      out[c] = static_cast<T>(prior_shifted_ce::logit_gradient(inverse_batch, probability, c == y));
    }
  }
  if (threadIdx.x == 0) row_losses[b] = loss;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prior_shifted_ce(const at::Tensor& expert_logits, const at::Tensor& target,
                                                    const at::Tensor& logit_shifts, bool compute_grad) {
  constexpr const char* op = "fastlt.prior_shifted_ce";
  check_cuda(expert_logits, op, "expert_logits");  // before the shared checks, so a CPU tensor gets this message
  const c10::cuda::CUDAGuard guard(expert_logits.device());
  const at::Tensor shifts = check_prior_shifted_ce_inputs(expert_logits, target, logit_shifts);
  const at::Tensor labels = target.contiguous();
  const int64_t E = expert_logits.size(0), B = expert_logits.size(1), C = expert_logits.size(2);
  at::Tensor grad = compute_grad ? at::empty({E, B, C}, expert_logits.options())
                                 : at::empty({0}, expert_logits.options());
  at::Tensor row_losses = at::empty({B}, shifts.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, expert_logits.scalar_type(), "fastlt_prior_shifted_ce_cuda", [&] {
        using A = acc_t<scalar_t>;
        prior_shifted_ce_rows<scalar_t, A><<<B, kThreads, 0, current_stream()>>>(
            expert_logits.data_ptr<scalar_t>(), expert_logits.stride(0), expert_logits.stride(1),
            expert_logits.stride(2), static_cast<int>(E), B, C, labels.data_ptr<int64_t>(), shifts.data_ptr<A>(),
            row_losses.data_ptr<A>(), compute_grad ? grad.data_ptr<scalar_t>() : nullptr);
      });
  check_launch(op);
  // Deterministic on-device reduction of the row losses (no atomics): fp32 loss for fp16/bf16, as on the CPU.
  return {row_losses.sum(), grad};
}

}  // namespace cuda
}  // namespace fastlt

TORCH_LIBRARY_IMPL(fastlt, CUDA, m) {
  m.impl("prior_shifted_ce", &fastlt::cuda::prior_shifted_ce);
}
