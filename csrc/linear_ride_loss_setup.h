// Host-side setup of fastlt::linear_ride_loss and of its pass overloads (.statistics: pass 1 alone, .gradients: pass 2
// from given statistics, for heads whose classes are sharded across ranks), shared by the CPU kernel
// (csrc/cpu/linear_ride_loss.cpp) and the CUDA launcher (csrc/cuda/linear_ride_loss.cu): the argument checks, each
// row's coefficients (docs/methods.md 6.5), the weight's column scales, the row statistics' buffers, and the loss
// from them. All ATen (the device's own kernels);
// the per-class work is the kernels'. The op normalises only the weight (O(C x D), never copied); a cosine head's
// caller normalises the features (O(B x D)) under autograd.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "loss_checks.h"

namespace fastlt {
namespace linear_ride_loss {

constexpr const char* kOp = "fastlt.linear_ride_loss";
constexpr double kNormEps = 1e-12;  // F.normalize's eps (NormedLinear)

struct Setup {
  int64_t E, B, C, D, chunk;
  at::ScalarType acc;
  bool diversity;
  at::Tensor labels;               // [B] int64, -1: never in a chunk (an ignored row, or another shard's class)
  at::Tensor row_margins;          // [B] the target logit's margin
  at::Tensor ce_coef, div_coef;    // [B] each row's factor on its CE and on its diversity term (0: ignored)
  at::Tensor inverse_temperature;  // [C]
  at::Tensor bias;                 // [E, C] in the accumulation dtype, or undefined
  at::Tensor row_bias_scales;      // [B] each row's factor on the bias, or undefined (all 1)
  at::Tensor features;             // [E, B, D] in the accumulation dtype, contiguous
  at::Tensor column_scale;         // [E, C] scale / ||w_c|| (normalize_weight only)
  at::Tensor weight_above_eps;     // [E, C] bool (normalize_weight only)
};

// A 1-d table of `size` entries (`size_name`: C per class, B per row) on the weight's device, contiguous in the
// accumulation dtype.
inline at::Tensor table_of(const at::Tensor& table, int64_t size, const char* size_name, const at::Tensor& weight,
                           at::ScalarType acc, const char* name) {
  TORCH_CHECK_VALUE(table.dim() == 1 && table.size(0) == size, kOp, ": ", name, " must be [", size_name, "]=[", size,
                    "], got ", table.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(table.scalar_type()), kOp, ": ", name, " must be floating, got ",
                    table.scalar_type());
  TORCH_CHECK_VALUE(table.device() == weight.device(), kOp, ": ", name, " must be on ", weight.device());
  return table.to(acc).contiguous();
}

inline at::Tensor class_table(const at::Tensor& table, int64_t C, const at::Tensor& weight, at::ScalarType acc,
                              const char* name) {
  return table_of(table, C, "C", weight, acc, name);
}

// A [B] per-row table; its entries must be finite.
inline at::Tensor row_table(const at::Tensor& table, int64_t B, const at::Tensor& weight, at::ScalarType acc,
                            const char* name) {
  const at::Tensor values = table_of(table, B, "B", weight, acc, name);
  TORCH_CHECK_VALUE(values.isfinite().all().item<bool>(), kOp, ": ", name, " must be finite");
  return values;
}

// The checks and tensors every entry point shares (the op and its pass overloads .statistics and .gradients):
// weight, features, bias, row bias scales, chunk and scale; the features in the accumulation dtype and, for the
// cosine classifier, the weight's column scales. The per-class and per-row tables are the callers'.
inline Setup head_setup(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& row_bias_scales, double scale, bool normalize_weight,
                        int64_t chunk_size) {
  TORCH_CHECK_VALUE(weight.dim() == 3 && weight.numel() > 0, kOp, ": weight must be a non-empty [E, C, D], got ",
                    weight.sizes());
  Setup s;
  s.E = weight.size(0);
  s.C = weight.size(1);
  s.D = weight.size(2);
  TORCH_CHECK_VALUE(s.E <= kMaxExperts, kOp, ": weight has ", s.E, " experts; at most ", kMaxExperts, " are supported");
  TORCH_CHECK_VALUE(at::isFloatingType(weight.scalar_type()), kOp, ": weight must be floating, got ",
                    weight.scalar_type());
  TORCH_CHECK_VALUE((features.dim() == 2 || (features.dim() == 3 && features.size(0) == s.E)) &&
                        features.size(-1) == s.D && features.size(-2) > 0,
                    kOp, ": features must be [B, D] or [E, B, D] with D = ", s.D, ", E = ", s.E, ", got ",
                    features.sizes());
  TORCH_CHECK_VALUE(features.scalar_type() == weight.scalar_type(), kOp, ": features must have weight's dtype ",
                    weight.scalar_type(), ", got ", features.scalar_type());
  TORCH_CHECK_VALUE(features.device() == weight.device(), kOp, ": features must be on ", weight.device());
  s.B = features.size(-2);
  TORCH_CHECK_VALUE(chunk_size >= 1, kOp, ": chunk_size must be >= 1, got ", chunk_size);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, kOp, ": scale must be a finite number > 0, got ", scale);
  s.acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  s.chunk = std::min(chunk_size, s.C);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 2 && bias->size(0) == s.E && bias->size(1) == s.C &&
                          bias->scalar_type() == weight.scalar_type() && bias->device() == weight.device(),
                      kOp, ": bias must be [E, C]=[", s.E, ", ", s.C, "] of weight's dtype and device, got ",
                      bias->sizes());
    s.bias = bias->to(s.acc).contiguous();
  }
  if (row_bias_scales.has_value()) {
    TORCH_CHECK_VALUE(bias.has_value(), kOp, ": row_bias_scales needs a bias");
    s.row_bias_scales = row_table(*row_bias_scales, s.B, weight, s.acc, "row_bias_scales");
  }
  s.features = features.to(s.acc).expand({s.E, s.B, s.D}).contiguous();
  if (normalize_weight) {
    const at::Tensor weight_norms = at::linalg_vector_norm(weight, 2, {-1}, false, s.acc);
    s.column_scale = (scale / weight_norms.clamp_min(kNormEps)).contiguous();
    s.weight_above_eps = (weight_norms > kNormEps).contiguous();
  }
  return s;
}

