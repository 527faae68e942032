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
#pragma once

#include <cstdint>

#include "cpu_simd.h"

namespace mole {

struct QuantLayout;

// Lloyd-Max levels of a unit normal for 8 and 4 levels, divided by their largest level (the same
// float32 numbers as mole_kernels.quant.LOWBIT), padded to 16 for one-permute decoding.
constexpr float kQ3Levels[16] = {-1.0f, -0.6245400309562683f, -0.3513011038303375f, -0.11389870941638947f,
                                 0.11389870941638947f, 0.3513011038303375f, 0.6245400309562683f, 1.0f};
constexpr float kQ2Levels[16] = {-1.0f, -0.29978814721107483f, 0.29978814721107483f, 1.0f};
constexpr float kQ1Levels[16] = {-1.0f, 1.0f};

// Columns [c0, c0 + n) of one low-bit row: dst[k] = deq(c0 + k). `isa`: the instruction set the caller
// chose (usable here).
void lowbit_span_set(const QuantLayout& q, const uint8_t* row, int64_t c0, int64_t n, float* dst, CpuIsa isa);

// The low-bit formats' DequantSum (lut_gather_quant.h): acc[k] += sum_e w[e] * deq_e(c0 + k) over E rows
// q.row_bytes apart, E <= kExpertGroup, with the instruction set `isa`.
using LowbitSum = void (*)(const QuantLayout& q, const uint8_t* rows, int64_t E, const float* w, int64_t c0,
                           int64_t n, float* acc);
LowbitSum lowbit_sum_fn(const QuantLayout& q, CpuIsa isa);

}  // namespace mole
