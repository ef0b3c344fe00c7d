// CPU kernels of fastlt::batch_norm_channels_last: training-mode batch normalisation of a channels_last [N, C, H, W]
// tensor, whose memory is a row-major [M, C] table (M = N * H * W). torch's CPU kernel vectorises its loops over the
// C channels of one row, so a channel count that is not a multiple of the vector width runs its tail scalar: the RIDE
// CIFAR experts' 24 channels take 3-4x longer per element than 48 channels on AVX-512 (BENCHMARKS.md). Here the
// loops run over tiles of L = lcm(C, 16) values (16 / C whole rows), the per-position tables repeating every C
// values, so each ISA vectorises the whole tile; per-position sums fold back to C channels at the end.
//
// Statistics in one pass: sums of x - shift and (x - shift)^2 with the first row as the per-channel shift (no
// cancellation when the shift is within a few standard deviations of the mean), summed in the input's dtype over
// blocks of kBlockRows tiles and in double across blocks and threads. Backward in two passes: the per-channel sums of
// g and g * (x - mean), then grad_input = g * k1 + (x - mean) * k2 + k3 with per-channel k's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <numeric>
#include <vector>

#include "cpu/per_isa.h"
#include "ops_common.h"

namespace fastlt {
namespace cpu {
namespace {

constexpr int64_t kTileMultiple = 16;  // fp32 lanes of AVX-512: a tile is a whole number of vectors on every ISA
constexpr int64_t kBlockRows = 256;    // tiles summed in the input's dtype before a double accumulation

// sum1[j] += x - shift[j], sum2[j] += (x - shift[j])^2 over `rows` tiles of L values.
template <typename T>
FASTLT_ALWAYS_INLINE void shifted_sums_impl(const T* x, int64_t rows, int64_t L, const T* shift, T* sum1, T* sum2) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * L;
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) {
      const T d = row[j] - shift[j];
      sum1[j] += d;
      sum2[j] += d * d;
    }
  }
}

// out = (x - mean[j]) * scale[j] + bias[j] (not x * a + b: with a mean far from 0, b cancels x's leading digits).
template <typename T>
FASTLT_ALWAYS_INLINE void normalize_impl(const T* x, T* out, int64_t rows, int64_t L, const T* mean, const T* scale,
                                         const T* bias) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) out[r * L + j] = (x[r * L + j] - mean[j]) * scale[j] + bias[j];
  }
}

// sum_g[j] += g, sum_gx[j] += g * (x - mean[j]).
template <typename T>
FASTLT_ALWAYS_INLINE void grad_sums_impl(const T* g, const T* x, int64_t rows, int64_t L, const T* mean, T* sum_g,
                                         T* sum_gx) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) {
      sum_g[j] += g[r * L + j];
      sum_gx[j] += g[r * L + j] * (x[r * L + j] - mean[j]);
    }
  }
}

// grad_input = g * k1[j] + (x - mean[j]) * k2[j] + k3[j].
template <typename T>
FASTLT_ALWAYS_INLINE void write_grad_input_impl(const T* g, const T* x, T* out, int64_t rows, int64_t L, const T* mean,
                                                const T* k1, const T* k2, const T* k3) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) out[r * L + j] = g[r * L + j] * k1[j] + (x[r * L + j] - mean[j]) * k2[j] + k3[j];
  }
}

// fp32 takes the per-ISA builds; fp64 (tests, gradcheck) the generic one.
#define FASTLT_BN_LOOPS(T, ATTRIBUTE)                                                                                  \
  ATTRIBUTE void shifted_sums(const T* x, int64_t rows, int64_t L, const T* shift, T* sum1, T* sum2) {                 \
    shifted_sums_impl(x, rows, L, shift, sum1, sum2);                                                                  \
  }                                                                                                                    \
  ATTRIBUTE void normalize(const T* x, T* out, int64_t rows, int64_t L, const T* mean, const T* scale,                 \
                           const T* bias) {                                                                            \
    normalize_impl(x, out, rows, L, mean, scale, bias);                                                                \
  }                                                                                                                    \
  ATTRIBUTE void grad_sums(const T* g, const T* x, int64_t rows, int64_t L, const T* mean, T* sum_g, T* sum_gx) {      \
    grad_sums_impl(g, x, rows, L, mean, sum_g, sum_gx);                                                                \
  }                                                                                                                    \
  ATTRIBUTE void write_grad_input(const T* g, const T* x, T* out, int64_t rows, int64_t L, const T* mean, const T* k1, \
                                  const T* k2, const T* k3) {                                                          \
    write_grad_input_impl(g, x, out, rows, L, mean, k1, k2, k3);                                                       \
  }