// The rows' labels (-1: no class of the chunks) and the per-class tables the passes read: each row's target margin
// and the inverse temperatures. Returns the temperatures in the accumulation dtype.
inline at::Tensor set_class_tables(Setup& s, const at::Tensor& labels, const at::Tensor& target_margins,
                                   const at::Tensor& temperatures, const at::Tensor& weight) {
  s.labels = labels.contiguous();
  const at::Tensor margins = class_table(target_margins, s.C, weight, s.acc, "target_margins");
  s.row_margins = margins.index_select(0, s.labels.clamp_min(0)).contiguous();
  const at::Tensor temperature_table = class_table(temperatures, s.C, weight, s.acc, "temperatures");
  s.inverse_temperature = temperature_table.reciprocal().contiguous();
  return temperature_table;
}

// The op's setup: the head, the target and each row's coefficients (docs/methods.md 6.5).
inline Setup setup(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const at::Tensor& target, const at::Tensor& target_margins,
                   const std::optional<at::Tensor>& class_weights, const at::Tensor& temperatures,
                   const std::optional<at::Tensor>& row_weights, const std::optional<at::Tensor>& row_bias_scales,
                   double scale, bool normalize_weight, double diversity_factor, int64_t reduction,
                   int64_t ignore_index, int64_t chunk_size) {
  check_reduction(reduction, kOp);
  TORCH_CHECK_VALUE(reduction != kReductionNone, kOp,
                    ": reduction must be 1 (mean) or 2 (sum): 'none' is not supported, the weight gradient is "
                    "accumulated in the forward pass for one scalar loss");
  TORCH_CHECK_VALUE(std::isfinite(diversity_factor), kOp, ": diversity_factor must be finite, got ", diversity_factor);
  Setup s = head_setup(features, weight, bias, row_bias_scales, scale, normalize_weight, chunk_size);
  // check_loss_target reads B, C and the device of an [E, B, C] tensor: a stride-0 view of one element.
  check_loss_target(target, at::empty({}, weight.options()).expand({s.E, s.B, s.C}), kOp, ignore_index);
  s.diversity = diversity_factor != 0.0;
  // Rows: CE factor r_i * w_y, diversity factor r_i * lam * mean(T)^2 (r_i: row_weights, else 1); under mean divided
  // by the kept rows' total CE factor and their total r_i (0 when that is 0); an ignored row gets 0 and the label -1.
  const at::Tensor kept = target != ignore_index;
  const at::Tensor temperature_table =
      set_class_tables(s, at::where(kept, target, at::full_like(target, -1)), target_margins, temperatures, weight);
  at::Tensor kept_values = kept.to(s.acc);
  if (row_weights.has_value()) {
    const at::Tensor values = row_table(*row_weights, s.B, weight, s.acc, "row_weights");
    TORCH_CHECK_VALUE((values >= 0).all().item<bool>(), kOp, ": row_weights must be >= 0");
    kept_values = kept_values * values;
  }
  at::Tensor ce_coef = kept_values;
  if (class_weights.has_value())
    ce_coef = class_table(*class_weights, s.C, weight, s.acc, "class_weights").index_select(0, s.labels.clamp_min(0)) *
              kept_values;
  at::Tensor div_coef = kept_values * (diversity_factor * temperature_table.mean().square());
  if (reduction == kReductionMean) {
    const at::Tensor weight_total = ce_coef.sum(), kept_rows = kept_values.sum();
    ce_coef = at::where(weight_total > 0, ce_coef / weight_total, at::zeros_like(ce_coef));
    div_coef = at::where(kept_rows > 0, div_coef / kept_rows, at::zeros_like(div_coef));
  }
  s.ce_coef = ce_coef.contiguous();
  s.div_coef = div_coef.contiguous();
  return s;
}

