// CPU kernel of fastlt::linear_ride_loss: the experts' classifiers fused with RIDE's loss, never holding the
// [E, B, C] logits. Two passes over chunks of classes. Each chunk's logits come from one batched GEMM (ATen / BLAS)
// into a reused [E, B, chunk] buffer; OpenMP over sample rows then (1) merges the chunk into the rows' online softmax
// statistics (LDAM-margin CE and tempered softmax per expert, tempered expert mean, KL gaps), or (2) overwrites the
// chunk with d loss / d logits, which two more GEMMs turn into d features (accumulated) and d weight (written for the
// chunk's classes). The cosine classifier's weight normalisation is a column scale of the GEMM's result, and its
// backward is row-local (fastlt/linear_ride_loss.h); the caller normalises the features. Memory beyond inputs and
// gradients: the logit buffer, one [E, chunk, D] weight-gradient buffer and O(E x B x D + E x C) of features in the
// accumulation dtype and per-class tables. The overloads .statistics (pass 1) and .gradients (pass 2 from given
// statistics) run one pass each over one shard of the classes, for class-parallel heads (fastlt/ops/_class_parallel.py
// all-reduces the statistics between them).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/softmax_vectorized.h"
#include "fastlt/linear_ride_loss.h"
#include "linear_ride_loss_setup.h"

namespace fastlt {
namespace cpu {
namespace {

// z[c] = z[c] * column_scale[c] + bias_scale * bias[c], in place; either table may be nullptr (1 and 0).
template <typename A>
FASTLT_ALWAYS_INLINE void affine_row_impl(A* z, const A* column_scale, const A* bias, A bias_scale, int64_t n) {
  if (column_scale != nullptr && bias != nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) z[c] = linear_ride_loss::chunk_logit(z[c], column_scale[c], bias_scale * bias[c]);
  } else if (column_scale != nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) z[c] *= column_scale[c];
  } else if (bias != nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) z[c] += bias_scale * bias[c];
  }
}

// total[c] = z[c] (first expert) or total[c] + z[c]; the last expert turns the total into the tempered mean logits
// v[c] = total[c] / E / T_c.
template <typename A>
FASTLT_ALWAYS_INLINE void add_to_mean_impl(const A* z, A* total, bool first, bool last, A inverse_experts,
                                           const A* inverse_temperature, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const A sum = first ? z[c] : total[c] + z[c];
    total[c] = last ? ride_loss::tempered_mean_logit(sum, inverse_experts, inverse_temperature[c]) : sum;
  }
}

// sum_c exp(v_c - max v) (v_c - z_c / T_c): one expert's KL gap over a chunk.
template <typename A>
FASTLT_ALWAYS_INLINE A gap_sum_impl(const A* mean_exp, const A* mean_logits, const A* z, const A* inverse_temperature,
                                    int64_t n) {
  A gap = A(0);
#pragma omp simd reduction(+ : gap)
  for (int64_t c = 0; c < n; ++c)
    gap += ride_loss::weighted_gap_term(mean_exp[c], mean_logits[c],
                                        ride_loss::tempered_logit(z[c], inverse_temperature[c]));
  return gap;
}

// z[c] <- d loss / d z[c] for a non-target class, in place: ce_scale * exp(z - ce_max) +
// (expert_scale * exp(z / T - expert_max) - mean_scale * mean_exp) / T, with ce_scale = ce_coef / ce_sum,
// expert_scale = div_coef / expert_sum, mean_scale = div_coef / mean_sum; inverse_temperature == nullptr: CE only.
template <typename A>
FASTLT_ALWAYS_INLINE void gradient_row_impl(A* z, A ce_max, A ce_scale, const A* inverse_temperature, A expert_max,
                                            A expert_scale, const A* mean_exp, A mean_scale, int64_t n) {
  if (inverse_temperature == nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) z[c] = ce_scale * vector_exp(z[c] - ce_max);
    return;
  }
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const A u = ride_loss::tempered_logit(z[c], inverse_temperature[c]);
    z[c] = ce_scale * vector_exp(z[c] - ce_max) +
           (expert_scale * vector_exp(u - expert_max) - mean_scale * mean_exp[c]) * inverse_temperature[c];
  }
}

