// CPU kernels of fastlt::batch_norm_channels_last: training-mode batch normalisation of a channels_last [N, C, H, W]
// tensor, whose memory is a row-major [M, C] table (M = N * H * W). torch's CPU kernel vectorises its loops over the
// C channels of one row, so a channel count that is not a multiple of the vector width runs its tail scalar: the RIDE
// CIFAR experts' 24 channels take 3-4x longer per element than 48 channels on AVX-512 (BENCHMARKS.md). Here the
// loops run over tiles of L = lcm(C, 16) values (16 / C whole rows), the per-position tables repeating every C
// values, so each ISA vectorises the whole tile; per-position sums fold back to C channels at the end.
//
// Statistics in one pass: sums of x - shift and (x - shift)^2 with the first row as the per-channel shift (no
// cancellation when the shift is within a few standard deviations of the mean), summed in float (fp32, bf16) or
// double (fp64) over blocks of kBlockRows tiles and in double across blocks and threads. bf16 batches (autocast)
// take float32 or bf16 parameters and return float32 statistics, as torch's batch norm does. Backward in two passes:
// the per-channel sums of g and g * (x - mean), then grad_input = g * k1 + (x - mean) * k2 + k3 with per-channel k's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "cpu/per_isa.h"
#include "ops_common.h"

namespace fastlt {
namespace cpu {
namespace {

constexpr int64_t kTileMultiple = 16;  // fp32 lanes of AVX-512: a tile is a whole number of vectors on every ISA
constexpr int64_t kBlockRows = 256;    // tiles summed in float (double for fp64) before a double accumulation

// The loops' element types: float, double, and bf16 as its bits (uint16_t: the upper half of a float; stores round to
// nearest even and keep NaN, as c10::BFloat16 does). Through the bits every ISA vectorises the conversions, which
// c10::BFloat16's own operators leave scalar.
FASTLT_ALWAYS_INLINE float to_compute(float value) { return value; }
FASTLT_ALWAYS_INLINE double to_compute(double value) { return value; }
FASTLT_ALWAYS_INLINE float to_compute(uint16_t bits) { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }
FASTLT_ALWAYS_INLINE void store(float* out, float value) { *out = value; }
FASTLT_ALWAYS_INLINE void store(double* out, double value) { *out = value; }
FASTLT_ALWAYS_INLINE void store(uint16_t* out, float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  *out = value != value ? uint16_t{0x7FC0} : rounded;
}
template <typename T>
T* elements(T* data) {
  return data;
}
inline const uint16_t* elements(const c10::BFloat16* data) { return reinterpret_cast<const uint16_t*>(data); }
inline uint16_t* elements(c10::BFloat16* data) { return reinterpret_cast<uint16_t*>(data); }

// The loops read and write T (the input's element type) and compute in A (float for bf16 and fp32, double for fp64).

// sum1[j] += x - shift[j], sum2[j] += (x - shift[j])^2 over `rows` tiles of L values.
template <typename T, typename A>
FASTLT_ALWAYS_INLINE void shifted_sums_impl(const T* x, int64_t rows, int64_t L, const A* shift, A* sum1, A* sum2) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * L;
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) {
      const A d = to_compute(row[j]) - shift[j];
      sum1[j] += d;
      sum2[j] += d * d;
    }
  }
}

// out = (x - mean[j]) * scale[j] + bias[j] (not x * a + b: with a mean far from 0, b cancels x's leading digits),
// then max(out, 0) with Relu (NaN kept, as torch's relu).
template <bool Relu, typename T, typename A>
FASTLT_ALWAYS_INLINE void normalize_impl(const T* x, T* out, int64_t rows, int64_t L, const A* mean, const A* scale,
                                         const A* bias) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) {
      const A value = (to_compute(x[r * L + j]) - mean[j]) * scale[j] + bias[j];
      store(out + r * L + j, Relu && value < A(0) ? A(0) : value);
    }
  }
}

// The gradient reaching the batch norm: g, or with Relu 0 where the (relu) output y <= 0.
template <bool Relu, typename T>
FASTLT_ALWAYS_INLINE auto gate(const T* g, const T* y, int64_t i) {
  const auto gi = to_compute(g[i]);
  if constexpr (Relu) return to_compute(y[i]) <= 0 ? decltype(gi)(0) : gi;  // NaN passes, as in torch's relu
  return gi;
}

