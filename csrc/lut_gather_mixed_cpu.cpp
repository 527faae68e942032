// lut_gather_mixed: the fused CPU gather of a mixed-precision table (mole_kernels/mixed.py).
//
// A mixed table keys its rows by frequency rank: rank[id] says which part holds the id (part k holds
// ranks [start_k, start_k + n_k)) and at which row. Parts are quantized tables (int8, fp8, nf4, q3,
// q2, q1: decoded by the quantized gather's own summing routine, dequant_sum_fn in
// lut_gather_quant_cpu.cpp), factored tables (per row `rank` signed codes and one float16 scale; per
// (layer, expert) a basis [rank, D]) or float tables. A normalised table adds per (layer, expert)
// column scales and offsets:
//
//   row(v, l, e) = part_row(v, l, e) * col_scale[l, e] + offset[l, e]
//   fused        = sum_e w_e * row(v, l, e)
//
// The factored parts' bases are read as the table stores them, float16 [L, E, rank, D] (a layer's is
// E * rank * D * 2 bytes, half of a float32 copy: in a decode step it comes from L3 on every layer call),
// widened in registers. A factored row costs E * rank * D multiply-adds, the column scale applied once
// per (token, expert) after the sum over the rank; a batch's factored tokens go in groups of up to 8 through
// one pass over the layer's basis (factored_product). The part of a token is found once per token (a
// branch per token, none per value). The same code serves a table in RAM
// (parts = whole tables, rank = the table's map) and a step's staged rows (parts = staging buffers,
// rank = the step's own map from positions to staging rows).
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>

#include "direct_calls.h"
#include "lut_gather.h"
#include "lut_gather_quant.h"
#include "cpu_simd.h"
#include "lut_gather_mixed.h"


namespace mole {

namespace {

int64_t factored_row_bytes(int64_t rank, int64_t bits) {
  const int64_t payload = (rank * bits + 7) / 8;
  return payload + payload % 2 + 2;
}

// The instruction set of this file's own vector code (the factored product), as the quantized kernels that
// decode the quantized parts choose it: AVX-512, AVX2 + FMA + F16C, or scalar (MOLE_KERNELS_CPU_ISA caps it).
bool avx512() { return cpu_vector_isa() == CpuIsa::kAvx512; }
bool avx2() { return cpu_vector_isa() == CpuIsa::kAvx2; }

// acc[d] += sum_j coef[j] * basis[j * D + d] for d < D, j < R (float32 rows: the offsets' weighted sum).
void coef_basis_scalar(const float* coef, const float* basis, int64_t R, int64_t D, float* acc) {
  for (int64_t j = 0; j < R; ++j) {
    const float c = coef[j];
    const float* b = basis + j * D;
    for (int64_t d = 0; d < D; ++d) acc[d] += c * b[d];
  }
}

#if MOLE_X86
// The same, 64 columns of acc held in registers while every basis row streams past.
MOLE_AVX512 void coef_basis_avx512(const float* coef, const float* basis, int64_t R, int64_t D, float* acc) {
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
    __m512 a0 = _mm512_loadu_ps(acc + d), a1 = _mm512_loadu_ps(acc + d + 16);
    __m512 a2 = _mm512_loadu_ps(acc + d + 32), a3 = _mm512_loadu_ps(acc + d + 48);
    for (int64_t j = 0; j < R; ++j) {
      const __m512 c = _mm512_set1_ps(coef[j]);
      const float* b = basis + j * D + d;
      a0 = _mm512_fmadd_ps(c, _mm512_loadu_ps(b), a0);
      a1 = _mm512_fmadd_ps(c, _mm512_loadu_ps(b + 16), a1);
      a2 = _mm512_fmadd_ps(c, _mm512_loadu_ps(b + 32), a2);
      a3 = _mm512_fmadd_ps(c, _mm512_loadu_ps(b + 48), a3);
    }
    _mm512_storeu_ps(acc + d, a0);
    _mm512_storeu_ps(acc + d + 16, a1);
    _mm512_storeu_ps(acc + d + 32, a2);
    _mm512_storeu_ps(acc + d + 48, a3);
  }
  for (; d < D; d += 16) {
    const __mmask16 k = D - d >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (D - d)) - 1);
    __m512 a = _mm512_maskz_loadu_ps(k, acc + d);
    for (int64_t j = 0; j < R; ++j) {
      a = _mm512_fmadd_ps(_mm512_set1_ps(coef[j]), _mm512_maskz_loadu_ps(k, basis + j * D + d), a);
    }
    _mm512_mask_storeu_ps(acc + d, k, a);
  }
}

// acc[d] += x[d] * y[d] (a column scale applied to a decoded row, its weight already in x).
MOLE_AVX512 void mul_add_avx512(const float* x, const float* y, int64_t D, float* acc) {
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m512 a = _mm512_loadu_ps(acc + d);
    _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(_mm512_loadu_ps(x + d), _mm512_loadu_ps(y + d), a));
  }
  for (; d < D; ++d) acc[d] += x[d] * y[d];
}

// The factored product of N tokens (factored_product below) in columns of W vectors: each float16 basis
// vector loaded (and widened) once feeds N tokens, N * W accumulators (>= 8: an FMA's latency hidden) in
// registers over the rank, then scaled by the expert's column scale into acc. Columns past D are masked.
template <int N, int W>
MOLE_AVX512 void factored_product_avx512(const float* coef, const uint16_t* basis, const float* cs, int64_t E,
                                          int64_t R, int64_t D, float* acc) {
  const int64_t ER = E * R;
  for (int64_t d0 = 0; d0 < D; d0 += 16 * W) {
    __mmask16 k[W];
#pragma GCC unroll 8
    for (int v = 0; v < W; ++v) {
      const int64_t left = D - d0 - 16 * v;
      k[v] = left >= 16 ? __mmask16(0xFFFF) : left > 0 ? __mmask16((1u << left) - 1) : __mmask16(0);
    }
    for (int64_t e = 0; e < E; ++e) {
      __m512 a[N][W];
#pragma GCC unroll 8
      for (int t = 0; t < N; ++t) {
#pragma GCC unroll 8
        for (int v = 0; v < W; ++v) a[t][v] = _mm512_setzero_ps();
      }
      const uint16_t* b = basis + e * R * D + d0;
      const float* c = coef + e * R;
      for (int64_t j = 0; j < R; ++j, b += D) {
        __m512 bv[W];
#pragma GCC unroll 8
        for (int v = 0; v < W; ++v) bv[v] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k[v], b + 16 * v));
#pragma GCC unroll 8
        for (int t = 0; t < N; ++t) {
          const __m512 ct = _mm512_set1_ps(c[t * ER + j]);
#pragma GCC unroll 8
          for (int v = 0; v < W; ++v) a[t][v] = _mm512_fmadd_ps(ct, bv[v], a[t][v]);
        }
      }
#pragma GCC unroll 8
      for (int v = 0; v < W; ++v) {
        const __m512 sv = cs != nullptr ? _mm512_maskz_loadu_ps(k[v], cs + e * D + d0 + 16 * v) : _mm512_set1_ps(1.f);
#pragma GCC unroll 8
        for (int t = 0; t < N; ++t) {
          float* o = acc + t * D + d0 + 16 * v;
          _mm512_mask_storeu_ps(o, k[v], _mm512_fmadd_ps(sv, a[t][v], _mm512_maskz_loadu_ps(k[v], o)));
        }
      }
    }
  }
}

