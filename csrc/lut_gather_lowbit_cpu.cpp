// The CPU dequantization of the low-bit formats (q3, q2, q1; layout in lut_gather_lowbit.h).
//
// lut_gather_quant_cpu.cpp owns the gather (threads, tiles, prefetch, output dtypes): it hands every
// row span of a low-bit table to lowbit_span_set and every fused sum to lowbit_sum_fn's routine, which
// sums a token's rows in registers. AVX-512 decodes 16 values per step: their codes are 16 * bits bits
// starting on a byte boundary, broadcast to 16 lanes, shifted per lane, masked and looked up in the
// levels with one permute. AVX2 does the same for 8 values (at most 8 levels: one 8-lane permute). A
// scalar path serves other CPUs, the tails and spans that do not start on a vector boundary.
#include <c10/util/Half.h>

#include <cstring>

#include "lut_gather_lowbit.h"
#include "lut_gather_quant.h"
#include "cpu_simd.h"


namespace mole {

namespace {

inline float lowbit_scale(const uint8_t* row, const QuantLayout& q, int64_t b) {
  uint16_t h;  // memcpy: rows are only 2-byte aligned (and a staging buffer need not be)
  std::memcpy(&h, row + q.scale_offset + 2 * b, sizeof(h));
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

template <int BITS>
inline uint32_t code_at(const uint8_t* row, int64_t j) {
  const int64_t bit = j * BITS;
  // The byte after the last code byte is still inside the row (the scales follow), so reading two
  // bytes is in bounds; a code spans at most two bytes.
  const uint32_t two = row[bit >> 3] | (BITS == 3 ? uint32_t(row[(bit >> 3) + 1]) << 8 : 0u);
  return (two >> (bit & 7)) & ((1u << BITS) - 1);
}

template <int BITS>
constexpr const float* levels() {
  return BITS == 3 ? kQ3Levels : BITS == 2 ? kQ2Levels : kQ1Levels;
}

template <int BITS, bool ACC>
void segment_scalar(const uint8_t* row, int64_t j0, int64_t n, float s, float* dst) {
  const float* lv = levels<BITS>();
  for (int64_t k = 0; k < n; ++k) {
    const float x = lv[code_at<BITS>(row, j0 + k)];
    if (ACC) dst[k] += s * x;
    else dst[k] = s * x;
  }
}

#if MOLE_X86
// 16 codes starting at value j (j % 16 == 0, so at byte j * BITS / 8) as lane indices.
template <int BITS>
MOLE_AVX512 inline __m512i codes16(const uint8_t* row, int64_t j) {
  const uint8_t* p = row + j * BITS / 8;
  if constexpr (BITS == 3) {
    // 48 bits: two 24-bit halves of 8 codes each. Reading 8 bytes stays in the row: 16 codes end at
    // least 2 bytes (the scales) before its end.
    uint64_t w;
    std::memcpy(&w, p, sizeof(w));
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(int(w & 0xffffff))),
                                         _mm256_set1_epi32(int((w >> 24) & 0xffffff)), 1);
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

// 8 codes starting at value j (j % 8 == 0, so at byte j * BITS / 8) as lane indices, for AVX2.
template <int BITS>
MOLE_AVX2 inline __m256i codes8(const uint8_t* row, int64_t j) {
  uint32_t w = 0;  // q3: 4 bytes for 24 bits of codes (in the row, as for codes16; bits 24.. are masked off)
  std::memcpy(&w, row + j * BITS / 8, BITS == 3 ? 4 : BITS == 2 ? 2 : 1);
  const __m256i sh = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(w)), sh), _mm256_set1_epi32((1 << BITS) - 1));
}

template <int BITS, bool ACC>
MOLE_AVX2 void span_avx2(const QuantLayout& q, const uint8_t* row, int64_t c0, int64_t n, float w, float* dst) {
  const __m256 lv = _mm256_loadu_ps(levels<BITS>());  // every level (at most 8)
  float* out = dst - c0;
  auto scale = [&](int64_t b) { return lowbit_scale(row, q, b); };
  walk_scale_blocks<ACC>(q, c0, n, w, scale, [&](int64_t j, int64_t stop, float s) MOLE_AVX2 {
    const int64_t head = std::min(stop, (j + 7) / 8 * 8);  // vectors start on an 8-value boundary
    segment_scalar<BITS, ACC>(row, j, head - j, s, out + j);
    j = head;
    const __m256 vs = _mm256_set1_ps(s);
    for (; j + 8 <= stop; j += 8) {
      const __m256 x = _mm256_permutevar8x32_ps(lv, codes8<BITS>(row, j));
      if (ACC) _mm256_storeu_ps(out + j, _mm256_fmadd_ps(vs, x, _mm256_loadu_ps(out + j)));
      else _mm256_storeu_ps(out + j, _mm256_mul_ps(vs, x));
    }
    segment_scalar<BITS, ACC>(row, j, stop - j, s, out + j);
  });
}

