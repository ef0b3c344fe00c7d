// CUDA kernels of fastlt::expert_aggregate: one block per row b, threads over classes; the per-row coefficients and
// the per-element sum come from fastlt/expert_aggregate.h (the same code the CPU kernel runs).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <torch/library.h>

#include "cuda/cuda_common.cuh"
#include "fastlt/expert_aggregate.h"
#include "ops_common.h"

namespace fastlt {
namespace cuda {
namespace {

template <typename T, typename A>
__global__ void aggregate_forward(const T* logits, int64_t sE, int64_t sB, int64_t sC, int E, int64_t C, int reduce,
                                  const A* weights, const bool* active, T* out) {
  __shared__ A unweighted[kMaxExperts], coef[kMaxExperts];
  const int64_t b = blockIdx.x;
  if (threadIdx.x == 0)
    expert_aggregate::row_coefficients<A>(E, reduce, weights ? weights + b * E : nullptr,
                                          active ? active + b * E : nullptr, unweighted, coef);
  __syncthreads();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    out[b * C + c] = static_cast<T>(expert_aggregate::aggregate_element<T, A>(logits + b * sB + c * sC, sE, E, coef));
}

template <typename T, typename A>
__global__ void aggregate_backward(const T* grad, const T* logits, int64_t sE, int64_t sB, int64_t sC, int E, int64_t B,
                                   int64_t C, int reduce, const A* weights, const bool* active, T* grad_logits,
                                   A* grad_weights) {
  __shared__ A unweighted[kMaxExperts], coef[kMaxExperts];
  __shared__ A reduce_buffer[kThreads];
  const int64_t b = blockIdx.x;
  if (threadIdx.x == 0)
    expert_aggregate::row_coefficients<A>(E, reduce, weights ? weights + b * E : nullptr,
                                          active ? active + b * E : nullptr, unweighted, coef);
  __syncthreads();
  const T* g_row = grad + b * C;
  for (int k = 0; k < E; ++k) {
    T* out_row = grad_logits + (k * B + b) * C;
    A dot = A(0);
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const A g = static_cast<A>(g_row[c]);
      out_row[c] = static_cast<T>(coef[k] * g);
      if (grad_weights != nullptr) dot += g * static_cast<A>(logits[k * sE + b * sB + c * sC]);
    }
    if (grad_weights != nullptr) {
      const A total = block_sum(dot, reduce_buffer);
      if (threadIdx.x == 0) grad_weights[b * E + k] = unweighted[k] * total;
    }
  }
}

}  // namespace

at::Tensor expert_aggregate(const at::Tensor& logits, c10::string_view reduce, const std::optional<at::Tensor>& weights,
                            const std::optional<at::Tensor>& active) {
  check_cuda(logits, "fastlt.expert_aggregate", "logits");
  const int reduce_kind = parse_reduce(reduce);
  auto [weight_table, active_table] = expert_aggregate_tables(logits, weights, active);
  check_active_rows(active_table);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t E = logits.size(0), B = logits.size(1), C = logits.size(2);
  at::Tensor out = at::empty({B, C}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fastlt_expert_aggregate_cuda", [&] {
    using A = acc_t<scalar_t>;
    aggregate_forward<scalar_t, A><<<B, kThreads, 0, current_stream()>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), logits.stride(1), logits.stride(2), static_cast<int>(E), C,
        reduce_kind, weight_table.defined() ? weight_table.data_ptr<A>() : nullptr,
        active_table.defined() ? active_table.data_ptr<bool>() : nullptr, out.data_ptr<scalar_t>());
  });
  check_launch("fastlt.expert_aggregate");
  return out;
}

std::tuple<at::Tensor, at::Tensor> expert_aggregate_backward(const at::Tensor& grad, const at::Tensor& logits,
                                                             c10::string_view reduce,
                                                             const std::optional<at::Tensor>& weights,
                                                             const std::optional<at::Tensor>& active,
                                                             bool weights_requires_grad) {
  check_cuda(logits, "fastlt.expert_aggregate_backward", "logits");
  check_cuda(grad, "fastlt.expert_aggregate_backward", "grad");
  const int reduce_kind = parse_reduce(reduce);
  auto [weight_table, active_table] = expert_aggregate_tables(logits, weights, active);
  check_expert_aggregate_grad(grad, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t E = logits.size(0), B = logits.size(1), C = logits.size(2);
  const at::Tensor g = grad.to(logits.scalar_type()).contiguous();
  at::Tensor grad_logits = at::empty({E, B, C}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  const bool want_weights = weights_requires_grad && weights.has_value();
  at::Tensor grad_table =
      want_weights ? at::zeros({B, E}, logits.options().dtype(accumulate_dtype(logits))) : at::Tensor();
  if (grad_logits.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fastlt_expert_aggregate_bwd", [&] {
      using A = acc_t<scalar_t>;
      aggregate_backward<scalar_t, A><<<B, kThreads, 0, current_stream()>>>(
          g.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), logits.stride(0), logits.stride(1), logits.stride(2),
          static_cast<int>(E), B, C, reduce_kind, weight_table.defined() ? weight_table.data_ptr<A>() : nullptr,
          active_table.defined() ? active_table.data_ptr<bool>() : nullptr, grad_logits.data_ptr<scalar_t>(),
          want_weights ? grad_table.data_ptr<A>() : nullptr);
    });
    check_launch("fastlt.expert_aggregate_backward");
  }
  at::Tensor grad_weights = want_weights
                                ? (weights->dim() == 1 ? grad_table.sum(0) : grad_table).to(weights->scalar_type())
                                : at::empty({0}, logits.options());
  return {grad_logits, grad_weights};
}

}  // namespace cuda
}  // namespace fastlt

TORCH_LIBRARY_IMPL(fastlt, CUDA, m) {
  m.impl("expert_aggregate", &fastlt::cuda::expert_aggregate);
  m.impl("expert_aggregate_backward", &fastlt::cuda::expert_aggregate_backward);
}