// factored_product_avx512 with AVX2 + FMA + F16C, for exactly W full 8-column vectors at column d0.
template <int N, int W>
MOLE_AVX2 void factored_block_avx2(const float* coef, const uint16_t* basis, const float* cs, int64_t E, int64_t R,
                                   int64_t D, int64_t d0, float* acc) {
  const int64_t ER = E * R;
  for (int64_t e = 0; e < E; ++e) {
    __m256 a[N][W];
#pragma GCC unroll 8
    for (int t = 0; t < N; ++t) {
#pragma GCC unroll 8
      for (int v = 0; v < W; ++v) a[t][v] = _mm256_setzero_ps();
    }
    const uint16_t* b = basis + e * R * D + d0;
    const float* c = coef + e * R;
    for (int64_t j = 0; j < R; ++j, b += D) {
      __m256 bv[W];
#pragma GCC unroll 8
      for (int v = 0; v < W; ++v) bv[v] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 8 * v)));
#pragma GCC unroll 8
      for (int t = 0; t < N; ++t) {
        const __m256 ct = _mm256_set1_ps(c[t * ER + j]);
#pragma GCC unroll 8
        for (int v = 0; v < W; ++v) a[t][v] = _mm256_fmadd_ps(ct, bv[v], a[t][v]);
      }
    }
#pragma GCC unroll 8
    for (int v = 0; v < W; ++v) {
      const __m256 sv = cs != nullptr ? _mm256_loadu_ps(cs + e * D + d0 + 8 * v) : _mm256_set1_ps(1.f);
#pragma GCC unroll 8
      for (int t = 0; t < N; ++t) {
        float* o = acc + t * D + d0 + 8 * v;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(sv, a[t][v], _mm256_loadu_ps(o)));
      }
    }
  }
}

// The factored product of N tokens with AVX2: blocks of W vectors (N * W accumulators, <= 12 of the 16 registers),
// the last whole vectors one at a time, and the columns past the last multiple of 8 in scalar code.
template <int N, int W>
void factored_product_avx2(const float* coef, const uint16_t* basis, const float* cs, int64_t E, int64_t R,
                           int64_t D, float* acc) {
  const int64_t D8 = D / 8 * 8;
  int64_t d0 = 0;
  for (; d0 + 8 * W <= D8; d0 += 8 * W) factored_block_avx2<N, W>(coef, basis, cs, E, R, D, d0, acc);
  for (; d0 < D8; d0 += 8) factored_block_avx2<N, 1>(coef, basis, cs, E, R, D, d0, acc);
  const int64_t ER = E * R;
  for (int64_t d = D8; d < D; ++d) {
    for (int64_t e = 0; e < E; ++e) {
      for (int t = 0; t < N; ++t) {
        float s = 0.f;
        for (int64_t j = 0; j < R; ++j) {
          s += coef[t * ER + e * R + j] * static_cast<float>(c10::Half(basis[(e * R + j) * D + d], c10::Half::from_bits()));
        }
        acc[t * D + d] += (cs != nullptr ? cs[e * D + d] : 1.f) * s;
      }
    }
  }
}

// acc[d] += sum_e w[e] * scale_e * code_e[d] * cs[e * D + d]: an int8 part's rows of one token in a normalised
// table (one float32 scale per row, csrc/lut_gather_quant.h), decoded, weighted and column-scaled in registers
// (the general quantized route decodes each row into scratch first: part_sum).
MOLE_AVX512 void int8_scaled_sum_avx512(const QuantLayout& q, const uint8_t* rows, int64_t E, const float* w,
                                         const float* cs, float* acc) {
  const int64_t D = q.D;
  for (int64_t e = 0; e < E; ++e) {
    const uint8_t* row = rows + e * q.row_bytes;
    float s;
    std::memcpy(&s, row + q.scale_offset, sizeof(s));
    const __m512 ws = _mm512_set1_ps(w[e] * s);
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 k = D - d >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (D - d)) - 1);
      const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, row + d)));
      _mm512_mask_storeu_ps(acc + d, k, _mm512_fmadd_ps(_mm512_mul_ps(ws, x), _mm512_maskz_loadu_ps(k, cs + e * D + d),
                                                        _mm512_maskz_loadu_ps(k, acc + d)));
    }
  }
}

// a[d] = a0[d] + a1[d] + sum_e w[e] * off[e * D + d] for d < D (a0, a1, off may be null: 0): a token's row
// before its table rows are added (residual, shared and a normalised table's offsets), in one pass.
MOLE_AVX512 void start_row_avx512(const float* a0, const float* a1, const float* off, const float* w, int64_t E,
                                   int64_t D, float* a) {
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 k = D - d >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (D - d)) - 1);
    __m512 v = _mm512_add_ps(a0 != nullptr ? _mm512_maskz_loadu_ps(k, a0 + d) : _mm512_setzero_ps(),
                             a1 != nullptr ? _mm512_maskz_loadu_ps(k, a1 + d) : _mm512_setzero_ps());
    if (off != nullptr) {
      for (int64_t e = 0; e < E; ++e) v = _mm512_fmadd_ps(_mm512_set1_ps(w[e]), _mm512_maskz_loadu_ps(k, off + e * D + d), v);
    }
    _mm512_mask_storeu_ps(a + d, k, v);
  }
}

// coef[j] = scale * (code_j) for j < R, 8 codes (`bits` bytes) at a time: one 64-bit word shifted per lane.
MOLE_AVX512 void factored_coefs_avx512(const uint8_t* row, int64_t R, int bits, float scale, float* coef) {
  const int64_t payload = (R * bits + 7) / 8;
  const __m512i shifts = _mm512_set_epi64(7 * bits, 6 * bits, 5 * bits, 4 * bits, 3 * bits, 2 * bits, bits, 0);
  const __m512i mask = _mm512_set1_epi64((int64_t{1} << bits) - 1);
  const __m256 bias = _mm256_set1_ps(static_cast<float>(1 << (bits - 1))), s = _mm256_set1_ps(scale);
  for (int64_t j = 0; j < R; j += 8) {
    const int64_t byte = j / 8 * bits, have = std::min<int64_t>(8, payload - byte);  // no byte past the payload
    const __m128i raw = _mm_maskz_loadu_epi8(__mmask16((1u << have) - 1), row + byte);
    const __m512i codes = _mm512_and_si512(_mm512_srlv_epi64(_mm512_broadcastq_epi64(raw), shifts), mask);
    const __m256 f = _mm256_mul_ps(_mm256_sub_ps(_mm512_cvtepi64_ps(codes), bias), s);
    _mm256_mask_storeu_ps(coef + j, __mmask8(R - j >= 8 ? 0xFF : (1u << (R - j)) - 1), f);
  }
}

// ---- The same helpers with AVX2 + FMA + F16C (CPUs without AVX-512): 8-float vectors, the columns past the
// last multiple of 8 in scalar code. Without them a normalised table's int8 rows, its offsets and every factored
// row's coefficients ran in scalar code on those CPUs: the int8 part cost 2.5x its unnormalised sum.