template <int BITS, bool ACC>
MOLE_AVX512 void span_avx512(const QuantLayout& q, const uint8_t* row, int64_t c0, int64_t n, float w,
                               float* dst) {
  const __m512 lv = _mm512_loadu_ps(levels<BITS>());
  float* out = dst - c0;
  auto scale = [&](int64_t b) { return lowbit_scale(row, q, b); };
  walk_scale_blocks<ACC>(q, c0, n, w, scale, [&](int64_t j, int64_t stop, float s) MOLE_AVX512 {
    const int64_t head = std::min(stop, (j + 15) / 16 * 16);  // vectors start on a 16-value boundary
    segment_scalar<BITS, ACC>(row, j, head - j, s, out + j);
    j = head;
    const __m512 vs = _mm512_set1_ps(s);
    for (; j + 16 <= stop; j += 16) {
      const __m512 x = _mm512_permutexvar_ps(codes16<BITS>(row, j), lv);
      if (ACC) _mm512_storeu_ps(out + j, _mm512_fmadd_ps(vs, x, _mm512_loadu_ps(out + j)));
      else _mm512_storeu_ps(out + j, _mm512_mul_ps(vs, x));
    }
    segment_scalar<BITS, ACC>(row, j, stop - j, s, out + j);
  });
}

// The columns of a sum that no vector covers: acc[j] += sum_e s[e] * level(code_e(j)), j in [j0, j1).
template <int BITS>
inline void sum_columns(const uint8_t* rows, int64_t rb, int64_t E, const float* s, int64_t j0, int64_t j1, float* out) {
  const float* lv = levels<BITS>();
  for (int64_t j = j0; j < j1; ++j) {
    float v = out[j];
    for (int64_t e = 0; e < E; ++e) v += s[e] * lv[code_at<BITS>(rows + e * rb, j)];
    out[j] = v;
  }
}

// acc[k] += sum_e w[e] * deq_e(c0 + k), k < n, over E <= kExpertGroup rows q.row_bytes apart (the low-bit
// formats' DequantSum): per vector of columns the E rows are decoded and summed in a register (each row's
// scale and router weight one factor per block), acc read and written once rather than once per row.
template <int BITS>
MOLE_AVX512 void sum_avx512(const QuantLayout& q, const uint8_t* rows, int64_t E, const float* w, int64_t c0,
                            int64_t n, float* acc) {
  const __m512 lv = _mm512_loadu_ps(levels<BITS>());
  const int64_t rb = q.row_bytes;
  float s[kExpertGroup];
  __m512 vs[kExpertGroup];
  float* out = acc - c0;
  for (int64_t j = c0, end = c0 + n; j < end;) {
    const int64_t b = j / q.block, stop = std::min(end, (b + 1) * q.block);
    for (int64_t e = 0; e < E; ++e) {
      s[e] = w[e] * lowbit_scale(rows + e * rb, q, b);
      vs[e] = _mm512_set1_ps(s[e]);
    }
    const int64_t head = std::min(stop, (j + 15) / 16 * 16);
    sum_columns<BITS>(rows, rb, E, s, j, head, out);
    for (j = head; j + 16 <= stop; j += 16) {
      __m512 a = _mm512_loadu_ps(out + j);
      for (int64_t e = 0; e < E; ++e) a = _mm512_fmadd_ps(vs[e], _mm512_permutexvar_ps(codes16<BITS>(rows + e * rb, j), lv), a);
      _mm512_storeu_ps(out + j, a);
    }
    sum_columns<BITS>(rows, rb, E, s, j, stop, out);
    j = stop;
  }
}

