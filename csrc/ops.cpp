// Every schema of the mole_kernels op library, written once, and the input
// validation all backends share. Backends only say impl(name, key, fn).
#include <torch/library.h>

#include "lut_gather.h"

namespace mole {

namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

}  // namespace

GatherPlan plan_lut_gather(const at::Tensor& lut, const at::Tensor& ids,
                           const std::optional<at::Tensor>& weights,
                           std::optional<int64_t> layer) {
  MOLE_CHECK_ARG(lut.dim() == 4 || lut.dim() == 3,
                 "lut_gather: lut must have shape [V, L, E, D] or [V, E, D], got ", shape_str(lut.sizes()));
  MOLE_CHECK_ARG(is_float_dtype(lut.scalar_type()),
                 "lut_gather: lut must be float32, float16 or bfloat16, got ", lut.scalar_type());
  MOLE_CHECK_ARG(lut.is_contiguous(),
                 "lut_gather: lut must be contiguous (token-major [V, L, E, D]); got strides ",
                 shape_str(lut.strides()), " (a copy of a large table is never made silently: call .contiguous())");
  MOLE_CHECK_ARG(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
                 "lut_gather: ids must be int32 or int64, got ", ids.scalar_type());
  const bool zero_copy = lut.device().is_cpu() && ids.device().is_cuda();
  MOLE_CHECK_ARG(lut.device() == ids.device() || zero_copy,
                 "lut_gather: ids must be on the table's device (", lut.device(), "), or on a CUDA device with a "
                 "pinned CPU table (zero-copy); got ids on ", ids.device());

  GatherPlan p;
  p.V = lut.size(0);
  p.L = lut.dim() == 4 ? lut.size(1) : 1;
  p.E = lut.size(-2);
  p.D = lut.size(-1);
  p.T = ids.numel();
  p.row_elems = p.L * p.E * p.D;
  p.fused = weights.has_value();
  if (layer.has_value()) {
    MOLE_CHECK_ARG(*layer >= 0 && *layer < p.L, "lut_gather: layer must be in [0, ", p.L, ") for a table with ",
                   p.L, " layers, got ", *layer);
  }
  MOLE_CHECK_ARG(!p.fused || layer.has_value() || p.L == 1,
                 "lut_gather: weights were given for a table with ", p.L,
                 " layers, so `layer` must say which layer to combine");
  const bool one_layer = layer.has_value() || lut.dim() == 3;
  p.seg_offset = layer.value_or(0) * p.E * p.D;
  p.seg_elems = one_layer ? p.E * p.D : p.row_elems;

  p.out_shape = ids.sizes().vec();
  if (p.fused) {
    const at::Tensor& w = *weights;
    std::vector<int64_t> want = ids.sizes().vec();
    want.push_back(p.E);
    MOLE_CHECK_ARG(w.sizes().vec() == want, "lut_gather: weights must have shape ids.shape + [E] = ",
                   shape_str(want), " (E = ", p.E, " experts in the table), got ", shape_str(w.sizes()));
    MOLE_CHECK_ARG(is_float_dtype(w.scalar_type()),
                   "lut_gather: weights must be float32, float16 or bfloat16, got ", w.scalar_type());
    MOLE_CHECK_ARG(w.device() == ids.device(), "lut_gather: weights must be on ids' device (", ids.device(),
                   "), got ", w.device());
    p.out_shape.push_back(p.D);
  } else {
    if (!one_layer) p.out_shape.push_back(p.L);
    p.out_shape.push_back(p.E);
    p.out_shape.push_back(p.D);
  }
  return p;
}

void check_gather_outputs(const GatherPlan& plan, const at::Tensor& lut, const at::Tensor& ids,
                          const at::Tensor& out, const std::optional<at::Tensor>& faults) {
  MOLE_CHECK_ARG(out.sizes().vec() == plan.out_shape, "lut_gather: out must have shape ",
                 shape_str(plan.out_shape), ", got ", shape_str(out.sizes()));
  MOLE_CHECK_ARG(out.device() == ids.device(), "lut_gather: out must be on ids' device (", ids.device(), "), got ",
                 out.device());
  MOLE_CHECK_ARG(out.is_contiguous(), "lut_gather: out must be contiguous");
  if (plan.fused) {
    MOLE_CHECK_ARG(is_float_dtype(out.scalar_type()),
                   "lut_gather: out must be float32, float16 or bfloat16, got ", out.scalar_type());
  } else {
    MOLE_CHECK_ARG(out.scalar_type() == lut.scalar_type(), "lut_gather: out must have the table's dtype (",
                   lut.scalar_type(), ") when gathering rows, got ", out.scalar_type());
  }
  if (faults.has_value()) {
    MOLE_CHECK_ARG(faults->scalar_type() == at::kLong && faults->numel() >= 1 && faults->is_contiguous(),
                   "lut_gather: faults must be a contiguous int64 tensor with at least one element");
    MOLE_CHECK_ARG(faults->device() == ids.device(), "lut_gather: faults must be on ids' device (", ids.device(),
                   "), got ", faults->device());
  }
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
