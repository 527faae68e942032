// Low-bit codebook formats of quantized tables (q3, q2, q1: 3, 2 and 1 bits per value).
//
// A row (token, layer, expert) is dense codes then float16 scales, with no padding beyond the
// 2-byte alignment of the scales:
//
//   [ ceil(D * bits / 8) bytes: value j in bits [bits*j, bits*j + bits) of the little-endian bit stream ]
//   [ zero pad to a multiple of 2 ][ D / block_size float16 scales ]
//
// Value j decodes to float(scale[j / block]) * kLevels[code]: symmetric levels fitted to a normal
// distribution with a top level of 1 (q1: the sign). The encoder (mole_kernels.quant) picks each
// block's scale to minimise its squared error. Why float16 scales and no 16-byte row padding: at
// D = 128 the fp32 scales and padding of the older layout cost ~1 bit per value, as much as the
// codes of q1. Rows stay 2-byte aligned; the kernels use unaligned loads.
//
// This header holds the CPU decoders (scales, codes, levels; scalar, AVX2 and AVX-512); the CPU kernels
// that use them for every quantized format are in lut_gather_quant_cpu.cpp.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "cpu_simd.h"
#include "lut_gather_quant.h"

namespace mole {

// Lloyd-Max levels of a unit normal for 8 and 4 levels, divided by their largest level (the same
// float32 numbers as mole_kernels.quant.LOWBIT), repeated through the first 8 entries (AVX2's permute reads an
// index's low 3 bits, so its decoders leave the bits above q2's and q1's codes unmasked) and zero-padded to 16
// for the AVX-512 permute (whose decoders mask the codes).
constexpr float kQ3Levels[16] = {-1.0f, -0.6245400309562683f, -0.3513011038303375f, -0.11389870941638947f,
                                 0.11389870941638947f, 0.3513011038303375f, 0.6245400309562683f, 1.0f};
constexpr float kQ2Levels[16] = {-1.0f, -0.29978814721107483f, 0.29978814721107483f, 1.0f,
                                 -1.0f, -0.29978814721107483f, 0.29978814721107483f, 1.0f};
constexpr float kQ1Levels[16] = {-1.0f, 1.0f, -1.0f, 1.0f, -1.0f, 1.0f, -1.0f, 1.0f};

template <int BITS>
constexpr const float* lowbit_levels() {
  return BITS == 3 ? kQ3Levels : BITS == 2 ? kQ2Levels : kQ1Levels;
}

// Block b's scale of a row.
inline float lowbit_scale(const uint8_t* row, const QuantLayout& q, int64_t b) {
  uint16_t h;  // memcpy: rows are only 2-byte aligned (and a staging buffer need not be)
  std::memcpy(&h, row + q.scale_offset + 2 * b, sizeof(h));
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// Value j's code.
template <int BITS>
inline uint32_t code_at(const uint8_t* row, int64_t j) {
  const int64_t bit = j * BITS;
  // The byte after the last code byte is still inside the row (the scales follow), so reading two
  // bytes is in bounds; a code spans at most two bytes.
  const uint32_t two = row[bit >> 3] | (BITS == 3 ? uint32_t(row[(bit >> 3) + 1]) << 8 : 0u);
  return (two >> (bit & 7)) & ((1u << BITS) - 1);
}

#if MOLE_X86
// lowbit_scale in one F16C instruction, for the vector paths (c10::Half converts with portable bit operations).
MOLE_AVX2 inline float lowbit_scale_f16c(const uint8_t* row, const QuantLayout& q, int64_t b) {
  uint16_t h;
  std::memcpy(&h, row + q.scale_offset + 2 * b, sizeof(h));
  return _cvtsh_ss(h);
}

// The codes of values j .. j + 15 (j % 8 == 0, so they start at byte j * BITS / 8) as lane indices:
// 16 * BITS bits broadcast to the lanes, shifted per lane and masked.
template <int BITS>
MOLE_AVX512 inline __m512i codes16(const uint8_t* row, int64_t j) {
  const uint8_t* p = row + j * BITS / 8;
  if constexpr (BITS == 3) {
    // 48 bits: two 24-bit halves of 8 codes each, put in dwords 0 and 1 and spread to 8 lanes each (bits past
    // a half's 24 are masked off below). Reading 8 bytes stays in the row: 16 codes end at least 2 bytes (the
    // scales) before its end.
    uint64_t w;
    std::memcpy(&w, p, sizeof(w));
    const __m512i two = _mm512_castsi128_si512(_mm_cvtsi64_si128(static_cast<long long>((w & 0xffffffffu) | (w >> 24) << 32)));
    const __m512i v = _mm512_permutexvar_epi32(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0), two);
    const __m512i sh = _mm512_set_epi32(21, 18, 15, 12, 9, 6, 3, 0, 21, 18, 15, 12, 9, 6, 3, 0);
    return _mm512_and_si512(_mm512_srlv_epi32(v, sh), _mm512_set1_epi32(7));
  } else if constexpr (BITS == 2) {
    uint32_t w;
    std::memcpy(&w, p, sizeof(w));
    const __m512i sh = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int(w)), sh), _mm512_set1_epi32(3));
  } else {
    uint16_t w;
    std::memcpy(&w, p, sizeof(w));
    const __m512i sh = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int(w)), sh), _mm512_set1_epi32(1));
  }
}

// Lane k's shift for the code k0 + k of a word (8 lanes), for AVX2.
template <int BITS>
MOLE_AVX2 inline __m256i code_shifts8(int k0) {
  return _mm256_setr_epi32(k0 * BITS, (k0 + 1) * BITS, (k0 + 2) * BITS, (k0 + 3) * BITS, (k0 + 4) * BITS,
                           (k0 + 5) * BITS, (k0 + 6) * BITS, (k0 + 7) * BITS);
}

// The codes of values j .. j + 7 (j % 8 == 0; nf4, BITS = 4: j even) for AVX2, each in its lane's low BITS bits,
// the bits above left unmasked (the low-bit levels repeat through 8 entries, _mm256_permutevar8x32_ps reads 3
// bits; nf4's lookup reads 4).
template <int BITS>
MOLE_AVX2 inline __m256i codes8(const uint8_t* row, int64_t j) {
  uint32_t w = 0;  // q3: 4 bytes for 24 bits of codes (in the row, as for codes16)
  std::memcpy(&w, row + j * BITS / 8, BITS == 3 ? 4 : BITS);
  return _mm256_srlv_epi32(_mm256_set1_epi32(int(w)), code_shifts8<BITS>(0));
}

// Values j .. j + 15 as two codes8 vectors: q2's and q1's 16 codes (4 or 2 bytes) from one broadcast word.
template <int BITS>
MOLE_AVX2 inline void codes16_avx2(const uint8_t* row, int64_t j, __m256i& lo, __m256i& hi) {
  if constexpr (BITS == 3) {
    lo = codes8<3>(row, j);
    hi = codes8<3>(row, j + 8);
  } else {
    uint32_t w = 0;
    std::memcpy(&w, row + j * BITS / 8, 2 * BITS);
    const __m256i all = _mm256_set1_epi32(int(w));
    lo = _mm256_srlv_epi32(all, code_shifts8<BITS>(0));
    hi = _mm256_srlv_epi32(all, code_shifts8<BITS>(8));
  }
}
#endif

}  // namespace mole
