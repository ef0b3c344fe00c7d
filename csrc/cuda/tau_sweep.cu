// CUDA kernel of fastlt::tau_sweep: cuBLAS computes the raw logits of a block of rows once (at::mm); one CUDA block
// per row then takes, for every tau, the argmax of raw * scale + bias with the shared fastlt/tau_sweep.h scan.
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <torch/library.h>

#include "cuda/cuda_common.cuh"
#include "fastlt/tau_sweep.h"
#include "ops_common.h"

namespace fastlt {
namespace cuda {
namespace {

constexpr int64_t kRowBlock = 4096;

template <typename A>
__global__ void compute_scales(const A* sum_squares, const A* taus, int64_t C, int64_t K, A eps, A* scales) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index < K * C) scales[index] = tau_normalize::row_scale<A>(sum_squares[index % C], taus[index / C], eps);
}

template <typename A>
__global__ void sweep_rows(const A* raw, const A* scales, const A* bias, int64_t C, int64_t K, int64_t N,
                           int64_t row_offset, int64_t* out) {
  __shared__ A best_value[kThreads];
  __shared__ int64_t best_index[kThreads];
  const A* raw_row = raw + blockIdx.x * C;
  for (int64_t k = 0; k < K; ++k) {
    A best = A(0);
    int64_t index = -1;
    tau_sweep::scan<A>(raw_row, scales + k * C, bias, threadIdx.x, C, blockDim.x, &best, &index);
    best_value[threadIdx.x] = best;
    best_index[threadIdx.x] = index;
    __syncthreads();
    for (int offset = kThreads / 2; offset > 0; offset >>= 1) {
      if (threadIdx.x < offset) {
        const int64_t other = best_index[threadIdx.x + offset];
        if (other >= 0 &&
            argmax_better(best_value[threadIdx.x + offset], other, best_value[threadIdx.x], best_index[threadIdx.x])) {
          best_value[threadIdx.x] = best_value[threadIdx.x + offset];
          best_index[threadIdx.x] = other;
        }
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) out[k * N + row_offset + blockIdx.x] = best_index[0];
    __syncthreads();
  }
}

}  // namespace

at::Tensor tau_sweep(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& taus,
                     const std::optional<at::Tensor>& bias, double eps) {
  check_cuda(features, "fastlt.tau_sweep", "features");
  check_tau_sweep_inputs(features, weight, taus, bias, eps);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t N = features.size(0), C = weight.size(0), K = taus.size(0);
  const at::ScalarType acc =
      (features.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  const at::Tensor w = weight.to(acc);
  const at::Tensor tau_values = taus.to(features.device(), acc).contiguous();
  at::Tensor bias_values;
  if (bias.has_value()) bias_values = bias->to(acc).contiguous();
  at::Tensor predictions = at::empty({K, N}, features.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(acc, "fastlt_tau_sweep_cuda", [&] {
    using A = scalar_t;
    const at::Tensor sum_squares = w.mul(w).sum(1).contiguous();
    at::Tensor scales = at::empty({K, C}, w.options());
    const int64_t total = K * C;
    compute_scales<A><<<(total + kThreads - 1) / kThreads, kThreads, 0, current_stream()>>>(
        sum_squares.data_ptr<A>(), tau_values.data_ptr<A>(), C, K, static_cast<A>(eps), scales.data_ptr<A>());
    check_launch("fastlt.tau_sweep");
    const at::Tensor weight_t = w.t();
    for (int64_t r0 = 0; r0 < N; r0 += kRowBlock) {
      const int64_t rows = std::min(kRowBlock, N - r0);
      const at::Tensor raw = at::mm(features.narrow(0, r0, rows).to(acc), weight_t).contiguous();
      sweep_rows<A><<<rows, kThreads, 0, current_stream()>>>(
          raw.data_ptr<A>(), scales.data_ptr<A>(), bias_values.defined() ? bias_values.data_ptr<A>() : nullptr, C, K, N,
          r0, predictions.data_ptr<int64_t>());
      check_launch("fastlt.tau_sweep");
    }
  });
  return predictions;
}

}  // namespace cuda
}  // namespace fastlt

TORCH_LIBRARY_IMPL(fastlt, CUDA, m) { m.impl("tau_sweep", &fastlt::cuda::tau_sweep); }
