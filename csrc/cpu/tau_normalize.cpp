// CPU kernels of fastlt::tau_normalize: one weight row per iteration, OpenMP over rows; math in
// fastlt/tau_normalize.h. The row loops are vectorised (`omp simd` reductions, compiled per ISA): a plain
// `sum += w * w` loop is one dependent add per element, a third of eager PyTorch's speed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/per_isa.h"
#include "fastlt/tau_normalize.h"
#include "ops_common.h"

namespace fastlt {
namespace cpu {
namespace {

// out = w * max(||w||, eps) ** -tau for one row of D values.
template <typename T, typename A>
FASTLT_ALWAYS_INLINE void normalize_row_impl(const T* w, T* out, int64_t D, A tau, A eps) {
  A sum_squares = A(0);
#pragma omp simd reduction(+ : sum_squares)
  for (int64_t d = 0; d < D; ++d) sum_squares += static_cast<A>(w[d]) * static_cast<A>(w[d]);
  const A scale = tau_normalize::row_scale<A>(sum_squares, tau, eps);
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(static_cast<A>(w[d]) * scale);
}

// out = dL/dw for one row, given dL/dy = g.
template <typename T, typename A>
FASTLT_ALWAYS_INLINE void normalize_row_backward_impl(const T* w, const T* g, T* out, int64_t D, A tau, A eps) {
  A sum_squares = A(0), grad_dot_weight = A(0);
#pragma omp simd reduction(+ : sum_squares, grad_dot_weight)
  for (int64_t d = 0; d < D; ++d) {
    const A wd = static_cast<A>(w[d]);
    sum_squares += wd * wd;
    grad_dot_weight += static_cast<A>(g[d]) * wd;
  }
  const A scale = tau_normalize::row_scale<A>(sum_squares, tau, eps);
  const A coefficient = tau_normalize::row_grad_weight_coefficient<A>(sum_squares, grad_dot_weight, tau, eps);
#pragma omp simd
  for (int64_t d = 0; d < D; ++d)
    out[d] = static_cast<T>(scale * static_cast<A>(g[d]) - coefficient * static_cast<A>(w[d]));
}

// fp16 / bf16 rows (fp32 accumulation) take the generic build; fp32 and fp64 the per-ISA ones.
template <typename T, typename A>
void normalize_row(const T* w, T* out, int64_t D, A tau, A eps) {
  normalize_row_impl(w, out, D, tau, eps);
}
FASTLT_PER_ISA void normalize_row(const float* w, float* out, int64_t D, float tau, float eps) {
  normalize_row_impl(w, out, D, tau, eps);
}
FASTLT_PER_ISA void normalize_row(const double* w, double* out, int64_t D, double tau, double eps) {
  normalize_row_impl(w, out, D, tau, eps);
}

template <typename T, typename A>
void normalize_row_backward(const T* w, const T* g, T* out, int64_t D, A tau, A eps) {
  normalize_row_backward_impl(w, g, out, D, tau, eps);
}
FASTLT_PER_ISA void normalize_row_backward(const float* w, const float* g, float* out, int64_t D, float tau,
                                           float eps) {
  normalize_row_backward_impl(w, g, out, D, tau, eps);
}
FASTLT_PER_ISA void normalize_row_backward(const double* w, const double* g, double* out, int64_t D, double tau,
                                           double eps) {
  normalize_row_backward_impl(w, g, out, D, tau, eps);
}

}  // namespace

at::Tensor tau_normalize(const at::Tensor& weight_in, double tau, double eps) {
  check_tau_normalize_inputs(weight_in, tau, eps, "fastlt.tau_normalize");
  TORCH_CHECK(weight_in.device().is_cpu(), "fastlt.tau_normalize (CPU kernel): weight must be a CPU tensor");
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor out = at::empty_like(weight);
  const int64_t C = weight.size(0), D = weight.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fastlt_tau_normalize_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, C, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, D)),
                     [&](int64_t c0, int64_t c1) {
                       for (int64_t c = c0; c < c1; ++c)
                         normalize_row(w + c * D, o + c * D, D, static_cast<A>(tau), static_cast<A>(eps));
                     });
  });
  return out;
}

at::Tensor tau_normalize_backward(const at::Tensor& grad_in, const at::Tensor& weight_in, double tau, double eps) {
  check_tau_normalize_backward_inputs(grad_in, weight_in, tau, eps);
  TORCH_CHECK(weight_in.device().is_cpu(), "fastlt.tau_normalize_backward (CPU kernel): weight must be a CPU tensor");
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor grad = grad_in.to(weight.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(weight);
  const int64_t C = weight.size(0), D = weight.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fastlt_tau_normalize_bwd", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(
        0, C, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, D)), [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c)
            normalize_row_backward(w + c * D, g + c * D, o + c * D, D, static_cast<A>(tau), static_cast<A>(eps));
        });
  });
  return out;
}

}  // namespace cpu
}  // namespace fastlt

TORCH_LIBRARY_FRAGMENT(fastlt, m) {
  m.def("tau_normalize(Tensor weight, float tau, float eps) -> Tensor");
  m.def("tau_normalize_backward(Tensor grad, Tensor weight, float tau, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlt, CPU, m) {
  m.impl("tau_normalize", &fastlt::cpu::tau_normalize);
  m.impl("tau_normalize_backward", &fastlt::cpu::tau_normalize_backward);
}
