// What the x86 CPU kernels share: the target attribute of their AVX-512 functions and the bfloat16
// rounding every AVX-512 store into bfloat16 uses (one definition, so every path rounds alike).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12 flags the intrinsics headers' own `__m512i __Y = __Y;` idiom.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define MOLE_X86 1
// A function compiled for AVX-512 in a file built for baseline x86-64: called only after a run-time check.
#define MOLE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define MOLE_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace mole {

// bfloat16 bits of v (round to nearest even; NaN stays NaN) in the low half of each 32-bit lane.
MOLE_AVX512 inline __m512i bf16_bits_avx512(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
}

}  // namespace mole
#else
#define MOLE_X86 0
#endif
