// lut_gather: shapes, validation and the per-backend entry points.
//
// A table is [V, L, E, D] (or [V, E, D], the case L = 1), C-contiguous and
// token-major: one token's rows for all layers are one block of L*E*D elements.
#pragma once

#include <algorithm>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"

namespace mole {

// Everything a kernel needs to address the table, derived once from the inputs.
struct GatherPlan {
  int64_t T = 0;           // number of ids (product of ids' shape)
  int64_t V = 0, L = 1, E = 0, D = 0;
  bool fused = false;       // weights given: out[t] = sum_e w[t,e] * row[t,e]
  int64_t row_elems = 0;    // elements per token: L*E*D
  int64_t layer0 = 0;       // first layer read
  int64_t layers = 1;       // layers read per token
  int64_t seg_offset = 0;   // offset of the part read, within a token's row
  int64_t seg_elems = 0;    // elements read per token (rows form)
  std::vector<int64_t> out_shape;
};

// Which layers a call reads: one (`layer`), a range [layer, layer_end) (rows form only, e.g. a
// prefetch that fills several layers with one launch), or all of them (both absent).
struct LayerSpan {
  std::optional<int64_t> layer;
  std::optional<int64_t> layer_end;
};

// Validates lut/ids/weights/layer (shapes, dtypes, contiguity, same device or
// zero-copy pair) and returns the plan. Throws ValueError naming the argument.
// (first layer, number of layers) a call reads; checks the span against L (`fused`: one layer only).
std::pair<int64_t, int64_t> resolve_layers(LayerSpan layers, int64_t L, bool fused, const char* op);

// Checks an optional fault counter: a contiguous int64 tensor with >= 1 element on ids' device.
void check_faults(const std::optional<at::Tensor>& faults, const at::Tensor& ids, const char* op);

// What every table format shares: ids, devices (CPU or CUDA, dense), counts (overflow-checked), the
// layer span, weights, the result shape.
// `table` is [V, L, E, x] or [V, E, x] (x = D for a float table, bytes per row for a quantized one);
// D is the hidden size.
GatherPlan plan_table(const at::Tensor& table, const char* table_name, const at::Tensor& ids,
                      const std::optional<at::Tensor>& weights, LayerSpan layers, int64_t D, const char* op,
                      const char* what);

// `what` names the weights argument in errors ("weights", or "logits" for lut_combine).
GatherPlan plan_lut_gather(const at::Tensor& lut, const at::Tensor& ids,
                           const std::optional<at::Tensor>& weights, LayerSpan layers,
                           const char* op = "lut_gather", const char* what = "weights");

// Checks `out` (shape, dtype, device, layout) and `faults` against the plan, and that neither
// shares memory with an input or the other. Returns the elements between consecutive tokens'
// results in `out`: the rows form may write into a view whose tokens are strided (a slice of a
// larger buffer; its layout rules out internal overlap); everything else is contiguous.
int64_t check_gather_outputs(const GatherPlan& plan, const at::Tensor& lut, const at::Tensor& ids,
                             const std::optional<at::Tensor>& weights, const at::Tensor& out,
                             const std::optional<at::Tensor>& faults);

// ValueError when `out` or `faults` shares memory with the table, ids, weights or each other
// (a conservative test on the byte ranges the tensors span).
void check_no_overlaps(const char* op, const at::Tensor& table, const char* table_name, const at::Tensor& ids,
                       const std::optional<at::Tensor>& weights, const at::Tensor& out,
                       const std::optional<at::Tensor>& faults);

// a * b, a + b; a ValueError naming `what` when the result does not fit in int64 (sizes that come
// from the caller or a file).
int64_t checked_mul(int64_t a, int64_t b, const char* what);
int64_t checked_add(int64_t a, int64_t b, const char* what);

// The per-token stride of a rows-form `out` whose inner `inner` elements per token are contiguous,
// or -1 when `out` has no such layout. Shared by the float and quantized gathers.
int64_t rows_out_stride(const at::Tensor& out, int64_t id_dims, int64_t inner);

// True when no row has to be read (no ids, E = 0 or D = 0); then `out` is already final
// (a fused sum over nothing is zero). Keeps zero-sized work away from the kernels.
bool nothing_to_read(const GatherPlan& plan, const at::Tensor& out, bool accumulate);

// Either raises (faults == nullopt) naming the first id outside [0, V), or adds
// the number of such ids to faults[0] (no synchronisation on CUDA).
void check_ids_cpu(const at::Tensor& ids, int64_t V, const std::optional<at::Tensor>& faults);

// The weights the kernels read: float32, contiguous. Small ([T, E]).
inline at::Tensor kernel_weights(const std::optional<at::Tensor>& weights) {
  return weights.has_value() ? as_contiguous(*weights, at::kFloat) : at::Tensor();
}

void lut_gather_into_cpu(const at::Tensor& out, const at::Tensor& lut, const at::Tensor& ids,
                         const std::optional<at::Tensor>& weights, std::optional<int64_t> layer,
                         bool accumulate, const std::optional<at::Tensor>& faults,
                         std::optional<int64_t> layer_end);
#ifdef MOLE_WITH_CUDA
void lut_gather_into_cuda(const at::Tensor& out, const at::Tensor& lut, const at::Tensor& ids,
                          const std::optional<at::Tensor>& weights, std::optional<int64_t> layer,
                          bool accumulate, const std::optional<at::Tensor>& faults,
                          std::optional<int64_t> layer_end);
#endif

// The scalar fused span: the fused gather's path on any CPU and the tail of every SIMD row, and
// the whole sum of a decode step's lean path (csrc/lut_combine.cpp).

// dst[j] = add0[j] + add1[j] + sum_e w[e] * row_e[j] for j < n (add0/add1 may be null; add0 may be dst).
template <typename lut_t, typename out_t>
inline void fused_span_scalar(const lut_t* base, int64_t D, int64_t E, const float* w, out_t* dst, int64_t n,
                       const out_t* add0, const out_t* add1) {
  // Expert-outer over an L1 tile, so the compiler can vectorise the inner loops.
  constexpr int64_t kTile = 256;
  float acc[kTile];
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t m = std::min(kTile, n - t0);
    for (int64_t j = 0; j < m; ++j) {
      acc[j] = (add0 ? static_cast<float>(add0[t0 + j]) : 0.f) + (add1 ? static_cast<float>(add1[t0 + j]) : 0.f);
    }
    for (int64_t e = 0; e < E; ++e) {
      const lut_t* row = base + e * D + t0;
      for (int64_t j = 0; j < m; ++j) acc[j] += w[e] * static_cast<float>(row[j]);
    }
    for (int64_t j = 0; j < m; ++j) dst[t0 + j] = static_cast<out_t>(acc[j]);  // round to nearest even
  }
}

