// Host-side setup of fastlt::linear_ride_loss, shared by the CPU kernel (csrc/cpu/linear_ride_loss.cpp) and the CUDA
// launcher (csrc/cuda/linear_ride_loss.cu): the argument checks, each row's coefficients (docs/methods.md 6.5), the
// weight's column scales, the row statistics' buffers, and the loss from them. All ATen (the device's own kernels);
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
  at::Tensor labels;               // [B] int64, -1 for ignored rows (never in a chunk)
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

inline Setup setup(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const at::Tensor& target, const at::Tensor& target_margins,
                   const std::optional<at::Tensor>& class_weights, const at::Tensor& temperatures,
                   const std::optional<at::Tensor>& row_weights, const std::optional<at::Tensor>& row_bias_scales,
                   double scale, bool normalize_weight, double diversity_factor, int64_t reduction,
                   int64_t ignore_index, int64_t chunk_size) {
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
  check_reduction(reduction, kOp);
  TORCH_CHECK_VALUE(reduction != kReductionNone, kOp,
                    ": reduction must be 1 (mean) or 2 (sum): 'none' is not supported, the weight gradient is "
                    "accumulated in the forward pass for one scalar loss");
  // check_loss_target reads B, C and the device of an [E, B, C] tensor: a stride-0 view of one element.
  check_loss_target(target, at::empty({}, weight.options()).expand({s.E, s.B, s.C}), kOp, ignore_index);
  TORCH_CHECK_VALUE(chunk_size >= 1, kOp, ": chunk_size must be >= 1, got ", chunk_size);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, kOp, ": scale must be a finite number > 0, got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(diversity_factor), kOp, ": diversity_factor must be finite, got ", diversity_factor);
  s.acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  s.chunk = std::min(chunk_size, s.C);
  s.diversity = diversity_factor != 0.0;
  const at::Tensor margins = class_table(target_margins, s.C, weight, s.acc, "target_margins");
  const at::Tensor temperature_table = class_table(temperatures, s.C, weight, s.acc, "temperatures");
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
  // Rows (docs/methods.md 6.5): CE factor r_i * w_y, diversity factor r_i * lam * mean(T)^2 (r_i: row_weights, else
  // 1); under mean divided by the kept rows' total CE factor and their total r_i (0 when that is 0); an ignored row
  // gets 0 and the label -1.
  const at::Tensor kept = target != ignore_index;
  at::Tensor kept_values = kept.to(s.acc);
  if (row_weights.has_value()) {
    const at::Tensor values = row_table(*row_weights, s.B, weight, s.acc, "row_weights");
    TORCH_CHECK_VALUE((values >= 0).all().item<bool>(), kOp, ": row_weights must be >= 0");
    kept_values = kept_values * values;
  }
  s.labels = at::where(kept, target, at::full_like(target, -1)).contiguous();
  const at::Tensor gather_labels = s.labels.clamp_min(0);
  at::Tensor ce_coef = kept_values;
  if (class_weights.has_value())
    ce_coef =
        class_table(*class_weights, s.C, weight, s.acc, "class_weights").index_select(0, gather_labels) * kept_values;
  at::Tensor div_coef = kept_values * (diversity_factor * temperature_table.mean().square());
  if (reduction == kReductionMean) {
    const at::Tensor weight_total = ce_coef.sum(), kept_rows = kept_values.sum();
    ce_coef = at::where(weight_total > 0, ce_coef / weight_total, at::zeros_like(ce_coef));
    div_coef = at::where(kept_rows > 0, div_coef / kept_rows, at::zeros_like(div_coef));
  }
  s.ce_coef = ce_coef.contiguous();
  s.div_coef = div_coef.contiguous();
  s.row_margins = margins.index_select(0, gather_labels).contiguous();
  s.inverse_temperature = temperature_table.reciprocal().contiguous();

  s.features = features.to(s.acc).expand({s.E, s.B, s.D}).contiguous();
  if (normalize_weight) {
    const at::Tensor weight_norms = at::linalg_vector_norm(weight, 2, {-1}, false, s.acc);
    s.column_scale = (scale / weight_norms.clamp_min(kNormEps)).contiguous();
    s.weight_above_eps = (weight_norms > kNormEps).contiguous();
  }
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

// The op's outputs (loss, d features, d weight, d bias), with empty gradients when none were asked for; d features
// summed over the experts for shared [B, D] features.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs(const RowStatistics& stats, const Setup& s,
                                                                          const at::Tensor& features,
                                                                          const at::Tensor& weight,
                                                                          const Gradients& grads, bool compute_grad) {
  const at::Tensor loss = loss_of(stats, s);
  const auto empty = [&] { return at::empty({0}, features.options()); };
  if (!compute_grad) return {loss, empty(), empty(), empty()};
  const at::Tensor grad_features =
      (features.dim() == 2 ? grads.expert_features.sum(0) : grads.expert_features).to(features.scalar_type());
  return {loss, grad_features, grads.weight, grads.bias.defined() ? grads.bias.to(weight.scalar_type()) : empty()};
}

}  // namespace linear_ride_loss
}  // namespace fastlt
