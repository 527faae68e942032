// lut_gather_quant on the CPU, plus the schemas and validation of the quantized-gather ops.
//
// Rows form: rows are dequantized in float32 tiles that stay in L1 (scale * code: one rounding, the
// same as mole_kernels.dequantize, so the rows form is exact) and stored in the output dtype. Fused
// form: a token's rows are summed over experts with the router weight folded into the scale; with
// AVX-512 or AVX2, sums of up to kExpertGroup rows (every format: int8, fp8, nf4 and the low-bit q3, q2,
// q1, whose decoders are in lut_gather_lowbit.h) stay in registers and go straight to the output dtype
// (as the bf16 gather's), larger ones go through a float32 tile. AVX-512 decodes 16-32 codes per
// instruction group, AVX2 8-16 (chosen at run time); a scalar path serves every other CPU and the tails.
// Work is split over tokens (and columns for small batches) with at::parallel_for, as in lut_gather.
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>

#include "cpu_simd.h"
#include "direct_calls.h"
#include "lut_gather_lowbit.h"  // the low-bit formats' decoders
#include "lut_gather_quant.h"


namespace mole {

namespace {

std::string shape_string(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

// x rounded up to a multiple of m, checked: dim and block_size come from the user or a file.
int64_t round_up(int64_t x, int64_t m, const char* what) { return checked_add(x, m - 1, what) / m * m; }

}  // namespace

QuantLayout make_quant_layout(c10::string_view format, int64_t dim, int64_t block_size) {
  // Compared as a string_view: no std::string is built on the per-call path (only for an error).
  constexpr std::pair<c10::string_view, QFormat> kNames[] = {
      {"int8", QFormat::kInt8}, {"fp8_e4m3", QFormat::kFp8E4M3}, {"nf4", QFormat::kNf4},
      {"q3", QFormat::kQ3},     {"q2", QFormat::kQ2},            {"q1", QFormat::kQ1}};
  QuantLayout q;
  bool known = false;
  for (const auto& [name, fmt] : kNames) {
    if (format == name) {
      q.fmt = fmt;
      known = true;
      break;
    }
  }
  MOLE_CHECK_ARG(known, "lut_gather_quant: unknown format '", std::string(format.data(), format.size()),
                 "' (expected 'int8', 'fp8_e4m3', 'nf4', 'q3', 'q2' or 'q1')");
  MOLE_CHECK_ARG(dim >= 1, "lut_gather_quant: dim (values per row, D) must be >= 1, got ", dim);
  MOLE_CHECK_ARG(block_size >= 1 && dim % block_size == 0, "lut_gather_quant: block_size must divide dim (D = ",
                 dim, "), got ", block_size);
  MOLE_CHECK_ARG(q.fmt != QFormat::kInt8 || block_size == dim,
                 "lut_gather_quant: int8 has one scale per row, so block_size must equal dim (", dim, "), got ",
                 block_size);
  q.D = dim;
  q.block = block_size;
  q.nblocks = dim / block_size;
  const char* what = "lut_gather_quant: the row size for this dim and block_size";
  if (is_lowbit(q.fmt)) {  // dense codes, float16 scales, rows padded to 2 bytes only (lut_gather_lowbit.h)
    const int64_t bits = q.fmt == QFormat::kQ3 ? 3 : q.fmt == QFormat::kQ2 ? 2 : 1;
    q.payload_bytes = round_up(checked_mul(dim, bits, what), 8, what) / 8;
    q.scale_offset = round_up(q.payload_bytes, 2, what);
    q.row_bytes = checked_add(q.scale_offset, checked_mul(2, q.nblocks, what), what);
    return q;
  }
  q.payload_bytes = q.fmt == QFormat::kNf4 ? dim / 2 + dim % 2 : dim;
  q.scale_offset = round_up(q.payload_bytes, 4, what);
  q.row_bytes = round_up(checked_add(q.scale_offset, checked_mul(4, q.nblocks, what), what), 16, what);
  return q;
}

QuantPlan plan_lut_gather_quant(const at::Tensor& data, c10::string_view format, int64_t dim, int64_t block_size,
                                const at::Tensor& ids, const std::optional<at::Tensor>& weights, LayerSpan layers,
                                const char* op, const char* what) {
  QuantPlan p;
  p.q = make_quant_layout(format, dim, block_size);
  MOLE_CHECK_ARG(data.dim() == 4 || data.dim() == 3,
                 op, ": data must have shape [V, L, E, row_bytes] or [V, E, row_bytes], got ", shape_string(data.sizes()));
  MOLE_CHECK_ARG(data.scalar_type() == at::kByte, op, ": data must be uint8 (packed rows), got ", data.scalar_type());
  MOLE_CHECK_ARG(data.size(-1) == p.q.row_bytes, op, ": data rows are ", data.size(-1),
                 " bytes, but format '", std::string(format.data(), format.size()), "' with dim=", dim,
                 " and block_size=", block_size, " needs ", p.q.row_bytes,
                 " bytes per row (do the format metadata and the payload disagree?)");
  const GatherPlan g = plan_table(data, "data", ids, weights, layers, dim, op, what);
  MOLE_CHECK_ARG(!is_lowbit(p.q.fmt) || (data.device().is_cpu() && ids.device().is_cpu()), op, ": format '",
                 std::string(format.data(), format.size()),
                 "' has a CPU kernel only in this version; keep the table and ids on the CPU");
  p.T = g.T;
  p.V = g.V;
  p.L = g.L;
  p.E = g.E;
  p.fused = g.fused;
  p.seg_row0 = g.layer0 * g.E;
  p.seg_rows = g.layers * g.E;
  p.out_shape = g.out_shape;
  return p;
}

int64_t check_quant_outputs(const QuantPlan& plan, const at::Tensor& data, const at::Tensor& ids,
                            const std::optional<at::Tensor>& weights, const at::Tensor& out,
                            const std::optional<at::Tensor>& faults) {
  MOLE_CHECK_ARG(out.sizes().vec() == plan.out_shape, "lut_gather_quant: out must have shape ",
                 shape_string(plan.out_shape), ", got ", shape_string(out.sizes()));
  MOLE_CHECK_ARG(out.device() == ids.device(), "lut_gather_quant: out must be on ids' device (", ids.device(),
                 "), got ", out.device());
  MOLE_CHECK_ARG(is_float_dtype(out.scalar_type()),
                 "lut_gather_quant: out must be float32, float16 or bfloat16, got ", out.scalar_type());
  int64_t stride = plan.q.D;
  if (plan.fused) {
    MOLE_CHECK_ARG(out.is_contiguous(), "lut_gather_quant: out must be contiguous");
  } else {
    stride = rows_out_stride(out, ids.dim(), plan.seg_rows * plan.q.D);
    MOLE_CHECK_ARG(stride >= 0, "lut_gather_quant: out must be contiguous, or a [T, ...] view (1-D ids) whose rows "
                   "are contiguous with tokens strided (a slice of a larger buffer); got strides ",
                   shape_string(out.strides()));
  }
  check_faults(faults, ids, "lut_gather_quant");
  check_no_overlaps("lut_gather_quant", data, "data", ids, weights, out, faults);
  return stride;
}

namespace {

// fp8 e4m3fn byte -> float, built once from c10's exact conversion (scalar path).
struct Fp8Table {
  float v[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) v[b] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(b), c10::Float8_e4m3fn::from_bits()));
  }
};
const Fp8Table& fp8_table() {
  static const Fp8Table t;
  return t;
}

