// Kernel entry points of the fastlt ops, one set per device (fastlt::cpu in csrc/cpu/*.cpp, fastlt::cuda in
// csrc/cuda/*.cu), registered in csrc/bindings.cpp. Each checks its arguments and raises c10::Error naming the
// argument (RuntimeError in Python; the fused losses raise ValueError, see loss_checks.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

#define FASTLT_DECLARE_KERNELS                                                                                     \
  at::Tensor expert_aggregate(const at::Tensor& logits, c10::string_view reduce,                                   \
                              const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& active);  \
  std::tuple<at::Tensor, at::Tensor> expert_aggregate_backward(                                                    \
      const at::Tensor& grad, const at::Tensor& logits, c10::string_view reduce,                                   \
      const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& active,                           \
      bool weights_requires_grad);                                                                                 \
  at::Tensor tau_normalize(const at::Tensor& weight, double tau, double eps);                                      \
  at::Tensor tau_normalize_backward(const at::Tensor& grad, const at::Tensor& weight, double tau, double eps);      \
  at::Tensor tau_sweep(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& taus,               \
                       const std::optional<at::Tensor>& bias, double eps);                                    \
  std::tuple<at::Tensor, at::Tensor> ride_loss(                                                                    \
      const at::Tensor& expert_logits, const at::Tensor& target, const at::Tensor& target_margins,                 \
      const std::optional<at::Tensor>& class_weights, const at::Tensor& temperatures, double diversity_factor,     \
      bool compute_grad);                                                                                          \
  std::tuple<at::Tensor, at::Tensor> reslt_loss(const at::Tensor& branch_logits, const at::Tensor& target,        \
                                                const at::Tensor& group_masks, double beta, double log_eps,        \
                                                bool compute_grad);                                                \
  std::tuple<at::Tensor, at::Tensor> prior_shifted_ce(const at::Tensor& expert_logits, const at::Tensor& target,  \
                                                      const at::Tensor& logit_shifts, bool compute_grad);          \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ride_loss(                                     \
      const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,                 \
      const at::Tensor& target, const at::Tensor& target_margins, const std::optional<at::Tensor>& class_weights,  \
      const at::Tensor& temperatures, double scale, bool normalize, double diversity_factor, int64_t chunk_size,   \
      bool compute_grad);

namespace fastlt {
namespace cpu {
FASTLT_DECLARE_KERNELS
}  // namespace cpu
namespace cuda {
FASTLT_DECLARE_KERNELS
}  // namespace cuda
}  // namespace fastlt
