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

void check_table_and_ids(const char* op, const at::Tensor& table, const char* table_name, const at::Tensor& ids) {
  // A meta (or other) tensor has no memory to read: refuse it rather than return garbage.
  const std::pair<const char*, const at::Tensor*> args[] = {{table_name, &table}, {"ids", &ids}};
  for (const auto& [name, t] : args) {
    MOLE_CHECK_ARG(t->layout() == at::kStrided && (t->device().is_cpu() || t->device().is_cuda()), op, ": ", name,
                   " must be a dense tensor on the CPU or a CUDA device, got ", t->layout(), " on ", t->device());
  }
  MOLE_CHECK_ARG(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, op,
                 ": ids must be int32 or int64, got ", ids.scalar_type());
  const bool zero_copy = table.device().is_cpu() && ids.device().is_cuda();
  MOLE_CHECK_ARG(table.device() == ids.device() || zero_copy, op, ": ids must be on the table's device (",
                 table.device(), "), or on a CUDA device with a pinned CPU table (zero-copy); got ids on ",
                 ids.device());
}

std::vector<int64_t> check_weights_and_shape(const char* op, const at::Tensor& ids,
                                             const std::optional<at::Tensor>& weights, int64_t L, int64_t E,
                                             int64_t D, bool one_layer) {
  std::vector<int64_t> shape = ids.sizes().vec();
  if (weights.has_value()) {
    const at::Tensor& w = *weights;
    std::vector<int64_t> want = ids.sizes().vec();
    want.push_back(E);
    MOLE_CHECK_ARG(w.sizes().vec() == want, op, ": weights must have shape ids.shape + [E] = ", shape_str(want),
                   " (E = ", E, " experts in the table), got ", shape_str(w.sizes()));
    MOLE_CHECK_ARG(is_float_dtype(w.scalar_type()), op, ": weights must be float32, float16 or bfloat16, got ",
                   w.scalar_type());
    MOLE_CHECK_ARG(w.layout() == at::kStrided && w.device() == ids.device(), op, ": weights must be a dense tensor "
                   "on ids' device (", ids.device(), "), got ", w.layout(), " on ", w.device());
    // The CUDA kernels index experts with int.
    MOLE_CHECK_ARG(E <= std::numeric_limits<int32_t>::max(), op, ": at most 2^31-1 experts, got ", E);
    shape.push_back(D);
  } else {
    if (!one_layer) shape.push_back(L);
    shape.push_back(E);
    shape.push_back(D);
  }
  return shape;
}

void check_outputs(const char* op, const at::Tensor& table, const char* table_name, const at::Tensor& ids,
                   const std::optional<at::Tensor>& weights, const at::Tensor& out,
                   const std::optional<at::Tensor>& faults) {
  MOLE_CHECK_ARG(out.layout() == at::kStrided && out.device() == ids.device(), op,
                 ": out must be a dense tensor on ids' device (", ids.device(), "), got ", out.layout(), " on ",
                 out.device());
  // Contiguity also rules out internal overlap (an expanded, stride-0 out).
  MOLE_CHECK_ARG(out.is_contiguous(), op, ": out must be contiguous; got strides ", shape_str(out.strides()));
  const std::pair<const char*, const at::Tensor*> inputs[] = {{table_name, &table}, {"ids", &ids},
                                                              {"weights", weights ? &*weights : nullptr}};
  for (const auto& [name, t] : inputs) {
    if (t != nullptr) check_no_overlap(op, "out", out, name, *t);
  }
  if (!faults.has_value()) return;
  MOLE_CHECK_ARG(faults->scalar_type() == at::kLong && faults->numel() >= 1 && faults->is_contiguous(), op,
                 ": faults must be a contiguous int64 tensor with at least one element");
  MOLE_CHECK_ARG(faults->device() == ids.device(), op, ": faults must be on ids' device (", ids.device(), "), got ",
                 faults->device());
  for (const auto& [name, t] : inputs) {
    if (t != nullptr) check_no_overlap(op, "faults", *faults, name, *t);
  }
  check_no_overlap(op, "faults", *faults, "out", out);
}