MOLE_AVX2 void coef_basis_avx2(const float* coef, const float* basis, int64_t R, int64_t D, float* acc) {
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {  // 32 columns of acc in registers while every basis row streams past
    __m256 a0 = _mm256_loadu_ps(acc + d), a1 = _mm256_loadu_ps(acc + d + 8);
    __m256 a2 = _mm256_loadu_ps(acc + d + 16), a3 = _mm256_loadu_ps(acc + d + 24);
    for (int64_t j = 0; j < R; ++j) {
      const __m256 c = _mm256_set1_ps(coef[j]);
      const float* b = basis + j * D + d;
      a0 = _mm256_fmadd_ps(c, _mm256_loadu_ps(b), a0);
      a1 = _mm256_fmadd_ps(c, _mm256_loadu_ps(b + 8), a1);
      a2 = _mm256_fmadd_ps(c, _mm256_loadu_ps(b + 16), a2);
      a3 = _mm256_fmadd_ps(c, _mm256_loadu_ps(b + 24), a3);
    }
    _mm256_storeu_ps(acc + d, a0);
    _mm256_storeu_ps(acc + d + 8, a1);
    _mm256_storeu_ps(acc + d + 16, a2);
    _mm256_storeu_ps(acc + d + 24, a3);
  }
  for (; d + 8 <= D; d += 8) {
    __m256 a = _mm256_loadu_ps(acc + d);
    for (int64_t j = 0; j < R; ++j) a = _mm256_fmadd_ps(_mm256_set1_ps(coef[j]), _mm256_loadu_ps(basis + j * D + d), a);
    _mm256_storeu_ps(acc + d, a);
  }
  for (; d < D; ++d) {
    for (int64_t j = 0; j < R; ++j) acc[d] += coef[j] * basis[j * D + d];
  }
}

MOLE_AVX2 void mul_add_avx2(const float* x, const float* y, int64_t D, float* acc) {
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(_mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d), _mm256_loadu_ps(acc + d)));
  }
  for (; d < D; ++d) acc[d] += x[d] * y[d];
}

MOLE_AVX2 void int8_scaled_sum_avx2(const QuantLayout& q, const uint8_t* rows, int64_t E, const float* w,
                                     const float* cs, float* acc) {
  const int64_t D = q.D;
  for (int64_t e = 0; e < E; ++e) {
    const uint8_t* row = rows + e * q.row_bytes;
    const float* c = cs + e * D;
    float s;
    std::memcpy(&s, row + q.scale_offset, sizeof(s));
    const float ws = w[e] * s;
    const __m256 vws = _mm256_set1_ps(ws);
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      const __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + d))));
      _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(_mm256_mul_ps(vws, x), _mm256_loadu_ps(c + d), _mm256_loadu_ps(acc + d)));
    }
    for (; d < D; ++d) acc[d] += ws * static_cast<float>(static_cast<int8_t>(row[d])) * c[d];
  }
}

MOLE_AVX2 void start_row_avx2(const float* a0, const float* a1, const float* off, const float* w, int64_t E,
                               int64_t D, float* a) {
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    __m256 v = _mm256_add_ps(a0 != nullptr ? _mm256_loadu_ps(a0 + d) : _mm256_setzero_ps(),
                             a1 != nullptr ? _mm256_loadu_ps(a1 + d) : _mm256_setzero_ps());
    if (off != nullptr) {
      for (int64_t e = 0; e < E; ++e) v = _mm256_fmadd_ps(_mm256_set1_ps(w[e]), _mm256_loadu_ps(off + e * D + d), v);
    }
    _mm256_storeu_ps(a + d, v);
  }
  for (; d < D; ++d) {
    float v = (a0 != nullptr ? a0[d] : 0.f) + (a1 != nullptr ? a1[d] : 0.f);
    if (off != nullptr) {
      for (int64_t e = 0; e < E; ++e) v += w[e] * off[e * D + d];
    }
    a[d] = v;
  }
}

// 8 codes (`bits` <= 8 bytes) as two 32-bit words, codes 0-3 from the low word and 4-7 from the word 4 * bits
// further, each lane shifted by its own amount (AVX2 has no 64-bit lane to float conversion).
MOLE_AVX2 void factored_coefs_avx2(const uint8_t* row, int64_t R, int bits, float scale, float* coef) {
  const int64_t payload = (R * bits + 7) / 8;
  const __m256i shifts = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 0, bits, 2 * bits, 3 * bits);
  const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
  const __m256 bias = _mm256_set1_ps(static_cast<float>(1 << (bits - 1))), s = _mm256_set1_ps(scale);
  for (int64_t j = 0; j < R; j += 8) {
    const int64_t byte = j / 8 * bits;
    uint64_t word = 0;  // little-endian, as the codes are packed; no byte past the payload is read
    std::memcpy(&word, row + byte, static_cast<size_t>(std::min<int64_t>(8, payload - byte)));
    const int32_t lo = static_cast<int32_t>(word), hi = static_cast<int32_t>(word >> (4 * bits));
    const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(_mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi), shifts), mask);
    const __m256 f = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(codes), bias), s);
    if (R - j >= 8) {
      _mm256_storeu_ps(coef + j, f);
    } else {
      alignas(32) float last[8];
      _mm256_store_ps(last, f);
      std::copy(last, last + (R - j), coef + j);
    }
  }
}
#endif

void coef_basis(const float* coef, const float* basis, int64_t R, int64_t D, float* acc) {
#if MOLE_X86
  if (avx512()) return coef_basis_avx512(coef, basis, R, D, acc);
  if (avx2()) return coef_basis_avx2(coef, basis, R, D, acc);
#endif
  coef_basis_scalar(coef, basis, R, D, acc);
}

