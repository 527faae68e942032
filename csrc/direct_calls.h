// The C++ functions the Python module calls directly (csrc/module.cpp), past the dispatcher.
//
// Why: a decode step on a CPU calls lut_combine once per layer and reads its disk rows once per
// step. Through torch.ops (or a TorchScript method) each such call costs ~25-30 us inside a decode
// loop, whose other work evicts that call path from the caches, against ~6 us for a native torch
// op: at small shapes that alone made MoLE 10 % slower than dense. The functions here are the ones
// the ops run on a CPU (the decode step's usual case by a lean path of the same arithmetic, equal up
// to float32 rounding); mole_kernels/table/reader.py uses them when no torch.compile, dispatch mode
// or autograd would need to see the op (_C._plain_eager and torch.compiler.is_dynamo_compiling say so).
#pragma once

#include <ATen/ATen.h>

#include <c10/util/string_view.h>

#include <memory>
#include <optional>
#include <tuple>
#include <vector>

namespace mole {

// torch.ops.mole_kernels.lut_combine / lut_combine_quant on CPU tensors (csrc/lut_combine.cpp). The
// module's bindings also take the router weight, then computing the logits with router_logits below:
// the model's router matmul without a second call from Python.
at::Tensor lut_combine_cpu(const at::Tensor& lut, const at::Tensor& ids, const at::Tensor& logits,
                           std::optional<int64_t> layer, const std::optional<at::Tensor>& residual,
                           const std::optional<at::Tensor>& shared);
at::Tensor lut_combine_quant_cpu(const at::Tensor& data, c10::string_view format, int64_t dim, int64_t block_size,
                                 const at::Tensor& ids, const at::Tensor& logits, std::optional<int64_t> layer,
                                 const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shared,
                                 std::optional<at::ScalarType> dtype);

// torch.ops.mole_kernels.lut_gather / lut_gather_quant on CPU tensors (csrc/lut_gather_cpu.cpp,
// csrc/lut_gather_quant_cpu.cpp): the public lut_gather / quantized_lut_gather call them directly in plain
// eager mode. Through torch.ops a call's arguments cost more than a decode-sized gather itself: ~1 us
// for a torch.dtype argument alone (the binding's failed `__torch_function__` lookup on it).
at::Tensor lut_gather_cpu(const at::Tensor& lut, const at::Tensor& ids, const std::optional<at::Tensor>& weights,
                          std::optional<int64_t> layer, std::optional<int64_t> layer_end);
at::Tensor lut_gather_quant_cpu(const at::Tensor& data, c10::string_view format, int64_t dim, int64_t block_size,
                                const at::Tensor& ids, const std::optional<at::Tensor>& weights,
                                std::optional<int64_t> layer, std::optional<at::ScalarType> dtype,
                                std::optional<int64_t> layer_end);

// The model's layer call: lut_combine_cpu with the logits linear(x, router_weight) (x itself without
// a router weight); a decode step's usual case runs a lean path (csrc/lut_combine.cpp says why).
at::Tensor lut_combine_step_cpu(const at::Tensor& lut, const at::Tensor& ids, std::optional<int64_t> layer,
                                const at::Tensor& x, const std::optional<at::Tensor>& router_weight,
                                const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shared);

// The same for a quantized table (lut_combine_quant_cpu; the result dtype is residual's): the decode
// step's usual case dequantizes inside the lean path's fused row sum.
at::Tensor lut_combine_quant_step_cpu(const at::Tensor& data, c10::string_view format, int64_t dim,
                                      int64_t block_size, const at::Tensor& ids, std::optional<int64_t> layer,
                                      const at::Tensor& x, const std::optional<at::Tensor>& router_weight,
                                      const std::optional<at::Tensor>& residual,
                                      const std::optional<at::Tensor>& shared);

// linear(x, weight) for the router (x [*, D], weight [E, D]): a hand loop for decode-sized inputs, whose
// cost a GEMM library's fixed overhead would dwarf; at::linear beyond (csrc/lut_combine.cpp).
at::Tensor router_logits(const at::Tensor& x, const at::Tensor& weight);

// softmax(linear(x, weight)) into w [T, E] (float32), as the decode step's lean path computes it, for
// contiguous CPU x [*, K] (T rows) and weight [E, K] of one float dtype and T * E * K up to the hand loop's
// bound; false (w untouched) for any other call. No allocation: the mixed table's lean step shares it.
bool router_softmax_into(const at::Tensor& x, const at::Tensor& weight, int64_t T, float* w);

// The float32 softmax weights [T, E] of logits [*, E] (any float dtype and strides), max-subtracted, as
// lut_combine computes them (csrc/lut_combine.cpp); the mixed table's step shares them.
std::vector<float> softmax_weights(const at::Tensor& logits, int64_t T, int64_t E);

// Blocks until the storage reads a background read_through_cache left running under `ticket` are done, once
// (it also reports a read's failure or a changed file).
void wait_reads(int64_t ticket);

// A disk-tier reader's row cache (csrc/lookup_table.cpp says why): `slots` (uint8, whole rows of
// `row_bytes`) holds the rows of recent steps of the file named by `handle`. read_through_cache gives
// (each id's slot, in ids' shape; rows read from the file; ticket of the reads left running: `background`
// leaves the rows not in the page cache reading on threads of their own, so the step computes meanwhile; 0
// when none); drop_cached_rows makes the next step forget every row (thread-safe).
struct RowCache;
std::shared_ptr<RowCache> make_row_cache(int64_t handle, const at::Tensor& slots, int64_t row_bytes);
std::tuple<at::Tensor, int64_t, int64_t> read_through_cache(RowCache& cache, const at::Tensor& ids, bool background);
void drop_cached_rows(RowCache& cache);
int64_t row_cache_slots(const RowCache& cache);  // how many rows it holds at most

// The decode step's lean paths (lut_combine.cpp, lut_gather_mixed_cpu.cpp) share these two.
// Whether `t` is a contiguous CPU tensor of `dtype` and shape ids.shape + [last].
inline bool is_step_operand(const at::Tensor& t, const at::Tensor& ids, int64_t last, at::ScalarType dtype) {
  if (t.layout() != at::kStrided || !t.device().is_cpu() || t.scalar_type() != dtype || !t.is_contiguous() ||
      t.dim() != ids.dim() + 1 || t.size(-1) != last) {
    return false;
  }
  for (int64_t i = 0; i < ids.dim(); ++i) {
    if (t.size(i) != ids.size(i)) return false;
  }
  return true;
}

// Starts loading bytes [p, p + n) into the caches (no fault, no wait).
inline void prefetch_span(const void* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(static_cast<const char*>(p) + i, 0, 3);
}

}  // namespace mole
