// Helpers for the lean CUDA translation units (no torch/extension.h: compile times in docs/building.md section 4).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "fastlt/common.h"
#include "fastlt/softmax_stats.h"

namespace fastlt {
namespace cuda {

constexpr int kThreads = 256;

inline void check_cuda(const at::Tensor& tensor, const char* op, const char* name) {
  TORCH_CHECK(tensor.is_cuda(), op, " (CUDA kernel): ", name, " must be a CUDA tensor, got a tensor on ",
              tensor.device());
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_launch(const char* op) {
  const cudaError_t error = cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

// Tree reduction over the block (blockDim.x == kThreads) with combine(V, V) -> V; every thread gets the result.
// The order of the combines is fixed, so the result does not vary from run to run.
template <typename V, typename Combine>
__device__ V block_reduce(V value, V* shared, Combine combine) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int offset = kThreads / 2; offset > 0; offset >>= 1) {
    if (threadIdx.x < offset) shared[threadIdx.x] = combine(shared[threadIdx.x], shared[threadIdx.x + offset]);
    __syncthreads();
  }
  const V total = shared[0];
  __syncthreads();
  return total;
}

template <typename A>
__device__ A block_sum(A value, A* shared) {
  return block_reduce(value, shared, [](A a, A b) { return a + b; });
}

// The row's softmax statistics from each thread's part (fused losses: one block per row).
template <typename A>
__device__ SoftmaxStats<A> block_softmax_stats(SoftmaxStats<A> partial, SoftmaxStats<A>* shared) {
  return block_reduce(partial, shared, [](SoftmaxStats<A> a, SoftmaxStats<A> b) { return merge_softmax_stats(a, b); });
}

}  // namespace cuda
}  // namespace fastlt
