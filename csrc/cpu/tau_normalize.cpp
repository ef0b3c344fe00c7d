// CPU kernels of fastlt::tau_normalize: one weight row per iteration, OpenMP over rows; math in
// fastlt/tau_normalize.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "kernels.h"
#include "fastlt/tau_normalize.h"
#include "ops_common.h"

namespace fastlt {
namespace cpu {
namespace {

void check_weight(const at::Tensor& weight, const char* op) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [C, D], got ", weight.dim(), " dims");
  TORCH_CHECK(is_float_dtype(weight), op, ": weight must be floating point, got ", weight.scalar_type());
  TORCH_CHECK(weight.device().is_cpu(), op, " (CPU kernel): weight must be a CPU tensor");
}

}  // namespace

at::Tensor tau_normalize(const at::Tensor& weight_in, double tau, double eps) {
  check_weight(weight_in, "fastlt.tau_normalize");
  check_tau(tau, "fastlt.tau_normalize");
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor out = at::empty_like(weight);
  const int64_t C = weight.size(0), D = weight.size(1);
  if (weight.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fastlt_tau_normalize_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, C, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, D)), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const scalar_t* row = w + c * D;
        A sum_squares = A(0);
        for (int64_t d = 0; d < D; ++d) sum_squares += static_cast<A>(row[d]) * static_cast<A>(row[d]);
        const A scale = tau_normalize::row_scale<A>(sum_squares, static_cast<A>(tau), static_cast<A>(eps));
        for (int64_t d = 0; d < D; ++d) o[c * D + d] = static_cast<scalar_t>(static_cast<A>(row[d]) * scale);
      }
    });
  });
  return out;
}

at::Tensor tau_normalize_backward(const at::Tensor& grad_in, const at::Tensor& weight_in, double tau, double eps) {
  check_weight(weight_in, "fastlt.tau_normalize_backward");
  TORCH_CHECK(grad_in.sizes() == weight_in.sizes(), "fastlt.tau_normalize_backward: grad must match weight's shape");
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor grad = grad_in.to(weight.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(weight);
  const int64_t C = weight.size(0), D = weight.size(1);
  if (weight.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fastlt_tau_normalize_bwd", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, C, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, D)), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const scalar_t* w_row = w + c * D;
        const scalar_t* g_row = g + c * D;
        A sum_squares = A(0), grad_dot_weight = A(0);
        for (int64_t d = 0; d < D; ++d) {
          const A wd = static_cast<A>(w_row[d]);
          sum_squares += wd * wd;
          grad_dot_weight += static_cast<A>(g_row[d]) * wd;
        }
        const A a = static_cast<A>(tau), e = static_cast<A>(eps);
        const A scale = tau_normalize::row_scale<A>(sum_squares, a, e);
        const A coefficient = tau_normalize::row_grad_weight_coefficient<A>(sum_squares, grad_dot_weight, a, e);
        for (int64_t d = 0; d < D; ++d)
          o[c * D + d] = static_cast<scalar_t>(scale * static_cast<A>(g_row[d]) - coefficient * static_cast<A>(w_row[d]));
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace fastlt