// p -= w * radial_coefficient(w . p): the cosine classifier's row-local weight-gradient correction.
template <typename A>
FASTLT_ALWAYS_INLINE void radial_correction_impl(const A* w, A* p, A column_scale, A scale, bool above_eps, int64_t d) {
  A radial = A(0);
#pragma omp simd reduction(+ : radial)
  for (int64_t i = 0; i < d; ++i) radial += w[i] * p[i];
  const A coefficient = linear_ride_loss::radial_coefficient(radial, column_scale, scale, above_eps);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) p[i] -= w[i] * coefficient;
}

#define FASTLT_LINEAR_RIDE_ROW_FUNCTIONS(A)                                                                         \
  FASTLT_PER_ISA void affine_row(A* z, const A* column_scale, const A* bias, A bias_scale, int64_t n) {             \
    affine_row_impl(z, column_scale, bias, bias_scale, n);                                                          \
  }                                                                                                                 \
  FASTLT_PER_ISA void add_to_mean(const A* z, A* total, bool first, bool last, A inverse_experts,                   \
                                  const A* inverse_temperature, int64_t n) {                                        \
    add_to_mean_impl(z, total, first, last, inverse_experts, inverse_temperature, n);                               \
  }                                                                                                                 \
  FASTLT_PER_ISA A gap_sum(const A* mean_exp, const A* mean_logits, const A* z, const A* inverse_temperature,       \
                           int64_t n) {                                                                             \
    return gap_sum_impl(mean_exp, mean_logits, z, inverse_temperature, n);                                          \
  }                                                                                                                 \
  FASTLT_PER_ISA void gradient_row(A* z, A ce_max, A ce_scale, const A* inverse_temperature, A expert_max,          \
                                   A expert_scale, const A* mean_exp, A mean_scale, int64_t n) {                    \
    gradient_row_impl(z, ce_max, ce_scale, inverse_temperature, expert_max, expert_scale, mean_exp, mean_scale, n); \
  }                                                                                                                 \
  FASTLT_PER_ISA void radial_correction(const A* w, A* p, A column_scale, A scale, bool above_eps, int64_t d) {     \
    radial_correction_impl(w, p, column_scale, scale, above_eps, d);                                                \
  }
FASTLT_LINEAR_RIDE_ROW_FUNCTIONS(float)
FASTLT_LINEAR_RIDE_ROW_FUNCTIONS(double)
#undef FASTLT_LINEAR_RIDE_ROW_FUNCTIONS

// The two passes over the chunks of classes, on the setup's tables as pointers of the accumulation type A, with a
// reused logit buffer and per-thread scratch: merge_statistics (pass 1) and accumulate_gradients (pass 2). The op
// runs both; its overloads .statistics and .gradients one each.
template <typename A>
class ChunkPasses {
 public:
  ChunkPasses(const linear_ride_loss::Setup& setup, const at::Tensor& weight)
      : s_(setup),
        weight_(weight),
        logit_buffer_(at::empty({setup.E * setup.B * setup.chunk}, weight.options().dtype(setup.acc))),
        // Per-thread scratch, [chunk] each: the tempered mean logits, their exps, and one row of throw-away exps.
        scratch_(at::empty({at::get_num_threads(), 3 * setup.chunk}, weight.options().dtype(setup.acc))),
        labels_(setup.labels.data_ptr<int64_t>()),  // -1: never in a chunk
        margin_of_row_(setup.row_margins.data_ptr<A>()),
        inverse_temperature_(setup.inverse_temperature.data_ptr<A>()),
        scales_(setup.column_scale.defined() ? setup.column_scale.data_ptr<A>() : nullptr),
        biases_(setup.bias.defined() ? setup.bias.data_ptr<A>() : nullptr),
        bias_scale_of_row_(setup.row_bias_scales.defined() ? setup.row_bias_scales.data_ptr<A>() : nullptr),
        inverse_experts_(A(1) / static_cast<A>(setup.E)) {}