FASTLT_BN_LOOPS(float, FASTLT_PER_ISA)
FASTLT_BN_LOOPS(double, )
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

// input [N, C, H, W] (more than one value per channel) and two [C] tables of its dtype and device.
void check_inputs(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, const char* op,
                  const char* bias_name = "bias") {
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be [N, C, H, W], got shape ", input.sizes());
  TORCH_CHECK_VALUE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
                    ": input must be float32/float64, got ", input.scalar_type());
  TORCH_CHECK_VALUE(input.device().is_cpu(), op, " (CPU kernel): input must be a CPU tensor, got ", input.device());
  const int64_t C = input.size(1);
  TORCH_CHECK_VALUE(C > 0 && input.numel() / C > 1, op,
                    ": input needs more than one value per channel in training, got shape ", input.sizes());
  for (const auto& [tensor, name] : {std::pair{&weight, "weight"}, std::pair{&bias, bias_name}}) {
    TORCH_CHECK_VALUE(tensor->dim() == 1 && tensor->size(0) == C, op, ": ", name, " must be [C]=[", C, "], got shape ",
                      tensor->sizes());
    TORCH_CHECK_VALUE(tensor->scalar_type() == input.scalar_type(), op, ": ", name, " must be ", input.scalar_type(),
                      " like input, got ", tensor->scalar_type());
    check_same_device(*tensor, input, op, name, "input");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_channels_last(const at::Tensor& input_in,
                                                                                    const at::Tensor& weight_in,
                                                                                    const at::Tensor& bias_in,
                                                                                    double eps) {
  constexpr const char* op = "fastlt.batch_norm_channels_last";
  check_inputs(input_in, weight_in, bias_in, op);  // the one check of fastlt/ops/batch_norm_channels_last.py
  check_eps(eps, op);
  const at::Tensor input = input_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const Tiling tiling(input);
  const int64_t C = tiling.C;
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor mean = at::empty({C}, input.options()), invstd = at::empty({C}, input.options());
  at::Tensor unbiased_var = at::empty({C}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastlt_batch_norm_channels_last_cpu", [&] {
    const scalar_t* x = input.data_ptr<scalar_t>();
    std::vector<double> first_row(C);
    // an infinite first value would make every shifted value nan (inf - inf): no shift there
    for (int64_t c = 0; c < C; ++c) first_row[c] = std::isfinite(x[c]) ? static_cast<double>(x[c]) : 0.0;
    const std::vector<scalar_t> shift = tiled<scalar_t>(first_row, tiling.L);
    const auto sums = channel_sums<scalar_t>(tiling, 2, [&](int64_t t0, int64_t t1, int64_t L, scalar_t* block) {
      shifted_sums(x + t0 * tiling.L, t1 - t0, L, shift.data(), block, block + L);
    });
    std::vector<double> channel_means(C), scale(C), bias_values(C);
    scalar_t* mean_out = mean.data_ptr<scalar_t>();
    scalar_t* invstd_out = invstd.data_ptr<scalar_t>();
    scalar_t* unbiased_var_out = unbiased_var.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* b = bias.data_ptr<scalar_t>();
    const double M = static_cast<double>(tiling.M);
    for (int64_t c = 0; c < C; ++c) {
      const double shifted_mean = sums[0][c] / M;
      const double var = std::max(sums[1][c] / M - shifted_mean * shifted_mean, 0.0);
      const double channel_mean = first_row[c] + shifted_mean, channel_invstd = 1.0 / std::sqrt(var + eps);
      mean_out[c] = static_cast<scalar_t>(channel_mean);
      invstd_out[c] = static_cast<scalar_t>(channel_invstd);
      unbiased_var_out[c] = static_cast<scalar_t>(var * M / (M - 1.0));  // what the running variance averages
      channel_means[c] = channel_mean;
      scale[c] = channel_invstd * w[c];
      bias_values[c] = b[c];
    }
    const std::vector<scalar_t> mean_tiles = tiled<scalar_t>(channel_means, tiling.L);
    const std::vector<scalar_t> scale_tiles = tiled<scalar_t>(scale, tiling.L);
    const std::vector<scalar_t> bias_tiles = tiled<scalar_t>(bias_values, tiling.L);
    scalar_t* y = out.data_ptr<scalar_t>();
    each_tile(tiling, [&](int64_t t0, int64_t t1, int64_t L) {
      normalize(x + t0 * tiling.L, y + t0 * tiling.L, t1 - t0, L, mean_tiles.data(), scale_tiles.data(),
                bias_tiles.data());
    });
  });
  return {out, mean, invstd, unbiased_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_channels_last_backward(const at::Tensor& grad_in,
                                                                                 const at::Tensor& input_in,
                                                                                 const at::Tensor& weight_in,
                                                                                 const at::Tensor& mean_in,
                                                                                 const at::Tensor& invstd_in) {
  constexpr const char* op = "fastlt.batch_norm_channels_last_backward";
  check_inputs(input_in, weight_in, mean_in, op, "mean");
  check_inputs(input_in, invstd_in, invstd_in, op, "invstd");
  TORCH_CHECK_VALUE(grad_in.sizes() == input_in.sizes(), op, ": grad must match input's shape ", input_in.sizes(),
                    ", got ", grad_in.sizes());
  TORCH_CHECK_VALUE(grad_in.scalar_type() == input_in.scalar_type(), op, ": grad must be ", input_in.scalar_type(),
                    " like input, got ", grad_in.scalar_type());
  check_same_device(grad_in, input_in, op, "grad", "input");
  const at::Tensor input = input_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor grad = grad_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor weight = weight_in.contiguous(), mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  const Tiling tiling(input);
  const int64_t C = tiling.C;
  at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor grad_weight = at::empty({C}, input.options()), grad_bias = at::empty({C}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastlt_batch_norm_channels_last_backward_cpu", [&] {
    const scalar_t* x = input.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* m = mean.data_ptr<scalar_t>();
    const scalar_t* s = invstd.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    std::vector<double> channel_mean(m, m + C);
    const std::vector<scalar_t> mean_tiles = tiled<scalar_t>(channel_mean, tiling.L);
    const auto sums = channel_sums<scalar_t>(tiling, 2, [&](int64_t t0, int64_t t1, int64_t L, scalar_t* block) {
      grad_sums(g + t0 * tiling.L, x + t0 * tiling.L, t1 - t0, L, mean_tiles.data(), block, block + L);
    });
    // grad_input = w * invstd * (g - sum_g / M - (x - mean) * invstd^2 * sum_gx / M) = g * k1 + (x - mean) * k2 + k3
    std::vector<double> k1(C), k2(C), k3(C);
    scalar_t* grad_weight_out = grad_weight.data_ptr<scalar_t>();
    scalar_t* grad_bias_out = grad_bias.data_ptr<scalar_t>();
    const double M = static_cast<double>(tiling.M);
    for (int64_t c = 0; c < C; ++c) {
      const double scale = static_cast<double>(w[c]) * s[c];
      const double projection = sums[1][c] * s[c] * s[c] / M;
      k1[c] = scale;
      k2[c] = -scale * projection;
      k3[c] = -scale * sums[0][c] / M;
      grad_weight_out[c] = static_cast<scalar_t>(sums[1][c] * s[c]);
      grad_bias_out[c] = static_cast<scalar_t>(sums[0][c]);
    }
    const std::vector<scalar_t> k1_tiles = tiled<scalar_t>(k1, tiling.L), k2_tiles = tiled<scalar_t>(k2, tiling.L),
                                k3_tiles = tiled<scalar_t>(k3, tiling.L);
    scalar_t* out = grad_input.data_ptr<scalar_t>();
    each_tile(tiling, [&](int64_t t0, int64_t t1, int64_t L) {
      write_grad_input(g + t0 * tiling.L, x + t0 * tiling.L, out + t0 * tiling.L, t1 - t0, L, mean_tiles.data(),
                       k1_tiles.data(), k2_tiles.data(), k3_tiles.data());
    });
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace fastlt

TORCH_LIBRARY_FRAGMENT(fastlt, m) {
  m.def(
      "batch_norm_channels_last(Tensor input, Tensor weight, Tensor bias, float eps) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_channels_last_backward(Tensor grad, Tensor input, Tensor weight, Tensor mean, Tensor invstd) -> "
      "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlt, CPU, m) {
  m.impl("batch_norm_channels_last", &fastlt::cpu::batch_norm_channels_last);
  m.impl("batch_norm_channels_last_backward", &fastlt::cpu::batch_norm_channels_last_backward);
}