// The setup of the pass overloads (.statistics, .gradients), which see one shard of the classes: target holds each
// row's label among the weight's C classes, or -1 when its class is not among them (another shard's, or the row is
// ignored); the rows' coefficients, when given (.gradients), are the whole batch's.
inline Setup pass_setup(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& target, const at::Tensor& target_margins, const at::Tensor& temperatures,
                        const std::optional<at::Tensor>& row_bias_scales, double scale, bool normalize_weight,
                        bool diversity, int64_t chunk_size) {
  Setup s = head_setup(features, weight, bias, row_bias_scales, scale, normalize_weight, chunk_size);
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == s.B, kOp, ": target must be [B] = [", s.B, "], got ",
                    target.sizes());
  TORCH_CHECK_VALUE(target.scalar_type() == at::kLong, kOp, ": target must be int64, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.device() == weight.device(), kOp, ": target must be on ", weight.device());
  const auto extremes = at::aminmax(target);
  const int64_t low = std::get<0>(extremes).item<int64_t>(), high = std::get<1>(extremes).item<int64_t>();
  TORCH_CHECK_VALUE(low >= -1 && high < s.C, kOp, ": target must be in [-1, ", s.C,
                    ") (-1: the row's class is not among the weight's), got ", low < -1 ? low : high);
  s.diversity = diversity;
  set_class_tables(s, target, target_margins, temperatures, weight);
  return s;
}

// The setup of .gradients: pass_setup and the whole batch's row coefficients ce_coefs, div_coefs ([B], finite).
inline Setup gradients_setup(const at::Tensor& features, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& target,
                             const at::Tensor& target_margins, const at::Tensor& temperatures,
                             const std::optional<at::Tensor>& row_bias_scales, const at::Tensor& ce_coefs,
                             const at::Tensor& div_coefs, double scale, bool normalize_weight, bool diversity,
                             int64_t chunk_size) {
  Setup s = pass_setup(features, weight, bias, target, target_margins, temperatures, row_bias_scales, scale,
                       normalize_weight, diversity, chunk_size);
  s.ce_coef = row_table(ce_coefs, s.B, weight, s.acc, "ce_coefs");
  s.div_coef = row_table(div_coefs, s.B, weight, s.acc, "div_coefs");
  return s;
}

// The statistics of a row's class range merged over the chunks; one entry per (expert, row) or per row.
struct RowStatistics {
  at::Tensor ce_max, ce_sum, expert_max, expert_sum, gap, target_logit;  // [E, B]
  at::Tensor mean_max, mean_sum;                                         // [B]
};

inline RowStatistics empty_statistics(const Setup& s, const at::TensorOptions& acc_options) {
  RowStatistics stats;
  stats.ce_max = at::full({s.E, s.B}, -std::numeric_limits<double>::infinity(), acc_options);
  stats.expert_max = stats.ce_max.clone();
  stats.mean_max = at::full({s.B}, -std::numeric_limits<double>::infinity(), acc_options);
  stats.ce_sum = at::zeros({s.E, s.B}, acc_options);
  stats.expert_sum = at::zeros({s.E, s.B}, acc_options);
  stats.gap = at::zeros({s.E, s.B}, acc_options);
  stats.target_logit = at::zeros({s.E, s.B}, acc_options);
  stats.mean_sum = at::zeros({s.B}, acc_options);
  return stats;
}

// The whole batch's statistics given to .gradients ([E, B] per expert and row, [B] per row), checked and converted
// to the accumulation dtype; the KL gaps and target logits, which only the loss reads, stay undefined.
inline RowStatistics given_statistics(const Setup& s, const at::Tensor& weight, const at::Tensor& ce_max,
                                      const at::Tensor& ce_sum, const at::Tensor& expert_max,
                                      const at::Tensor& expert_sum, const at::Tensor& mean_max,
                                      const at::Tensor& mean_sum) {
  const auto per_expert = [&](const at::Tensor& table, const char* name) {
    TORCH_CHECK_VALUE(table.dim() == 2 && table.size(0) == s.E && table.size(1) == s.B, kOp, ": ", name,
                      " must be [E, B]=[", s.E, ", ", s.B, "], got ", table.sizes());
    TORCH_CHECK_VALUE(at::isFloatingType(table.scalar_type()), kOp, ": ", name, " must be floating, got ",
                      table.scalar_type());
    TORCH_CHECK_VALUE(table.device() == weight.device(), kOp, ": ", name, " must be on ", weight.device());
    return table.to(s.acc).contiguous();
  };
  RowStatistics stats;
  stats.ce_max = per_expert(ce_max, "ce_max");
  stats.ce_sum = per_expert(ce_sum, "ce_sum");
  stats.expert_max = per_expert(expert_max, "expert_max");
  stats.expert_sum = per_expert(expert_sum, "expert_sum");
  stats.mean_max = table_of(mean_max, s.B, "B", weight, s.acc, "mean_max");
  stats.mean_sum = table_of(mean_sum, s.B, "B", weight, s.acc, "mean_sum");
  return stats;
}