inline float load_scale(const uint8_t* row, const QuantLayout& q, int64_t b) {
  float s;  // memcpy: a table's rows (a staging buffer, a view) need not be 4-byte aligned
  std::memcpy(&s, row + q.scale_offset + 4 * b, sizeof(float));
  return s;
}

// Columns [c0, c0 + n) of one row cut at its scale blocks: piece(j, stop, scale(b)) for each piece [j, stop) of
// block b (the rows form's spans, each format on each path). A vector caller passes a lambda with its own
// target attribute; the walk is inlined first (always_inline), so the lambda inlines into its caller too (not
// into a walk of the base instruction set, which it may not).
#if defined(__GNUC__) || defined(__clang__)
#define MOLE_ALWAYS_INLINE __attribute__((always_inline))
#else
#define MOLE_ALWAYS_INLINE
#endif
template <typename Scale, typename Piece>
MOLE_ALWAYS_INLINE inline void walk_scale_blocks(const QuantLayout& q, int64_t c0, int64_t n, Scale scale, Piece piece) {
  for (int64_t j = c0, end = c0 + n; j < end;) {
    const int64_t b = j / q.block, stop = std::min(end, (b + 1) * q.block);
    piece(j, stop, scale(b));
    j = stop;
  }
}

// Bits per code of a low-bit format (0 for the others).
constexpr int lowbit_bits(QFormat f) {
  return f == QFormat::kQ3 ? 3 : f == QFormat::kQ2 ? 2 : f == QFormat::kQ1 ? 1 : 0;
}

// fn(std::integral_constant<QFormat, f>{}): a format's routines chosen once per call, instantiated per format.
template <typename Fn>
decltype(auto) with_format(QFormat f, Fn&& fn) {
  switch (f) {
    case QFormat::kInt8: return fn(std::integral_constant<QFormat, QFormat::kInt8>{});
    case QFormat::kFp8E4M3: return fn(std::integral_constant<QFormat, QFormat::kFp8E4M3>{});
    case QFormat::kNf4: return fn(std::integral_constant<QFormat, QFormat::kNf4>{});
    case QFormat::kQ3: return fn(std::integral_constant<QFormat, QFormat::kQ3>{});
    case QFormat::kQ2: return fn(std::integral_constant<QFormat, QFormat::kQ2>{});
    default: return fn(std::integral_constant<QFormat, QFormat::kQ1>{});
  }
}

// Block b's scale of a row: float32, float16 for the low-bit formats.
template <QFormat F>
inline float scale_at(const uint8_t* row, const QuantLayout& q, int64_t b) {
  return lowbit_bits(F) ? lowbit_scale(row, q, b) : load_scale(row, q, b);
}

#if MOLE_X86
// scale_at for the vector paths (float16 scales converted by F16C).
template <QFormat F>
MOLE_AVX2 inline float vscale_at(const uint8_t* row, const QuantLayout& q, int64_t b) {
  return lowbit_bits(F) ? lowbit_scale_f16c(row, q, b) : load_scale(row, q, b);
}
#endif

// The levels a format's codes index, padded to 16 floats (nf4 and the low-bit formats; others none).
template <QFormat F>
constexpr const float* levels_of() {
  if constexpr (lowbit_bits(F) != 0) return lowbit_levels<lowbit_bits(F)>();
  else return kNf4Levels;
}

// The first column at or after j where F's vector decoding may start: nf4 on a byte (an even column), the
// low-bit formats on a multiple of 8 columns (their codes then start on a byte), the others anywhere.
template <QFormat F>
constexpr int64_t vector_start(int64_t j) {
  return F == QFormat::kNf4 ? (j + 1) & ~int64_t{1} : lowbit_bits(F) != 0 ? (j + 7) & ~int64_t{7} : j;
}

// ---- scalar path --------------------------------------------------------------------------
// Code j of a row as a float (before its scale); `fp8` is fp8_table().v.
inline float decode_one(QFormat fmt, const float* fp8, const uint8_t* row, int64_t j) {
  switch (fmt) {
    case QFormat::kInt8: return static_cast<float>(static_cast<int8_t>(row[j]));
    case QFormat::kFp8E4M3: return fp8[row[j]];
    case QFormat::kNf4: return kNf4Levels[(row[j >> 1] >> ((j & 1) * 4)) & 15];
    case QFormat::kQ3: return kQ3Levels[code_at<3>(row, j)];
    case QFormat::kQ2: return kQ2Levels[code_at<2>(row, j)];
    default: return kQ1Levels[code_at<1>(row, j)];
  }
}

// dst[k] = s * x[j0 + k] for k < n, where every element lies in one scale block (one rounding, as
// mole_kernels.dequantize).
inline void segment_scalar(QFormat fmt, const uint8_t* row, int64_t j0, int64_t n, float s, float* dst) {
  const float* fp8 = fp8_table().v;
  for (int64_t k = 0; k < n; ++k) dst[k] = s * decode_one(fmt, fp8, row, j0 + k);
}

// Column j of E rows (`rows`, `rb` bytes apart) into *a: *a += s[e] * x_e[j], experts in order.
inline void column_scalar(QFormat fmt, const float* fp8, const uint8_t* rows, int64_t rb, int64_t E, const float* s,
                          int64_t j, float* a) {
  float v = *a;
  for (int64_t e = 0; e < E; ++e) v += s[e] * decode_one(fmt, fp8, rows + e * rb, j);
  *a = v;
}