// The factored rows' product for n <= kTokenGroup tokens of part p at (layer, expert) blocks [b, b + E):
//   acc[t, d] += sum_e cs[e, d] * sum_j coef[t, e, j] * basis[b + e, j, d]
// coef: n x E x rank floats (weight * scale * code); cs: the layer's column scales [E, D], or null (1);
// acc: n rows of D. One pass over the basis for all n tokens: the float16 basis as the table stores it, widened
// in registers (AVX-512, AVX2), or its float32 copy (the scalar path: widening there, even once per group of
// tokens, made the call 1.7x slower than reading the copy). tmp: kTokenGroup * D floats (the scalar path's
// per-expert sums).
constexpr int kTokenGroup = 8;
void factored_product(const float* coef, int n, const MixedPart& p, int64_t b, const float* cs, int64_t E, int64_t D,
                      float* acc, float* tmp) {
  const int64_t R = p.rank;
#if MOLE_X86
  const c10::Half* basis = p.basis + b * R * D;
  if (avx512()) {
    const auto* h = reinterpret_cast<const uint16_t*>(basis);
    switch (n) {  // N * W >= 8 accumulators
      case 8: return factored_product_avx512<8, 2>(coef, h, cs, E, R, D, acc);
      case 7: return factored_product_avx512<7, 2>(coef, h, cs, E, R, D, acc);
      case 6: return factored_product_avx512<6, 2>(coef, h, cs, E, R, D, acc);
      case 5: return factored_product_avx512<5, 2>(coef, h, cs, E, R, D, acc);
      case 4: return factored_product_avx512<4, 2>(coef, h, cs, E, R, D, acc);
      case 3: return factored_product_avx512<3, 4>(coef, h, cs, E, R, D, acc);
      case 2: return factored_product_avx512<2, 4>(coef, h, cs, E, R, D, acc);
      default: return factored_product_avx512<1, 8>(coef, h, cs, E, R, D, acc);
    }
  }
  if (avx2()) {
    const auto* h = reinterpret_cast<const uint16_t*>(basis);
    switch (n) {  // N * W accumulators: >= 8 where 12 registers allow
      case 8: return factored_product_avx2<8, 1>(coef, h, cs, E, R, D, acc);
      case 7: return factored_product_avx2<7, 1>(coef, h, cs, E, R, D, acc);
      case 6: return factored_product_avx2<6, 2>(coef, h, cs, E, R, D, acc);
      case 5: return factored_product_avx2<5, 2>(coef, h, cs, E, R, D, acc);
      case 4: return factored_product_avx2<4, 2>(coef, h, cs, E, R, D, acc);
      case 3: return factored_product_avx2<3, 4>(coef, h, cs, E, R, D, acc);
      case 2: return factored_product_avx2<2, 4>(coef, h, cs, E, R, D, acc);
      default: return factored_product_avx2<1, 8>(coef, h, cs, E, R, D, acc);
    }
  }
#endif
  const float* wide = p.basis_f32 + b * R * D;
  float* sum = tmp;  // n x D: each token's sum over j for expert e
  for (int64_t e = 0; e < E; ++e) {
    std::fill(sum, sum + n * D, 0.f);
    for (int t = 0; t < n; ++t) coef_basis_scalar(coef + (t * E + e) * R, wide + e * R * D, R, D, sum + t * D);
    for (int t = 0; t < n; ++t) {
      for (int64_t d = 0; d < D; ++d) acc[t * D + d] += (cs != nullptr ? cs[e * D + d] : 1.f) * sum[t * D + d];
    }
  }
}

void mul_add(const float* x, const float* y, int64_t D, float* acc) {
#if MOLE_X86
  if (avx512()) return mul_add_avx512(x, y, D, acc);
  if (avx2()) return mul_add_avx2(x, y, D, acc);
#endif
  for (int64_t d = 0; d < D; ++d) acc[d] += x[d] * y[d];
}

// coef[j] = w * scale * code_j for one factored row (codes stored as code + 2^(bits-1), little-endian bits).
inline void factored_coefs(const MixedPart& p, const uint8_t* row, float w, float* coef) {
  uint16_t h;
  std::memcpy(&h, row + p.row_bytes - 2, sizeof(h));
  const float s = w * static_cast<float>(c10::Half(h, c10::Half::from_bits()));
  const int bits = static_cast<int>(p.bits);
#if MOLE_X86
  if (avx512()) return factored_coefs_avx512(row, p.rank, bits, s, coef);
  if (avx2()) return factored_coefs_avx2(row, p.rank, bits, s, coef);
#endif
  const uint32_t mask = (1u << bits) - 1;
  const int bias = 1 << (bits - 1);
  for (int64_t j = 0; j < p.rank; ++j) {
    const int64_t bit = j * bits;
    // The byte after a code's first byte is inside the row (the scale follows the payload).
    const uint32_t two = row[bit >> 3] | (uint32_t(row[(bit >> 3) + 1]) << 8);
    coef[j] = s * static_cast<float>(static_cast<int>((two >> (bit & 7)) & mask) - bias);
  }
}

// dst[d] = float(src[d]) (a float part's row).
void load_row(at::ScalarType dtype, const uint8_t* src, int64_t D, float* dst) {
  MOLE_DISPATCH_FLOATING_TYPES(dtype, "lut_gather_mixed", [&] {
    const scalar_t* s = reinterpret_cast<const scalar_t*>(src);
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(s[d]);
  });
}

}  // namespace

MixedTable make_mixed_table(const at::Tensor& rank, at::TensorList parts, c10::string_view formats,
                            at::IntArrayRef block_sizes, at::TensorList bases, int64_t dim,
                            const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& col_scale) {
  const char* op = "lut_gather_mixed";
  MixedTable m;
  MOLE_CHECK_ARG(rank.device().is_cpu() && rank.layout() == at::kStrided && rank.scalar_type() == at::kInt &&
                     rank.dim() == 1 && rank.is_contiguous(),
                 op, ": rank must be a contiguous 1-D int32 CPU tensor [V], got ", rank.scalar_type(), " ",
                 rank.sizes(), " on ", rank.device());
  MOLE_CHECK_ARG(!parts.empty(), op, ": parts must hold at least one table");
  MOLE_CHECK_ARG(dim >= 1, op, ": dim (D) must be >= 1, got ", dim);
  std::vector<std::string> names;
  {
    std::stringstream ss{std::string(formats.data(), formats.size())};
    for (std::string f; std::getline(ss, f, ',');) names.push_back(f);
  }
  MOLE_CHECK_ARG(names.size() == parts.size() && block_sizes.size() == parts.size(), op,
                 ": formats (comma-separated) and block_sizes need one entry per part (", parts.size(), "), got ",
                 names.size(), " and ", block_sizes.size());
  const at::Tensor& p0 = parts[0];
  MOLE_CHECK_ARG(p0.dim() == 3 || p0.dim() == 4, op, ": part 0 must be [n, L, E, x] or [n, E, x], got ", p0.sizes());
  m.V = rank.size(0);
  m.L = p0.dim() == 4 ? p0.size(1) : 1;
  m.E = p0.size(-2);
  m.D = dim;
  m.layered = p0.dim() == 4;
  m.rank = rank.const_data_ptr<int32_t>();
  m.keep.push_back(rank);
  int64_t start = 0;
  size_t basis_k = 0;
  for (size_t k = 0; k < parts.size(); ++k) {
    const at::Tensor& t = parts[k];
    MOLE_CHECK_ARG(t.device().is_cpu() && t.layout() == at::kStrided && t.is_contiguous() && t.dim() == p0.dim() &&
                       t.sizes().slice(1, t.dim() - 2) == p0.sizes().slice(1, p0.dim() - 2),
                   op, ": part ", k, " must be a contiguous CPU tensor of shape [n, ",
                   p0.sizes().slice(1, p0.dim() - 2), ", x], got ", t.sizes(), " on ", t.device());
    MixedPart p;
    p.rows = t.size(0);
    p.start = start;
    start = checked_add(start, p.rows, "lut_gather_mixed: rows of the parts");
    p.data = static_cast<const uint8_t*>(t.const_data_ptr());
    const std::string& f = names[k];
    if (f == "float") {
      MOLE_CHECK_ARG(is_float_dtype(t.scalar_type()) && t.size(-1) == dim, op, ": part ", k,
                     " (float) must be float32/float16/bfloat16 with D = ", dim, " values per row, got ",
                     t.scalar_type(), " ", t.sizes());
      p.kind = PartKind::kFloat;
      p.dtype = t.scalar_type();
      p.row_bytes = dim * static_cast<int64_t>(t.element_size());
    } else if (f == "factored") {
      p.kind = PartKind::kFactored;
      p.bits = block_sizes[k];
      MOLE_CHECK_ARG(p.bits >= 2 && p.bits <= 8, op, ": part ", k, " (factored): bits (its block_sizes entry) must be "
                     "in [2, 8], got ", p.bits);
      MOLE_CHECK_ARG(basis_k < bases.size(), op, ": bases needs one tensor per factored part (", basis_k + 1,
                     " or more), got ", bases.size());
      const at::Tensor& b = bases[basis_k++];
      MOLE_CHECK_ARG(b.device().is_cpu() && b.layout() == at::kStrided && b.scalar_type() == at::kHalf &&
                         b.is_contiguous() && b.dim() == p0.dim() &&
                         b.sizes().slice(0, b.dim() - 2) == p0.sizes().slice(1, p0.dim() - 2) && b.size(-1) == dim,
                     op, ": the basis of part ", k, " must be a contiguous float16 CPU tensor [",
                     p0.sizes().slice(1, p0.dim() - 2), ", rank, ", dim, "], got ", b.scalar_type(), " ", b.sizes());
      p.rank = b.size(-2);
      MOLE_CHECK_ARG(p.rank >= 1, op, ": the basis of part ", k, " has rank 0");
      p.basis = b.const_data_ptr<c10::Half>();
      if (!avx512() && !avx2()) {  // the scalar path reads a float32 copy (see factored_product)
        const at::Tensor wide = b.to(at::kFloat).contiguous();
        p.basis_f32 = wide.const_data_ptr<float>();
        m.keep.push_back(wide);
      }
      p.row_bytes = factored_row_bytes(p.rank, p.bits);
      MOLE_CHECK_ARG(t.scalar_type() == at::kByte && t.size(-1) == p.row_bytes, op, ": part ", k,
                     " (factored, rank ", p.rank, ", ", p.bits, " bits) must be uint8 rows of ", p.row_bytes,
                     " bytes, got ", t.scalar_type(), " ", t.sizes());
      m.keep.push_back(b);
    } else {
      p.kind = PartKind::kQuant;
      p.q = make_quant_layout(f, dim, block_sizes[k]);
      p.sum = dequant_sum_fn(p.q);
      p.row_bytes = p.q.row_bytes;
      MOLE_CHECK_ARG(t.scalar_type() == at::kByte && t.size(-1) == p.row_bytes, op, ": part ", k, " (", f,
                     ") must be uint8 rows of ", p.row_bytes, " bytes, got ", t.scalar_type(), " ", t.sizes());
    }
    p.token_bytes = m.L * m.E * p.row_bytes;
    m.parts.push_back(p);
    m.keep.push_back(t);
  }
  MOLE_CHECK_ARG(basis_k == bases.size(), op, ": bases has ", bases.size(), " tensors but the parts name ", basis_k,
                 " factored parts");
  MOLE_CHECK_ARG(start == m.V, op, ": rank has ", m.V, " ids but the parts hold ", start, " rows");
  MOLE_CHECK_ARG(offset.has_value() == col_scale.has_value(), op,
                 ": offset and col_scale go together (both float32 [L, E, D]) or not at all");
  if (offset.has_value()) {
    for (const at::Tensor* t : {&*offset, &*col_scale}) {
      MOLE_CHECK_ARG(t->device().is_cpu() && t->layout() == at::kStrided && t->scalar_type() == at::kFloat &&
                         t->is_contiguous() && t->numel() == m.L * m.E * m.D && t->size(-1) == m.D,
                     op, ": offset and col_scale must be contiguous float32 CPU tensors [L, E, D] = [", m.L, ", ", m.E,
                     ", ", m.D, "], got ", t->scalar_type(), " ", t->sizes());
      m.keep.push_back(*t);
    }
    m.offset = offset->const_data_ptr<float>();
    m.col_scale = col_scale->const_data_ptr<float>();
  }
  return m;
}