  // Pass 1: merges every chunk into the rows' statistics.
  void merge_statistics(linear_ride_loss::RowStatistics& stats) {
    const int64_t E = s_.E, B = s_.B, C = s_.C, chunk = s_.chunk;
    const bool diversity = s_.diversity;
    A* ce_max = stats.ce_max.data_ptr<A>();
    A* ce_sum = stats.ce_sum.data_ptr<A>();
    A* expert_max = stats.expert_max.data_ptr<A>();
    A* expert_sum = stats.expert_sum.data_ptr<A>();
    A* gap = stats.gap.data_ptr<A>();
    A* target_logit = stats.target_logit.data_ptr<A>();
    A* mean_max = stats.mean_max.data_ptr<A>();
    A* mean_sum = stats.mean_sum.data_ptr<A>();
    for (int64_t c0 = 0; c0 < C; c0 += chunk) {
      const int64_t n = std::min(chunk, C - c0);
      const at::Tensor logits_tensor = chunk_logits(n, weight_.narrow(1, c0, n).to(s_.acc));
      A* logits = logits_tensor.data_ptr<A>();
      at::parallel_for(0, B, rows_per_task(E * n), [&](int64_t b0, int64_t b1) {
        A* mean_logits = scratch_.data_ptr<A>() + at::get_thread_num() * 3 * chunk;
        A* mean_exp = mean_logits + chunk;
        A* throwaway = mean_exp + chunk;
        for (int64_t b = b0; b < b1; ++b) {
          chunk_rows(logits, b, c0, n, mean_logits);
          const int64_t t = labels_[b] - c0;  // the target's column in the chunk, if 0 <= t < n
          const bool has_target = t >= 0 && t < n;
          const std::pair<int64_t, int64_t> others[2] = {{0, has_target ? t : n},
                                                         {has_target ? t + 1 : n, has_target ? n - t - 1 : 0}};
          A chunk_mean_max = -std::numeric_limits<A>::infinity(), chunk_mean_sum = A(0);
          if (diversity) {
            chunk_mean_max = row_max(mean_logits, static_cast<const A*>(nullptr), n);
            chunk_mean_sum = exp_shifted(mean_logits, static_cast<const A*>(nullptr), chunk_mean_max, mean_exp, n);
          }
          const A merged_mean_max = std::max(mean_max[b], chunk_mean_max);
          for (int64_t k = 0; k < E; ++k) {
            const int64_t row = k * B + b;
            const A* z = logits + row * n;
            // LDAM-margin CE over the chunk: the target (if here) lowered by its margin, the others as they are.
            const A margin_target = has_target ? ride_loss::margin_logit(z[t], true, margin_of_row_[b]) : A(0);
            A m = has_target ? margin_target : -std::numeric_limits<A>::infinity();
            for (const auto& [begin, count] : others)
              m = std::max(m, row_max(z + begin, static_cast<const A*>(nullptr), count));
            A sum = has_target ? exponential(margin_target - m) : A(0);
            for (const auto& [begin, count] : others)
              sum += exp_shifted(z + begin, static_cast<const A*>(nullptr), m, throwaway + begin, count);
            const SoftmaxStats<A> ce = merge_softmax_stats<A>({ce_max[row], ce_sum[row]}, {m, sum});
            ce_max[row] = ce.maximum;
            ce_sum[row] = ce.shifted_sum;
            if (has_target) target_logit[row] = margin_target;
            if (!diversity) continue;
            const A expert_m = row_max(z, inverse_temperature_ + c0, n);
            const A expert_s = exp_shifted(z, inverse_temperature_ + c0, expert_m, throwaway, n);
            const SoftmaxStats<A> expert =
                merge_softmax_stats<A>({expert_max[row], expert_sum[row]}, {expert_m, expert_s});
            expert_max[row] = expert.maximum;
            expert_sum[row] = expert.shifted_sum;
            const A chunk_gap = gap_sum(mean_exp, mean_logits, z, inverse_temperature_ + c0, n);
            gap[row] = linear_ride_loss::rescale(gap[row], mean_max[b], merged_mean_max) +
                       linear_ride_loss::rescale(chunk_gap, chunk_mean_max, merged_mean_max);
          }
          if (diversity) {
            const SoftmaxStats<A> mean =
                merge_softmax_stats<A>({mean_max[b], mean_sum[b]}, {chunk_mean_max, chunk_mean_sum});
            mean_max[b] = mean.maximum;
            mean_sum[b] = mean.shifted_sum;
          }
        }
      });
    }
  }