// The scalar DequantSum (see lut_gather_quant.h): one pass over acc, the E rows summed per column.
template <QFormat F>
void sum_scalar(const QuantLayout& q, const uint8_t* rows, int64_t E, const float* w, int64_t c0, int64_t n,
                float* acc) {
  const float* fp8 = fp8_table().v;
  float s[kExpertGroup];
  float* out = acc - c0;
  for (int64_t j = c0, end = c0 + n; j < end;) {
    const int64_t b = j / q.block, stop = std::min(end, (b + 1) * q.block);
    for (int64_t e = 0; e < E; ++e) s[e] = w[e] * scale_at<F>(rows + e * q.row_bytes, q, b);
    for (; j < stop; ++j) column_scalar(F, fp8, rows, q.row_bytes, E, s, j, out + j);
  }
}

template <typename out_t>
void load_scalar(const out_t* src, float* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<float>(src[k]);
}
template <typename out_t>
void store_scalar(const float* src, out_t* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<out_t>(src[k]);
}

#if MOLE_X86
// ---- AVX-512 path -------------------------------------------------------------------------

template <QFormat F>
MOLE_AVX512 inline __m512 decode16(const uint8_t* row, int64_t j, __m512 lv) {
  if constexpr (lowbit_bits(F) != 0) {  // j % 8 == 0: the codes start on a byte boundary
    return _mm512_permutexvar_ps(codes16<lowbit_bits(F)>(row, j), lv);
  } else if constexpr (F == QFormat::kInt8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j))));
  } else if constexpr (F == QFormat::kFp8E4M3) {
    // e4m3 bits s.eeee.mmm placed as fp16 s.0eeee.mmm0000000 are the same number times 2^-8
    // (subnormals included); the 2^8 is folded into the scale by the caller. e4m3fn has no
    // infinities: its NaN codes s.1111.111 get an all-ones fp16 exponent (NaN) like the scalar table.
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j)));
    const __m256i mag = _mm256_and_si256(b, _mm256_set1_epi16(0x7f));
    const __m256i nan = _mm256_and_si256(_mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7f)), _mm256_set1_epi16(0x7c00));
    const __m256i h = _mm256_or_si256(_mm256_or_si256(_mm256_slli_epi16(mag, 7), nan),
                                      _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8));
    return _mm512_cvtph_ps(h);
  } else {
    // nf4, j even: 8 bytes -> 16 nibbles (low first), looked up in the 16 levels with one permute.
    const __m128i b8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + (j >> 1)));
    const __m512i dup = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b8, b8));
    const __m512i shifts = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(dup, shifts), lv);  // the permute reads an index's low 4 bits
  }
}

// Codes j .. j + 31 of a row as two vectors (nf4: j even), with fewer instructions per value than two
// decode16 calls: fp8's bit moves run on 32 16-bit lanes at once, and nf4 spreads its nibbles to bytes
// with one shift and two unpacks (the permute reads only an index's low 4 bits, so no mask is needed).
template <QFormat F>
MOLE_AVX512 inline void decode32(const uint8_t* row, int64_t j, __m512 lv, __m512& lo, __m512& hi) {
  if constexpr (F == QFormat::kInt8 || lowbit_bits(F) != 0) {
    lo = decode16<F>(row, j, lv);
    hi = decode16<F>(row, j + 16, lv);
  } else if constexpr (F == QFormat::kFp8E4M3) {
    // As decode16: b << 7 puts s.eeee.mmm at bits 14..7; adding its bit 14 to itself moves the sign to bit 15.
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j)));
    const __m512i t = _mm512_slli_epi16(b, 7);
    __m512i h = _mm512_add_epi16(t, _mm512_and_si512(t, _mm512_set1_epi16(0x4000)));
    // The NaN codes s.1111.111 (b | 0x80 all ones) become an fp16 NaN.
    const __mmask32 nan = _mm512_cmpeq_epi16_mask(_mm512_or_si512(b, _mm512_set1_epi16(0x80)), _mm512_set1_epi16(0xff));
    h = _mm512_mask_mov_epi16(h, nan, _mm512_set1_epi16(0x7e00));
    lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
  } else {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (j >> 1)));
    const __m128i high = _mm_srli_epi16(b, 4);  // each byte's low 4 bits: its high nibble
    lo = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, high)), lv);
    hi = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(b, high)), lv);
  }
}

// Columns [c0, c0 + n) of one row dequantized into dst (the rows form), the block loop inside: per-call
// setup is paid once per row, not per block.
template <QFormat F>
MOLE_AVX512 void span_avx512(const QuantLayout& q, const uint8_t* row, int64_t c0, int64_t n, float* dst) {
  const __m512 lv = _mm512_loadu_ps(levels_of<F>());
  const float unit = F == QFormat::kFp8E4M3 ? 256.f : 1.f;  // exact: a power of two
  float* out = dst - c0;
  auto scale = [&](int64_t b) { return vscale_at<F>(row, q, b); };
  walk_scale_blocks(q, c0, n, scale, [&](int64_t j, int64_t stop, float s) MOLE_AVX512 {
    const int64_t head = std::min(stop, vector_start<F>(j));
    segment_scalar(F, row, j, head - j, s, out + j);
    const __m512 vs = _mm512_set1_ps(s * unit);
    for (j = head; j + 16 <= stop; j += 16) _mm512_storeu_ps(out + j, _mm512_mul_ps(vs, decode16<F>(row, j, lv)));
    segment_scalar(F, row, j, stop - j, s, out + j);
  });
}

// 32 columns from their even (p[0], p[2], ..., p[30]) and odd (p[1], ..., p[31]) halves, as fp8's fast
// sum leaves them: one word shuffle for a 16-bit dtype, where two float shuffles and two narrowings would do.
MOLE_AVX512 inline void store_split(float* p, __m512 even, __m512 odd) {
  _mm512_storeu_ps(p, _mm512_permutex2var_ps(even, _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0), odd));
  _mm512_storeu_ps(p + 16, _mm512_permutex2var_ps(even, _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8), odd));
}
// Word indices for _mm512_permutex2var_epi16 that interleave words 0, step, 2 * step, ... of a (the even
// columns) with the same words of b (the odd ones).
struct InterleaveWords {
  alignas(64) int16_t idx[32] = {};
  constexpr explicit InterleaveWords(int step) {
    for (int i = 0; i < 16; ++i) {
      idx[2 * i] = static_cast<int16_t>(step * i);
      idx[2 * i + 1] = static_cast<int16_t>(32 + step * i);
    }
  }
};
constexpr InterleaveWords kHalfWords(1);  // _mm512_cvtps_ph: 16 words, packed
constexpr InterleaveWords kBf16Words(2);  // bf16_bits_avx512: a word in each 32-bit lane's low half
MOLE_AVX512 inline void store_split(at::Half* p, __m512 even, __m512 odd) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512i he = _mm512_castsi256_si512(_mm512_cvtps_ph(even, kRound));
  const __m512i ho = _mm512_castsi256_si512(_mm512_cvtps_ph(odd, kRound));
  _mm512_storeu_si512(p, _mm512_permutex2var_epi16(he, _mm512_load_si512(kHalfWords.idx), ho));
}
MOLE_AVX512 inline void store_split(at::BFloat16* p, __m512 even, __m512 odd) {
  _mm512_storeu_si512(p, _mm512_permutex2var_epi16(bf16_bits_avx512(even), _mm512_load_si512(kBf16Words.idx), bf16_bits_avx512(odd)));
}

