// A mixed-precision table as the CPU kernels see it (csrc/lut_gather_mixed_cpu.cpp): parts keyed by
// frequency rank, each a quantized, factored or float table, with optional column normalisation.
#pragma once

#include <ATen/ATen.h>

#include <c10/util/string_view.h>

#include <optional>
#include <vector>

#include "direct_calls.h"
#include "lut_gather_quant.h"

namespace mole {

enum class PartKind { kQuant, kFactored, kFloat };

struct MixedPart {
  PartKind kind = PartKind::kQuant;
  QuantLayout q;               // kQuant: the format's row layout
  DequantSum sum = nullptr;    // kQuant: dequant_sum_fn(q)
  int64_t start = 0, rows = 0;  // ranks [start, start + rows)
  int64_t row_bytes = 0;       // bytes of one (token, layer, expert) row
  int64_t token_bytes = 0;     // bytes of one token's rows (L * E * row_bytes)
  int64_t rank = 0, bits = 0;  // kFactored: coefficients per row and their bits
  const uint8_t* data = nullptr;
  const c10::Half* basis = nullptr;  // kFactored: float16 [L, E, rank, D] (FactoredLUT.basis)
  const float* basis_f32 = nullptr;  // kFactored, scalar path only (no AVX-512 or AVX2): the basis widened to float32
  at::ScalarType dtype = at::kFloat;  // kFloat: the part's dtype
};

struct MixedTable {
  std::vector<at::Tensor> keep;  // the tensors the pointers below read (kept alive with the table)
  std::vector<MixedPart> parts;
  const int32_t* rank = nullptr;  // [V]
  int64_t V = 0, L = 1, E = 0, D = 0;
  bool layered = false;  // parts are [n, L, E, x] (not [n, E, x])
  const float* offset = nullptr;     // [L, E, D] or null
  const float* col_scale = nullptr;  // [L, E, D] or null (with offset)
};

// Where a token's rows are: its part and the row in it.
struct MixedRow {
  int32_t part = 0;
  int64_t row = 0;
};

// Checks the arguments of lut_gather_mixed (see its schema) and builds the table. ValueError naming what is wrong.
MixedTable make_mixed_table(const at::Tensor& rank, at::TensorList parts, c10::string_view formats,
                            at::IntArrayRef block_sizes, at::TensorList bases, int64_t dim,
                            const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& col_scale);

// where[t] for each id (any shape, int32/int64 CPU); ValueError naming an id outside [0, V).
void locate_mixed(const MixedTable& m, const at::Tensor& ids, MixedRow* where);

// out[t] = add0[t] + add1[t] + sum_e w[t, e] * row(t, l, e) for t < T; out/add0/add1 [T, D] contiguous of
// one float dtype (add0/add1 may be undefined). `parallel`: split tokens over threads. `scratch`: null, or (a
// serial call) fused_scratch_floats(m) floats the call may use instead of allocating its own.
void mixed_fused_cpu(const MixedTable& m, const MixedRow* where, int64_t T, int64_t l, const float* w,
                     const at::Tensor& out, const at::Tensor& add0, const at::Tensor& add1, bool parallel,
                     float* scratch);
int64_t fused_scratch_floats(const MixedTable& m);

// The decode step's layer call for a mixed table in RAM (mole_kernels._C._lut_combine_mixed): residual + shared
// + sum_e softmax(logits)_e * row(ids, layer, e), the logits linear(x, router_weight) (x itself without one).
at::Tensor lut_combine_mixed_step_cpu(const MixedTable& m, const at::Tensor& ids, std::optional<int64_t> layer,
                                      const at::Tensor& x, const std::optional<at::Tensor>& router_weight,
                                      const std::optional<at::Tensor>& residual,
                                      const std::optional<at::Tensor>& shared);

// A disk-tier step of a mixed table: each part's rows of `ids` through its row cache (`caches[k]`, over the
// part's file of [n_k, L, E, x] bytes and a staging buffer of `cap` tokens' rows, the same `cap` for every part;
// csrc/direct_calls.h), and step_rank[t] (int32 [K * cap]) set to k * cap + the row's slot in cache k for token
// t: a MixedTable over the staging buffers with rank step_rank then serves ids 0 .. T-1. `rank`: the table's
// int32 [V]; `starts`: each part's first rank. A bad id raises naming it.
void mixed_read_step(const at::Tensor& rank, at::IntArrayRef starts, const std::vector<RowCache*>& caches,
                     const at::Tensor& step_rank, const at::Tensor& ids);

}  // namespace mole