  // Pass 2: each chunk's d loss / d logits from the finished statistics, then d features += dz @ W and
  // d weight[chunk] = dz^T @ x.
  void accumulate_gradients(const linear_ride_loss::RowStatistics& stats, linear_ride_loss::Gradients& grads,
                            double scale) {
    const int64_t E = s_.E, B = s_.B, C = s_.C, D = s_.D, chunk = s_.chunk;
    const bool diversity = s_.diversity;
    const A* coef_of_row = s_.ce_coef.data_ptr<A>();
    const A* div_of_row = s_.div_coef.data_ptr<A>();
    const A* ce_max = stats.ce_max.data_ptr<A>();
    const A* ce_sum = stats.ce_sum.data_ptr<A>();
    const A* expert_max = stats.expert_max.data_ptr<A>();
    const A* expert_sum = stats.expert_sum.data_ptr<A>();
    const A* mean_max = stats.mean_max.data_ptr<A>();
    const A* mean_sum = stats.mean_sum.data_ptr<A>();
    for (int64_t c0 = 0; c0 < C; c0 += chunk) {
      const int64_t n = std::min(chunk, C - c0);
      const at::Tensor weight_chunk = weight_.narrow(1, c0, n).to(s_.acc);
      at::Tensor logits_tensor = chunk_logits(n, weight_chunk);
      A* logits = logits_tensor.data_ptr<A>();
      at::parallel_for(0, B, rows_per_task(E * n), [&](int64_t b0, int64_t b1) {
        A* mean_logits = scratch_.data_ptr<A>() + at::get_thread_num() * 3 * chunk;
        A* mean_exp = mean_logits + chunk;
        for (int64_t b = b0; b < b1; ++b) {
          chunk_rows(logits, b, c0, n, mean_logits);
          const int64_t t = labels_[b] - c0;
          const bool has_target = t >= 0 && t < n;
          if (diversity) exp_shifted(mean_logits, static_cast<const A*>(nullptr), mean_max[b], mean_exp, n);
          const A div = div_of_row[b];
          const A mean_scale = diversity ? div / mean_sum[b] : A(0);
          for (int64_t k = 0; k < E; ++k) {
            const int64_t row = k * B + b;
            A* z = logits + row * n;
            const A ce_scale = coef_of_row[b] / ce_sum[row];
            const A expert_scale = diversity ? div / expert_sum[row] : A(0);
            const A z_target = has_target ? z[t] : A(0);  // read before the gradient overwrites it
            gradient_row(z, ce_max[row], ce_scale, diversity ? inverse_temperature_ + c0 : nullptr, expert_max[row],
                         expert_scale, mean_exp, mean_scale, n);
            if (!has_target) continue;
            const A invT = inverse_temperature_[c0 + t];
            const A ce_probability =
                exponential(ride_loss::margin_logit(z_target, true, margin_of_row_[b]) - ce_max[row]) / ce_sum[row];
            const A expert_probability =
                diversity ? exponential(ride_loss::tempered_logit(z_target, invT) - expert_max[row]) / expert_sum[row]
                          : A(0);
            const A mean_probability = diversity ? mean_exp[t] / mean_sum[b] : A(0);
            z[t] = ride_loss::logit_gradient(coef_of_row[b], ce_probability, true, div, expert_probability,
                                             mean_probability, invT);
          }
        }
      });
      if (grads.bias.defined())
        grads.bias.narrow(1, c0, n).copy_(linear_ride_loss::bias_gradient(logits_tensor, s_.row_bias_scales));
      if (scales_ != nullptr) logits_tensor.mul_(s_.column_scale.narrow(1, c0, n).unsqueeze(1));
      grads.expert_features.baddbmm_(logits_tensor, weight_chunk);
      at::Tensor weight_gradient = grads.weight_chunk(n);
      at::bmm_out(weight_gradient, logits_tensor.transpose(1, 2), s_.features);
      if (scales_ != nullptr) {
        const at::Tensor weight_chunk_contiguous = weight_chunk.contiguous();
        const A* w = weight_chunk_contiguous.data_ptr<A>();
        A* p = weight_gradient.data_ptr<A>();
        const bool* above_eps = s_.weight_above_eps.data_ptr<bool>();
        at::parallel_for(0, E * n, std::max<int64_t>(1, (int64_t(1) << 14) / D), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t k = r / n, c = c0 + r % n;
            radial_correction(w + r * D, p + r * D, scales_[k * C + c], static_cast<A>(scale), above_eps[k * C + c], D);
          }
        });
      }
      grads.weight.narrow(1, c0, n).copy_(weight_gradient);
    }
  }

 private:
  // The chunk [c0, c0 + n)'s logits, [E, B, n] contiguous in the logit buffer, before column scale and bias.
  at::Tensor chunk_logits(int64_t n, const at::Tensor& weight_chunk) {
    at::Tensor logits = logit_buffer_.narrow(0, 0, s_.E * s_.B * n).view({s_.E, s_.B, n});
    at::bmm_out(logits, s_.features, weight_chunk.transpose(1, 2));
    return logits;
  }

  // Applies column scale and bias to the chunk's rows of sample b and forms the tempered mean logits (diversity
  // term only) in `mean_logits`.
  void chunk_rows(A* logits, int64_t b, int64_t c0, int64_t n, A* mean_logits) const {
    const int64_t E = s_.E, B = s_.B, C = s_.C;
    const A bias_scale = bias_scale_of_row_ == nullptr ? A(1) : bias_scale_of_row_[b];
    for (int64_t k = 0; k < E; ++k) {
      A* z = logits + (k * B + b) * n;
      affine_row(z, scales_ == nullptr ? nullptr : scales_ + k * C + c0,
                 biases_ == nullptr ? nullptr : biases_ + k * C + c0, bias_scale, n);
      if (s_.diversity) add_to_mean(z, mean_logits, k == 0, k == E - 1, inverse_experts_, inverse_temperature_ + c0, n);
    }
  }

  const linear_ride_loss::Setup& s_;
  const at::Tensor& weight_;
  at::Tensor logit_buffer_, scratch_;
  const int64_t* labels_;
  const A *margin_of_row_, *inverse_temperature_, *scales_, *biases_, *bias_scale_of_row_;
  const A inverse_experts_;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ride_loss(
    const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& target_margins, const std::optional<at::Tensor>& class_weights,
    const at::Tensor& temperatures, const std::optional<at::Tensor>& row_weights,
    const std::optional<at::Tensor>& row_bias_scales, double scale, bool normalize_weight, double diversity_factor,
    int64_t reduction, int64_t ignore_index, int64_t chunk_size, bool compute_grad) {
  TORCH_CHECK(weight.device().is_cpu(), linear_ride_loss::kOp, " (CPU kernel): weight must be a CPU tensor");
  const linear_ride_loss::Setup setup = linear_ride_loss::setup(
      features, weight, bias, target, target_margins, class_weights, temperatures, row_weights, row_bias_scales, scale,
      normalize_weight, diversity_factor, reduction, ignore_index, chunk_size);
  linear_ride_loss::RowStatistics stats = linear_ride_loss::empty_statistics(setup, weight.options().dtype(setup.acc));
  linear_ride_loss::Gradients grads;
  AT_DISPATCH_FLOATING_TYPES(setup.acc, "fastlt_linear_ride_loss_cpu", [&] {
    ChunkPasses<scalar_t> passes(setup, weight);
    passes.merge_statistics(stats);
    if (!compute_grad) return;
    grads = linear_ride_loss::empty_gradients(setup, weight);
    passes.accumulate_gradients(stats, grads, scale);
  });
  return linear_ride_loss::outputs(stats, setup, features, weight, grads, compute_grad);
}

