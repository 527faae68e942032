// lut_gather_quant: gather from quantized tables (int8, fp8 e4m3, nf4), dequantizing in registers.
//
// A quantized table is one uint8 tensor [V, L, E, row_bytes] (or [V, E, row_bytes]), token-major
// like a float table. Each row (token, layer, expert) is self-contained:
//
//   [ payload: D codes (int8 / fp8: 1 byte each; nf4: 2 per byte, element 2k in the low nibble) ]
//   [ zero pad to a multiple of 4 ][ D / block_size float32 scales ][ zero pad to a multiple of 16 ]
//
// Why interleaved per row rather than payload and scales in parallel arrays: a token's rows for one
// layer (E rows) and for all layers (L*E rows) stay ONE contiguous byte range, so a zero-copy read
// over PCIe, a disk read or a staging DMA is one sequential stream of exactly the bytes needed,
// with no second small scattered read for the scales. The 16-byte row stride keeps every row's
// payload 16-byte aligned for vector loads; it costs at most 12 bytes per row (<= 3% at D = 768).
#pragma once

#include <c10/util/string_view.h>

#include <optional>
#include <vector>

#include "lut_gather.h"

namespace mole {

// kQ3 / kQ2 / kQ1: the low-bit codebook formats (dense codes, float16 scales; lut_gather_lowbit.h).
enum class QFormat : int { kInt8 = 0, kFp8E4M3 = 1, kNf4 = 2, kQ3 = 3, kQ2 = 4, kQ1 = 5 };
inline bool is_lowbit(QFormat f) { return f == QFormat::kQ3 || f == QFormat::kQ2 || f == QFormat::kQ1; }

// The 16 NormalFloat-4 levels (QLoRA, Dettmers et al. 2023; as in bitsandbytes), times absmax.
constexpr float kNf4Levels[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

// Byte layout of one quantized row (see the top of this file).
struct QuantLayout {
  QFormat fmt = QFormat::kInt8;
  int64_t D = 0;              // values per row
  int64_t block = 0;          // values per scale (int8: D)
  int64_t nblocks = 0;        // scales per row
  int64_t payload_bytes = 0;  // D, or ceil(D / 2) for nf4, ceil(D * bits / 8) for the low-bit formats
  int64_t scale_offset = 0;   // byte offset of the scales in the row (float32; float16 for low-bit formats)
  int64_t row_bytes = 0;      // row stride, a multiple of 16 (low-bit formats: of 2)
  int64_t codes_per_byte() const { return fmt == QFormat::kNf4 ? 2 : 1; }
};

// Parses the format name and checks dim / block_size. Throws ValueError naming the argument.
QuantLayout make_quant_layout(c10::string_view format, int64_t dim, int64_t block_size);

struct QuantPlan {
  QuantLayout q;
  int64_t T = 0, V = 0, L = 1, E = 0;
  bool fused = false;
  int64_t seg_row0 = 0;  // first row read within a token's L*E rows
  int64_t seg_rows = 0;  // rows read per token (rows form: E or L*E; fused: E)
  std::vector<int64_t> out_shape;
};

QuantPlan plan_lut_gather_quant(const at::Tensor& data, c10::string_view format, int64_t dim, int64_t block_size,
                                const at::Tensor& ids, const std::optional<at::Tensor>& weights, LayerSpan layers,
                                const char* op = "lut_gather_quant", const char* what = "weights");

// As check_gather_outputs (overlap included); returns the elements between consecutive tokens'
// results in `out`.
int64_t check_quant_outputs(const QuantPlan& plan, const at::Tensor& data, const at::Tensor& ids,
                            const std::optional<at::Tensor>& weights, const at::Tensor& out,
                            const std::optional<at::Tensor>& faults);

// How a format's rows are summed on a CPU: acc[k] += sum_e w[e] * deq(rows + e * row_bytes)[c0 + k] for
// k < n and E <= kExpertGroup rows (a token's rows of one layer are consecutive), the rows decoded and
// summed in registers and acc read and written once. Every fused CPU sum of a quantized table (the
// fused gather, lut_combine_quant, the decode step's lean path, the mixed table's parts) calls the
// routine dequant_sum_fn picks once per call: a new format plugs in there, with one routine
// (csrc/lut_gather_quant_cpu.cpp). There the AVX-512 routine of int8, fp8 and nf4 is written once over
// where its sums start and go (a float acc, or a token's out with its addends: fused_routine, which
// the fused gather uses so that its sums never leave registers).
constexpr int64_t kExpertGroup = 16;
using DequantSum = void (*)(const QuantLayout& q, const uint8_t* rows, int64_t E, const float* w, int64_t c0,
                            int64_t n, float* acc);
DequantSum dequant_sum_fn(const QuantLayout& q);

// The fused CPU gather behind lut_gather_quant(weights=) and lut_combine_quant (see fused_gather_cpu).
void fused_gather_quant_cpu(const QuantPlan& p, const at::Tensor& data, const at::Tensor& ids, const float* w,
                            const at::Tensor& out, const at::Tensor& add0, const at::Tensor& add1);

// A decode step's whole quantized lookup sum, on this thread and without checks (the lean path of
// csrc/lut_combine.cpp): out[t] = add0[t] + add1[t] + sum_e w[t * E + e] * deq(seg[t] + e * row_bytes)
// for t < T; out, add0 and add1 [T, D] contiguous of one float dtype (add0/add1 may be undefined).
void fused_step_quant_cpu(const QuantLayout& q, const uint8_t* const* seg, int64_t T, int64_t E, const float* w,
                          const at::Tensor& out, const at::Tensor& add0, const at::Tensor& add1);

// The instruction set the quantized CPU kernels use: "avx512" or "scalar" (MOLE_KERNELS_CPU_ISA caps it).
const char* quant_cpu_isa();

void lut_gather_quant_into_cpu(const at::Tensor& out, const at::Tensor& data, c10::string_view format, int64_t dim,
                               int64_t block_size, const at::Tensor& ids, const std::optional<at::Tensor>& weights,
                               std::optional<int64_t> layer, bool accumulate,
                               const std::optional<at::Tensor>& faults, std::optional<int64_t> layer_end);
#ifdef MOLE_WITH_CUDA
void lut_gather_quant_into_cuda(const at::Tensor& out, const at::Tensor& data, c10::string_view format, int64_t dim,
                                int64_t block_size, const at::Tensor& ids, const std::optional<at::Tensor>& weights,
                                std::optional<int64_t> layer, bool accumulate,
                                const std::optional<at::Tensor>& faults, std::optional<int64_t> layer_end);
#endif

// The functional form shared by every backend: allocate the result on ids' device, fill it.
template <auto Into>
at::Tensor lut_gather_quant_functional(const at::Tensor& data, c10::string_view format, int64_t dim,
                                       int64_t block_size, const at::Tensor& ids,
                                       const std::optional<at::Tensor>& weights, std::optional<int64_t> layer,
                                       std::optional<at::ScalarType> dtype, std::optional<int64_t> layer_end) {
  const QuantPlan plan = plan_lut_gather_quant(data, format, dim, block_size, ids, weights, {layer, layer_end});
  const at::ScalarType out_dtype = dtype.value_or(at::kFloat);
  MOLE_CHECK_ARG(is_float_dtype(out_dtype), "lut_gather_quant: dtype must be float32, float16 or bfloat16, got ",
                 out_dtype);
  at::Tensor out = at::empty(plan.out_shape, ids.options().dtype(out_dtype));
  Into(out, data, format, dim, block_size, ids, weights, layer, /*accumulate=*/false, /*faults=*/std::nullopt,
       layer_end);
  return out;
}

}  // namespace mole
