// Every schema of the mole_kernels op library, written once, and the input
// validation all backends share. Backends only say impl(name, key, fn).
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <limits>
#include <utility>

#include "lut_gather.h"

namespace mole {

namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

// The bytes [first, last + 1) that a strided tensor's elements span.
std::pair<uintptr_t, uintptr_t> byte_range(const at::Tensor& t) {
  int64_t lo = 0, hi = 0;  // element offsets of the lowest and highest element
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t reach = (t.size(d) - 1) * t.stride(d);
    (reach < 0 ? lo : hi) += reach;
  }
  const auto base = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const int64_t item = static_cast<int64_t>(t.element_size());
  return {base + lo * item, base + (hi + 1) * item};
}

// Conservative: two views that interleave without sharing an element count as overlapping.
bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.device() != b.device()) return false;
  const auto [a0, a1] = byte_range(a);
  const auto [b0, b1] = byte_range(b);
  return a0 < b1 && b0 < a1;
}

void check_no_overlap(const char* op, const char* written_name, const at::Tensor& written, const char* name,
                      const at::Tensor& other) {
  MOLE_CHECK_ARG(!may_overlap(written, other), op, ": ", written_name, " shares memory with ", name,
                 "; the kernel would read what it writes (pass a separate tensor)");
}

}  // namespace

int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  MOLE_CHECK_ARG(!c10::mul_overflows(a, b, &r), what, " overflows int64 (", a, " * ", b, ")");
  return r;
}

int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  MOLE_CHECK_ARG(!c10::add_overflows(a, b, &r), what, " overflows int64 (", a, " + ", b, ")");
  return r;
}

void check_no_overlaps(const char* op, const at::Tensor& table, const char* table_name, const at::Tensor& ids,
                       const std::optional<at::Tensor>& weights, const at::Tensor& out,
                       const std::optional<at::Tensor>& faults) {
  const std::pair<const char*, const at::Tensor*> inputs[] = {{table_name, &table}, {"ids", &ids},
                                                              {"weights", weights ? &*weights : nullptr}};
  for (const auto& [name, t] : inputs) {
    if (t == nullptr) continue;
    check_no_overlap(op, "out", out, name, *t);
    if (faults.has_value()) check_no_overlap(op, "faults", *faults, name, *t);
  }
  if (faults.has_value()) check_no_overlap(op, "faults", *faults, "out", out);
}

std::pair<int64_t, int64_t> resolve_layers(LayerSpan layers, int64_t L, bool fused, const char* op) {
  const auto& [layer, layer_end] = layers;
  if (layer.has_value()) {
    MOLE_CHECK_ARG(*layer >= 0 && *layer < L, op, ": layer must be in [0, ", L, ") for a table with ", L,
                   " layers, got ", *layer);
  }
  if (layer_end.has_value()) {
    MOLE_CHECK_ARG(!fused, op, ": a layer range needs the rows form (weights combine one layer)");
    MOLE_CHECK_ARG(layer.has_value(), op, ": layer_end needs layer (the first layer of the range)");
    MOLE_CHECK_ARG(*layer_end > *layer && *layer_end <= L, op, ": layer range [", *layer, ", ", *layer_end,
                   ") must be non-empty and inside [0, ", L, ")");
    return {*layer, *layer_end - *layer};
  }
  MOLE_CHECK_ARG(!fused || layer.has_value() || L == 1, op, ": ", "weights were given for a table with ", L,
                 " layers, so `layer` must say which layer to combine");
  if (layer.has_value()) return {*layer, 1};
  return {0, L};
}

void check_faults(const std::optional<at::Tensor>& faults, const at::Tensor& ids, const char* op) {
  if (!faults.has_value()) return;
  MOLE_CHECK_ARG(faults->scalar_type() == at::kLong && faults->numel() >= 1 && faults->is_contiguous(),
                 op, ": faults must be a contiguous int64 tensor with at least one element");
  MOLE_CHECK_ARG(faults->device() == ids.device(), op, ": faults must be on ids' device (", ids.device(),
                 "), got ", faults->device());
}

