// Per-ISA builds of the CPU row loops, and the few x86 instructions the kernels use, behind one architecture guard.
// On x86-64 a function marked FASTLT_PER_ISA is compiled for AVX-512, AVX2 and the baseline, and GCC's target_clones
// picks one at load time from the CPU it runs on (ATen's CPU kernels do the same by hand). Elsewhere (aarch64: Grace,
// Graviton, Apple silicon), or with -DFASTLT_PORTABLE, the same loops are built once for the target and vectorised
// by the compiler from their `omp simd` form; streaming stores become plain stores.
#pragma once

#if defined(__x86_64__) && !defined(FASTLT_PORTABLE)
#define FASTLT_X86 1
#include <immintrin.h>
#define FASTLT_PER_ISA __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTLT_X86 0
#define FASTLT_PER_ISA
#endif
#define FASTLT_ALWAYS_INLINE __attribute__((always_inline)) inline

namespace fastlt {
namespace cpu {

// Writes 4 floats to a 16-byte aligned address, bypassing the cache where the ISA allows (outputs that are large and
// not read back soon: skipping the read-for-ownership doubles the write bandwidth).
FASTLT_ALWAYS_INLINE void stream_store4(float* out, float a, float b, float c, float d) {
#if FASTLT_X86
  _mm_stream_ps(out, _mm_setr_ps(a, b, c, d));
#else
  out[0] = a;
  out[1] = b;
  out[2] = c;
  out[3] = d;
#endif
}

// Orders the streaming stores before the tensor is handed to other threads or code.
FASTLT_ALWAYS_INLINE void stream_fence() {
#if FASTLT_X86
  _mm_sfence();
#endif
}

}  // namespace cpu
}  // namespace fastlt