// fp8's fast 32 columns: sum_e vs[e] * x_e[j .. j + 31] added to `even` (columns j, j + 2, ..., j + 30)
// and `odd` (j + 1, ..., j + 31), for codes without NaNs (fp8_nan_in). The 32 codes read as 16 words hold the
// even columns' codes in their low bytes and the odd columns' in their high bytes; each half becomes fp16
// (x 2^-8, as decode16) with two or three 16-bit operations and no widening shuffle, which costs as much as
// the conversion itself on some CPUs. The columns stay split over the E rows (store_split joins them).
MOLE_AVX512 inline void fp8_sum32(const uint8_t* rows, int64_t rb, int64_t E, const __m512* vs, int64_t j,
                                   __m512& even, __m512& odd) {
  // A code in a word's high byte, arithmetic-shifted right by one, is s.s.eeee.mmm.0000000: clearing the
  // second copy of the sign (and the low byte's bits) leaves the fp16 s.0eeee.mmm0000000.
  const __m256i keep = _mm256_set1_epi16(static_cast<int16_t>(0xbf80));
  for (int64_t e = 0; e < E; ++e) {
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + e * rb + j));
    const __m256i he = _mm256_and_si256(_mm256_srai_epi16(_mm256_slli_epi16(words, 8), 1), keep);
    const __m256i ho = _mm256_and_si256(_mm256_srai_epi16(words, 1), keep);
    even = _mm512_fmadd_ps(vs[e], _mm512_cvtph_ps(he), even);
    odd = _mm512_fmadd_ps(vs[e], _mm512_cvtph_ps(ho), odd);
  }
}

// Whether codes j .. j + 31 of any of the E rows hold an fp8 NaN (s.1111.111: 0x7f or 0xff).
MOLE_AVX512 inline bool fp8_nan_in(const uint8_t* rows, int64_t rb, int64_t E, int64_t j) {
  __mmask32 nan = 0;
  for (int64_t e = 0; e < E; ++e) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + e * rb + j));
    nan |= _mm256_testn_epi8_mask(_mm256_add_epi8(b, _mm256_set1_epi8(1)), _mm256_set1_epi8(0x7f));
  }
  return nan != 0;
}

// ---- AVX2 + FMA + F16C path: the AVX-512 path's sums on 8-float vectors (CPUs without AVX-512) ------

// A format's 16 levels (levels_of) as two 8-float tables (AVX2 permutes 8 lanes): level i is lo[i & 7] or,
// when bit 3 is set, hi[i & 7]. The low-bit formats have at most 8: lo holds them all.
struct Levels8 {
  __m256 lo, hi;
};
template <QFormat F>
MOLE_AVX2 inline Levels8 levels8() { return {_mm256_loadu_ps(levels_of<F>()), _mm256_loadu_ps(levels_of<F>() + 8)}; }
// The levels of 8 codes, one in each 32-bit lane's low 4 bits (higher bits are ignored).
MOLE_AVX2 inline __m256 nf4_lookup8(__m256i codes, const Levels8& t) {
  const __m256 lo = _mm256_permutevar8x32_ps(t.lo, codes), hi = _mm256_permutevar8x32_ps(t.hi, codes);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));  // bit 3 -> the sign bit
}

// fp8 e4m3 codes (one per 16-bit lane) as fp16 times 2^-8, as decode16 does for AVX-512; NaN codes give an fp16 NaN.
MOLE_AVX2 inline __m128i fp8_to_half8(__m128i b) {
  const __m128i t = _mm_slli_epi16(b, 7);
  const __m128i h = _mm_add_epi16(t, _mm_and_si128(t, _mm_set1_epi16(0x4000)));  // the sign from bit 14 to bit 15
  const __m128i nan = _mm_cmpeq_epi16(_mm_or_si128(b, _mm_set1_epi16(0x80)), _mm_set1_epi16(0xff));
  return _mm_blendv_epi8(h, _mm_set1_epi16(0x7e00), nan);
}
MOLE_AVX2 inline __m256i fp8_to_half16(__m256i b) {
  const __m256i t = _mm256_slli_epi16(b, 7);
  const __m256i h = _mm256_add_epi16(t, _mm256_and_si256(t, _mm256_set1_epi16(0x4000)));
  const __m256i nan = _mm256_cmpeq_epi16(_mm256_or_si256(b, _mm256_set1_epi16(0x80)), _mm256_set1_epi16(0xff));
  return _mm256_blendv_epi8(h, _mm256_set1_epi16(0x7e00), nan);
}

// Codes j .. j + 7 of a row (nf4: j even; low-bit formats: j % 8 == 0), before the scale (fp8: times 2^-8).
template <QFormat F>
MOLE_AVX2 inline __m256 decode8(const uint8_t* row, int64_t j, const Levels8& lv) {
  if constexpr (lowbit_bits(F) != 0) {
    return _mm256_permutevar8x32_ps(lv.lo, codes8<lowbit_bits(F)>(row, j));
  } else if constexpr (F == QFormat::kInt8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j))));
  } else if constexpr (F == QFormat::kFp8E4M3) {
    return _mm256_cvtph_ps(fp8_to_half8(_mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j)))));
  } else {
    return nf4_lookup8(codes8<4>(row, j), lv);
  }
}

// Codes j .. j + 15 of a row as two vectors (nf4: j even), one load per row.
template <QFormat F>
MOLE_AVX2 inline void decode16_avx2(const uint8_t* row, int64_t j, const Levels8& lv, __m256& lo, __m256& hi) {
  if constexpr (lowbit_bits(F) != 0) {
    __m256i a, b;
    codes16_avx2<lowbit_bits(F)>(row, j, a, b);
    lo = _mm256_permutevar8x32_ps(lv.lo, a);
    hi = _mm256_permutevar8x32_ps(lv.lo, b);
  } else if constexpr (F == QFormat::kInt8) {  // two 8-byte loads widened in place: no shuffle to split one
    lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j))));
    hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j + 8))));
  } else if constexpr (F == QFormat::kFp8E4M3) {
    const __m256i h = fp8_to_half16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j))));
    lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
  } else {
    lo = nf4_lookup8(codes8<4>(row, j), lv);
    hi = nf4_lookup8(codes8<4>(row, j + 8), lv);
  }
}