// sum_g[j] += g, sum_gx[j] += g * (x - mean[j]) (g gated by the relu output y).
template <bool Relu, typename T, typename A>
FASTLT_ALWAYS_INLINE void grad_sums_impl(const T* g, const T* y, const T* x, int64_t rows, int64_t L, const A* mean,
                                         A* sum_g, A* sum_gx) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) {
      const A gj = gate<Relu>(g, y, r * L + j);
      sum_g[j] += gj;
      sum_gx[j] += gj * (to_compute(x[r * L + j]) - mean[j]);
    }
  }
}

// grad_input = g * k1[j] + (x - mean[j]) * k2[j] + k3[j] (g gated by the relu output y).
template <bool Relu, typename T, typename A>
FASTLT_ALWAYS_INLINE void write_grad_input_impl(const T* g, const T* y, const T* x, T* out, int64_t rows, int64_t L,
                                                const A* mean, const A* k1, const A* k2, const A* k3) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < L; ++j)
      store(out + r * L + j,
            gate<Relu>(g, y, r * L + j) * k1[j] + (to_compute(x[r * L + j]) - mean[j]) * k2[j] + k3[j]);
  }
}

// fp32 and bf16 take the per-ISA builds; fp64 (tests, gradcheck) the generic one. `y` is the relu output, or null.
#define FASTLT_BN_LOOPS(T, A, ATTRIBUTE)                                                                              \
  ATTRIBUTE void shifted_sums(const T* x, int64_t rows, int64_t L, const A* shift, A* sum1, A* sum2) {                \
    shifted_sums_impl(x, rows, L, shift, sum1, sum2);                                                                 \
  }                                                                                                                   \
  ATTRIBUTE void normalize(const T* x, T* out, int64_t rows, int64_t L, const A* mean, const A* scale, const A* bias, \
                           bool relu) {                                                                               \
    relu ? normalize_impl<true>(x, out, rows, L, mean, scale, bias)                                                   \
         : normalize_impl<false>(x, out, rows, L, mean, scale, bias);                                                 \
  }                                                                                                                   \
  ATTRIBUTE void grad_sums(const T* g, const T* y, const T* x, int64_t rows, int64_t L, const A* mean, A* sum_g,      \
                           A* sum_gx) {                                                                               \
    y ? grad_sums_impl<true>(g, y, x, rows, L, mean, sum_g, sum_gx)                                                   \
      : grad_sums_impl<false>(g, y, x, rows, L, mean, sum_g, sum_gx);                                                 \
  }                                                                                                                   \
  ATTRIBUTE void write_grad_input(const T* g, const T* y, const T* x, T* out, int64_t rows, int64_t L, const A* mean, \
                                  const A* k1, const A* k2, const A* k3) {                                            \
    y ? write_grad_input_impl<true>(g, y, x, out, rows, L, mean, k1, k2, k3)                                          \
      : write_grad_input_impl<false>(g, y, x, out, rows, L, mean, k1, k2, k3);                                        \
  }
FASTLT_BN_LOOPS(float, float, FASTLT_PER_ISA)
FASTLT_BN_LOOPS(uint16_t, float, FASTLT_PER_ISA)
FASTLT_BN_LOOPS(double, double, )
#undef FASTLT_BN_LOOPS

// The tiling of an [M, C] table: full tiles of L values, then a partial tile of `tail` values (a multiple of C).
struct Tiling {
  int64_t C, M, L, tiles, tail;
  explicit Tiling(const at::Tensor& input)
      : C(input.size(1)),
        M(input.numel() / input.size(1)),
        L(std::lcm<int64_t>(input.size(1), kTileMultiple)),
        tiles(input.numel() / L),
        tail(input.numel() - tiles * L) {}
};

// The per-position table of L values of a per-channel vector (position j holds channel j % C).
template <typename T>
std::vector<T> tiled(const std::vector<double>& per_channel, int64_t L) {
  const int64_t C = static_cast<int64_t>(per_channel.size());
  std::vector<T> out(L);
  for (int64_t j = 0; j < L; ++j) out[j] = static_cast<T>(per_channel[j % C]);
  return out;
}