GatherPlan plan_table(const at::Tensor& table, const char* table_name, const at::Tensor& ids,
                      const std::optional<at::Tensor>& weights, LayerSpan layers, int64_t D, const char* op,
                      const char* what) {
  // A meta (or other) tensor has no memory to read: refuse it rather than return garbage.
  const std::pair<const char*, const at::Tensor*> args[] = {{table_name, &table}, {"ids", &ids}};
  for (const auto& [name, t] : args) {
    MOLE_CHECK_ARG(t->layout() == at::kStrided && (t->device().is_cpu() || t->device().is_cuda()), op, ": ", name,
                   " must be a dense tensor on the CPU or a CUDA device, got ", t->layout(), " on ", t->device());
  }
  MOLE_CHECK_ARG(table.is_contiguous(),
                 op, ": ", table_name, " must be contiguous (token-major [V, L, E, ...]); got strides ",
                 shape_str(table.strides()), " (a copy of a large table is never made silently: call .contiguous())");
  MOLE_CHECK_ARG(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
                 op, ": ids must be int32 or int64, got ", ids.scalar_type());
  const bool zero_copy = table.device().is_cpu() && ids.device().is_cuda();
  MOLE_CHECK_ARG(table.device() == ids.device() || zero_copy,
                 op, ": ids must be on the table's device (", table.device(), "), or on a CUDA device with a "
                 "pinned CPU table (zero-copy); got ids on ", ids.device());

  GatherPlan p;
  p.V = table.size(0);
  p.L = table.dim() == 4 ? table.size(1) : 1;
  p.E = table.size(-2);
  p.D = D;
  p.T = ids.numel();
  // With V = 0 the other sizes are not bounded by the table's numel; D may come from the caller.
  const int64_t rows = checked_mul(p.L, p.E, "L * E");
  p.row_elems = checked_mul(rows, p.D, "elements per token (L * E * D)");
  checked_mul(rows, table.size(-1), "bytes or elements per token (L * E * row size)");
  p.fused = weights.has_value();
  std::tie(p.layer0, p.layers) = resolve_layers(layers, p.L, p.fused, op);
  p.seg_offset = p.layer0 * p.E * p.D;
  p.seg_elems = p.layers * p.E * p.D;

  p.out_shape = ids.sizes().vec();
  if (p.fused) {
    const at::Tensor& w = *weights;
    std::vector<int64_t> want = ids.sizes().vec();
    want.push_back(p.E);
    MOLE_CHECK_ARG(w.sizes().vec() == want, op, ": ", what, " must have shape ids.shape + [E] = ",
                   shape_str(want), " (E = ", p.E, " experts in the table), got ", shape_str(w.sizes()));
    MOLE_CHECK_ARG(is_float_dtype(w.scalar_type()),
                   op, ": ", what, " must be float32, float16 or bfloat16, got ", w.scalar_type());
    MOLE_CHECK_ARG(w.layout() == at::kStrided && w.device() == ids.device(), op, ": ", what,
                   " must be a dense tensor on ids' device (", ids.device(), "), got ", w.layout(), " on ",
                   w.device());
    // The CUDA kernels index experts with int.
    MOLE_CHECK_ARG(p.E <= std::numeric_limits<int32_t>::max(), op, ": at most 2^31-1 experts, got ", p.E);
    p.out_shape.push_back(p.D);
  } else {
    if (layers.layer_end.has_value() || (!layers.layer.has_value() && table.dim() == 4)) p.out_shape.push_back(p.layers);
    p.out_shape.push_back(p.E);
    p.out_shape.push_back(p.D);
  }
  return p;
}

GatherPlan plan_lut_gather(const at::Tensor& lut, const at::Tensor& ids, const std::optional<at::Tensor>& weights,
                           LayerSpan layers, const char* op, const char* what) {
  MOLE_CHECK_ARG(lut.dim() == 4 || lut.dim() == 3,
                 op, ": lut must have shape [V, L, E, D] or [V, E, D], got ", shape_str(lut.sizes()));
  MOLE_CHECK_ARG(is_float_dtype(lut.scalar_type()),
                 op, ": lut must be float32, float16 or bfloat16, got ", lut.scalar_type());
  return plan_table(lut, "lut", ids, weights, layers, lut.size(-1), op, what);
}