// A span of one row into dst, as span_avx512.
template <QFormat F>
MOLE_AVX2 void span_avx2(const QuantLayout& q, const uint8_t* row, int64_t c0, int64_t n, float* dst) {
  const Levels8 lv = levels8<F>();
  const float unit = F == QFormat::kFp8E4M3 ? 256.f : 1.f;
  float* out = dst - c0;
  auto scale = [&](int64_t b) { return vscale_at<F>(row, q, b); };
  walk_scale_blocks(q, c0, n, scale, [&](int64_t j, int64_t stop, float s) MOLE_AVX2 {
    const int64_t head = std::min(stop, vector_start<F>(j));
    segment_scalar(F, row, j, head - j, s, out + j);
    const __m256 vs = _mm256_set1_ps(s * unit);
    for (j = head; j + 8 <= stop; j += 8) _mm256_storeu_ps(out + j, _mm256_mul_ps(vs, decode8<F>(row, j, lv)));
    segment_scalar(F, row, j, stop - j, s, out + j);
  });
}

// Where a fused sum's columns start from and go (k: columns from c0), so that the AVX-512 and AVX2 sums below are
// written once for both: AccSink reads and writes a float32 acc (DequantSum); OutSink starts from
// add0 + add1 (either may be null; add0 may be dst) and stores straight to out's dtype, so the fused
// gather keeps its sums in registers as the bf16 one does (no float tile to zero, reload and convert).
struct AccSink {
  float* acc;
  bool fresh() const { return false; }  // whether every sum starts from zero
  MOLE_AVX512 __m512 load16(int64_t k) const { return _mm512_loadu_ps(acc + k); }
  MOLE_AVX512 void store16(int64_t k, __m512 v) const { _mm512_storeu_ps(acc + k, v); }
  MOLE_AVX512 void store_split(int64_t k, __m512 even, __m512 odd) const { mole::store_split(acc + k, even, odd); }
  MOLE_AVX2 __m256 load8(int64_t k) const { return _mm256_loadu_ps(acc + k); }
  MOLE_AVX2 void store8(int64_t k, __m256 v) const { _mm256_storeu_ps(acc + k, v); }
  float load1(int64_t k) const { return acc[k]; }
  void store1(int64_t k, float v) const { acc[k] = v; }
};
template <typename out_t>
struct OutSink {
  out_t* dst;
  const out_t* add0;
  const out_t* add1;
  bool fresh() const { return add0 == nullptr && add1 == nullptr; }
  // 0 + add1 (not add1) when add0 is null, as the float tile computes it: an add1 of -0.0 gives +0.0 on both paths.
  MOLE_AVX512 __m512 load16(int64_t k) const {
    const __m512 a = add0 != nullptr ? mole::load16(add0 + k) : _mm512_setzero_ps();
    return add1 != nullptr ? _mm512_add_ps(a, mole::load16(add1 + k)) : a;
  }
  MOLE_AVX512 void store16(int64_t k, __m512 v) const { mole::store16(dst + k, v); }
  MOLE_AVX512 void store_split(int64_t k, __m512 even, __m512 odd) const { mole::store_split(dst + k, even, odd); }
  MOLE_AVX2 __m256 load8(int64_t k) const {
    const __m256 a = add0 != nullptr ? mole::load8(add0 + k) : _mm256_setzero_ps();
    return add1 != nullptr ? _mm256_add_ps(a, mole::load8(add1 + k)) : a;
  }
  MOLE_AVX2 void store8(int64_t k, __m256 v) const { mole::store8(dst + k, v); }
  float load1(int64_t k) const {
    const float a = add0 != nullptr ? static_cast<float>(add0[k]) : 0.f;
    return add1 != nullptr ? a + static_cast<float>(add1[k]) : a;
  }
  void store1(int64_t k, float v) const { dst[k] = static_cast<out_t>(v); }
};

// The AVX-512 sum (see DequantSum in lut_gather_quant.h): per 32 columns, the E rows decoded and summed
// in two registers (each row's scale and router weight folded into one factor per block), the sink read
// and written once, not once per expert.
template <QFormat F, typename Sink>
MOLE_AVX512 void sum_avx512_into(const QuantLayout& q, const uint8_t* rows, int64_t E, const float* w, int64_t c0,
                                  int64_t n, const Sink& sink) {
  const __m512 lv = _mm512_loadu_ps(levels_of<F>());
  const float unit = F == QFormat::kFp8E4M3 ? 256.f : 1.f;  // exact: a power of two (see decode16)
  const float* fp8 = fp8_table().v;
  const int64_t rb = q.row_bytes;
  float s[kExpertGroup];
  __m512 vs[kExpertGroup];
  auto column = [&](int64_t j) {  // one column through the scalar decoder
    float v = sink.load1(j - c0);
    column_scalar(F, fp8, rows, rb, E, s, j, &v);
    sink.store1(j - c0, v);
  };
  for (int64_t j = c0, end = c0 + n; j < end;) {
    const int64_t b = j / q.block, stop = std::min(end, (b + 1) * q.block);
    for (int64_t e = 0; e < E; ++e) {
      s[e] = w[e] * vscale_at<F>(rows + e * rb, q, b);
      vs[e] = _mm512_set1_ps(s[e] * unit);
    }
    for (const int64_t head = std::min(stop, vector_start<F>(j)); j < head;) column(j++);
    for (; j + 32 <= stop; j += 32) {
      if (F == QFormat::kFp8E4M3 && !fp8_nan_in(rows, rb, E, j)) {
        __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
        if (!sink.fresh()) {  // the start split as the sum is (a fresh sum starts from zero: nothing to split)
          const __m512 a0 = sink.load16(j - c0), a1 = sink.load16(j + 16 - c0);
          even = _mm512_permutex2var_ps(a0, _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0), a1);
          odd = _mm512_permutex2var_ps(a0, _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1), a1);
        }
        fp8_sum32(rows, rb, E, vs, j, even, odd);
        sink.store_split(j - c0, even, odd);
        continue;
      }
      __m512 a0 = sink.load16(j - c0), a1 = sink.load16(j + 16 - c0);
      for (int64_t e = 0; e < E; ++e) {
        __m512 x0, x1;
        decode32<F>(rows + e * rb, j, lv, x0, x1);
        a0 = _mm512_fmadd_ps(vs[e], x0, a0);
        a1 = _mm512_fmadd_ps(vs[e], x1, a1);
      }
      sink.store16(j - c0, a0);
      sink.store16(j + 16 - c0, a1);
    }
    for (; j + 16 <= stop; j += 16) {
      __m512 a = sink.load16(j - c0);
      for (int64_t e = 0; e < E; ++e) a = _mm512_fmadd_ps(vs[e], decode16<F>(rows + e * rb, j, lv), a);
      sink.store16(j - c0, a);
    }
    for (; j < stop; ++j) column(j);
  }
}

