// CUDA kernels of fastlt::tau_normalize: one block per weight row; row math from fastlt/tau_normalize.h.
#include <ATen/ops/empty_like.h>

#include <torch/library.h>

#include "cuda/cuda_common.cuh"
#include "fastlt/tau_normalize.h"
#include "ops_common.h"

namespace fastlt {
namespace cuda {
namespace {

template <typename T, typename A>
__global__ void normalize_rows(const T* weight, int64_t D, A tau, A eps, T* out) {
  __shared__ A buffer[kThreads];
  const T* row = weight + blockIdx.x * D;
  A partial = A(0);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) partial += static_cast<A>(row[d]) * static_cast<A>(row[d]);
  const A scale = tau_normalize::row_scale<A>(block_sum(partial, buffer), tau, eps);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
    out[blockIdx.x * D + d] = static_cast<T>(static_cast<A>(row[d]) * scale);
}

template <typename T, typename A>
__global__ void normalize_rows_backward(const T* grad, const T* weight, int64_t D, A tau, A eps, T* out) {
  __shared__ A buffer[kThreads];
  const T* w_row = weight + blockIdx.x * D;
  const T* g_row = grad + blockIdx.x * D;
  A squares = A(0), dot = A(0);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const A w = static_cast<A>(w_row[d]);
    squares += w * w;
    dot += static_cast<A>(g_row[d]) * w;
  }
  const A sum_squares = block_sum(squares, buffer);
  const A grad_dot_weight = block_sum(dot, buffer);
  const A scale = tau_normalize::row_scale<A>(sum_squares, tau, eps);
  const A coefficient = tau_normalize::row_grad_weight_coefficient<A>(sum_squares, grad_dot_weight, tau, eps);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
    out[blockIdx.x * D + d] = static_cast<T>(scale * static_cast<A>(g_row[d]) - coefficient * static_cast<A>(w_row[d]));
}

}  // namespace

at::Tensor tau_normalize(const at::Tensor& weight_in, double tau, double eps) {
  check_cuda(weight_in, "fastlt.tau_normalize", "weight");
  check_tau_normalize_inputs(weight_in, tau, eps, "fastlt.tau_normalize");
  const c10::cuda::CUDAGuard guard(weight_in.device());
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor out = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fastlt_tau_normalize_cuda", [&] {
    using A = acc_t<scalar_t>;
    normalize_rows<scalar_t, A><<<weight.size(0), kThreads, 0, current_stream()>>>(
        weight.data_ptr<scalar_t>(), weight.size(1), static_cast<A>(tau), static_cast<A>(eps),
        out.data_ptr<scalar_t>());
  });
  check_launch("fastlt.tau_normalize");
  return out;
}

at::Tensor tau_normalize_backward(const at::Tensor& grad_in, const at::Tensor& weight_in, double tau, double eps) {
  check_cuda(weight_in, "fastlt.tau_normalize_backward", "weight");
  check_cuda(grad_in, "fastlt.tau_normalize_backward", "grad");
  check_tau_normalize_backward_inputs(grad_in, weight_in, tau, eps);
  const c10::cuda::CUDAGuard guard(weight_in.device());
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor grad = grad_in.to(weight.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fastlt_tau_normalize_bwd_cuda", [&] {
    using A = acc_t<scalar_t>;
    normalize_rows_backward<scalar_t, A><<<weight.size(0), kThreads, 0, current_stream()>>>(
        grad.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), weight.size(1), static_cast<A>(tau),
        static_cast<A>(eps), out.data_ptr<scalar_t>());
  });
  check_launch("fastlt.tau_normalize_backward");
  return out;
}

}  // namespace cuda
}  // namespace fastlt

TORCH_LIBRARY_IMPL(fastlt, CUDA, m) {
  m.impl("tau_normalize", &fastlt::cuda::tau_normalize);
  m.impl("tau_normalize_backward", &fastlt::cuda::tau_normalize_backward);
}