// The loss from the finished statistics: sum over (expert, row) of ce_coef * CE + div_coef * KL.
inline at::Tensor loss_of(const RowStatistics& stats, const Setup& s) {
  at::Tensor loss = ((stats.ce_sum.log() + stats.ce_max - stats.target_logit) * s.ce_coef.unsqueeze(0)).sum();
  if (s.diversity) {
    const at::Tensor mean_lse = stats.mean_sum.log() + stats.mean_max;
    const at::Tensor expert_lse = stats.expert_sum.log() + stats.expert_max;
    const at::Tensor kl = stats.gap / stats.mean_sum.unsqueeze(0) + expert_lse - mean_lse.unsqueeze(0);
    loss = loss + (kl * s.div_coef.unsqueeze(0)).sum();
  }
  return loss;
}

// Pass 2's gradients: d features per expert (accumulated over the chunks), d weight in the weight's dtype and
// d bias (written chunk by chunk), and the buffer of one chunk's d weight.
struct Gradients {
  at::Tensor expert_features;  // [E, B, D], accumulation dtype
  at::Tensor weight;           // [E, C, D]
  at::Tensor bias;             // [E, C] accumulation dtype, or undefined without a bias
  at::Tensor chunk_buffer;     // [E * chunk * D]

  // The buffer as the d weight of a chunk of n classes, [E, n, D].
  at::Tensor weight_chunk(int64_t n) const {
    const int64_t E = weight.size(0), D = weight.size(2);
    return chunk_buffer.narrow(0, 0, E * n * D).view({E, n, D});
  }
};

inline Gradients empty_gradients(const Setup& s, const at::Tensor& weight) {
  const auto acc_options = weight.options().dtype(s.acc);
  Gradients g;
  g.expert_features = at::zeros({s.E, s.B, s.D}, acc_options);
  g.weight = at::empty({s.E, s.C, s.D}, weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (s.bias.defined()) g.bias = at::empty({s.E, s.C}, acc_options);
  g.chunk_buffer = at::empty({s.E * s.chunk * s.D}, acc_options);
  return g;
}

// d bias of a chunk from its d loss / d logits [E, B, n]: the sum over the rows, each times its bias scale.
inline at::Tensor bias_gradient(const at::Tensor& chunk_gradient, const at::Tensor& row_bias_scales) {
  if (!row_bias_scales.defined()) return chunk_gradient.sum(1);
  return at::matmul(row_bias_scales.view({1, 1, -1}), chunk_gradient).squeeze(1);
}

// The gradient outputs (d features, d weight, d bias): d features summed over the experts for shared [B, D]
// features, d bias empty without a bias.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> gradient_outputs(const at::Tensor& features,
                                                                       const at::Tensor& weight,
                                                                       const Gradients& grads) {
  const at::Tensor grad_features =
      (features.dim() == 2 ? grads.expert_features.sum(0) : grads.expert_features).to(features.scalar_type());
  return {grad_features, grads.weight,
          grads.bias.defined() ? grads.bias.to(weight.scalar_type()) : at::empty({0}, features.options())};
}

// The op's outputs (loss, d features, d weight, d bias), with empty gradients when none were asked for.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs(const RowStatistics& stats, const Setup& s,
                                                                          const at::Tensor& features,
                                                                          const at::Tensor& weight,
                                                                          const Gradients& grads, bool compute_grad) {
  const at::Tensor loss = loss_of(stats, s);
  const auto empty = [&] { return at::empty({0}, features.options()); };
  if (!compute_grad) return {loss, empty(), empty(), empty()};
  const auto [grad_features, grad_weight, grad_bias] = gradient_outputs(features, weight, grads);
  return {loss, grad_features, grad_weight, grad_bias};
}

// The statistics as .statistics returns them, in the order of fastlt/ops/_chunked_head.py's STATISTICS.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
statistics_outputs(const RowStatistics& stats) {
  return {stats.ce_max,   stats.ce_sum,   stats.expert_max, stats.expert_sum,
          stats.mean_max, stats.mean_sum, stats.gap,        stats.target_logit};
}

}  // namespace linear_ride_loss
}  // namespace fastlt