template <int BITS>
MOLE_AVX2 void sum_avx2(const QuantLayout& q, const uint8_t* rows, int64_t E, const float* w, int64_t c0, int64_t n,
                        float* acc) {
  const __m256 lv = _mm256_loadu_ps(levels<BITS>());
  const int64_t rb = q.row_bytes;
  float s[kExpertGroup];
  __m256 vs[kExpertGroup];
  float* out = acc - c0;
  for (int64_t j = c0, end = c0 + n; j < end;) {
    const int64_t b = j / q.block, stop = std::min(end, (b + 1) * q.block);
    for (int64_t e = 0; e < E; ++e) {
      s[e] = w[e] * lowbit_scale(rows + e * rb, q, b);
      vs[e] = _mm256_set1_ps(s[e]);
    }
    const int64_t head = std::min(stop, (j + 7) / 8 * 8);
    sum_columns<BITS>(rows, rb, E, s, j, head, out);
    for (j = head; j + 8 <= stop; j += 8) {
      __m256 a = _mm256_loadu_ps(out + j);
      for (int64_t e = 0; e < E; ++e) a = _mm256_fmadd_ps(vs[e], _mm256_permutevar8x32_ps(lv, codes8<BITS>(rows + e * rb, j)), a);
      _mm256_storeu_ps(out + j, a);
    }
    sum_columns<BITS>(rows, rb, E, s, j, stop, out);
    j = stop;
  }
}
#endif

template <int BITS, bool ACC>
void span_scalar(const QuantLayout& q, const uint8_t* row, int64_t c0, int64_t n, float w, float* dst) {
  walk_scale_blocks<ACC>(q, c0, n, w, [&](int64_t b) { return lowbit_scale(row, q, b); },
                         [&](int64_t j, int64_t stop, float s) {
                           segment_scalar<BITS, ACC>(row, j, stop - j, s, dst + (j - c0));
                         });
}

template <int BITS, bool ACC>
void span(const QuantLayout& q, const uint8_t* row, int64_t c0, int64_t n, float w, float* dst, CpuIsa isa) {
#if MOLE_X86
  if (isa == CpuIsa::kAvx512) return span_avx512<BITS, ACC>(q, row, c0, n, w, dst);
  if (isa == CpuIsa::kAvx2) return span_avx2<BITS, ACC>(q, row, c0, n, w, dst);
#endif
  (void)isa;
  span_scalar<BITS, ACC>(q, row, c0, n, w, dst);
}

template <bool ACC>
void span_any(const QuantLayout& q, const uint8_t* row, int64_t c0, int64_t n, float w, float* dst, CpuIsa isa) {
  switch (q.fmt) {
    case QFormat::kQ3: return span<3, ACC>(q, row, c0, n, w, dst, isa);
    case QFormat::kQ2: return span<2, ACC>(q, row, c0, n, w, dst, isa);
    case QFormat::kQ1: return span<1, ACC>(q, row, c0, n, w, dst, isa);
    default: MOLE_CHECK_ARG(false, "lut_gather_quant: not a low-bit format: ", static_cast<int>(q.fmt));
  }
}

// The scalar DequantSum: each row added into acc in turn.
template <int BITS>
void sum_scalar(const QuantLayout& q, const uint8_t* rows, int64_t E, const float* w, int64_t c0, int64_t n,
                float* acc) {
  for (int64_t e = 0; e < E; ++e) span_scalar<BITS, true>(q, rows + e * q.row_bytes, c0, n, w[e], acc);
}

template <int BITS>
LowbitSum sum_fn(CpuIsa isa) {
#if MOLE_X86
  if (isa == CpuIsa::kAvx512) return sum_avx512<BITS>;
  if (isa == CpuIsa::kAvx2) return sum_avx2<BITS>;
#endif
  (void)isa;
  return sum_scalar<BITS>;
}

}  // namespace

LowbitSum lowbit_sum_fn(const QuantLayout& q, CpuIsa isa) {
  switch (q.fmt) {
    case QFormat::kQ3: return sum_fn<3>(isa);
    case QFormat::kQ2: return sum_fn<2>(isa);
    case QFormat::kQ1: return sum_fn<1>(isa);
    default: MOLE_CHECK_ARG(false, "lut_gather_quant: not a low-bit format: ", static_cast<int>(q.fmt));
  }
}

void lowbit_span_set(const QuantLayout& q, const uint8_t* row, int64_t c0, int64_t n, float* dst, CpuIsa isa) {
  span_any<false>(q, row, c0, n, 1.f, dst, isa);
}

}  // namespace mole