namespace {

// Where rank r's row lives: its part (the parts hold consecutive ranks from their `start`) and its row there.
inline MixedRow row_of_rank(const MixedTable& m, int64_t r) {
  int32_t k = 0;
  while (k + 1 < static_cast<int32_t>(m.parts.size()) && r >= m.parts[k + 1].start) ++k;
  return {k, r - m.parts[k].start};
}

}  // namespace

void locate_mixed(const MixedTable& m, const at::Tensor& ids, MixedRow* where) {
  const at::Tensor flat = ids.contiguous();
  const int64_t T = flat.numel();
  MOLE_DISPATCH_ID_TYPES(flat.scalar_type(), "lut_gather_mixed", [&] {
    const scalar_t* id = flat.const_data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      const int64_t v = static_cast<int64_t>(id[t]);
      MOLE_CHECK_ARG(v >= 0 && v < m.V, "lut_gather_mixed: ids contains ", v, " (at flat position ", t,
                     "), outside the table's vocabulary [0, ", m.V, ")");
      const int64_t r = m.rank[v];
      MOLE_CHECK_ARG(r >= 0 && r < m.V, "lut_gather_mixed: rank[", v, "] = ", r, " is outside [0, ", m.V,
                     ") (a corrupt rank map)");
      where[t] = row_of_rank(m, r);
    }
  });
}

namespace {

// acc[0, D) += sum_e w[e] * row(token at `at`, layer l, e) for a quantized or float part (a factored part's
// tokens are summed in groups: mixed_fused_cpu). tmp: scratch of D floats.
void part_sum(const MixedTable& m, MixedRow at, int64_t l, const float* w, float* acc, float* tmp) {
  const MixedPart& p = m.parts[at.part];
  const int64_t E = m.E, D = m.D;
  const uint8_t* rows = p.data + at.row * p.token_bytes + l * E * p.row_bytes;
  const float* cs = m.col_scale != nullptr ? m.col_scale + l * E * D : nullptr;
  if (p.kind == PartKind::kQuant && cs == nullptr) {
    for (int64_t e0 = 0; e0 < E; e0 += kExpertGroup) {
      p.sum(p.q, rows + e0 * p.row_bytes, std::min(kExpertGroup, E - e0), w + e0, 0, D, acc);
    }
    return;
  }
#if MOLE_X86
  if (p.kind == PartKind::kQuant && p.q.fmt == QFormat::kInt8) {
    if (avx512()) return int8_scaled_sum_avx512(p.q, rows, E, w, cs, acc);
    if (avx2()) return int8_scaled_sum_avx2(p.q, rows, E, w, cs, acc);
  }
#endif
  for (int64_t e = 0; e < E; ++e) {  // each expert's column scales: w_e * row_e decoded, then scaled into acc
    if (p.kind == PartKind::kQuant) {
      std::fill(tmp, tmp + D, 0.f);
      p.sum(p.q, rows + e * p.row_bytes, 1, w + e, 0, D, tmp);
    } else {
      load_row(p.dtype, rows + e * p.row_bytes, D, tmp);
      for (int64_t d = 0; d < D; ++d) tmp[d] *= w[e];
    }
    if (cs != nullptr) {
      mul_add(tmp, cs + e * D, D, acc);
    } else {
      for (int64_t d = 0; d < D; ++d) acc[d] += tmp[d];
    }
  }
}

// acc[0, D) += sum_e w[e] * offset[l, e] (a normalised table's column offsets).
void offset_sum(const MixedTable& m, int64_t l, const float* w, float* acc) {
  if (m.offset == nullptr) return;
  coef_basis(w, m.offset + l * m.E * m.D, m.E, m.D, acc);  // the E offset rows weighted: a product like a basis's
}

}  // namespace

