// Argument checks and small helpers shared by the CPU kernels and the CUDA launchers (host code only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

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

inline int parse_reduce(c10::string_view reduce) {
  if (reduce == "mean") return expert_aggregate::kMean;
  if (reduce == "sum") return expert_aggregate::kSum;
  TORCH_CHECK(false, "fastlt.expert_aggregate: reduce must be 'mean' or 'sum', got '", std::string(reduce), "'");
  return 0;
}

// Checks logits [E, B, C] and the optional weights ([E] or [B, E]) / active ([B, E] bool) and returns the
// per-row weight table [B, E] in the accumulation dtype (undefined when weights is absent) and a contiguous
// active table (undefined when absent).
inline std::tuple<at::Tensor, at::Tensor> expert_aggregate_tables(const at::Tensor& logits,
                                                                  const std::optional<at::Tensor>& weights,
                                                                  const std::optional<at::Tensor>& active) {
  TORCH_CHECK(logits.dim() == 3, "fastlt.expert_aggregate: logits must be [E, B, C], got ", logits.dim(), " dims");
  TORCH_CHECK(is_float_dtype(logits), "fastlt.expert_aggregate: logits must be floating point, got ",
              logits.scalar_type());
  const int64_t E = logits.size(0), B = logits.size(1);
  TORCH_CHECK(E >= 1 && E <= kMaxExperts, "fastlt.expert_aggregate: logits must have 1..", kMaxExperts,
              " experts, got ", E);
  at::Tensor weight_table, active_table;
  if (weights.has_value()) {
    const auto& w = *weights;
    TORCH_CHECK(is_float_dtype(w), "fastlt.expert_aggregate: weights must be floating point, got ", w.scalar_type());
    TORCH_CHECK(w.device() == logits.device(), "fastlt.expert_aggregate: weights must be on ", logits.device());
    TORCH_CHECK((w.dim() == 1 && w.size(0) == E) || (w.dim() == 2 && w.size(0) == B && w.size(1) == E),
                "fastlt.expert_aggregate: weights must be [E] or [B, E] = [", B, ", ", E, "], got ", w.sizes());
    weight_table = w.to(accumulate_dtype(logits)).expand({B, E}).contiguous();
  }
  if (active.has_value()) {
    const auto& a = *active;
    TORCH_CHECK(a.scalar_type() == at::kBool, "fastlt.expert_aggregate: active must be bool, got ", a.scalar_type());
    TORCH_CHECK(a.device() == logits.device(), "fastlt.expert_aggregate: active must be on ", logits.device());
    TORCH_CHECK(a.dim() == 2 && a.size(0) == B && a.size(1) == E,
                "fastlt.expert_aggregate: active must be [B, E] = [", B, ", ", E, "], got ", a.sizes());
    active_table = a.contiguous();
  }
  return {weight_table, active_table};
}

inline void check_tau(double tau, const char* op) {
  TORCH_CHECK(tau >= 0.0, op, ": tau must be >= 0, got ", tau);
}

}  // namespace fastlt

namespace fastlt {

// A routed row with no active expert has no mean: refuse it rather than return 0 or NaN.
inline void check_active_rows(const at::Tensor& active_table) {
  if (!active_table.defined() || active_table.size(0) == 0) return;
  const at::Tensor empty_rows = active_table.logical_not().all(1);
  if (empty_rows.any().item<bool>()) {
    const int64_t row = empty_rows.nonzero().select(1, 0).min().item<int64_t>();
    TORCH_CHECK(false, "fastlt.expert_aggregate: active row ", row, " has no active expert (every row needs >= 1)");
  }
}

}  // namespace fastlt