// .statistics: pass 1 alone over the weight's classes (one shard of a class-parallel head): the rows' statistics.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_ride_loss_statistics(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& target, const at::Tensor& target_margins, const at::Tensor& temperatures,
                            const std::optional<at::Tensor>& row_bias_scales, double scale, bool normalize_weight,
                            bool diversity, int64_t chunk_size) {
  TORCH_CHECK(weight.device().is_cpu(), linear_ride_loss::kOp, " (CPU kernel): weight must be a CPU tensor");
  const linear_ride_loss::Setup setup =
      linear_ride_loss::pass_setup(features, weight, bias, target, target_margins, temperatures, row_bias_scales, scale,
                                   normalize_weight, diversity, chunk_size);
  linear_ride_loss::RowStatistics stats = linear_ride_loss::empty_statistics(setup, weight.options().dtype(setup.acc));
  AT_DISPATCH_FLOATING_TYPES(setup.acc, "fastlt_linear_ride_loss_statistics_cpu",
                             [&] { ChunkPasses<scalar_t>(setup, weight).merge_statistics(stats); });
  return linear_ride_loss::statistics_outputs(stats);
}

// .gradients: pass 2 alone over the weight's classes, from the whole batch's statistics and row coefficients:
// (d features, d weight, d bias) of the loss's part that these classes' logits carry.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ride_loss_gradients(
    const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& target_margins, const at::Tensor& temperatures,
    const std::optional<at::Tensor>& row_bias_scales, const at::Tensor& ce_coefs, const at::Tensor& div_coefs,
    const at::Tensor& ce_max, const at::Tensor& ce_sum, const at::Tensor& expert_max, const at::Tensor& expert_sum,
    const at::Tensor& mean_max, const at::Tensor& mean_sum, double scale, bool normalize_weight, bool diversity,
    int64_t chunk_size) {
  TORCH_CHECK(weight.device().is_cpu(), linear_ride_loss::kOp, " (CPU kernel): weight must be a CPU tensor");
  const linear_ride_loss::Setup setup =
      linear_ride_loss::gradients_setup(features, weight, bias, target, target_margins, temperatures, row_bias_scales,
                                        ce_coefs, div_coefs, scale, normalize_weight, diversity, chunk_size);
  const linear_ride_loss::RowStatistics stats =
      linear_ride_loss::given_statistics(setup, weight, ce_max, ce_sum, expert_max, expert_sum, mean_max, mean_sum);
  linear_ride_loss::Gradients grads = linear_ride_loss::empty_gradients(setup, weight);
  AT_DISPATCH_FLOATING_TYPES(setup.acc, "fastlt_linear_ride_loss_gradients_cpu",
                             [&] { ChunkPasses<scalar_t>(setup, weight).accumulate_gradients(stats, grads, scale); });
  return linear_ride_loss::gradient_outputs(features, weight, grads);
}

}  // namespace cpu
}  // namespace fastlt

