// CUDA kernel of fastlt::linear_ride_loss: the CPU kernel's two-pass plan on the device. Each chunk of classes'
// logits comes from one batched GEMM (at::bmm: cuBLAS) into a reused [E, B, chunk] buffer; then one block per sample
// row (threads over the chunk's classes) either (1) merges the chunk into the row's online softmax statistics
// (LDAM-margin CE and tempered softmax per expert, tempered expert mean, KL gaps), or (2) overwrites the chunk with
// d loss / d logits, which two more GEMMs turn into d features (accumulated) and d weight (the chunk's classes).
// The setup and the loss are ATen (linear_ride_loss_setup.h, shared with the CPU kernel); per-class math:
// fastlt/linear_ride_loss.h, fastlt/ride_loss.h, fastlt/softmax_stats.h. The overloads .statistics and .gradients run
// one pass each, for class-parallel heads (as the CPU kernel's).
#include <ATen/ATen.h>

#include <torch/library.h>

#include "cuda/cuda_common.cuh"
#include "fastlt/linear_ride_loss.h"
#include "linear_ride_loss_setup.h"

namespace fastlt {
namespace cuda {
namespace {

// Running statistics of the rows, [E, B] (per expert and row) or [B] (per row).
template <typename A>
struct StatisticsPointers {
  A *ce_max, *ce_sum, *expert_max, *expert_sum, *gap, *target_logit, *mean_max, *mean_sum;
};

template <typename A>
A* optional_pointer(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.data_ptr<A>() : nullptr;
}

// The statistics' pointers; nullptr for those left undefined (.gradients is given no gaps or target logits, which
// pass 2 does not read).
template <typename A>
StatisticsPointers<A> pointers(const linear_ride_loss::RowStatistics& stats) {
  return {optional_pointer<A>(stats.ce_max),     optional_pointer<A>(stats.ce_sum),
          optional_pointer<A>(stats.expert_max), optional_pointer<A>(stats.expert_sum),
          optional_pointer<A>(stats.gap),        optional_pointer<A>(stats.target_logit),
          optional_pointer<A>(stats.mean_max),   optional_pointer<A>(stats.mean_sum)};
}

// Pass 1, one block per row b: applies column scale and bias to the chunk's logits [E, B, n] in place, forms the
// tempered mean logits (in mean_scratch [B, n]) and merges the chunk's statistics into the row's.
template <typename A>
__global__ void merge_chunk(A* logits, int E, int64_t B, int64_t C, int64_t n, int64_t c0, const A* column_scale,
                            const A* bias, const A* row_bias_scales, const int64_t* labels, const A* row_margins,
                            const A* inverse_temperature, bool diversity, A* mean_scratch,
                            StatisticsPointers<A> stats) {
  __shared__ SoftmaxStats<A> stats_buffer[kThreads];
  __shared__ A sum_buffer[kThreads];
  const int64_t b = blockIdx.x;
  const int64_t t = labels[b] - c0;  // the target's column in the chunk, if 0 <= t < n (ignored rows: label -1)
  const bool has_target = t >= 0 && t < n;
  const A margin = row_margins[b];
  const A bias_scale = row_bias_scales != nullptr ? row_bias_scales[b] : A(1);
  const A inverse_experts = A(1) / static_cast<A>(E);
  A* mean_logits = mean_scratch + b * n;
  SoftmaxStats<A> mean_partial = empty_softmax_stats<A>();
  for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
    A total = A(0);
    for (int k = 0; k < E; ++k) {
      A* z = logits + (k * B + b) * n + c;
      *z = linear_ride_loss::chunk_logit(*z, column_scale != nullptr ? column_scale[k * C + c0 + c] : A(1),
                                         bias != nullptr ? bias_scale * bias[k * C + c0 + c] : A(0));
      total += *z;  // experts in order, as the CPU kernel
    }
    if (diversity) {
      const A v = ride_loss::tempered_mean_logit(total, inverse_experts, inverse_temperature[c0 + c]);
      mean_logits[c] = v;
      add_to_softmax_stats(mean_partial, v);
    }
  }
  // Publishes every thread's scaled logits (thread 0 reads the target's) and reduces the mean's statistics.
  const SoftmaxStats<A> chunk_mean = block_softmax_stats(mean_partial, stats_buffer);
  const A old_mean_max = stats.mean_max[b];
  const A merged_mean_max =
      diversity ? (chunk_mean.maximum > old_mean_max ? chunk_mean.maximum : old_mean_max) : old_mean_max;
  for (int k = 0; k < E; ++k) {
    const int64_t row = k * B + b;
    const A* z = logits + row * n;
    SoftmaxStats<A> ce_partial = empty_softmax_stats<A>(), expert_partial = empty_softmax_stats<A>();
    A gap_partial = A(0);
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
      add_to_softmax_stats(ce_partial, ride_loss::margin_logit(z[c], c == t, margin));
      if (diversity) {
        const A u = ride_loss::tempered_logit(z[c], inverse_temperature[c0 + c]);
        add_to_softmax_stats(expert_partial, u);
        const A v = mean_logits[c];
        gap_partial += ride_loss::weighted_gap_term(exponential(v - chunk_mean.maximum), v, u);
      }
    }
    const SoftmaxStats<A> ce = block_softmax_stats(ce_partial, stats_buffer);
    SoftmaxStats<A> expert = empty_softmax_stats<A>();
    A chunk_gap = A(0);
    if (diversity) {
      expert = block_softmax_stats(expert_partial, stats_buffer);
      chunk_gap = block_sum(gap_partial, sum_buffer);
    }
    if (threadIdx.x != 0) continue;
    const SoftmaxStats<A> merged_ce = merge_softmax_stats<A>({stats.ce_max[row], stats.ce_sum[row]}, ce);
    stats.ce_max[row] = merged_ce.maximum;
    stats.ce_sum[row] = merged_ce.shifted_sum;
    if (has_target) stats.target_logit[row] = ride_loss::margin_logit(z[t], true, margin);
    if (!diversity) continue;
    const SoftmaxStats<A> merged_expert =
        merge_softmax_stats<A>({stats.expert_max[row], stats.expert_sum[row]}, expert);
    stats.expert_max[row] = merged_expert.maximum;
    stats.expert_sum[row] = merged_expert.shifted_sum;
    stats.gap[row] = linear_ride_loss::rescale(stats.gap[row], old_mean_max, merged_mean_max) +
                     linear_ride_loss::rescale(chunk_gap, chunk_mean.maximum, merged_mean_max);
  }
  if (threadIdx.x == 0 && diversity) {
    const SoftmaxStats<A> merged_mean = merge_softmax_stats<A>({old_mean_max, stats.mean_sum[b]}, chunk_mean);
    stats.mean_max[b] = merged_mean.maximum;
    stats.mean_sum[b] = merged_mean.shifted_sum;
  }
}

// Pass 2, one block per row b: overwrites the chunk's raw logits [E, B, n] with d loss / d z (each thread owns its
// columns across the experts, so reading every expert for the mean before overwriting needs no barrier).
template <typename A>
__global__ void chunk_gradient(A* logits, int E, int64_t B, int64_t C, int64_t n, int64_t c0, const A* column_scale,
                               const A* bias, const A* row_bias_scales, const int64_t* labels, const A* row_margins,
                               const A* ce_coefs, const A* div_coefs, const A* inverse_temperature, bool diversity,
                               StatisticsPointers<A> stats) {
  const int64_t b = blockIdx.x;
  const int64_t t = labels[b] - c0;
  const A margin = row_margins[b], ce_coef = ce_coefs[b], div_coef = div_coefs[b];
  const A bias_scale = row_bias_scales != nullptr ? row_bias_scales[b] : A(1);
  const A inverse_experts = A(1) / static_cast<A>(E);
  for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
    const A inverse_t = inverse_temperature[c0 + c];
    A mean_probability = A(0);
    if (diversity) {
      A total = A(0);
      for (int k = 0; k < E; ++k)
        total += linear_ride_loss::chunk_logit(logits[(k * B + b) * n + c],
                                               column_scale != nullptr ? column_scale[k * C + c0 + c] : A(1),
                                               bias != nullptr ? bias_scale * bias[k * C + c0 + c] : A(0));
      const A v = ride_loss::tempered_mean_logit(total, inverse_experts, inverse_t);
      mean_probability = exponential(v - stats.mean_max[b]) / stats.mean_sum[b];
    }
    for (int k = 0; k < E; ++k) {
      const int64_t row = k * B + b;
      A* z = logits + row * n + c;
      const A logit = linear_ride_loss::chunk_logit(*z, column_scale != nullptr ? column_scale[k * C + c0 + c] : A(1),
                                                    bias != nullptr ? bias_scale * bias[k * C + c0 + c] : A(0));
      const bool is_target = c == t;
      const A ce_probability =
          exponential(ride_loss::margin_logit(logit, is_target, margin) - stats.ce_max[row]) / stats.ce_sum[row];
      const A expert_probability =
          diversity
              ? exponential(ride_loss::tempered_logit(logit, inverse_t) - stats.expert_max[row]) / stats.expert_sum[row]
              : A(0);
      *z = ride_loss::logit_gradient(ce_coef, ce_probability, is_target, diversity ? div_coef : A(0),
                                     expert_probability, mean_probability, inverse_t);
    }
  }
}

