// CPU kernels of fastlt::expert_aggregate: OpenMP (at::parallel_for) over rows; per-row math from
// fastlt/expert_aggregate.h. Logits may have any strides ([B, E, C] views are read in place).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/per_isa.h"
#include "fastlt/expert_aggregate.h"
#include "ops_common.h"

namespace fastlt {
namespace cpu {
namespace {

// Writes value(c) for c in [0, C) to out. fp32 rows are written with non-temporal (streaming) stores: the outputs
// are large and not read back soon, and streaming skips the read-for-ownership that halves write bandwidth.
template <typename T, typename F>
inline void write_row(T* out, int64_t C, F value) {
  for (int64_t c = 0; c < C; ++c) out[c] = static_cast<T>(value(c));
}

template <typename F>
inline void write_row(float* out, int64_t C, F value) {
  int64_t c = 0;
  for (; c < C && (reinterpret_cast<uintptr_t>(out + c) & 15) != 0; ++c) out[c] = value(c);
  for (; c + 4 <= C; c += 4) stream_store4(out + c, value(c), value(c + 1), value(c + 2), value(c + 3));
  for (; c < C; ++c) out[c] = value(c);
}

constexpr int64_t kChunk = 2048;  // classes per chunk: the fp32 accumulator stays in L1

// out[c] = sum_k coef[k] * row[k * expert_stride + c] for a contiguous row (fp16 / bf16 / fp64; fp32 below): same
// order of additions as aggregate_element (k = 0..E-1), but over L1-sized chunks of classes with the expert loop
// outside, so the inner loop is contiguous.
template <typename T, typename A>
void weighted_sum_row(const T* row, int64_t expert_stride, int64_t E, const A* coef, T* out, int64_t C, A* acc) {
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, C - c0);
    std::fill(acc, acc + n, A(0));
    for (int64_t k = 0; k < E; ++k) {
      const T* zk = row + k * expert_stride + c0;
      const A ck = coef[k];
      for (int64_t c = 0; c < n; ++c) acc[c] += ck * static_cast<A>(zk[c]);
    }
    write_row(out + c0, n, [&](int64_t c) { return acc[c]; });
  }
}

// The fp32 version for up to 6 experts (RIDE's range), compiled per ISA: one pass reads the E expert rows side by side
// (E fixed at compile time, so the expert loop unrolls and the class loop vectorises to the CPU's widest registers),
// and each chunk is streamed to out. More experts take the generic version above.
template <int E>
FASTLT_ALWAYS_INLINE void weighted_sum_chunk(const float* z, int64_t expert_stride, const float* coef, float* acc,
                                             int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    float sum = 0.0f;
    for (int k = 0; k < E; ++k) sum += coef[k] * z[k * expert_stride + c];
    acc[c] = sum;
  }
}

FASTLT_PER_ISA void weighted_sum_row(const float* row, int64_t expert_stride, int64_t E, const float* coef, float* out,
                                     int64_t C, float* acc) {
  if (E > 6) return weighted_sum_row<float, float>(row, expert_stride, E, coef, out, C, acc);
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, C - c0);
    const float* z = row + c0;
    switch (E) {
      case 1: weighted_sum_chunk<1>(z, expert_stride, coef, acc, n); break;
      case 2: weighted_sum_chunk<2>(z, expert_stride, coef, acc, n); break;
      case 3: weighted_sum_chunk<3>(z, expert_stride, coef, acc, n); break;
      case 4: weighted_sum_chunk<4>(z, expert_stride, coef, acc, n); break;
      case 5: weighted_sum_chunk<5>(z, expert_stride, coef, acc, n); break;
      default: weighted_sum_chunk<6>(z, expert_stride, coef, acc, n); break;
    }
    float* o = out + c0;
    int64_t c = 0;
    for (; c < n && (reinterpret_cast<uintptr_t>(o + c) & 15) != 0; ++c) o[c] = acc[c];
    for (; c + 4 <= n; c += 4) stream_store4(o + c, acc[c], acc[c + 1], acc[c + 2], acc[c + 3]);
    for (; c < n; ++c) o[c] = acc[c];
  }
}

// Rows per parallel task so that each task touches at least ATen's GRAIN_SIZE elements: small inputs stay on one
// thread instead of paying a thread wake-up per call.
inline int64_t rows_per_task(int64_t elements_per_row) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, elements_per_row));
}

template <typename A>
struct RowTables {
  const A* weights;    // [B, E] or null
  const bool* active;  // [B, E] or null
  int num_experts;
  int reduce;
  int fill(int64_t b, A* unweighted, A* coef) const {
    return expert_aggregate::row_coefficients<A>(num_experts, reduce, weights ? weights + b * num_experts : nullptr,
                                                 active ? active + b * num_experts : nullptr, unweighted, coef);
  }
};

}  // namespace