// Runs `pass(begin_tile, end_tile, sums...)` over every block of tiles (and the partial tile) with per-thread
// T-dtype block sums of `num_sums` tables of L values, and returns their per-channel totals in double.
template <typename T, typename Pass>
std::vector<std::vector<double>> channel_sums(const Tiling& tiling, int num_sums, const Pass& pass) {
  const int64_t L = tiling.L, blocks = (tiling.tiles + kBlockRows - 1) / kBlockRows;
  const int threads = at::get_num_threads();
  std::vector<double> totals(static_cast<size_t>(threads) * num_sums * L, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    double* mine = totals.data() + static_cast<size_t>(at::get_thread_num()) * num_sums * L;
    std::vector<T> block(num_sums * L);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(block.begin(), block.end(), T(0));
      pass(b * kBlockRows, std::min(tiling.tiles, (b + 1) * kBlockRows), L, block.data());
      for (int64_t j = 0; j < num_sums * L; ++j) mine[j] += block[j];
    }
  });
  std::vector<std::vector<double>> out(num_sums, std::vector<double>(tiling.C, 0.0));
  std::vector<T> partial(num_sums * std::max<int64_t>(tiling.tail, 1), T(0));
  if (tiling.tail > 0) pass(tiling.tiles, tiling.tiles + 1, tiling.tail, partial.data());
  for (int s = 0; s < num_sums; ++s) {
    for (int t = 0; t < threads; ++t)
      for (int64_t j = 0; j < L; ++j) out[s][j % tiling.C] += totals[(static_cast<size_t>(t) * num_sums + s) * L + j];
    for (int64_t j = 0; j < tiling.tail; ++j) out[s][j % tiling.C] += partial[s * tiling.tail + j];
  }
  return out;
}

// Runs `pass(begin_tile, end_tile, L)` over every tile in parallel, then over the partial tile.
template <typename Pass>
void each_tile(const Tiling& tiling, const Pass& pass) {
  at::parallel_for(0, tiling.tiles, std::max<int64_t>(1, at::internal::GRAIN_SIZE / tiling.L),
                   [&](int64_t t0, int64_t t1) { pass(t0, t1, tiling.L); });
  if (tiling.tail > 0) pass(tiling.tiles, tiling.tiles + 1, tiling.tail);
}

// The dtype of the statistics (mean, invstd, unbiased variance) and of the per-channel math: float for fp32 and
// bf16 batches (as torch's batch norm returns them), double for fp64.
at::ScalarType statistics_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// input [N, C, H, W], fp32 / fp64 / bf16 on the CPU, more than one value per channel.
void check_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be [N, C, H, W], got shape ", input.sizes());
  const auto dtype = input.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16, op,
                    ": input must be float32/float64/bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(input.device().is_cpu(), op, " (CPU kernel): input must be a CPU tensor, got ", input.device());
  const int64_t C = input.size(1);
  TORCH_CHECK_VALUE(C > 0 && input.numel() / C > 1, op,
                    ": input needs more than one value per channel in training, got shape ", input.sizes());
}