int64_t rows_out_stride(const at::Tensor& out, int64_t id_dims, int64_t inner) {
  if (out.is_contiguous()) return inner;
  // A [T, ...] view into a larger buffer: every token's `inner` elements contiguous, tokens strided.
  if (id_dims != 1) return -1;
  int64_t expect = 1;
  for (int64_t d = out.dim() - 1; d >= 1; --d) {
    if (out.size(d) != 1 && out.stride(d) != expect) return -1;
    expect *= out.size(d);
  }
  return out.size(0) <= 1 ? inner : (out.stride(0) >= inner ? out.stride(0) : -1);
}

int64_t check_gather_outputs(const GatherPlan& plan, const at::Tensor& lut, const at::Tensor& ids,
                             const std::optional<at::Tensor>& weights, const at::Tensor& out,
                             const std::optional<at::Tensor>& faults) {
  MOLE_CHECK_ARG(out.sizes().vec() == plan.out_shape, "lut_gather: out must have shape ",
                 shape_str(plan.out_shape), ", got ", shape_str(out.sizes()));
  MOLE_CHECK_ARG(out.device() == ids.device(), "lut_gather: out must be on ids' device (", ids.device(), "), got ",
                 out.device());
  int64_t stride = plan.fused ? plan.D : plan.seg_elems;
  if (plan.fused) {
    MOLE_CHECK_ARG(out.is_contiguous(), "lut_gather: out must be contiguous");
    MOLE_CHECK_ARG(is_float_dtype(out.scalar_type()),
                   "lut_gather: out must be float32, float16 or bfloat16, got ", out.scalar_type());
  } else {
    stride = rows_out_stride(out, ids.dim(), plan.seg_elems);
    MOLE_CHECK_ARG(stride >= 0, "lut_gather: out must be contiguous, or a [T, ...] view (1-D ids) whose rows are "
                   "contiguous with tokens strided (a slice of a larger buffer); got strides ",
                   shape_str(out.strides()));
    MOLE_CHECK_ARG(out.scalar_type() == lut.scalar_type(), "lut_gather: out must have the table's dtype (",
                   lut.scalar_type(), ") when gathering rows, got ", out.scalar_type());
  }
  check_faults(faults, ids, "lut_gather");
  check_no_overlaps("lut_gather", lut, "lut", ids, weights, out, faults);
  return stride;
}

bool nothing_to_read(const GatherPlan& plan, const at::Tensor& out, bool accumulate) {
  if (plan.T > 0 && plan.E > 0 && plan.D > 0) return false;
  if (plan.fused && !accumulate) out.zero_();
  return true;
}

std::string build_info_json() {
  std::ostringstream os;
  os << "{\"torch\": \"" << MOLE_TORCH_VERSION << "\"";
#ifdef MOLE_WITH_CUDA
  os << ", \"cuda\": true, \"cuda_archs\": \"" << MOLE_CUDA_ARCHS << "\"";
#else
  os << ", \"cuda\": false, \"cuda_archs\": \"\", \"cuda_skipped\": \"" << MOLE_CUDA_SKIPPED << "\"";
#endif
  os << "}";
  return os.str();
}

}  // namespace mole

TORCH_LIBRARY(mole_kernels, m) {
  // Rows of `lut` for every id (weights=None), or sum_e weights[..., e] * row[..., layer, e, :].
  // An id outside [0, V) raises an error naming it.
  // layer_end: rows of layers [layer, layer_end) (rows form only).
  m.def("lut_gather(Tensor lut, Tensor ids, Tensor? weights=None, int? layer=None, int? layer_end=None) -> Tensor");
  // The same into `out` (accumulate: out += result, fused form only). With `faults` (int64, on ids'
  // device), ids outside [0, V) read nothing (zero rows) and are counted into faults[0] without
  // synchronising, so the call can be captured in a CUDA graph. The functional op stays pure:
  // inductor cannot lower an op that returns a tensor and also mutates an optional argument.
  m.def(
      "lut_gather_out(Tensor(b!) out, Tensor lut, Tensor ids, Tensor? weights=None, int? layer=None, "
      "bool accumulate=False, Tensor(a!)? faults=None, int? layer_end=None) -> ()");
  m.def("build_info() -> str", &mole::build_info_json);
}
