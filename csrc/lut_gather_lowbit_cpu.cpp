// The CPU dequantization of the low-bit formats (q3, q2, q1; layout in lut_gather_lowbit.h).
//
// lut_gather_quant_cpu.cpp owns the gather (threads, tiles, prefetch, output dtypes) and the fused sums
// of every format (a token's rows summed in registers, with the decoders of lut_gather_lowbit.h); it
// hands the rows form's row spans of a low-bit table to lowbit_span_set. AVX-512 decodes 16 values per
// step: their codes are 16 * bits bits starting on a byte boundary, broadcast to 16 lanes, shifted per
// lane, masked and looked up in the levels with one permute. AVX2 does the same for 8 values (at most 8
// levels: one 8-lane permute). A scalar path serves other CPUs, the tails and spans that do not start on
// a vector boundary.
#include "lut_gather_lowbit.h"


namespace mole {

namespace {

// dst[k] = s * level(code(j0 + k)), k < n (every value in one scale block).
template <int BITS>
void segment_scalar(const uint8_t* row, int64_t j0, int64_t n, float s, float* dst) {
  const float* lv = lowbit_levels<BITS>();
  for (int64_t k = 0; k < n; ++k) dst[k] = s * lv[code_at<BITS>(row, j0 + k)];
}

#if MOLE_X86
template <int BITS>
MOLE_AVX512 void span_avx512(const QuantLayout& q, const uint8_t* row, int64_t c0, int64_t n, float* dst) {
  const __m512 lv = _mm512_loadu_ps(lowbit_levels<BITS>());
  float* out = dst - c0;
  auto scale = [&](int64_t b) { return lowbit_scale_f16c(row, q, b); };
  walk_scale_blocks<false>(q, c0, n, 1.f, scale, [&](int64_t j, int64_t stop, float s) MOLE_AVX512 {
    const int64_t head = std::min(stop, (j + 15) / 16 * 16);  // vectors start on a 16-value boundary
    segment_scalar<BITS>(row, j, head - j, s, out + j);
    const __m512 vs = _mm512_set1_ps(s);
    for (j = head; j + 16 <= stop; j += 16) {
      _mm512_storeu_ps(out + j, _mm512_mul_ps(vs, _mm512_permutexvar_ps(codes16<BITS>(row, j), lv)));
    }
    segment_scalar<BITS>(row, j, stop - j, s, out + j);
  });
}

template <int BITS>
MOLE_AVX2 void span_avx2(const QuantLayout& q, const uint8_t* row, int64_t c0, int64_t n, float* dst) {
  const __m256 lv = _mm256_loadu_ps(lowbit_levels<BITS>());  // every level (at most 8)
  float* out = dst - c0;
  auto scale = [&](int64_t b) { return lowbit_scale_f16c(row, q, b); };
  walk_scale_blocks<false>(q, c0, n, 1.f, scale, [&](int64_t j, int64_t stop, float s) MOLE_AVX2 {
    const int64_t head = std::min(stop, (j + 7) / 8 * 8);  // vectors start on an 8-value boundary
    segment_scalar<BITS>(row, j, head - j, s, out + j);
    const __m256 vs = _mm256_set1_ps(s);
    for (j = head; j + 8 <= stop; j += 8) {
      _mm256_storeu_ps(out + j, _mm256_mul_ps(vs, _mm256_permutevar8x32_ps(lv, codes8<BITS>(row, j))));
    }
    segment_scalar<BITS>(row, j, stop - j, s, out + j);
  });
}
#endif

template <int BITS>
void span(const QuantLayout& q, const uint8_t* row, int64_t c0, int64_t n, float* dst, CpuIsa isa) {
#if MOLE_X86
  if (isa == CpuIsa::kAvx512) return span_avx512<BITS>(q, row, c0, n, dst);
  if (isa == CpuIsa::kAvx2) return span_avx2<BITS>(q, row, c0, n, dst);
#endif
  (void)isa;
  walk_scale_blocks<false>(q, c0, n, 1.f, [&](int64_t b) { return lowbit_scale(row, q, b); },
                           [&](int64_t j, int64_t stop, float s) {
                             segment_scalar<BITS>(row, j, stop - j, s, dst + (j - c0));
                           });
}

}  // namespace

void lowbit_span_set(const QuantLayout& q, const uint8_t* row, int64_t c0, int64_t n, float* dst, CpuIsa isa) {
  switch (q.fmt) {
    case QFormat::kQ3: return span<3>(q, row, c0, n, dst, isa);
    case QFormat::kQ2: return span<2>(q, row, c0, n, dst, isa);
    case QFormat::kQ1: return span<1>(q, row, c0, n, dst, isa);
    default: MOLE_CHECK_ARG(false, "lut_gather_quant: not a low-bit format: ", static_cast<int>(q.fmt));
  }
}

}  // namespace mole