// The fused CPU gather behind lut_gather(weights=) and lut_combine:
//   out[t] = add0[t] + add1[t] + sum_e w[t, e] * lut[ids[t], layer, e, :]
// `w`: float32 [T, E]; add0/add1: undefined, or [T, D] contiguous in out's dtype (add0 may be
// `out` itself: each element is read before it is written). An id outside [0, V) adds nothing.
void fused_gather_cpu(const GatherPlan& p, const at::Tensor& lut, const at::Tensor& ids, const float* w,
                      const at::Tensor& out, const at::Tensor& add0, const at::Tensor& add1);

}  // namespace mole

namespace mole {

// The functional form shared by every backend: allocate the result on ids' device, fill it.
template <auto Into>
at::Tensor lut_gather_functional(const at::Tensor& lut, const at::Tensor& ids,
                                 const std::optional<at::Tensor>& weights,
                                 std::optional<int64_t> layer, std::optional<int64_t> layer_end) {
  const GatherPlan plan = plan_lut_gather(lut, ids, weights, {layer, layer_end});
  at::Tensor out = at::empty(plan.out_shape, ids.options().dtype(lut.scalar_type()));
  Into(out, lut, ids, weights, layer, /*accumulate=*/false, /*faults=*/std::nullopt, layer_end);
  return out;
}

}  // namespace mole
