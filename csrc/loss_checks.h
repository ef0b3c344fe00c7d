// Host-side argument checks of the fused losses (ride_loss, reslt_loss, prior_shifted_ce), shared by the CPU kernels
// and the CUDA launchers. Each returns the per-class tables converted to the accumulation dtype, contiguous. They
// raise ValueError (TORCH_CHECK_VALUE), as the Python wrappers and the Triton ops do for the same inputs.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "fastlt/common.h"
#include "ops_common.h"

namespace fastlt {

inline void check_loss_logits(const at::Tensor& logits, const char* op, const char* name) {
  TORCH_CHECK_VALUE(logits.dim() == 3, op, ": ", name, " must be [E, B, C], got ", logits.dim(), " dims");
  TORCH_CHECK_VALUE(is_float_dtype(logits), op, ": ", name, " must be floating point, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(0) >= 1 && logits.size(0) <= kMaxExperts, op, ": ", name, " must have 1..", kMaxExperts,
                    " experts / branches, got ", logits.size(0));
  TORCH_CHECK_VALUE(logits.size(1) >= 1 && logits.size(2) >= 1, op, ": ", name, " must have B >= 1 and C >= 1, got ",
                    logits.sizes());
}

// target [B] int64 in [0, C), or equal to ignore_index (rows the loss skips): the range check reads the labels (a
// device sync for CUDA tensors). One aminmax over the labels; ignore_index is filtered out only when an extreme is out
// of range (the common all-valid batch pays no masked copy).
inline void check_loss_target(const at::Tensor& target, const at::Tensor& logits, const char* op,
                              std::optional<int64_t> ignore_index = std::nullopt) {
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == logits.size(1), op, ": target must be [B] = [",
                    logits.size(1), "], got ", target.sizes());
  TORCH_CHECK_VALUE(target.scalar_type() == at::kLong, op, ": target must be int64, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.device() == logits.device(), op, ": target must be on ", logits.device());
  const int64_t num_classes = logits.size(2);
  auto extremes = at::aminmax(target);
  int64_t low = std::get<0>(extremes).item<int64_t>(), high = std::get<1>(extremes).item<int64_t>();
  if ((low < 0 || high >= num_classes) && ignore_index.has_value()) {
    const at::Tensor labels = target.masked_fill(target == *ignore_index, 0);  // all ignored: in range
    extremes = at::aminmax(labels);
    low = std::get<0>(extremes).item<int64_t>(), high = std::get<1>(extremes).item<int64_t>();
  }
  TORCH_CHECK_VALUE(low >= 0 && high < num_classes, op, ": target must be in [0, ", num_classes, ")",
                    ignore_index.has_value() ? " or equal to ignore_index" : "", ", got ", low < 0 ? low : high);
}

inline void check_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK_VALUE(reduction == kReductionNone || reduction == kReductionMean || reduction == kReductionSum, op,
                    ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// A [C] floating table on the logits' device, as a contiguous tensor of the accumulation dtype.
inline at::Tensor class_table(const at::Tensor& table, const at::Tensor& logits, const char* op, const char* name) {
  TORCH_CHECK_VALUE(table.dim() == 1 && table.size(0) == logits.size(2), op, ": ", name, " must be [C] = [",
                    logits.size(2), "], got ", table.sizes());
  TORCH_CHECK_VALUE(is_float_dtype(table), op, ": ", name, " must be floating point, got ", table.scalar_type());
  TORCH_CHECK_VALUE(table.device() == logits.device(), op, ": ", name, " must be on ", logits.device());
  return table.to(accumulate_dtype(logits)).contiguous();
}

struct RideTables {
  at::Tensor margins, weights, temperatures;  // weights undefined without DRW
};

inline RideTables check_ride_loss_inputs(const at::Tensor& logits, const at::Tensor& target,
                                         const at::Tensor& target_margins,
                                         const std::optional<at::Tensor>& class_weights, const at::Tensor& temperatures,
                                         double diversity_factor, std::optional<int64_t> ignore_index = std::nullopt) {
  constexpr const char* op = "fastlt.ride_loss";
  check_loss_logits(logits, op, "expert_logits");
  TORCH_CHECK_VALUE(std::isfinite(diversity_factor), op, ": diversity_factor must be finite, got ", diversity_factor);
  check_loss_target(target, logits, op, ignore_index);
  RideTables tables;
  tables.margins = class_table(target_margins, logits, op, "target_margins");
  if (class_weights.has_value()) tables.weights = class_table(*class_weights, logits, op, "class_weights");
  tables.temperatures = class_table(temperatures, logits, op, "temperatures");
  return tables;
}

// group_masks [K, C] bool on the logits' device, each row selecting at least one class; returned contiguous.
inline at::Tensor check_reslt_loss_inputs(const at::Tensor& logits, const at::Tensor& target,
                                          const at::Tensor& group_masks, double beta, double log_eps,
                                          double fused_log_eps, std::optional<int64_t> ignore_index = std::nullopt) {
  constexpr const char* op = "fastlt.reslt_loss";
  check_loss_logits(logits, op, "branch_logits");
  check_loss_target(target, logits, op, ignore_index);
  TORCH_CHECK_VALUE(
      group_masks.dim() == 2 && group_masks.size(0) == logits.size(0) && group_masks.size(1) == logits.size(2), op,
      ": group_masks must be [K, C] = [", logits.size(0), ", ", logits.size(2), "], got ", group_masks.sizes());
  TORCH_CHECK_VALUE(group_masks.scalar_type() == at::kBool, op, ": group_masks must be bool, got ",
                    group_masks.scalar_type());
  TORCH_CHECK_VALUE(group_masks.device() == logits.device(), op, ": group_masks must be on ", logits.device());
  TORCH_CHECK_VALUE(group_masks.any(1).all().item<bool>(), op, ": every row of group_masks must select a class");
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, op, ": beta must be in [0, 1], got ", beta);
  TORCH_CHECK_VALUE(std::isfinite(log_eps) && log_eps >= 0.0, op, ": log_eps must be a finite number >= 0, got ",
                    log_eps);
  TORCH_CHECK_VALUE(std::isfinite(fused_log_eps) && fused_log_eps >= 0.0, op,
                    ": fused_log_eps must be a finite number >= 0, got ", fused_log_eps);
  return group_masks.contiguous();
}

// logit_shifts [E, C] floating on the logits' device; returned contiguous in the accumulation dtype.
inline at::Tensor check_prior_shifted_ce_inputs(const at::Tensor& logits, const at::Tensor& target,
                                                const at::Tensor& logit_shifts,
                                                std::optional<int64_t> ignore_index = std::nullopt) {
  constexpr const char* op = "fastlt.prior_shifted_ce";
  check_loss_logits(logits, op, "expert_logits");
  check_loss_target(target, logits, op, ignore_index);
  TORCH_CHECK_VALUE(
      logit_shifts.dim() == 2 && logit_shifts.size(0) == logits.size(0) && logit_shifts.size(1) == logits.size(2), op,
      ": logit_shifts must be [E, C] = [", logits.size(0), ", ", logits.size(2), "], got ", logit_shifts.sizes());
  TORCH_CHECK_VALUE(is_float_dtype(logit_shifts), op, ": logit_shifts must be floating point, got ",
                    logit_shifts.scalar_type());
  TORCH_CHECK_VALUE(logit_shifts.device() == logits.device(), op, ": logit_shifts must be on ", logits.device());
  return logit_shifts.to(accumulate_dtype(logits)).contiguous();
}

}  // namespace fastlt