namespace {

// dst[d] = row (l, e) of the token at `at` (dequantized, column scale and offset applied).
void mixed_row(const MixedTable& m, MixedRow at, int64_t l, int64_t e, float* dst, float* tmp) {
  const MixedPart& p = m.parts[at.part];
  const int64_t E = m.E, D = m.D;
  const uint8_t* row = p.data + at.row * p.token_bytes + (l * E + e) * p.row_bytes;
  const int64_t le = (l * E + e) * D;
  const float one = 1.f;
  std::fill(dst, dst + D, 0.f);
  switch (p.kind) {
    case PartKind::kQuant:
      p.sum(p.q, row, 1, &one, 0, D, dst);  // 1 * scale * code: one rounding, as dequantize
      break;
    case PartKind::kFactored:
      factored_coefs(p, row, 1.f, tmp);
      factored_product(tmp, 1, p, l * E + e, nullptr, 1, D, dst, tmp + p.rank);
      break;
    case PartKind::kFloat:
      load_row(p.dtype, row, D, dst);
      break;
  }
  if (m.offset != nullptr) {
    for (int64_t d = 0; d < D; ++d) dst[d] = dst[d] * m.col_scale[le + d] + m.offset[le + d];
  }
}

template <typename out_t>
void store(const float* src, out_t* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<out_t>(src[k]);
}

// Floats of one token's factored coefficients at one layer (E * rank, the largest factored part's; 1 without one).
int64_t coef_floats(const MixedTable& m) {
  int64_t n = 1;
  for (const MixedPart& p : m.parts) n = std::max(n, m.E * p.rank);
  return n;
}

// Floats of the rows path's scratch (lut_gather_mixed without weights): a row, its coefficients and
// factored_product's tmp.
int64_t row_scratch_floats(const MixedTable& m) {
  return m.D + coef_floats(m) + m.D;
}

}  // namespace

// Floats of mixed_fused_cpu's scratch per thread: the pending factored tokens' rows (kTokenGroup) and one more for
// the token at hand, the pending tokens' coefficients and factored_product's (and part_sum's) tmp.
int64_t fused_scratch_floats(const MixedTable& m) {
  return (kTokenGroup + 1) * m.D + kTokenGroup * coef_floats(m) + kTokenGroup * m.D;
}

void mixed_fused_cpu(const MixedTable& m, const MixedRow* where, int64_t T, int64_t l, const float* w,
                     const at::Tensor& out, const at::Tensor& add0, const at::Tensor& add1, bool parallel,
                     float* scratch) {
  const int64_t D = m.D, E = m.E;
  const int64_t S = coef_floats(m);
  const float* cs = m.col_scale != nullptr ? m.col_scale + l * E * D : nullptr;
  MOLE_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lut_gather_mixed", [&] {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
    const scalar_t* a0 = ptr(add0);
    const scalar_t* a1 = ptr(add1);
    scalar_t* o = out.data_ptr<scalar_t>();
    auto body = [&](int64_t begin, int64_t end) {
      // acc: the pending factored tokens' rows (kTokenGroup) and one more for the token at hand; coef: the
      // pending tokens' coefficients (E * rank each); tmp: scratch (fused_scratch_floats). A serial call may
      // bring its own.
      std::vector<float> buf(scratch != nullptr && !parallel ? 0 : static_cast<size_t>(fused_scratch_floats(m)));
      float* acc = buf.empty() ? scratch : buf.data();
      float* coef = acc + (kTokenGroup + 1) * D;
      float* tmp = coef + kTokenGroup * S;
      int64_t group[kTokenGroup];
      int n = 0;
      int32_t group_part = -1;
      auto start = [&](int64_t t, float* a) {  // a = add0[t] + add1[t] + the offsets' sum
#if MOLE_X86
        if constexpr (std::is_same_v<scalar_t, float>) {
          auto f = [](const scalar_t* x) { return reinterpret_cast<const float*>(x); };  // scalar_t is float
          const float* r0 = a0 ? f(a0 + t * D) : nullptr;
          const float* r1 = a1 ? f(a1 + t * D) : nullptr;
          const float* off = m.offset != nullptr ? m.offset + l * E * D : nullptr;
          if (avx512()) return start_row_avx512(r0, r1, off, w + t * E, E, D, a);
          if (avx2()) return start_row_avx2(r0, r1, off, w + t * E, E, D, a);
        }
#endif
        for (int64_t d = 0; d < D; ++d) {
          a[d] = (a0 ? static_cast<float>(a0[t * D + d]) : 0.f) + (a1 ? static_cast<float>(a1[t * D + d]) : 0.f);
        }
        offset_sum(m, l, w + t * E, a);
      };
      auto flush = [&]() {  // the pending tokens' coefficients times the layer's bases, in one pass over them
        if (n == 0) return;
        const MixedPart& p = m.parts[group_part];
        factored_product(coef, n, p, l * E, cs, E, D, acc, tmp);
        for (int i = 0; i < n; ++i) store(acc + i * D, o + group[i] * D, D);
        n = 0;
      };
      for (int64_t t = begin; t < end; ++t) {
        const MixedRow at = where[t];
        const MixedPart& p = m.parts[at.part];
        if (p.kind != PartKind::kFactored) {
          float* a = acc + kTokenGroup * D;
          start(t, a);
          part_sum(m, at, l, w + t * E, a, tmp);
          store(a, o + t * D, D);
          continue;
        }
        if (n > 0 && group_part != at.part) flush();
        group_part = at.part;
        start(t, acc + n * D);
        const uint8_t* rows = p.data + at.row * p.token_bytes + l * E * p.row_bytes;
        for (int64_t e = 0; e < E; ++e) {
          factored_coefs(p, rows + e * p.row_bytes, w[t * E + e], coef + (n * E + e) * p.rank);
        }
        group[n++] = t;
        if (n == kTokenGroup) flush();
      }
      flush();
    };
    if (parallel) {
      at::parallel_for(0, T, std::max<int64_t>(kTokenGroup, 8192 / std::max<int64_t>(1, E * D)), body);
    } else {
      body(0, T);
    }
  });
}

