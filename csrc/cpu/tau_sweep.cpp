// CPU kernel of fastlt::tau_sweep: raw logits features @ weight.T are computed once per block of rows (one GEMM),
// then every tau's prediction is an argmax over raw * scale[tau] + bias, never materialising K logit matrices.
// The argmax is compiled per ISA (cpu/per_isa.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <vector>

#include "cpu/per_isa.h"
#include "fastlt/tau_sweep.h"
#include "ops_common.h"

namespace fastlt {
namespace cpu {
namespace {

constexpr int64_t kRowBlock = 256;

// 64-byte GCC vector types: one AVX-512 register (two AVX2 / four SSE registers in the other clones).
template <typename A>
struct Vec64;
template <>
struct Vec64<float> {
  using type = float __attribute__((vector_size(64)));
  using mask = int32_t __attribute__((vector_size(64)));
};
template <>
struct Vec64<double> {
  using type = double __attribute__((vector_size(64)));
  using mask = int64_t __attribute__((vector_size(64)));
};

// Index of the first maximum of raw * scales + bias (torch.argmax semantics: the first NaN wins). A vector pass keeps
// per-lane maxima and NaN flags (the select below is exactly maxps' semantics, so it needs no -ffast-math); a second
// scan finds the first index holding the maximum. Each score is tau_sweep::score's expression.
template <typename A>
__attribute__((always_inline)) inline int64_t row_argmax_impl(const A* __restrict raw, const A* __restrict scales,
                                                              const A* __restrict bias, int64_t C,
                                                              A* __restrict values) {
  using V = typename Vec64<A>::type;
  using M = typename Vec64<A>::mask;
  constexpr int64_t kLanes = sizeof(V) / sizeof(A);
  const A lowest = -std::numeric_limits<A>::infinity();
  V best = V{} + lowest;
  M nan = M{};
  int64_t j = 0;
  for (; j + kLanes <= C; j += kLanes) {
    V r, s, v;
    std::memcpy(&r, raw + j, sizeof(V));
    std::memcpy(&s, scales + j, sizeof(V));
    v = r * s;
    if (bias != nullptr) {
      V b;
      std::memcpy(&b, bias + j, sizeof(V));
      v = v + b;
    }
    std::memcpy(values + j, &v, sizeof(V));
    best = v > best ? v : best;
    nan |= (v != v);
  }
  A best_value = lowest;
  bool any_nan = false;
  for (int64_t l = 0; l < kLanes; ++l) {
    best_value = best[l] > best_value ? best[l] : best_value;
    any_nan = any_nan || nan[l] != 0;
  }
  for (; j < C; ++j) {
    const A v = tau_sweep::score(raw[j], scales[j], bias, j);
    values[j] = v;
    best_value = v > best_value ? v : best_value;
    any_nan = any_nan || v != v;
  }
  for (int64_t i = 0; i < C; ++i) {
    if (any_nan ? values[i] != values[i] : values[i] == best_value) return i;
  }
  return 0;
}

FASTLT_PER_ISA int64_t row_argmax(const float* raw, const float* scales, const float* bias, int64_t C, float* values) {
  return row_argmax_impl<float>(raw, scales, bias, C, values);
}
FASTLT_PER_ISA int64_t row_argmax(const double* raw, const double* scales, const double* bias, int64_t C,
                                  double* values) {
  return row_argmax_impl<double>(raw, scales, bias, C, values);
}

}  // namespace

at::Tensor tau_sweep(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& taus,
                     const std::optional<at::Tensor>& bias, double eps) {
  check_tau_sweep_inputs(features, weight, taus, bias, eps);
  TORCH_CHECK(features.device().is_cpu(), "fastlt.tau_sweep (CPU kernel): features must be a CPU tensor");
  const int64_t N = features.size(0), C = weight.size(0), K = taus.size(0);
  const at::ScalarType acc =
      (features.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  const at::Tensor w = weight.to(acc);
  const at::Tensor tau_values = taus.to(at::kCPU, acc).contiguous();
  at::Tensor bias_values;
  if (bias.has_value()) bias_values = bias->to(acc).contiguous();
  at::Tensor predictions = at::empty({K, N}, features.options().dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES(acc, "fastlt_tau_sweep_cpu", [&] {
    using A = scalar_t;
    // scales[k, j] = max(||w_j||, eps) ** -tau_k
    const at::Tensor sum_squares = w.mul(w).sum(1).contiguous();
    at::Tensor scales = at::empty({K, C}, w.options());
    const A* ss = sum_squares.data_ptr<A>();
    const A* tv = tau_values.data_ptr<A>();
    A* sc = scales.data_ptr<A>();
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < C; ++j) sc[k * C + j] = tau_normalize::row_scale<A>(ss[j], tv[k], static_cast<A>(eps));
    const A* bp = bias_values.defined() ? bias_values.data_ptr<A>() : nullptr;
    int64_t* out = predictions.data_ptr<int64_t>();
    const at::Tensor weight_t = w.t();
    // One parallel region over all rows: each thread multiplies its own row blocks (at::mm runs single-threaded
    // inside a parallel region) and takes their argmaxes, so there is one barrier per call, not one per block.
    at::parallel_for(0, N, kRowBlock, [&](int64_t begin, int64_t end) {
      std::vector<A> values(C);
      for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, end - r0);
        const at::Tensor raw = at::mm(features.narrow(0, r0, rows).to(acc), weight_t).contiguous();
        const A* rp = raw.data_ptr<A>();
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t k = 0; k < K; ++k)
            out[k * N + r0 + i] = row_argmax(rp + i * C, sc + k * C, bp, C, values.data());
      }
    });
  });
  return predictions;
}

}  // namespace cpu
}  // namespace fastlt

TORCH_LIBRARY_FRAGMENT(fastlt, m) {
  m.def("tau_sweep(Tensor features, Tensor weight, Tensor taus, Tensor? bias, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlt, CPU, m) { m.impl("tau_sweep", &fastlt::cpu::tau_sweep); }