template <QFormat F>
void sum_avx512(const QuantLayout& q, const uint8_t* rows, int64_t E, const float* w, int64_t c0, int64_t n,
                float* acc) {
  sum_avx512_into<F>(q, rows, E, w, c0, n, AccSink{acc});
}
template <QFormat F, typename out_t>
void fused_avx512(const QuantLayout& q, const uint8_t* rows, int64_t E, const float* w, int64_t c0, int64_t n,
                  out_t* dst, const out_t* add0, const out_t* add1) {
  sum_avx512_into<F>(q, rows, E, w, c0, n, OutSink<out_t>{dst, add0, add1});
}

template <typename out_t>
MOLE_AVX512 void load_avx512(const out_t* src, float* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) _mm512_storeu_ps(dst + k, load16(src + k));
  load_scalar(src + k, dst + k, n - k);
}
template <typename out_t>
MOLE_AVX512 void store_avx512(const float* src, out_t* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) store16(dst + k, _mm512_loadu_ps(src + k));
  store_scalar(src + k, dst + k, n - k);
}

// The AVX2 sum: sum_avx512_into on 16 columns (two vectors) per pass, then 8, then single columns.
template <QFormat F, typename Sink>
MOLE_AVX2 void sum_avx2_into(const QuantLayout& q, const uint8_t* rows, int64_t E, const float* w, int64_t c0,
                              int64_t n, const Sink& sink) {
  const Levels8 lv = levels8<F>();
  const float unit = F == QFormat::kFp8E4M3 ? 256.f : 1.f;  // exact: a power of two (see decode16)
  const float* fp8 = fp8_table().v;
  const int64_t rb = q.row_bytes;
  float s[kExpertGroup];
  __m256 vs[kExpertGroup];
  auto column = [&](int64_t j) {
    float v = sink.load1(j - c0);
    column_scalar(F, fp8, rows, rb, E, s, j, &v);
    sink.store1(j - c0, v);
  };
  for (int64_t j = c0, end = c0 + n; j < end;) {
    const int64_t b = j / q.block, stop = std::min(end, (b + 1) * q.block);
    for (int64_t e = 0; e < E; ++e) {
      s[e] = w[e] * vscale_at<F>(rows + e * rb, q, b);
      vs[e] = _mm256_set1_ps(s[e] * unit);
    }
    for (const int64_t head = std::min(stop, vector_start<F>(j)); j < head;) column(j++);
    for (; j + 16 <= stop; j += 16) {
      __m256 a0 = sink.load8(j - c0), a1 = sink.load8(j + 8 - c0);
      for (int64_t e = 0; e < E; ++e) {
        __m256 x0, x1;
        decode16_avx2<F>(rows + e * rb, j, lv, x0, x1);
        a0 = _mm256_fmadd_ps(vs[e], x0, a0);
        a1 = _mm256_fmadd_ps(vs[e], x1, a1);
      }
      sink.store8(j - c0, a0);
      sink.store8(j + 8 - c0, a1);
    }
    for (; j + 8 <= stop; j += 8) {
      __m256 a = sink.load8(j - c0);
      for (int64_t e = 0; e < E; ++e) a = _mm256_fmadd_ps(vs[e], decode8<F>(rows + e * rb, j, lv), a);
      sink.store8(j - c0, a);
    }
    for (; j < stop; ++j) column(j);
  }
}

template <QFormat F>
void sum_avx2(const QuantLayout& q, const uint8_t* rows, int64_t E, const float* w, int64_t c0, int64_t n, float* acc) {
  sum_avx2_into<F>(q, rows, E, w, c0, n, AccSink{acc});
}
template <QFormat F, typename out_t>
void fused_avx2(const QuantLayout& q, const uint8_t* rows, int64_t E, const float* w, int64_t c0, int64_t n,
                out_t* dst, const out_t* add0, const out_t* add1) {
  sum_avx2_into<F>(q, rows, E, w, c0, n, OutSink<out_t>{dst, add0, add1});
}

template <typename out_t>
MOLE_AVX2 void load_avx2(const out_t* src, float* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) _mm256_storeu_ps(dst + k, load8(src + k));
  load_scalar(src + k, dst + k, n - k);
}
template <typename out_t>
MOLE_AVX2 void store_avx2(const float* src, out_t* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) store8(dst + k, _mm256_loadu_ps(src + k));
  store_scalar(src + k, dst + k, n - k);
}
#endif

// The quantized kernels' instruction set: the float gather's choice and cap, also under clang (these
// kernels use target attributes, not pragma regions).
CpuIsa quant_isa() { return cpu_vector_isa(); }

// Columns [c0, c0 + n) of one row, dequantized into dst (the rows form; fused sums use dequant_sum_fn).
void dequant_span(const QuantLayout& q, const uint8_t* row, int64_t c0, int64_t n, float* dst) {
  with_format(q.fmt, [&](auto format) {
    constexpr QFormat F = decltype(format)::value;
#if MOLE_X86
    if (quant_isa() == CpuIsa::kAvx512) return span_avx512<F>(q, row, c0, n, dst);
    if (quant_isa() == CpuIsa::kAvx2) return span_avx2<F>(q, row, c0, n, dst);
#endif
    walk_scale_blocks(q, c0, n, [&](int64_t b) { return scale_at<F>(row, q, b); },
                      [&](int64_t j, int64_t stop, float s) { segment_scalar(F, row, j, stop - j, s, dst + (j - c0)); });
  });
}

}  // namespace

// The one place that picks a format's summing routine (see DequantSum in lut_gather_quant.h).
DequantSum dequant_sum_fn(const QuantLayout& q) {
  return with_format(q.fmt, [](auto format) -> DequantSum {
    constexpr QFormat F = decltype(format)::value;
#if MOLE_X86
    if (quant_isa() == CpuIsa::kAvx512) return sum_avx512<F>;
    if (quant_isa() == CpuIsa::kAvx2) return sum_avx2<F>;
#endif
    return sum_scalar<F>;
  });
}

