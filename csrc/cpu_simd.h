// What the x86 CPU kernels share: the run-time choice of instruction set, the target attributes of
// their AVX-512 and AVX2 functions, and the bfloat16 rounding every vector store into bfloat16 uses (one
// definition per width, so every path rounds alike).
#pragma once

namespace mole {
enum class CpuIsa { kScalar, kAvx2, kAvx512 };
inline const char* isa_name(CpuIsa isa) {
  return isa == CpuIsa::kAvx512 ? "avx512" : isa == CpuIsa::kAvx2 ? "avx2" : "scalar";
}
}  // namespace mole

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12 flags the intrinsics headers' own `__m512i __Y = __Y;` idiom.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdlib>
#include <cstring>
#define MOLE_X86 1
// A function compiled for AVX-512 in a file built for baseline x86-64: called only after a run-time check.
#define MOLE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define MOLE_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace mole {

// The best vector instruction set of this CPU the kernels have code for (AVX2 means AVX2 + FMA + F16C),
// lowered by MOLE_KERNELS_CPU_ISA=scalar|avx2 (tests run every path on one CPU). Chosen once per process.
inline CpuIsa x86_cpu_isa() {
  static const CpuIsa isa = [] {
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    CpuIsa best = avx2 && avx512 ? CpuIsa::kAvx512 : avx2 ? CpuIsa::kAvx2 : CpuIsa::kScalar;
    const char* cap = std::getenv("MOLE_KERNELS_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "scalar") == 0) best = CpuIsa::kScalar;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && best == CpuIsa::kAvx512) best = CpuIsa::kAvx2;
    return best;
  }();
  return isa;
}

// bfloat16 bits of v (round to nearest even; NaN stays NaN) in the low half of each 32-bit lane.
MOLE_AVX512 inline __m512i bf16_bits_avx512(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
}

// The same rounding for 8 floats, packed into 8 bfloat16 words.
MOLE_AVX2 inline __m128i bf16x8_avx2(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0b1000));
}

}  // namespace mole
#else
#define MOLE_X86 0
#endif
