// Argument checks and small helpers shared by the CPU kernels and the CUDA launchers (host code only). Each op's
// checks live here once, so the two devices cannot drift, and they refuse exactly what the Python wrapper
// (fastlt/ops/<op>.py `_validate`) refuses, with a ValueError (TORCH_CHECK_VALUE) naming the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <optional>

#include "fastlt/common.h"
#include "fastlt/expert_aggregate.h"

namespace fastlt {

inline bool is_float_dtype(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

inline at::ScalarType accumulate_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A floating tensor with `dims` dims and at least one element.
inline void check_float_tensor(const at::Tensor& t, int64_t dims, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dims, op, ": ", name, " must have ", dims, " dims, got shape ", t.sizes());
  TORCH_CHECK_VALUE(is_float_dtype(t), op, ": ", name, " must be float16/bfloat16/float32/float64, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() > 0, op, ": ", name, " must not be empty, got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& reference, const char* op, const char* name,
                              const char* reference_name) {
  TORCH_CHECK_VALUE(t.device() == reference.device(), op, ": ", name, " is on ", t.device(), " but ", reference_name,
                    " is on ", reference.device());
}

inline void check_tau(double tau, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau >= 0.0, op, ": tau must be a finite number >= 0, got ", tau);
}

inline void check_eps(double eps, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, op, ": eps must be a finite number > 0, got ", eps);
}

// ---- expert_aggregate ----

inline int parse_reduce(c10::string_view reduce) {
  if (reduce == "mean") return expert_aggregate::kMean;
  if (reduce == "sum") return expert_aggregate::kSum;
  TORCH_CHECK_VALUE(false, "fastlt.expert_aggregate: reduce must be one of ('mean', 'sum'), got '", std::string(reduce),
                    "'");
  return 0;
}

// Checks logits [E, B, C] and the optional weights ([E] or [B, E]) / active ([B, E] bool) and returns the
// per-row weight table [B, E] in the accumulation dtype (undefined when weights is absent) and a contiguous
// active table (undefined when absent).
inline std::tuple<at::Tensor, at::Tensor> expert_aggregate_tables(const at::Tensor& logits,
                                                                  const std::optional<at::Tensor>& weights,
                                                                  const std::optional<at::Tensor>& active) {
  constexpr const char* op = "fastlt.expert_aggregate";
  check_float_tensor(logits, 3, op, "logits");
  const int64_t E = logits.size(0), B = logits.size(1);
  TORCH_CHECK_VALUE(E <= kMaxExperts, op, ": logits has ", E, " experts; at most ", kMaxExperts, " are supported");
  at::Tensor weight_table, active_table;
  if (weights.has_value()) {
    const auto& w = *weights;
    TORCH_CHECK_VALUE(w.dim() == 1 || w.dim() == 2, op, ": weights must have (1, 2) dims, got shape ", w.sizes());
    check_float_tensor(w, w.dim(), op, "weights");
    check_same_device(w, logits, op, "weights", "logits");
    TORCH_CHECK_VALUE((w.dim() == 1 && w.size(0) == E) || (w.dim() == 2 && w.size(0) == B && w.size(1) == E), op,
                      ": weights must be [E]=[", E, "] or [B, E]=[", B, ", ", E, "], got ", w.sizes());
    weight_table = w.to(accumulate_dtype(logits)).expand({B, E}).contiguous();
  }
  if (active.has_value()) {
    const auto& a = *active;
    TORCH_CHECK_VALUE(a.dim() == 2, op, ": active must have 2 dims, got shape ", a.sizes());
    check_same_device(a, logits, op, "active", "logits");
    TORCH_CHECK_VALUE(a.scalar_type() == at::kBool, op, ": active must be a bool tensor, got ", a.scalar_type());
    TORCH_CHECK_VALUE(a.size(0) == B && a.size(1) == E, op, ": active must be [B, E]=[", B, ", ", E, "], got ",
                      a.sizes());
    active_table = a.contiguous();
  }
  return {weight_table, active_table};
}

// A routed row with no active expert has no mean: refuse it rather than return 0 or NaN.
inline void check_active_rows(const at::Tensor& active_table) {
  if (!active_table.defined() || active_table.size(0) == 0) return;
  const at::Tensor empty_rows = active_table.logical_not().all(1);
  if (empty_rows.any().item<bool>()) {
    const int64_t row = empty_rows.nonzero().select(1, 0).min().item<int64_t>();
    TORCH_CHECK_VALUE(false, "fastlt.expert_aggregate: active row ", row,
                      " has no active expert (every row needs >= 1)");
  }
}

// The incoming gradient of the backward op: [B, C] floating, on the logits' device.
inline void check_expert_aggregate_grad(const at::Tensor& grad, const at::Tensor& logits) {
  constexpr const char* op = "fastlt.expert_aggregate_backward";
  TORCH_CHECK_VALUE(is_float_dtype(grad), op, ": grad must be floating point, got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == logits.size(1) && grad.size(1) == logits.size(2), op,
                    ": grad must be [B, C]=[", logits.size(1), ", ", logits.size(2), "], got ", grad.sizes());
  check_same_device(grad, logits, op, "grad", "logits");
}

// ---- tau_normalize ----

inline void check_tau_normalize_inputs(const at::Tensor& weight, double tau, double eps, const char* op) {
  check_float_tensor(weight, 2, op, "weight");
  check_tau(tau, op);
  check_eps(eps, op);
}

inline void check_tau_normalize_backward_inputs(const at::Tensor& grad, const at::Tensor& weight, double tau,
                                                double eps) {
  constexpr const char* op = "fastlt.tau_normalize_backward";
  check_tau_normalize_inputs(weight, tau, eps, op);
  TORCH_CHECK_VALUE(is_float_dtype(grad), op, ": grad must be floating point, got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.sizes() == weight.sizes(), op, ": grad must match weight's shape ", weight.sizes(), ", got ",
                    grad.sizes());
  check_same_device(grad, weight, op, "grad", "weight");
}

// ---- tau_sweep ----

inline void check_tau_sweep_inputs(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& taus,
                                   const std::optional<at::Tensor>& bias, double eps) {
  constexpr const char* op = "fastlt.tau_sweep";
  check_float_tensor(features, 2, op, "features");
  check_float_tensor(weight, 2, op, "weight");
  check_same_device(weight, features, op, "weight", "features");
  TORCH_CHECK_VALUE(features.size(1) == weight.size(1), op, ": features [N, D] and weight [C, D] disagree on D (",
                    features.size(1), " vs ", weight.size(1), ")");
  check_float_tensor(taus, 1, op, "taus");
  check_same_device(taus, features, op, "taus", "features");
  if (bias.has_value()) {
    check_float_tensor(*bias, 1, op, "bias");
    check_same_device(*bias, features, op, "bias", "features");
    TORCH_CHECK_VALUE(bias->size(0) == weight.size(0), op, ": bias must be [C]=[", weight.size(0), "], got ",
                      bias->sizes());
  }
  check_eps(eps, op);
  // The taus' values are read on the host (a device sync for CUDA taus, which are few).
  const at::Tensor host_taus = taus.to(at::kCPU, at::kDouble).contiguous();
  const double* tau_values = host_taus.data_ptr<double>();
  for (int64_t k = 0; k < host_taus.numel(); ++k)
    TORCH_CHECK_VALUE(std::isfinite(tau_values[k]) && tau_values[k] >= 0.0, op,
                      ": every tau must be a finite number >= 0, got ", tau_values[k], " at index ", k);
}

}  // namespace fastlt