at::Tensor expert_aggregate(const at::Tensor& logits, c10::string_view reduce, const std::optional<at::Tensor>& weights,
                            const std::optional<at::Tensor>& active) {
  const int reduce_kind = parse_reduce(reduce);
  auto [weight_table, active_table] = expert_aggregate_tables(logits, weights, active);
  TORCH_CHECK(logits.device().is_cpu(), "fastlt.expert_aggregate (CPU kernel): logits must be a CPU tensor");
  check_active_rows(active_table);
  const int64_t E = logits.size(0), B = logits.size(1), C = logits.size(2);
  const int64_t sE = logits.stride(0), sB = logits.stride(1), sC = logits.stride(2);
  at::Tensor out = at::empty({B, C}, logits.options().memory_format(at::MemoryFormat::Contiguous));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fastlt_expert_aggregate_cpu", [&] {
    using A = acc_t<scalar_t>;
    const RowTables<A> tables{weight_table.defined() ? weight_table.data_ptr<A>() : nullptr,
                              active_table.defined() ? active_table.data_ptr<bool>() : nullptr, static_cast<int>(E),
                              reduce_kind};
    const scalar_t* z = logits.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, rows_per_task(E * C), [&](int64_t b0, int64_t b1) {
      A unweighted[kMaxExperts], coef[kMaxExperts];
      std::vector<A> acc(sC == 1 ? kChunk : 0);
      for (int64_t b = b0; b < b1; ++b) {
        tables.fill(b, unweighted, coef);
        const scalar_t* row = z + b * sB;
        scalar_t* out_row = o + b * C;
        if (sC == 1) {
          weighted_sum_row(row, sE, E, coef, out_row, C, acc.data());
        } else {
          for (int64_t c = 0; c < C; ++c)
            out_row[c] = static_cast<scalar_t>(
                expert_aggregate::aggregate_element<scalar_t, A>(row + c * sC, sE, static_cast<int>(E), coef));
        }
      }
    });
    stream_fence();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> expert_aggregate_backward(const at::Tensor& grad, const at::Tensor& logits,
                                                             c10::string_view reduce,
                                                             const std::optional<at::Tensor>& weights,
                                                             const std::optional<at::Tensor>& active,
                                                             bool weights_requires_grad) {
  const int reduce_kind = parse_reduce(reduce);
  auto [weight_table, active_table] = expert_aggregate_tables(logits, weights, active);
  const int64_t E = logits.size(0), B = logits.size(1), C = logits.size(2);
  check_expert_aggregate_grad(grad, logits);
  const at::Tensor g = grad.to(logits.scalar_type()).contiguous();
  at::Tensor grad_logits = at::empty({E, B, C}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  const bool want_weights = weights_requires_grad && weights.has_value();
  at::Tensor grad_table =
      want_weights ? at::zeros({B, E}, logits.options().dtype(accumulate_dtype(logits))) : at::Tensor();
  const int64_t sE = logits.stride(0), sB = logits.stride(1), sC = logits.stride(2);

  if (grad_logits.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fastlt_expert_aggregate_bwd", [&] {
      using A = acc_t<scalar_t>;
      const RowTables<A> tables{weight_table.defined() ? weight_table.data_ptr<A>() : nullptr,
                                active_table.defined() ? active_table.data_ptr<bool>() : nullptr, static_cast<int>(E),
                                reduce_kind};
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const scalar_t* z = logits.data_ptr<scalar_t>();
      scalar_t* gl = grad_logits.data_ptr<scalar_t>();
      A* gw = want_weights ? grad_table.data_ptr<A>() : nullptr;
      at::parallel_for(0, B, rows_per_task(E * C), [&](int64_t b0, int64_t b1) {
        A unweighted[kMaxExperts], coef[kMaxExperts];
        for (int64_t b = b0; b < b1; ++b) {
          tables.fill(b, unweighted, coef);
          const scalar_t* g_row = gp + b * C;
          for (int64_t k = 0; k < E; ++k) {
            scalar_t* out_row = gl + (k * B + b) * C;
            const A ck = coef[k];
            write_row(out_row, C, [&](int64_t c) { return ck * static_cast<A>(g_row[c]); });
            if (gw != nullptr) {  // inactive experts too: 0 * a NaN logit is NaN, as in the reference
              const scalar_t* zk = z + k * sE + b * sB;
              A dot = A(0);
              for (int64_t c = 0; c < C; ++c) dot += static_cast<A>(g_row[c]) * static_cast<A>(zk[c * sC]);
              gw[b * E + k] = unweighted[k] * dot;
            }
          }
        }
      });
      stream_fence();
    });
  }
  at::Tensor grad_weights;
  if (want_weights) {
    grad_weights = (weights->dim() == 1 ? grad_table.sum(0) : grad_table).to(weights->scalar_type());
  } else {
    grad_weights = at::empty({0}, logits.options());
  }
  return {grad_logits, grad_weights};
}

}  // namespace cpu
}  // namespace fastlt

TORCH_LIBRARY_FRAGMENT(fastlt, m) {
  m.def("expert_aggregate(Tensor logits, str reduce, Tensor? weights, Tensor? active) -> Tensor");
  m.def(
      "expert_aggregate_backward(Tensor grad, Tensor logits, str reduce, Tensor? weights, Tensor? active, "
      "bool weights_requires_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlt, CPU, m) {
  m.impl("expert_aggregate", &fastlt::cpu::expert_aggregate);
  m.impl("expert_aggregate_backward", &fastlt::cpu::expert_aggregate_backward);
}