namespace {

template <typename out_t>
void load_tile(const out_t* src, float* dst, int64_t n) {
#if MOLE_X86
  if (quant_isa() == CpuIsa::kAvx512) return load_avx512(src, dst, n);
  if (quant_isa() == CpuIsa::kAvx2) return load_avx2(src, dst, n);
#endif
  load_scalar(src, dst, n);
}
template <typename out_t>
void store_tile(const float* src, out_t* dst, int64_t n) {
#if MOLE_X86
  if (quant_isa() == CpuIsa::kAvx512) return store_avx512(src, dst, n);
  if (quant_isa() == CpuIsa::kAvx2) return store_avx2(src, dst, n);
#endif
  store_scalar(src, dst, n);
}

inline void prefetch_bytes(const uint8_t* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 2);
}

constexpr int64_t kTile = 512;          // float32 columns per L1 tile
constexpr int64_t kSplitColumns = 256;  // columns per item when a batch is too small for whole tokens

// How the fused gather sums a token's rows: `direct` (AVX-512 or AVX2, up to kExpertGroup rows)
// in registers straight into out, as the bf16 gather does; else `sum` (dequant_sum_fn) into a float32 tile,
// which also keeps a sum of more rows unrounded between groups. Looked up once per call.
template <typename out_t>
struct FusedRoutine {
  DequantSum sum;
  void (*direct)(const QuantLayout& q, const uint8_t* rows, int64_t E, const float* w, int64_t c0, int64_t n,
                 out_t* dst, const out_t* add0, const out_t* add1);
};
template <typename out_t>
FusedRoutine<out_t> fused_routine(const QuantLayout& q) {
  FusedRoutine<out_t> r{dequant_sum_fn(q), nullptr};
#if MOLE_X86
  with_format(q.fmt, [&](auto format) {
    constexpr QFormat F = decltype(format)::value;
    if (quant_isa() == CpuIsa::kAvx512) r.direct = fused_avx512<F, out_t>;
    if (quant_isa() == CpuIsa::kAvx2) r.direct = fused_avx2<F, out_t>;
  });
#endif
  return r;
}

// Columns [c0, c0 + n) of one token: dst = add0 + add1 + sum_e w[e] * deq(seg + e * row_bytes), the
// pointers already at column c0 (add0/add1 may be null, add0 may be dst; seg null: no rows, an id
// outside the table, which adds nothing).
template <typename out_t>
void fused_item(const QuantLayout& q, const FusedRoutine<out_t>& r, const uint8_t* seg, int64_t E, const float* w,
                int64_t c0, int64_t n, out_t* dst, const out_t* add0, const out_t* add1) {
  if (r.direct != nullptr && E <= kExpertGroup) return r.direct(q, seg, seg != nullptr ? E : 0, w, c0, n, dst, add0, add1);
  alignas(64) float acc[kTile];
  alignas(64) float tmp[kTile];
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t m = std::min(kTile, n - t0);
    if (add0 != nullptr) load_tile(add0 + t0, acc, m);
    else std::fill(acc, acc + m, 0.f);
    if (add1 != nullptr) {
      load_tile(add1 + t0, tmp, m);
      for (int64_t k = 0; k < m; ++k) acc[k] += tmp[k];
    }
    for (int64_t e0 = 0; seg != nullptr && e0 < E; e0 += kExpertGroup) {
      r.sum(q, seg + e0 * q.row_bytes, std::min(kExpertGroup, E - e0), w + e0, c0 + t0, m, acc);
    }
    store_tile(acc, dst + t0, m);
  }
}

// out[t] = add0[t] + add1[t] + sum_e w[t, e] * deq(row(ids[t], e)); add0/add1 may be null (add0 may be out).
template <typename out_t, typename id_t>
void fused_kernel(const QuantPlan& p, const uint8_t* data, const id_t* ids, const float* w, out_t* out,
                  const out_t* add0, const out_t* add1) {
  const QuantLayout& q = p.q;
  const FusedRoutine<out_t> routine = fused_routine<out_t>(q);
  const int64_t D = q.D;
  const int64_t span = p.T >= 4 * at::get_num_threads() ? D : std::min(D, kSplitColumns);
  const int64_t spans = (D + span - 1) / span;
  const int64_t token_bytes = p.L * p.E * q.row_bytes;
  const int64_t seg_off = p.seg_row0 * q.row_bytes;
  // Work per item counted in values, as for a bf16 row: decoding costs at least what reading bf16 does, so
  // a quantized table goes parallel at the batch size the bf16 one does (not 2-4x later: its rows are smaller).
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, p.E * span * 2));
  at::parallel_for(0, p.T * spans, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / spans;
      const int64_t c0 = (item % spans) * span;
      const int64_t at = t * D + c0;
      const int64_t id = static_cast<int64_t>(ids[t]);
      const bool ok = id >= 0 && id < p.V;  // an id outside the table adds nothing (counted in faults)
      const uint8_t* seg = ok ? data + id * token_bytes + seg_off : nullptr;
      if (ok && item + 1 < end && (item + 1) % spans == 0) {  // the next token's rows, fetched while these are summed
        const int64_t nid = static_cast<int64_t>(ids[t + 1]);
        if (nid >= 0 && nid < p.V) prefetch_bytes(data + nid * token_bytes + seg_off, p.E * q.row_bytes);
      }
      fused_item(q, routine, seg, p.E, w + t * p.E, c0, std::min(span, D - c0), out + at, add0 ? add0 + at : nullptr,
                 add1 ? add1 + at : nullptr);
    }
  });
}

// Token t's rows go to out + t * out_stride (elements), row after row.
template <typename out_t, typename id_t>
void rows_kernel(const QuantPlan& p, const uint8_t* data, const id_t* ids, out_t* out, int64_t out_stride) {
  const QuantLayout& q = p.q;
  const int64_t D = q.D;
  const int64_t token_bytes = p.L * p.E * q.row_bytes;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (D * static_cast<int64_t>(sizeof(out_t))));
  at::parallel_for(0, p.T * p.seg_rows, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float tile[kTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / p.seg_rows;
      const int64_t r = item % p.seg_rows;
      out_t* dst = out + t * out_stride + r * D;
      const int64_t id = static_cast<int64_t>(ids[t]);
      if (id < 0 || id >= p.V) {
        std::fill(dst, dst + D, out_t(0.f));
        continue;
      }
      const uint8_t* row = data + id * token_bytes + (p.seg_row0 + r) * q.row_bytes;
      if (r == 0) prefetch_bytes(row, p.seg_rows * q.row_bytes);  // one token's rows: one stream
      for (int64_t c0 = 0; c0 < D; c0 += kTile) {
        const int64_t m = std::min(kTile, D - c0);
        if constexpr (std::is_same_v<out_t, float>) {
          dequant_span(q, row, c0, m, dst + c0);
        } else {
          dequant_span(q, row, c0, m, tile);
          store_tile(tile, dst + c0, m);
        }
      }
    }
  });
}

}  // namespace