namespace {

std::vector<MixedRow> locate(const MixedTable& m, const at::Tensor& ids) {
  std::vector<MixedRow> where(static_cast<size_t>(ids.numel()));
  locate_mixed(m, ids, where.data());
  return where;
}

at::Tensor lut_gather_mixed_cpu(const at::Tensor& rank, at::TensorList parts, c10::string_view formats,
                                at::IntArrayRef block_sizes, at::TensorList bases, int64_t dim, const at::Tensor& ids,
                                const std::optional<at::Tensor>& weights, std::optional<int64_t> layer,
                                const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& col_scale,
                                std::optional<at::ScalarType> dtype, std::optional<int64_t> layer_end) {
  const char* op = "lut_gather_mixed";
  const MixedTable m = make_mixed_table(rank, parts, formats, block_sizes, bases, dim, offset, col_scale);
  MOLE_CHECK_ARG(ids.device().is_cpu() && ids.layout() == at::kStrided &&
                     (ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong),
                 op, ": ids must be an int32/int64 CPU tensor, got ", ids.scalar_type(), " on ", ids.device());
  const at::ScalarType out_dtype = dtype.value_or(at::kFloat);
  MOLE_CHECK_ARG(is_float_dtype(out_dtype), op, ": dtype must be float32, float16 or bfloat16, got ", out_dtype);
  const bool fused = weights.has_value();
  const auto [l0, nl] = resolve_layers({layer, layer_end}, m.L, fused, op);
  std::vector<int64_t> shape = ids.sizes().vec();
  const int64_t T = ids.numel(), E = m.E, D = m.D;
  if (fused) {
    std::vector<int64_t> want = shape;
    want.push_back(E);
    MOLE_CHECK_ARG(weights->sizes().vec() == want && is_float_dtype(weights->scalar_type()) &&
                       weights->device().is_cpu() && weights->layout() == at::kStrided,
                   op, ": weights must be a float CPU tensor of shape ids.shape + [E] = ", at::IntArrayRef(want),
                   ", got ", weights->scalar_type(), " ", weights->sizes());
    shape.push_back(D);
  } else {
    if (layer_end.has_value() || (!layer.has_value() && m.layered)) shape.push_back(nl);
    shape.push_back(E);
    shape.push_back(D);
  }
  at::Tensor out = at::empty(shape, ids.options().dtype(out_dtype));
  if (T == 0) return out;
  const std::vector<MixedRow> where = locate(m, ids);
  if (fused) {
    const at::Tensor w = kernel_weights(weights);
    mixed_fused_cpu(m, where.data(), T, l0, w.const_data_ptr<float>(), out, at::Tensor(), at::Tensor(), true,
                    nullptr);
    return out;
  }
  MOLE_DISPATCH_FLOATING_TYPES(out_dtype, "lut_gather_mixed", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t rows = nl * E;
    at::parallel_for(0, T * rows, std::max<int64_t>(1, 8192 / D), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(static_cast<size_t>(row_scratch_floats(m)));
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = i / rows, r = i % rows;
        mixed_row(m, where[t], l0 + r / E, r % E, buf.data(), buf.data() + D);
        store(buf.data(), o + i * D, D);
      }
    });
  });
  return out;
}

}  // namespace

namespace {

// A lean step's tokens, their softmax weights and its scratch live on the stack up to these sizes.
// 64 tokens, as lut_combine's lean path takes (its kStepWeights = 256 weights at E = 4): a B = 32 step too.
// kLeanScratch: fused_scratch_floats up to a factored part of E * rank = 752 at D = 128 (32 KB of stack).
constexpr int64_t kLeanTokens = 64, kLeanWeights = 256, kLeanScratch = 8192;

// A decode step's layer, the usual case only: a layer of a layered table, a few contiguous ids all in
// [0, V), x and the router weight of one float dtype (router_softmax_into), contiguous residual and shared of
// one float dtype and ids.shape + [D]. Why (as lut_combine's lean path, csrc/lut_combine.cpp): between two
// layers a decode step streams megabytes of weights through the caches, so the general path's checks,
// vectors, dispatched allocations and temporaries each cost a cache miss or more, and every byte the layer
// reads is a miss. So: nothing allocated but the result, nothing dispatched, and the tokens' rows, the
// layer's column scales and offsets and a factored part's basis prefetched before the router runs. The same
// sum as the general path (mixed_fused_cpu). Undefined for any other call, which the general path then runs
// or refuses, naming what is wrong.
at::Tensor mixed_step_lean(const MixedTable& m, const at::Tensor& ids, std::optional<int64_t> layer,
                           const at::Tensor& x, const at::Tensor& router_weight, const at::Tensor& residual,
                           const at::Tensor& shared) {
  const int64_t T = ids.numel(), E = m.E, D = m.D;
  if (!m.layered || !layer.has_value() || *layer < 0 || *layer >= m.L || T < 1 || T > kLeanTokens ||
      T * E > kLeanWeights || fused_scratch_floats(m) > kLeanScratch || ids.layout() != at::kStrided ||
      !ids.device().is_cpu() || !ids.is_contiguous() ||
      (ids.scalar_type() != at::kLong && ids.scalar_type() != at::kInt)) {
    return at::Tensor();
  }
  const at::ScalarType dtype = residual.scalar_type();
  if (!is_float_dtype(dtype) || !is_step_operand(residual, ids, D, dtype) || !is_step_operand(shared, ids, D, dtype)) {
    return at::Tensor();
  }
  const int64_t l = *layer;
  MixedRow where[kLeanTokens];
  bool in_range = true;
  MOLE_DISPATCH_ID_TYPES(ids.scalar_type(), "lut_combine_mixed", [&] {
    const scalar_t* id = ids.const_data_ptr<scalar_t>();
    for (int64_t t = 0; t < T && in_range; ++t) {
      const int64_t v = static_cast<int64_t>(id[t]);
      const int64_t r = v >= 0 && v < m.V ? m.rank[v] : -1;
      in_range = r >= 0 && r < m.V;
      if (!in_range) break;
      where[t] = row_of_rank(m, r);
    }
  });
  if (!in_range) return at::Tensor();  // the general path raises, naming the id (or the corrupt rank)
  // The layer's data, loading while the router runs: each token's rows, the column scales and offsets, and
  // the basis of each factored part a token reads (once per part).
  int32_t basis_of = -1;
  for (int64_t t = 0; t < T; ++t) {
    const MixedPart& p = m.parts[where[t].part];
    prefetch_span(p.data + where[t].row * p.token_bytes + l * E * p.row_bytes, E * p.row_bytes);
    if (p.kind == PartKind::kFactored && basis_of != where[t].part) {
      prefetch_span(p.basis + l * E * p.rank * D, E * p.rank * D * static_cast<int64_t>(sizeof(c10::Half)));
      basis_of = where[t].part;
    }
  }
  if (m.offset != nullptr) {
    prefetch_span(m.offset + l * E * D, E * D * static_cast<int64_t>(sizeof(float)));
    prefetch_span(m.col_scale + l * E * D, E * D * static_cast<int64_t>(sizeof(float)));
  }
  float w[kLeanWeights];
  if (router_weight.dim() != 2 || router_weight.size(0) != E || !is_step_operand(x, ids, router_weight.size(-1),
                                                                                   router_weight.scalar_type()) ||
      !router_softmax_into(x, router_weight, T, w)) {
    return at::Tensor();
  }
  at::Tensor out = at::detail::empty_cpu(residual.sizes(), dtype);  // the op's own allocator, undispatched
  float scratch[kLeanScratch];
  mixed_fused_cpu(m, where, T, l, w, out, residual, shared, /*parallel=*/false, scratch);
  return out;
}

}  // namespace