// A [C] table on input's device: a parameter (weight, bias) of input's dtype, or float32 beside a bf16 input (its
// parameters under autocast); a statistic (mean, invstd) of statistics_dtype(input).
void check_table(const at::Tensor& table, const at::Tensor& input, const char* op, const char* name, bool parameter) {
  const int64_t C = input.size(1);
  TORCH_CHECK_VALUE(table.dim() == 1 && table.size(0) == C, op, ": ", name, " must be [C]=[", C, "], got shape ",
                    table.sizes());
  const auto dtype = table.scalar_type();
  if (parameter) {
    TORCH_CHECK_VALUE(dtype == input.scalar_type() || (input.scalar_type() == at::kBFloat16 && dtype == at::kFloat), op,
                      ": ", name, " must be ", input.scalar_type(),
                      input.scalar_type() == at::kBFloat16 ? " or float32" : "", " like input, got ", dtype);
  } else {
    TORCH_CHECK_VALUE(dtype == statistics_dtype(input), op, ": ", name, " must be ", statistics_dtype(input), " for a ",
                      input.scalar_type(), " input, got ", dtype);
  }
  check_same_device(table, input, op, name, "input");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_channels_last(const at::Tensor& input_in,
                                                                                    const at::Tensor& weight_in,
                                                                                    const at::Tensor& bias_in,
                                                                                    double eps, bool relu) {
  // the checks of fastlt/ops/batch_norm_channels_last.py `_validate`
  constexpr const char* op = "fastlt.batch_norm_channels_last";
  check_input(input_in, op);
  check_table(weight_in, input_in, op, "weight", true);
  check_table(bias_in, input_in, op, "bias", true);
  check_eps(eps, op);
  const at::Tensor input = input_in.contiguous(at::MemoryFormat::ChannelsLast);
  const auto stats = input.options().dtype(statistics_dtype(input));
  const at::Tensor weight = weight_in.to(stats.dtype()).contiguous(), bias = bias_in.to(stats.dtype()).contiguous();
  const Tiling tiling(input);
  const int64_t C = tiling.C;
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor mean = at::empty({C}, stats), invstd = at::empty({C}, stats), unbiased_var = at::empty({C}, stats);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "fastlt_batch_norm_channels_last_cpu", [&] {
    using A = acc_t<scalar_t>;
    const auto* x = elements(input.data_ptr<scalar_t>());
    std::vector<double> first_row(C);
    // an infinite first value would make every shifted value nan (inf - inf): no shift there
    for (int64_t c = 0; c < C; ++c) {
      const double first = static_cast<double>(to_compute(x[c]));
      first_row[c] = std::isfinite(first) ? first : 0.0;
    }
    const std::vector<A> shift = tiled<A>(first_row, tiling.L);
    const auto sums = channel_sums<A>(tiling, 2, [&](int64_t t0, int64_t t1, int64_t L, A* block) {
      shifted_sums(x + t0 * tiling.L, t1 - t0, L, shift.data(), block, block + L);
    });
    std::vector<double> channel_means(C), scale(C), bias_values(C);
    A* mean_out = mean.data_ptr<A>();
    A* invstd_out = invstd.data_ptr<A>();
    A* unbiased_var_out = unbiased_var.data_ptr<A>();
    const A* w = weight.data_ptr<A>();
    const A* b = bias.data_ptr<A>();
    const double M = static_cast<double>(tiling.M);
    for (int64_t c = 0; c < C; ++c) {
      const double shifted_mean = sums[0][c] / M;
      const double var = std::max(sums[1][c] / M - shifted_mean * shifted_mean, 0.0);
      const double channel_mean = first_row[c] + shifted_mean, channel_invstd = 1.0 / std::sqrt(var + eps);
      mean_out[c] = static_cast<A>(channel_mean);
      invstd_out[c] = static_cast<A>(channel_invstd);
      unbiased_var_out[c] = static_cast<A>(var * M / (M - 1.0));  // what the running variance averages
      channel_means[c] = channel_mean;
      scale[c] = channel_invstd * w[c];
      bias_values[c] = b[c];
    }
    const std::vector<A> mean_tiles = tiled<A>(channel_means, tiling.L);
    const std::vector<A> scale_tiles = tiled<A>(scale, tiling.L);
    const std::vector<A> bias_tiles = tiled<A>(bias_values, tiling.L);
    auto* y = elements(out.data_ptr<scalar_t>());
    each_tile(tiling, [&](int64_t t0, int64_t t1, int64_t L) {
      normalize(x + t0 * tiling.L, y + t0 * tiling.L, t1 - t0, L, mean_tiles.data(), scale_tiles.data(),
                bias_tiles.data(), relu);
    });
  });
  return {out, mean, invstd, unbiased_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_channels_last_backward(
    const at::Tensor& grad_in, const at::Tensor& input_in, const at::Tensor& weight_in, const at::Tensor& mean_in,
    const at::Tensor& invstd_in, const std::optional<at::Tensor>& relu_output_in) {
  constexpr const char* op = "fastlt.batch_norm_channels_last_backward";
  check_input(input_in, op);
  check_table(weight_in, input_in, op, "weight", true);
  check_table(mean_in, input_in, op, "mean", false);
  check_table(invstd_in, input_in, op, "invstd", false);
  TORCH_CHECK_VALUE(grad_in.sizes() == input_in.sizes(), op, ": grad must match input's shape ", input_in.sizes(),
                    ", got ", grad_in.sizes());
  TORCH_CHECK_VALUE(grad_in.scalar_type() == input_in.scalar_type(), op, ": grad must be ", input_in.scalar_type(),
                    " like input, got ", grad_in.scalar_type());
  check_same_device(grad_in, input_in, op, "grad", "input");
  if (relu_output_in.has_value()) {
    const at::Tensor& y = *relu_output_in;
    TORCH_CHECK_VALUE(y.sizes() == input_in.sizes() && y.scalar_type() == input_in.scalar_type(), op,
                      ": relu_output must be input's shape and dtype, got ", y.sizes(), " ", y.scalar_type());
    check_same_device(y, input_in, op, "relu_output", "input");
  }
  const at::Tensor input = input_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor grad = grad_in.contiguous(at::MemoryFormat::ChannelsLast);
  // with the relu output (the forward ran relu), the gradient is gated by output > 0
  const at::Tensor relu_output =
      relu_output_in.has_value() ? relu_output_in->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  const auto stats = input.options().dtype(statistics_dtype(input));
  const at::Tensor weight = weight_in.to(stats.dtype()).contiguous(), mean = mean_in.contiguous(),
                   invstd = invstd_in.contiguous();
  const Tiling tiling(input);
  const int64_t C = tiling.C;
  at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor grad_weight = at::empty({C}, stats), grad_bias = at::empty({C}, stats);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "fastlt_batch_norm_channels_last_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const auto* x = elements(input.data_ptr<scalar_t>());
    const auto* g = elements(grad.data_ptr<scalar_t>());
    const auto* y = relu_output.defined() ? elements(relu_output.data_ptr<scalar_t>()) : nullptr;
    const A* m = mean.data_ptr<A>();
    const A* s = invstd.data_ptr<A>();
    const A* w = weight.data_ptr<A>();
    std::vector<double> channel_mean(m, m + C);
    const std::vector<A> mean_tiles = tiled<A>(channel_mean, tiling.L);
    const auto sums = channel_sums<A>(tiling, 2, [&](int64_t t0, int64_t t1, int64_t L, A* block) {
      grad_sums(g + t0 * tiling.L, y ? y + t0 * tiling.L : nullptr, x + t0 * tiling.L, t1 - t0, L, mean_tiles.data(),
                block, block + L);
    });
    // grad_input = w * invstd * (g - sum_g / M - (x - mean) * invstd^2 * sum_gx / M) = g * k1 + (x - mean) * k2 + k3
    std::vector<double> k1(C), k2(C), k3(C);
    A* grad_weight_out = grad_weight.data_ptr<A>();
    A* grad_bias_out = grad_bias.data_ptr<A>();
    const double M = static_cast<double>(tiling.M);
    for (int64_t c = 0; c < C; ++c) {
      const double scale = static_cast<double>(w[c]) * s[c];
      const double projection = sums[1][c] * s[c] * s[c] / M;
      k1[c] = scale;
      k2[c] = -scale * projection;
      k3[c] = -scale * sums[0][c] / M;
      grad_weight_out[c] = static_cast<A>(sums[1][c] * s[c]);
      grad_bias_out[c] = static_cast<A>(sums[0][c]);
    }
    const std::vector<A> k1_tiles = tiled<A>(k1, tiling.L), k2_tiles = tiled<A>(k2, tiling.L),
                         k3_tiles = tiled<A>(k3, tiling.L);
    auto* out = elements(grad_input.data_ptr<scalar_t>());
    each_tile(tiling, [&](int64_t t0, int64_t t1, int64_t L) {
      write_grad_input(g + t0 * tiling.L, y ? y + t0 * tiling.L : nullptr, x + t0 * tiling.L, out + t0 * tiling.L,
                       t1 - t0, L, mean_tiles.data(), k1_tiles.data(), k2_tiles.data(), k3_tiles.data());
    });
  });
  // the parameters' gradients in the parameters' dtype
  return {grad_input, grad_weight.to(weight_in.scalar_type()), grad_bias.to(weight_in.scalar_type())};
}

}  // namespace cpu
}  // namespace fastlt

TORCH_LIBRARY_FRAGMENT(fastlt, m) {
  m.def(
      "batch_norm_channels_last(Tensor input, Tensor weight, Tensor bias, float eps, bool relu) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_channels_last_backward(Tensor grad, Tensor input, Tensor weight, Tensor mean, Tensor invstd, "
      "Tensor? relu_output) -> "
      "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlt, CPU, m) {
  m.impl("batch_norm_channels_last", &fastlt::cpu::batch_norm_channels_last);
  m.impl("batch_norm_channels_last_backward", &fastlt::cpu::batch_norm_channels_last_backward);
}
