// Vectorised row loops of the fused losses (csrc/cpu/{ride_loss,reslt_loss,prior_shifted_ce}.cpp): row maxima and
// exp(x - shift) with their sum. The losses are bound by exp throughput, so exp is a polynomial (~1 ulp) written in
// plain arithmetic that GCC vectorises under `omp simd`; each loop is compiled per ISA (cpu/per_isa.h). fp64
// (gradcheck) uses std::exp.
#pragma once

#include <ATen/ATen.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/per_isa.h"

namespace fastlt {
namespace cpu {

// exp(x) = 2^n * p(r), n = round(x / ln 2), r = x - n ln 2 (one FMA), p a degree-6 polynomial (minimax for relative
// error on |r| <= ln(2) / 2, Horner with FMAs), and 2^n added to p's exponent bits with integer arithmetic instead of a
// multiply: 8 FMAs per exp. Relative error <= 1.2e-7 on [-20, 0] and <= 3e-7 down to -86.5, measured over every fp32
// input. Inputs below -86.5 give exp(-86.5) ~ 2.7e-38 (the smallest value for which 2^n * p stays normal); NaN stays
// NaN. Callers pass x <= 0 (logits minus their row maximum), so overflow cannot happen.
FASTLT_ALWAYS_INLINE float vector_exp(float x) {
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  const float clamped = x < -86.5f ? -86.5f : x;
  const float shifted = __builtin_fmaf(clamped, 1.44269504088896341f, kRoundMagic);
  const float n = shifted - kRoundMagic;
  int32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(float));
  const float r = __builtin_fmaf(n, -0.693147182464599609375f, clamped);
  float p = 1.3814612757e-03f;
  p = __builtin_fmaf(p, r, 8.3687100559e-03f);
  p = __builtin_fmaf(p, r, 4.1668388993e-02f);
  p = __builtin_fmaf(p, r, 1.6666521132e-01f);
  p = __builtin_fmaf(p, r, 4.9999994040e-01f);
  p = __builtin_fmaf(p, r, 1.0f);
  p = __builtin_fmaf(p, r, 1.0f);
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(float));
  bits += shifted_bits << 23;  // n << 23: the bits of kRoundMagic shift out, leaving n in the exponent field
  float result;
  std::memcpy(&result, &bits, sizeof(float));
  return result;
}
FASTLT_ALWAYS_INLINE double vector_exp(double x) { return std::exp(x); }

// max_c x[c] * scale[c] (scale == nullptr: max_c x[c]); -inf for an empty row. NaN is skipped here and propagates
// through the exp of the next pass.
template <typename A>
FASTLT_ALWAYS_INLINE A row_max_impl(const A* x, const A* scale, int64_t n) {
  A best = -std::numeric_limits<A>::infinity();
  if (scale == nullptr) {
#pragma omp simd reduction(max : best)
    for (int64_t c = 0; c < n; ++c) best = x[c] > best ? x[c] : best;
  } else {
#pragma omp simd reduction(max : best)
    for (int64_t c = 0; c < n; ++c) {
      const A value = x[c] * scale[c];
      best = value > best ? value : best;
    }
  }
  return best;
}

// out[c] = exp(x[c] * scale[c] - shift) (scale == nullptr: exp(x[c] - shift)); returns sum_c out[c].
template <typename A>
FASTLT_ALWAYS_INLINE A exp_shifted_impl(const A* x, const A* scale, A shift, A* out, int64_t n) {
  A sum = A(0);
  if (scale == nullptr) {
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < n; ++c) {
      const A e = vector_exp(x[c] - shift);
      out[c] = e;
      sum += e;
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < n; ++c) {
      const A e = vector_exp(x[c] * scale[c] - shift);
      out[c] = e;
      sum += e;
    }
  }
  return sum;
}

// at::empty for a large output written once per call (the losses' gradients). A fresh buffer of tens of MB costs one
// page fault per 4 KiB page on first write, which took longer than the loss itself; asking the kernel for 2 MiB
// transparent huge pages over the buffer's aligned interior (before anything touches it) removes almost all of them.
inline at::Tensor empty_with_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor tensor = at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(tensor.data_ptr());
  const uintptr_t end = begin + tensor.nbytes();
  const uintptr_t aligned_begin = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t aligned_end = end & ~(kHugePage - 1);
  if (aligned_end > aligned_begin)  // advice only: failure (e.g. THP disabled) leaves ordinary pages
    madvise(reinterpret_cast<void*>(aligned_begin), aligned_end - aligned_begin, MADV_HUGEPAGE);
  return tensor;
}