TORCH_LIBRARY_FRAGMENT(fastlt, m) {
  m.def(
      "linear_ride_loss(Tensor features, Tensor weight, Tensor? bias, Tensor target, Tensor target_margins, "
      "Tensor? class_weights, Tensor temperatures, Tensor? row_weights, Tensor? row_bias_scales, float scale, "
      "bool normalize_weight, float diversity_factor, "
      "int reduction, int ignore_index, int chunk_size, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_ride_loss.statistics(Tensor features, Tensor weight, Tensor? bias, Tensor target, "
      "Tensor target_margins, Tensor temperatures, Tensor? row_bias_scales, float scale, bool normalize_weight, "
      "bool diversity, int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_ride_loss.gradients(Tensor features, Tensor weight, Tensor? bias, Tensor target, "
      "Tensor target_margins, Tensor temperatures, Tensor? row_bias_scales, Tensor ce_coefs, Tensor div_coefs, "
      "Tensor ce_max, Tensor ce_sum, Tensor expert_max, Tensor expert_sum, Tensor mean_max, Tensor mean_sum, "
      "float scale, bool normalize_weight, bool diversity, int chunk_size) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlt, CPU, m) {
  m.impl("linear_ride_loss", &fastlt::cpu::linear_ride_loss);
  m.impl("linear_ride_loss.statistics", &fastlt::cpu::linear_ride_loss_statistics);
  m.impl("linear_ride_loss.gradients", &fastlt::cpu::linear_ride_loss_gradients);
}
