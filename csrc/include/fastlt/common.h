// Shared by the CPU (g++) and CUDA (nvcc) builds: the per-row math of every op lives in headers that include
// this one, so the CPU tests exercise exactly the arithmetic the GPU kernels run.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTLT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTLT_HOST_DEVICE inline
#endif

namespace fastlt {

// Accumulation type: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 (gradcheck).
template <typename T>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};
template <typename T>
using acc_t = typename acc_type<T>::type;

// torch.argmax semantics: NaN wins over any number, the first index wins ties.
template <typename A>
FASTLT_HOST_DEVICE bool argmax_better(A value, int64_t index, A best, int64_t best_index) {
  if (best_index < 0) return true;  // nothing seen yet
  const bool value_nan = value != value;
  const bool best_nan = best != best;
  if (value_nan || best_nan) {
    return value_nan && (!best_nan || index < best_index);
  }
  return value > best || (value == best && index < best_index);
}

// pow that resolves to powf/pow on both the host and the device.
FASTLT_HOST_DEVICE float power(float base, float exponent) { return powf(base, exponent); }
FASTLT_HOST_DEVICE double power(double base, double exponent) { return pow(base, exponent); }
FASTLT_HOST_DEVICE float square_root(float x) { return sqrtf(x); }
FASTLT_HOST_DEVICE double square_root(double x) { return sqrt(x); }

// The fused losses' reduction argument, as fastlt.ops._checks.REDUCTIONS numbers them. kNone returns per-row losses
// whose sum is the kSum loss; kMean divides each term by its normaliser (docs/methods.md 6.5).
enum Reduction : int64_t { kReductionNone = 0, kReductionMean = 1, kReductionSum = 2 };

// Largest expert / branch count the kernels keep per-row state for (local arrays).
constexpr int kMaxExperts = 64;

}  // namespace fastlt