GatherPlan plan_lut_gather(const at::Tensor& lut, const at::Tensor& ids,
                           const std::optional<at::Tensor>& weights,
                           std::optional<int64_t> layer) {
  check_table_and_ids("lut_gather", lut, "lut", ids);
  MOLE_CHECK_ARG(lut.dim() == 4 || lut.dim() == 3,
                 "lut_gather: lut must have shape [V, L, E, D] or [V, E, D], got ", shape_str(lut.sizes()));
  MOLE_CHECK_ARG(is_float_dtype(lut.scalar_type()),
                 "lut_gather: lut must be float32, float16 or bfloat16, got ", lut.scalar_type());
  MOLE_CHECK_ARG(lut.is_contiguous(),
                 "lut_gather: lut must be contiguous (token-major [V, L, E, D]); got strides ",
                 shape_str(lut.strides()), " (a copy of a large table is never made silently: call .contiguous())");

  GatherPlan p;
  p.V = lut.size(0);
  p.L = lut.dim() == 4 ? lut.size(1) : 1;
  p.E = lut.size(-2);
  p.D = lut.size(-1);
  p.T = ids.numel();
  // A table with V = 0 can have any other sizes: the row size is not bounded by its numel.
  p.row_elems = checked_mul(checked_mul(p.L, p.E, "lut_gather: L * E"), p.D, "lut_gather: L * E * D");
  p.fused = weights.has_value();
  if (layer.has_value()) {
    MOLE_CHECK_ARG(*layer >= 0 && *layer < p.L, "lut_gather: layer must be in [0, ", p.L, ") for a table with ",
                   p.L, " layers, got ", *layer);
  }
  MOLE_CHECK_ARG(!p.fused || layer.has_value() || p.L == 1,
                 "lut_gather: weights were given for a table with ", p.L,
                 " layers, so `layer` must say which layer to combine");
  const bool one_layer = layer.has_value() || lut.dim() == 3;
  p.seg_offset = layer.value_or(0) * p.E * p.D;  // < row_elems: no overflow
  p.seg_elems = one_layer ? p.E * p.D : p.row_elems;
  p.out_shape = check_weights_and_shape("lut_gather", ids, weights, p.L, p.E, p.D, one_layer);
  return p;
}

void check_gather_outputs(const GatherPlan& plan, const at::Tensor& lut, const at::Tensor& ids,
                          const std::optional<at::Tensor>& weights, const at::Tensor& out,
                          const std::optional<at::Tensor>& faults) {
  MOLE_CHECK_ARG(out.sizes().vec() == plan.out_shape, "lut_gather: out must have shape ",
                 shape_str(plan.out_shape), ", got ", shape_str(out.sizes()));
  if (plan.fused) {
    MOLE_CHECK_ARG(is_float_dtype(out.scalar_type()),
                   "lut_gather: out must be float32, float16 or bfloat16, got ", out.scalar_type());
  } else {
    MOLE_CHECK_ARG(out.scalar_type() == lut.scalar_type(), "lut_gather: out must have the table's dtype (",
                   lut.scalar_type(), ") when gathering rows, got ", out.scalar_type());
  }
  check_outputs("lut_gather", lut, "lut", ids, weights, out, faults);
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
  m.def("lut_gather(Tensor lut, Tensor ids, Tensor? weights=None, int? layer=None) -> Tensor");
  // The same into `out` (accumulate: out += result, fused form only). With `faults` (int64, on ids'
  // device), ids outside [0, V) read nothing (zero rows) and are counted into faults[0] without
  // synchronising, so the call can be captured in a CUDA graph. The functional op stays pure:
  // inductor cannot lower an op that returns a tensor and also mutates an optional argument.
  m.def(
      "lut_gather_out(Tensor(b!) out, Tensor lut, Tensor ids, Tensor? weights=None, int? layer=None, "
      "bool accumulate=False, Tensor(a!)? faults=None) -> ()");
  m.def("build_info() -> str", &mole::build_info_json);
}
