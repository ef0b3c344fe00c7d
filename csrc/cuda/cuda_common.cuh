// Helpers for the lean CUDA translation units (no torch/extension.h: see env notes on compile time).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "fastlt/common.h"

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

// Sum over the block (blockDim.x == kThreads); every thread gets the result.
template <typename A>
__device__ A block_sum(A value, A* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int offset = kThreads / 2; offset > 0; offset >>= 1) {
    if (threadIdx.x < offset) shared[threadIdx.x] += shared[threadIdx.x + offset];
    __syncthreads();
  }
  const A total = shared[0];
  __syncthreads();
  return total;
}

}  // namespace cuda
}  // namespace fastlt
