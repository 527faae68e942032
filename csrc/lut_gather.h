// lut_gather: shapes, validation and the per-backend entry points.
//
// A table is [V, L, E, D] (or [V, E, D], the case L = 1), C-contiguous and
// token-major: one token's rows for all layers are one block of L*E*D elements.
#pragma once

#include <optional>
#include <vector>

#include "common.h"

namespace mole {

// Everything a kernel needs to address the table, derived once from the inputs.
struct GatherPlan {
  int64_t T = 0;           // number of ids (product of ids' shape)
  int64_t V = 0, L = 1, E = 0, D = 0;
  bool fused = false;       // weights given: out[t] = sum_e w[t,e] * row[t,e]
  int64_t row_elems = 0;    // elements per token: L*E*D
  int64_t seg_offset = 0;   // offset of the part read, within a token's row
  int64_t seg_elems = 0;    // elements read per token (rows form)
  std::vector<int64_t> out_shape;
};

// Validates lut/ids/weights/layer (shapes, dtypes, contiguity, same device or
// zero-copy pair) and returns the plan. Throws ValueError naming the argument.
GatherPlan plan_lut_gather(const at::Tensor& lut, const at::Tensor& ids,
                           const std::optional<at::Tensor>& weights,
                           std::optional<int64_t> layer);

// Checks `out` (shape, dtype, device, contiguity) and `faults` against the plan, and that
// neither shares memory with an input or with the other.
void check_gather_outputs(const GatherPlan& plan, const at::Tensor& lut, const at::Tensor& ids,
                          const std::optional<at::Tensor>& weights, const at::Tensor& out,
                          const std::optional<at::Tensor>& faults);

// ---- checks shared by the float and quantized gathers; `op` and `table_name` name the call and
// the table argument in errors (ValueError) ------------------------------------------------------

// a * b, a + b; a ValueError naming `what` when the result does not fit in int64.
int64_t checked_mul(int64_t a, int64_t b, const char* what);
int64_t checked_add(int64_t a, int64_t b, const char* what);

// Both dense, on the CPU or CUDA (a meta tensor has nothing to read); ids int32/int64 on the
// table's device, or on CUDA with a CPU table (zero-copy).
void check_table_and_ids(const char* op, const at::Tensor& table, const char* table_name, const at::Tensor& ids);

// Checks weights ([*ids.shape, E], float, on ids' device) when given; returns the result's shape.
std::vector<int64_t> check_weights_and_shape(const char* op, const at::Tensor& ids,
                                             const std::optional<at::Tensor>& weights, int64_t L, int64_t E,
                                             int64_t D, bool one_layer);

// out: dense, contiguous, on ids' device; faults: contiguous int64 (>= 1 element) on ids' device;
// neither shares memory with the table, ids, weights or the other.
void check_outputs(const char* op, const at::Tensor& table, const char* table_name, const at::Tensor& ids,
                   const std::optional<at::Tensor>& weights, const at::Tensor& out,
                   const std::optional<at::Tensor>& faults);

// True when no row has to be read (no ids, E = 0 or D = 0); then `out` is already final
// (a fused sum over nothing is zero). Keeps zero-sized work away from the kernels.
bool nothing_to_read(const GatherPlan& plan, const at::Tensor& out, bool accumulate);

// Either raises (faults == nullopt) naming the first id outside [0, V), or adds
// the number of such ids to faults[0] (no synchronisation on CUDA).
void check_ids_cpu(const at::Tensor& ids, int64_t V, const std::optional<at::Tensor>& faults);

// The weights the kernels read: float32, contiguous. Small ([T, E]).
inline at::Tensor kernel_weights(const std::optional<at::Tensor>& weights) {
  return weights.has_value() ? weights->to(at::kFloat).contiguous() : at::Tensor();
}

void lut_gather_into_cpu(const at::Tensor& out, const at::Tensor& lut, const at::Tensor& ids,
                         const std::optional<at::Tensor>& weights, std::optional<int64_t> layer,
                         bool accumulate, const std::optional<at::Tensor>& faults);
#ifdef MOLE_WITH_CUDA
void lut_gather_into_cuda(const at::Tensor& out, const at::Tensor& lut, const at::Tensor& ids,
                          const std::optional<at::Tensor>& weights, std::optional<int64_t> layer,
                          bool accumulate, const std::optional<at::Tensor>& faults);
#endif

}  // namespace mole

namespace mole {

// The functional form shared by every backend: allocate the result on ids' device, fill it.
template <auto Into>
at::Tensor lut_gather_functional(const at::Tensor& lut, const at::Tensor& ids,
                                 const std::optional<at::Tensor>& weights,
                                 std::optional<int64_t> layer) {
  const GatherPlan plan = plan_lut_gather(lut, ids, weights, layer);
  at::Tensor out = at::empty(plan.out_shape, ids.options().dtype(lut.scalar_type()));
  Into(out, lut, ids, weights, layer, /*accumulate=*/false, /*faults=*/std::nullopt);
  return out;
}

}  // namespace mole