// The cosine classifier's weight-gradient correction, one block per class row r of the chunk's [E * n, D] gradient
// p = column_scale * dz^T x: p -= w * radial_coefficient(w . p).
template <typename A>
__global__ void radial_correction(const A* weight_chunk, A* gradient, int64_t C, int64_t n, int64_t c0, int64_t D,
                                  const A* column_scale, const bool* above_eps, A scale) {
  __shared__ A sum_buffer[kThreads];
  const int64_t r = blockIdx.x;
  const int64_t column = (r / n) * C + c0 + r % n;
  const A* w = weight_chunk + r * D;
  A* p = gradient + r * D;
  A partial = A(0);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) partial += w[i] * p[i];
  const A coefficient = linear_ride_loss::radial_coefficient(block_sum(partial, sum_buffer), column_scale[column],
                                                             scale, above_eps[column]);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) p[i] -= w[i] * coefficient;
}

// The chunk [c0, c0 + n)'s logits, [E, B, n] contiguous in the logit buffer, before column scale and bias.
inline at::Tensor chunk_logits(const linear_ride_loss::Setup& s, at::Tensor& logit_buffer, int64_t n,
                               const at::Tensor& weight_chunk) {
  at::Tensor logits = logit_buffer.narrow(0, 0, s.E * s.B * n).view({s.E, s.B, n});
  at::bmm_out(logits, s.features, weight_chunk.transpose(1, 2));
  return logits;
}