at::Tensor lut_combine_mixed_step_cpu(const MixedTable& m, const at::Tensor& ids, std::optional<int64_t> layer,
                                      const at::Tensor& x, const std::optional<at::Tensor>& router_weight,
                                      const std::optional<at::Tensor>& residual,
                                      const std::optional<at::Tensor>& shared) {
  const char* op = "lut_combine_mixed";
  if (router_weight.has_value() && residual.has_value() && shared.has_value()) {
    at::Tensor out = mixed_step_lean(m, ids, layer, x, *router_weight, *residual, *shared);
    if (out.defined()) return out;
  }
  MOLE_CHECK_ARG(ids.device().is_cpu() && ids.layout() == at::kStrided &&
                     (ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong),
                 op, ": ids must be an int32/int64 CPU tensor, got ", ids.scalar_type(), " on ", ids.device());
  const int64_t l = resolve_layers({layer, std::nullopt}, m.L, /*fused=*/true, op).first;
  const at::Tensor logits = router_weight.has_value() ? router_logits(x, *router_weight) : x;
  const int64_t T = ids.numel(), E = m.E, D = m.D;
  std::vector<int64_t> want = ids.sizes().vec();
  want.push_back(E);
  MOLE_CHECK_ARG(logits.sizes().vec() == want && is_float_dtype(logits.scalar_type()) && logits.device().is_cpu(), op,
                 ": logits must be a float CPU tensor of shape ids.shape + [E] = ", at::IntArrayRef(want), ", got ",
                 logits.scalar_type(), " ", logits.sizes());
  want.back() = D;
  at::ScalarType dtype = at::kFloat;
  for (const auto* t : {&residual, &shared}) {
    if (!t->has_value()) continue;
    MOLE_CHECK_ARG((*t)->sizes().vec() == want && is_float_dtype((*t)->scalar_type()) && (*t)->device().is_cpu(), op,
                   ": residual and shared must be float CPU tensors of shape ids.shape + [D] = ", at::IntArrayRef(want),
                   ", got ", (*t)->scalar_type(), " ", (*t)->sizes());
  }
  if (residual.has_value()) dtype = residual->scalar_type();
  else if (shared.has_value()) dtype = shared->scalar_type();
  at::Tensor out = at::detail::empty_cpu(want, dtype);  // the op's own allocator, undispatched
  if (T == 0) return out;
  auto term = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? as_contiguous(*t, dtype) : at::Tensor();
  };
  constexpr int64_t kStack = 64;  // a decode step's tokens: no allocation for where they are
  MixedRow stack[kStack];
  std::vector<MixedRow> heap;
  MixedRow* where = stack;
  if (T > kStack) {
    heap.resize(static_cast<size_t>(T));
    where = heap.data();
  }
  locate_mixed(m, ids, where);
  const std::vector<float> w = softmax_weights(logits, T, E);
  mixed_fused_cpu(m, where, T, l, w.data(), out, term(residual), term(shared), /*parallel=*/T > kStack, nullptr);
  return out;
}

void mixed_read_step(const at::Tensor& rank, at::IntArrayRef starts, const std::vector<RowCache*>& caches,
                     const at::Tensor& step_rank, const at::Tensor& ids) {
  const char* op = "MixedLookupTable (disk)";
  const size_t K = caches.size();
  MOLE_CHECK_ARG(K >= 1 && starts.size() == K, op, ": one start and row cache per part");
  const int64_t cap = row_cache_slots(*caches[0]);  // each part's slots: step_rank numbers part k's from k * cap
  for (const RowCache* c : caches) {
    MOLE_CHECK_ARG(row_cache_slots(*c) == cap, op, ": every part's row cache must hold as many rows (", cap, ")");
  }
  MOLE_CHECK_ARG(rank.scalar_type() == at::kInt && rank.is_contiguous() && step_rank.scalar_type() == at::kInt &&
                     step_rank.is_contiguous() && ids.device().is_cpu(),
                 op, ": rank maps must be contiguous int32 and ids on the CPU");
  const int64_t T = ids.numel(), V = rank.numel();
  MOLE_CHECK_ARG(T <= cap && step_rank.numel() == static_cast<int64_t>(K) * cap, op, ": a step of ", T,
                 " tokens needs as many slots per part (", cap, ")");
  const at::Tensor flat = as_contiguous(ids, at::kLong);
  const int64_t* id = flat.const_data_ptr<int64_t>();
  const int32_t* r = rank.const_data_ptr<int32_t>();
  std::vector<std::vector<int64_t>> local(K), pos(K);
  for (int64_t t = 0; t < T; ++t) {
    MOLE_CHECK_ARG(id[t] >= 0 && id[t] < V, "LookupTable: ids contains ", id[t], " (at flat position ", t,
                   "), outside the table's vocabulary [0, ", V, ")");
    const int64_t rk = r[id[t]];
    size_t k = 0;
    while (k + 1 < K && rk >= starts[k + 1]) ++k;
    local[k].push_back(rk - starts[k]);
    pos[k].push_back(t);
  }
  int32_t* out = step_rank.data_ptr<int32_t>();
  for (size_t k = 0; k < K; ++k) {
    const int64_t n = static_cast<int64_t>(local[k].size());
    if (n == 0) continue;
    at::Tensor lid = at::detail::empty_cpu({n}, at::kLong);
    std::copy(local[k].begin(), local[k].end(), lid.data_ptr<int64_t>());
    // The part's rows of the step through its row cache (csrc/lookup_table.cpp): read with pread the ones no
    // slot holds.
    const at::Tensor slot = std::get<0>(read_through_cache(*caches[k], lid, false));
    const int64_t* sl = slot.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) out[pos[k][i]] = static_cast<int32_t>(static_cast<int64_t>(k) * cap + sl[i]);
  }
}

namespace {

at::Tensor lut_combine_mixed_cpu(const at::Tensor& rank, at::TensorList parts, c10::string_view formats,
                                 at::IntArrayRef block_sizes, at::TensorList bases, int64_t dim, const at::Tensor& ids,
                                 const at::Tensor& logits, std::optional<int64_t> layer,
                                 const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& col_scale,
                                 const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shared) {
  const MixedTable m = make_mixed_table(rank, parts, formats, block_sizes, bases, dim, offset, col_scale);
  return lut_combine_mixed_step_cpu(m, ids, layer, logits, std::nullopt, residual, shared);
}

}  // namespace

}  // namespace mole

TORCH_LIBRARY_FRAGMENT(mole_kernels, m) {
  // Rows (weights=None) or sum_e weights[..., e] * row[..., layer, e, :] of a mixed-precision table
  // (see csrc/lut_gather_mixed_cpu.cpp): rank int32 [V]; parts [n_k, L, E, x] in rank order; formats
  // one name per part, comma-separated ("int8", "nf4", "q2", ..., "factored", "float"); block_sizes
  // one per part (a factored part: its bits; a float part: ignored); bases float16 [L, E, rank, D],
  // one per factored part (FactoredLUT.basis); offset/col_scale float32 [L, E, D] or None. The result
  // is `dtype` (float32 when None); float32 accumulation. An id outside [0, V) raises naming it.
  m.def(
      "lut_gather_mixed(Tensor rank, Tensor[] parts, str formats, int[] block_sizes, Tensor[] bases, int dim, "
      "Tensor ids, Tensor? weights=None, int? layer=None, Tensor? offset=None, Tensor? col_scale=None, "
      "ScalarType? dtype=None, int? layer_end=None) -> Tensor");
  // residual + shared + sum_e softmax(logits)_e * row[ids, layer, e, :] of a mixed table (the decode step's
  // layer call when something must see the op: torch.compile, a dispatch mode); the result has residual's
  // dtype (else shared's, else float32).
  m.def(
      "lut_combine_mixed(Tensor rank, Tensor[] parts, str formats, int[] block_sizes, Tensor[] bases, int dim, "
      "Tensor ids, Tensor logits, int? layer=None, Tensor? offset=None, Tensor? col_scale=None, "
      "Tensor? residual=None, Tensor? shared=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(mole_kernels, CPU, m) {
  m.impl("lut_gather_mixed", &mole::lut_gather_mixed_cpu);
  m.impl("lut_combine_mixed", &mole::lut_combine_mixed_cpu);
}