// Rows per parallel task, so that a task holds at least 2^16 logits: small losses (CIFAR: 3 x 128 x 100, ~50 us) then
// run on the calling thread, since waking a worker on a busy machine can cost a scheduler time slice (several ms).
inline int64_t rows_per_task(int64_t logits_per_row) {
  constexpr int64_t kMinLogitsPerTask = int64_t(1) << 16;
  return std::max<int64_t>(1, kMinLogitsPerTask / std::max<int64_t>(1, logits_per_row));
}

// The row as contiguous accumulation-type values: the input itself when it already is, else a converted copy.
template <typename T, typename A>
const A* contiguous_row(const T* row, int64_t stride, int64_t n, A* staging) {
  if constexpr (std::is_same_v<T, A>) {
    if (stride == 1) return row;
  }
  for (int64_t c = 0; c < n; ++c) staging[c] = static_cast<A>(row[c * stride]);
  return staging;
}

// Software prefetch of the next row while the current one is computed, one instruction per 64-byte line: a
// row's first pass would otherwise wait on DRAM (the hardware prefetcher cannot run ahead across rows), and the
// gradient rows are written by a read-for-ownership that stalls just the same. read / write may be nullptr.
template <typename A>
FASTLT_ALWAYS_INLINE void prefetch_lines(const A* read, A* write, int64_t n) {
  constexpr int64_t kPerLine = 64 / sizeof(A);
  for (int64_t c = 0; c < n; c += kPerLine) {
    if (read != nullptr) __builtin_prefetch(read + c, 0, 2);
    if (write != nullptr) __builtin_prefetch(write + c, 1, 2);
  }
}

// out[c] = x[c] + y[c] (summed branch logits, prior-shifted logits).
template <typename A>
FASTLT_ALWAYS_INLINE void add_rows_impl(const A* x, const A* y, A* out, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) out[c] = x[c] + y[c];
}

// out[c] = a[c] * a_scale + b[c] * b_scale (b == nullptr: a[c] * a_scale): probabilities (exp rows times
// coefficient / sum) combined into a gradient row.
template <typename A>
FASTLT_ALWAYS_INLINE void scaled_rows_impl(const A* a, A a_scale, const A* b, A b_scale, A* out, int64_t n) {
  if (b == nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) out[c] = a[c] * a_scale;
    return;
  }
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) out[c] = a[c] * a_scale + b[c] * b_scale;
}

// Internal to each kernel .cpp (a target_clones function cannot be inline); each uses only some of them.
namespace {
[[maybe_unused]] FASTLT_PER_ISA void add_rows(const float* x, const float* y, float* out, int64_t n) {
  add_rows_impl(x, y, out, n);
}
[[maybe_unused]] FASTLT_PER_ISA void add_rows(const double* x, const double* y, double* out, int64_t n) {
  add_rows_impl(x, y, out, n);
}
[[maybe_unused]] FASTLT_PER_ISA void scaled_rows(const float* a, float a_scale, const float* b, float b_scale,
                                                 float* out, int64_t n) {
  scaled_rows_impl(a, a_scale, b, b_scale, out, n);
}
[[maybe_unused]] FASTLT_PER_ISA void scaled_rows(const double* a, double a_scale, const double* b, double b_scale,
                                                 double* out, int64_t n) {
  scaled_rows_impl(a, a_scale, b, b_scale, out, n);
}
[[maybe_unused]] FASTLT_PER_ISA float row_max(const float* x, const float* scale, int64_t n) {
  return row_max_impl(x, scale, n);
}
[[maybe_unused]] FASTLT_PER_ISA double row_max(const double* x, const double* scale, int64_t n) {
  return row_max_impl(x, scale, n);
}
[[maybe_unused]] FASTLT_PER_ISA float exp_shifted(const float* x, const float* scale, float shift, float* out,
                                                  int64_t n) {
  return exp_shifted_impl(x, scale, shift, out, n);
}
[[maybe_unused]] FASTLT_PER_ISA double exp_shifted(const double* x, const double* scale, double shift, double* out,
                                                   int64_t n) {
  return exp_shifted_impl(x, scale, shift, out, n);
}
}  // namespace

}  // namespace cpu
}  // namespace fastlt