// Pass 1: merges every chunk into the rows' statistics.
template <typename A>
void merge_statistics(const linear_ride_loss::Setup& s, const at::Tensor& weight,
                      linear_ride_loss::RowStatistics& stats) {
  const auto acc_options = weight.options().dtype(s.acc);
  at::Tensor logit_buffer = at::empty({s.E * s.B * s.chunk}, acc_options);
  at::Tensor mean_scratch = at::empty({s.diversity ? s.B * s.chunk : 1}, acc_options);
  for (int64_t c0 = 0; c0 < s.C; c0 += s.chunk) {
    const int64_t n = std::min(s.chunk, s.C - c0);
    at::Tensor logits = chunk_logits(s, logit_buffer, n, weight.narrow(1, c0, n).to(s.acc));
    merge_chunk<A><<<s.B, kThreads, 0, current_stream()>>>(
        logits.data_ptr<A>(), static_cast<int>(s.E), s.B, s.C, n, c0, optional_pointer<A>(s.column_scale),
        optional_pointer<A>(s.bias), optional_pointer<A>(s.row_bias_scales), s.labels.data_ptr<int64_t>(),
        s.row_margins.data_ptr<A>(), s.inverse_temperature.data_ptr<A>(), s.diversity, mean_scratch.data_ptr<A>(),
        pointers<A>(stats));
    check_launch(linear_ride_loss::kOp);
  }
}