const char* quant_cpu_isa() { return isa_name(quant_isa()); }

void fused_step_quant_cpu(const QuantLayout& q, const uint8_t* const* seg, int64_t T, int64_t E, const float* w,
                          const at::Tensor& out, const at::Tensor& add0, const at::Tensor& add1) {
  MOLE_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lut_combine_quant", [&] {
    const FusedRoutine<scalar_t> routine = fused_routine<scalar_t>(q);
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
    const scalar_t* a0 = ptr(add0);
    const scalar_t* a1 = ptr(add1);
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t D = q.D;
    for (int64_t t = 0; t < T; ++t) {
      fused_item(q, routine, seg[t], E, w + t * E, 0, D, o + t * D, a0 ? a0 + t * D : nullptr, a1 ? a1 + t * D : nullptr);
    }
  });
}

void fused_gather_quant_cpu(const QuantPlan& p, const at::Tensor& data, const at::Tensor& ids, const float* w,
                            const at::Tensor& out, const at::Tensor& add0, const at::Tensor& add1) {
  const at::Tensor ids_c = ids.contiguous();  // ids are small; the table is never copied
  MOLE_DISPATCH_ID_TYPES(ids_c.scalar_type(), "lut_gather_quant_cpu", [&] {
    using id_t = scalar_t;
    MOLE_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lut_gather_quant_cpu", [&] {
      auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
      fused_kernel<scalar_t, id_t>(p, data.const_data_ptr<uint8_t>(), ids_c.const_data_ptr<id_t>(), w,
                                   out.data_ptr<scalar_t>(), ptr(add0), ptr(add1));
    });
  });
}

namespace {

// The CPU kernels for a checked plan and output (`out_stride`: elements between tokens' results).
void run_lut_gather_quant_cpu(const QuantPlan& p, const at::Tensor& out, int64_t out_stride, const at::Tensor& data,
                              const at::Tensor& ids, const std::optional<at::Tensor>& weights, bool accumulate,
                              const std::optional<at::Tensor>& faults) {
  MOLE_CHECK_ARG(data.device().is_cpu(), "lut_gather_quant: a CUDA table needs ids on its device");
  MOLE_CHECK_ARG(p.fused || !accumulate, "lut_gather_quant: accumulate=True needs weights (the fused form)");
  if (p.T == 0) return;
  check_ids_cpu(ids, p.V, faults);
  if (p.fused) {
    const at::Tensor w = kernel_weights(weights);
    return fused_gather_quant_cpu(p, data, ids, w.const_data_ptr<float>(), out, accumulate ? out : at::Tensor(),
                                  at::Tensor());
  }
  const at::Tensor ids_c = ids.contiguous();
  MOLE_DISPATCH_ID_TYPES(ids_c.scalar_type(), "lut_gather_quant_rows_cpu", [&] {
    using id_t = scalar_t;
    MOLE_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lut_gather_quant_rows_cpu", [&] {
      rows_kernel<scalar_t, id_t>(p, data.const_data_ptr<uint8_t>(), ids_c.const_data_ptr<id_t>(),
                                  out.data_ptr<scalar_t>(), out_stride);
    });
  });
}

}  // namespace

void lut_gather_quant_into_cpu(const at::Tensor& out, const at::Tensor& data, c10::string_view format, int64_t dim,
                               int64_t block_size, const at::Tensor& ids, const std::optional<at::Tensor>& weights,
                               std::optional<int64_t> layer, bool accumulate,
                               const std::optional<at::Tensor>& faults, std::optional<int64_t> layer_end) {
  const QuantPlan p = plan_lut_gather_quant(data, format, dim, block_size, ids, weights, {layer, layer_end});
  const int64_t out_stride = check_quant_outputs(p, data, ids, weights, out, faults);
  run_lut_gather_quant_cpu(p, out, out_stride, data, ids, weights, accumulate, faults);
}

// The functional op on the CPU: as lut_gather_quant_functional, but planned once and without the checks
// of a caller's `out` (a fresh tensor overlaps nothing): a decode-sized call is mostly this fixed cost.
at::Tensor lut_gather_quant_cpu(const at::Tensor& data, c10::string_view format, int64_t dim, int64_t block_size,
                                const at::Tensor& ids, const std::optional<at::Tensor>& weights,
                                std::optional<int64_t> layer, std::optional<at::ScalarType> dtype,
                                std::optional<int64_t> layer_end) {
  const QuantPlan p = plan_lut_gather_quant(data, format, dim, block_size, ids, weights, {layer, layer_end});
  const at::ScalarType out_dtype = dtype.value_or(at::kFloat);
  MOLE_CHECK_ARG(is_float_dtype(out_dtype), "lut_gather_quant: dtype must be float32, float16 or bfloat16, got ",
                 out_dtype);
  at::Tensor out = at::empty(p.out_shape, ids.options().dtype(out_dtype));
  run_lut_gather_quant_cpu(p, out, p.seg_rows * p.q.D, data, ids, weights, /*accumulate=*/false, std::nullopt);
  return out;
}

}  // namespace mole

TORCH_LIBRARY_FRAGMENT(mole_kernels, m) {
  // Rows of a quantized table (uint8 [V, L, E, row_bytes], see csrc/lut_gather_quant.h) dequantized to
  // `dtype` (float32 when None), or sum_e weights[..., e] * row[..., layer, e, :] accumulated in float32.
  m.def(
      "lut_gather_quant(Tensor data, str format, int dim, int block_size, Tensor ids, Tensor? weights=None, "
      "int? layer=None, ScalarType? dtype=None, int? layer_end=None) -> Tensor");
  // The same into `out` (any float dtype); accumulate and faults as in lut_gather_out.
  m.def(
      "lut_gather_quant_out(Tensor(b!) out, Tensor data, str format, int dim, int block_size, Tensor ids, "
      "Tensor? weights=None, int? layer=None, bool accumulate=False, Tensor(a!)? faults=None, "
      "int? layer_end=None) -> ()");
}

TORCH_LIBRARY_IMPL(mole_kernels, CPU, m) {
  m.impl("lut_gather_quant", &mole::lut_gather_quant_cpu);
  m.impl("lut_gather_quant_out", &mole::lut_gather_quant_into_cpu);
}
