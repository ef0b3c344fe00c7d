// Per-ISA builds of the CPU row loops: a function marked FASTLT_PER_ISA is compiled for AVX-512, AVX2 and the baseline,
// and GCC's target_clones picks one at load time from the CPU it runs on (ATen's CPU kernels do the same by hand).
#pragma once

#define FASTLT_PER_ISA __attribute__((target_clones("avx512f", "avx2", "default")))
#define FASTLT_ALWAYS_INLINE __attribute__((always_inline)) inline
