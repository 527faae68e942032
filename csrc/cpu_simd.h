// What the x86 CPU kernels share: the run-time choice of instruction set, the target attributes of
// their AVX-512 and AVX2 functions, and the conversions between float32 vectors and the kernels' element
// types (float32, float16, bfloat16: one definition per width, so every path rounds alike).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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
inline CpuIsa cpu_vector_isa() {
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

// 16 (AVX-512) or 8 (AVX2) float32 values from, and stored to, float32, float16 or bfloat16 (bfloat16 is the
// top half of a float32; stores round to nearest even and keep NaN a NaN).
MOLE_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
MOLE_AVX512 inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
MOLE_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
MOLE_AVX512 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
MOLE_AVX512 inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
MOLE_AVX512 inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits_avx512(v)));
}

MOLE_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
MOLE_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
MOLE_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
MOLE_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
MOLE_AVX2 inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
MOLE_AVX2 inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0b1000);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

}  // namespace mole
#else
#define MOLE_X86 0
namespace mole {
inline CpuIsa cpu_vector_isa() { return CpuIsa::kScalar; }
}  // namespace mole
#endif