// Pass 2: each chunk's d loss / d logits from the finished statistics, then d features += dz @ W and
// d weight[chunk] = dz^T @ x.
template <typename A>
void accumulate_gradients(const linear_ride_loss::Setup& s, const at::Tensor& weight,
                          const linear_ride_loss::RowStatistics& stats, linear_ride_loss::Gradients& grads,
                          double scale) {
  at::Tensor logit_buffer = at::empty({s.E * s.B * s.chunk}, weight.options().dtype(s.acc));
  const A* scales = optional_pointer<A>(s.column_scale);
  const StatisticsPointers<A> statistics = pointers<A>(stats);
  for (int64_t c0 = 0; c0 < s.C; c0 += s.chunk) {
    const int64_t n = std::min(s.chunk, s.C - c0);
    const at::Tensor weight_chunk = weight.narrow(1, c0, n).to(s.acc).contiguous();
    at::Tensor logits = chunk_logits(s, logit_buffer, n, weight_chunk);
    chunk_gradient<A><<<s.B, kThreads, 0, current_stream()>>>(
        logits.data_ptr<A>(), static_cast<int>(s.E), s.B, s.C, n, c0, scales, optional_pointer<A>(s.bias),
        optional_pointer<A>(s.row_bias_scales), s.labels.data_ptr<int64_t>(), s.row_margins.data_ptr<A>(),
        s.ce_coef.data_ptr<A>(), s.div_coef.data_ptr<A>(), s.inverse_temperature.data_ptr<A>(), s.diversity,
        statistics);
    check_launch(linear_ride_loss::kOp);
    if (grads.bias.defined())
      grads.bias.narrow(1, c0, n).copy_(linear_ride_loss::bias_gradient(logits, s.row_bias_scales));
    if (scales != nullptr) logits.mul_(s.column_scale.narrow(1, c0, n).unsqueeze(1));
    grads.expert_features.baddbmm_(logits, weight_chunk);
    at::Tensor weight_gradient = grads.weight_chunk(n);
    at::bmm_out(weight_gradient, logits.transpose(1, 2), s.features);
    if (scales != nullptr) {
      radial_correction<A><<<s.E * n, kThreads, 0, current_stream()>>>(
          weight_chunk.data_ptr<A>(), weight_gradient.data_ptr<A>(), s.C, n, c0, s.D, scales,
          s.weight_above_eps.data_ptr<bool>(), static_cast<A>(scale));
      check_launch(linear_ride_loss::kOp);
    }
    grads.weight.narrow(1, c0, n).copy_(weight_gradient);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ride_loss(
    const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& target_margins, const std::optional<at::Tensor>& class_weights,
    const at::Tensor& temperatures, const std::optional<at::Tensor>& row_weights,
    const std::optional<at::Tensor>& row_bias_scales, double scale, bool normalize_weight, double diversity_factor,
    int64_t reduction, int64_t ignore_index, int64_t chunk_size, bool compute_grad) {
  check_cuda(weight, linear_ride_loss::kOp, "weight");  // before the shared checks, so a CPU tensor gets this message
  const c10::cuda::CUDAGuard guard(weight.device());
  const linear_ride_loss::Setup setup = linear_ride_loss::setup(
      features, weight, bias, target, target_margins, class_weights, temperatures, row_weights, row_bias_scales, scale,
      normalize_weight, diversity_factor, reduction, ignore_index, chunk_size);
  linear_ride_loss::RowStatistics stats = linear_ride_loss::empty_statistics(setup, weight.options().dtype(setup.acc));
  linear_ride_loss::Gradients grads;
  AT_DISPATCH_FLOATING_TYPES(setup.acc, "fastlt_linear_ride_loss_cuda", [&] {
    merge_statistics<scalar_t>(setup, weight, stats);
    if (!compute_grad) return;
    grads = linear_ride_loss::empty_gradients(setup, weight);
    accumulate_gradients<scalar_t>(setup, weight, stats, grads, scale);
  });
  return linear_ride_loss::outputs(stats, setup, features, weight, grads, compute_grad);
}

// .statistics: pass 1 alone over the weight's classes (one shard of a class-parallel head).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_ride_loss_statistics(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& target, const at::Tensor& target_margins, const at::Tensor& temperatures,
                            const std::optional<at::Tensor>& row_bias_scales, double scale, bool normalize_weight,
                            bool diversity, int64_t chunk_size) {
  check_cuda(weight, linear_ride_loss::kOp, "weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  const linear_ride_loss::Setup setup =
      linear_ride_loss::pass_setup(features, weight, bias, target, target_margins, temperatures, row_bias_scales, scale,
                                   normalize_weight, diversity, chunk_size);
  linear_ride_loss::RowStatistics stats = linear_ride_loss::empty_statistics(setup, weight.options().dtype(setup.acc));
  AT_DISPATCH_FLOATING_TYPES(setup.acc, "fastlt_linear_ride_loss_statistics_cuda",
                             [&] { merge_statistics<scalar_t>(setup, weight, stats); });
  return linear_ride_loss::statistics_outputs(stats);
}

// .gradients: pass 2 alone over the weight's classes, from the whole batch's statistics and row coefficients.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ride_loss_gradients(
    const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& target_margins, const at::Tensor& temperatures,
    const std::optional<at::Tensor>& row_bias_scales, const at::Tensor& ce_coefs, const at::Tensor& div_coefs,
    const at::Tensor& ce_max, const at::Tensor& ce_sum, const at::Tensor& expert_max, const at::Tensor& expert_sum,
    const at::Tensor& mean_max, const at::Tensor& mean_sum, double scale, bool normalize_weight, bool diversity,
    int64_t chunk_size) {
  check_cuda(weight, linear_ride_loss::kOp, "weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  const linear_ride_loss::Setup setup =
      linear_ride_loss::gradients_setup(features, weight, bias, target, target_margins, temperatures, row_bias_scales,
                                        ce_coefs, div_coefs, scale, normalize_weight, diversity, chunk_size);
  const linear_ride_loss::RowStatistics stats =
      linear_ride_loss::given_statistics(setup, weight, ce_max, ce_sum, expert_max, expert_sum, mean_max, mean_sum);
  linear_ride_loss::Gradients grads = linear_ride_loss::empty_gradients(setup, weight);
  AT_DISPATCH_FLOATING_TYPES(setup.acc, "fastlt_linear_ride_loss_gradients_cuda",
                             [&] { accumulate_gradients<scalar_t>(setup, weight, stats, grads, scale); });
  return linear_ride_loss::gradient_outputs(features, weight, grads);
}

}  // namespace cuda
}  // namespace fastlt

TORCH_LIBRARY_IMPL(fastlt, CUDA, m) {
  m.impl("linear_ride_loss", &fastlt::cuda::linear_ride_loss);
  m.impl("linear_ride_loss.statistics", &fastlt::cuda::linear_ride_loss_statistics);
  m.impl("linear_ride_loss.gradients", &fastlt::cuda::linear_ride_loss_gradients);
}
