// The Python module `mole_kernels._C`. Importing it loads this library, whose static initialisers
// register the torch ops (torch.ops.mole_kernels.*). It also holds direct calls for the CPU decode
// path and the public gathers, past the dispatcher (csrc/direct_calls.h says why; the ops stay the public way), and
// the check that says when they may run.
#include <memory>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "direct_calls.h"
#include "lut_gather_mixed.h"

namespace {

const at::Tensor& tensor_arg(PyObject* o, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(o), name, " must be a tensor");
  return THPVariable_Unpack(o);
}

std::optional<at::Tensor> optional_tensor_arg(PyObject* o, const char* name) {
  if (o == Py_None) return std::nullopt;
  return tensor_arg(o, name);
}

int64_t int_arg(PyObject* o, const char* name) {
  TORCH_CHECK_TYPE(PyLong_Check(o) && !PyBool_Check(o), name, " must be an int");
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) throw python_error();
  return v;
}

std::optional<int64_t> optional_int_arg(PyObject* o, const char* name) {
  if (o == Py_None) return std::nullopt;
  return int_arg(o, name);
}

void check_count(Py_ssize_t n, Py_ssize_t want, const char* signature) {
  TORCH_CHECK_TYPE(n == want, "mole_kernels._C.", signature, " takes ", want, " positional arguments, got ", n);
}

// Whether a call may skip the dispatcher: nothing would see or change it. No Python dispatch or torch
// function mode, no functorch transform, and every tensor a plain CPU torch.Tensor (no subclass) that,
// with grad mode on, does not require grad (the ops have no autograd formula).
bool plain_cpu_call(std::initializer_list<PyObject*> tensors) {
  if (c10::impl::TorchDispatchModeTLS::stack_len() != 0 || at::impl::PythonTorchFunctionTLS::stack_len() != 0 ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode)) {
    return false;
  }
  const bool grad = at::GradMode::is_enabled();
  for (PyObject* o : tensors) {
    if (o == Py_None) continue;
    if (!THPVariable_CheckExact(o)) return false;
    const at::Tensor& t = THPVariable_Unpack(o);
    if (!t.device().is_cpu() || (grad && t.requires_grad())) return false;
  }
  return true;
}

// _lut_gather(lut, ids, weights, layer, layer_end) -> Tensor, or NotImplemented when the call must go
// through torch.ops.mole_kernels.lut_gather (see plain_cpu_call).
PyObject* lut_gather(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 5, "_lut_gather(lut, ids, weights, layer, layer_end)");
  if (!plain_cpu_call({args[0], args[1], args[2]})) Py_RETURN_NOTIMPLEMENTED;
  return THPVariable_Wrap(mole::lut_gather_cpu(tensor_arg(args[0], "lut"), tensor_arg(args[1], "ids"),
                                               optional_tensor_arg(args[2], "weights"),
                                               optional_int_arg(args[3], "layer"),
                                               optional_int_arg(args[4], "layer_end")));
  END_HANDLE_TH_ERRORS
}

c10::string_view str_arg(PyObject* o, const char* name) {
  TORCH_CHECK_TYPE(PyUnicode_Check(o), name, " must be a str");
  Py_ssize_t len = 0;
  const char* s = PyUnicode_AsUTF8AndSize(o, &len);  // cached in the str object: no copy
  if (s == nullptr) throw python_error();
  return c10::string_view(s, static_cast<size_t>(len));
}

// _lut_gather_quant(data, format, dim, block_size, ids, weights, layer, dtype, layer_end) -> Tensor, or
// NotImplemented when the call must go through torch.ops.mole_kernels.lut_gather_quant.
PyObject* lut_gather_quant(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 9, "_lut_gather_quant(data, format, dim, block_size, ids, weights, layer, dtype, layer_end)");
  if (!plain_cpu_call({args[0], args[4], args[5]})) Py_RETURN_NOTIMPLEMENTED;
  std::optional<at::ScalarType> dtype;
  if (args[7] != Py_None) {
    TORCH_CHECK_TYPE(THPDtype_Check(args[7]), "dtype must be a torch.dtype or None");
    dtype = reinterpret_cast<THPDtype*>(args[7])->scalar_type;
  }
  return THPVariable_Wrap(mole::lut_gather_quant_cpu(
      tensor_arg(args[0], "data"), str_arg(args[1], "format"), int_arg(args[2], "dim"),
      int_arg(args[3], "block_size"), tensor_arg(args[4], "ids"), optional_tensor_arg(args[5], "weights"),
      optional_int_arg(args[6], "layer"), dtype, optional_int_arg(args[8], "layer_end")));
  END_HANDLE_TH_ERRORS
}

// The argument order puts the table and ids first and then exactly what a model's layer passes
// (layer, x, residual, shared, router_weight), so functools.partial(_lut_combine, lut, ids) is the
// per-layer call itself, with no Python frame between the model and this function.

// _lut_combine(lut, ids, layer, logits_or_x, residual, shared, router_weight) -> Tensor
PyObject* lut_combine(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 7, "_lut_combine(lut, ids, layer, logits_or_x, residual, shared, router_weight)");
  return THPVariable_Wrap(mole::lut_combine_step_cpu(
      tensor_arg(args[0], "lut"), tensor_arg(args[1], "ids"), optional_int_arg(args[2], "layer"),
      tensor_arg(args[3], args[6] == Py_None ? "logits" : "x"), optional_tensor_arg(args[6], "router_weight"),
      optional_tensor_arg(args[4], "residual"), optional_tensor_arg(args[5], "shared")));
  END_HANDLE_TH_ERRORS
}

// _lut_combine_quant(data, format, dim, block_size, ids, layer, logits_or_x, residual, shared, router_weight)
PyObject* lut_combine_quant(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 10, "_lut_combine_quant(data, format, dim, block_size, ids, layer, logits_or_x, residual, shared, "
                     "router_weight)");
  return THPVariable_Wrap(mole::lut_combine_quant_step_cpu(
      tensor_arg(args[0], "data"), str_arg(args[1], "format"), int_arg(args[2], "dim"),
      int_arg(args[3], "block_size"), tensor_arg(args[4], "ids"), optional_int_arg(args[5], "layer"),
      tensor_arg(args[6], args[9] == Py_None ? "logits" : "x"), optional_tensor_arg(args[9], "router_weight"),
      optional_tensor_arg(args[7], "residual"), optional_tensor_arg(args[8], "shared")));
  END_HANDLE_TH_ERRORS
}

// A Python sequence (list or tuple) of tensors, or of ints.
std::vector<at::Tensor> tensors_arg(PyObject* o, const char* name) {
  TORCH_CHECK_TYPE(PyList_Check(o) || PyTuple_Check(o), name, " must be a list or tuple of tensors");
  std::vector<at::Tensor> out;
  for (Py_ssize_t i = 0, n = PySequence_Fast_GET_SIZE(o); i < n; ++i) {
    out.push_back(tensor_arg(PySequence_Fast_GET_ITEM(o, i), name));
  }
  return out;
}
std::vector<int64_t> ints_arg(PyObject* o, const char* name) {
  TORCH_CHECK_TYPE(PyList_Check(o) || PyTuple_Check(o), name, " must be a list or tuple of ints");
  std::vector<int64_t> out;
  for (Py_ssize_t i = 0, n = PySequence_Fast_GET_SIZE(o); i < n; ++i) {
    out.push_back(int_arg(PySequence_Fast_GET_ITEM(o, i), name));
  }
  return out;
}

// Opaque handles: a capsule owns one C++ object (deleted with it) and its name is the type check when a call
// reads it back (a wrong object raises instead of being misread).
template <typename T, const char* kName>
PyObject* owning_capsule(std::unique_ptr<T> object) {
  PyObject* capsule = PyCapsule_New(object.get(), kName, [](PyObject* c) {
    delete static_cast<T*>(PyCapsule_GetPointer(c, kName));
  });
  if (capsule != nullptr) object.release();
  return capsule;
}

template <typename T, const char* kName>
T& capsule_arg(PyObject* o) {
  auto* object = static_cast<T*>(PyCapsule_GetPointer(o, kName));
  if (object == nullptr) throw python_error();
  return *object;
}

constexpr char kMixedCapsule[] = "mole_kernels.MixedTable";

// _mixed_table(rank, parts, formats, block_sizes, bases, dim, offset, col_scale) -> an opaque handle: the
// arguments of lut_gather_mixed checked once and kept (with their tensors) for _lut_combine_mixed.
PyObject* mixed_table(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 8, "_mixed_table(rank, parts, formats, block_sizes, bases, dim, offset, col_scale)");
  TORCH_CHECK_TYPE(PyUnicode_Check(args[2]), "formats must be a str");
  Py_ssize_t len = 0;
  const char* formats = PyUnicode_AsUTF8AndSize(args[2], &len);
  if (formats == nullptr) throw python_error();
  const std::vector<at::Tensor> parts = tensors_arg(args[1], "parts"), bases = tensors_arg(args[4], "bases");
  const std::vector<int64_t> blocks = ints_arg(args[3], "block_sizes");
  return owning_capsule<mole::MixedTable, kMixedCapsule>(std::make_unique<mole::MixedTable>(mole::make_mixed_table(
      tensor_arg(args[0], "rank"), parts, c10::string_view(formats, static_cast<size_t>(len)), blocks, bases,
      int_arg(args[5], "dim"), optional_tensor_arg(args[6], "offset"), optional_tensor_arg(args[7], "col_scale"))));
  END_HANDLE_TH_ERRORS
}

// _lut_combine_mixed(table, ids, layer, logits_or_x, residual, shared, router_weight) -> Tensor (table: _mixed_table's)
PyObject* lut_combine_mixed(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 7, "_lut_combine_mixed(table, ids, layer, logits_or_x, residual, shared, router_weight)");
  const auto& table = capsule_arg<mole::MixedTable, kMixedCapsule>(args[0]);
  return THPVariable_Wrap(mole::lut_combine_mixed_step_cpu(
      table, tensor_arg(args[1], "ids"), optional_int_arg(args[2], "layer"),
      tensor_arg(args[3], args[6] == Py_None ? "logits" : "x"), optional_tensor_arg(args[6], "router_weight"),
      optional_tensor_arg(args[4], "residual"), optional_tensor_arg(args[5], "shared")));
  END_HANDLE_TH_ERRORS
}

constexpr char kRowCacheCapsule[] = "mole_kernels.RowCache";
using RowCacheHandle = std::shared_ptr<mole::RowCache>;  // as make_row_cache returns it

mole::RowCache& row_cache_arg(PyObject* o) { return *capsule_arg<RowCacheHandle, kRowCacheCapsule>(o); }

// A list or tuple of _row_cache handles (the sequence's caller holds them for the call).
std::vector<mole::RowCache*> row_caches_arg(PyObject* o, const char* name) {
  TORCH_CHECK_TYPE(PyList_Check(o) || PyTuple_Check(o), name, " must be a list or tuple of row caches");
  std::vector<mole::RowCache*> out;
  for (Py_ssize_t i = 0, n = PySequence_Fast_GET_SIZE(o); i < n; ++i) {
    out.push_back(&row_cache_arg(PySequence_Fast_GET_ITEM(o, i)));
  }
  return out;
}

// _mixed_read_step(rank, starts, caches, step_rank, ids) -> None (mixed_read_step; caches: _row_cache's)
PyObject* mixed_read_step(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 5, "_mixed_read_step(rank, starts, caches, step_rank, ids)");
  const std::vector<int64_t> starts = ints_arg(args[1], "starts");
  const std::vector<mole::RowCache*> caches = row_caches_arg(args[2], "caches");
  const at::Tensor& rank = tensor_arg(args[0], "rank");
  const at::Tensor& step_rank = tensor_arg(args[3], "step_rank");
  const at::Tensor& ids = tensor_arg(args[4], "ids");
  {
    pybind11::gil_scoped_release no_gil;  // file reads: let other Python threads run meanwhile
    mole::mixed_read_step(rank, starts, caches, step_rank, ids);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// A table's tally of its usual CPU steps (an int64 CPU tensor [3]: steps, ids, tokens whose rows were read), which
// _plain_eager and _read_cached count into and _take_tally empties; LookupTable.stats folds it in. Kept here
// because the same counts in Python objects cost ~0.6 % of a demo-sized decode step (cold attribute updates). The
// GIL is held wherever a tally changes, so counting and taking never interleave.
int64_t* tally_arg(PyObject* o) {
  const at::Tensor& t = tensor_arg(o, "tally");
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kLong && t.numel() == 3 && t.is_contiguous(),
                    "tally must be a contiguous int64 CPU tensor of 3 elements");
  return t.data_ptr<int64_t>();
}

// tally_arg, or null for None.
int64_t* optional_tally_arg(PyObject* o) { return o == Py_None ? nullptr : tally_arg(o); }

void count_step(int64_t* tally, int64_t ids, int64_t read) {
  if (tally == nullptr) return;
  tally[0] += 1;
  tally[1] += ids;
  tally[2] += read;
}

// _row_cache(handle, slots, row_bytes) -> an opaque handle: a disk-tier reader's cache of rows (direct_calls.h).
PyObject* row_cache(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 3, "_row_cache(handle, slots, row_bytes)");
  return owning_capsule<RowCacheHandle, kRowCacheCapsule>(std::make_unique<RowCacheHandle>(
      mole::make_row_cache(int_arg(args[0], "handle"), tensor_arg(args[1], "slots"), int_arg(args[2], "row_bytes"))));
  END_HANDLE_TH_ERRORS
}

// _read_cached(cache, ids, background, tally) -> (each id's slot, ticket of the reads left running: 0 for none);
// a tally (None: none) counts the step with the rows it read from the file.
PyObject* read_cached(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 4, "_read_cached(cache, ids, background, tally)");
  TORCH_CHECK_TYPE(PyBool_Check(args[2]), "background must be a bool");
  mole::RowCache& cache = row_cache_arg(args[0]);
  int64_t* tally = optional_tally_arg(args[3]);  // checked before any read starts
  const at::Tensor& ids = tensor_arg(args[1], "ids");
  std::tuple<at::Tensor, int64_t, int64_t> result;
  {
    pybind11::gil_scoped_release no_gil;  // file reads: let other Python threads run meanwhile
    result = mole::read_through_cache(cache, ids, args[2] == Py_True);
  }
  count_step(tally, ids.numel(), std::get<1>(result));
  PyObject* slots = THPVariable_Wrap(std::get<0>(result));
  if (slots == nullptr) return nullptr;
  return Py_BuildValue("(NL)", slots, static_cast<long long>(std::get<2>(result)));
  END_HANDLE_TH_ERRORS
}

// _drop_cached_rows(cache): the cache's next step forgets every row it holds (any thread may ask).
PyObject* drop_cached_rows(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 1, "_drop_cached_rows(cache)");
  mole::drop_cached_rows(row_cache_arg(args[0]));
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// _wait_reads(ticket): blocks until a background _read_cached's reads are done (raises their error).
PyObject* wait_reads(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 1, "_wait_reads(ticket)");
  const int64_t ticket = int_arg(args[0], "ticket");
  {
    pybind11::gil_scoped_release no_gil;
    mole::wait_reads(ticket);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// _plain_eager(ids, tally=None) -> bool: whether nothing needs to see an op called with `ids`, so that the
// direct calls above may run instead: grad mode off, ids a plain tensor, no Python dispatch mode, no functorch
// transform (torch.compile is asked in Python, where dynamo answers it). One call, not four from Python:
// a decode step asks it first thing, when all of this code is cold. A plain call counts itself in `tally` as a
// step reading every id's rows in place (a table in RAM).
PyObject* plain_eager(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(n == 1 || n == 2, "mole_kernels._C._plain_eager(ids, tally=None) takes 1 or 2 positional "
                   "arguments, got ", n);
  const bool plain = !at::GradMode::is_enabled() && THPVariable_CheckExact(args[0]) &&
                     c10::impl::TorchDispatchModeTLS::stack_len() == 0 &&
                     !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
  if (plain && n == 2) {
    const int64_t ids = THPVariable_Unpack(args[0]).numel();
    count_step(optional_tally_arg(args[1]), ids, ids);
  }
  return PyBool_FromLong(plain);
  END_HANDLE_TH_ERRORS
}

// _take_tally(tally) -> (steps, ids, tokens read): what was counted into `tally` since the last call; zeroes it.
PyObject* take_tally(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 1, "_take_tally(tally)");
  int64_t* tally = tally_arg(args[0]);
  const long long steps = tally[0], ids = tally[1], read = tally[2];
  tally[0] = tally[1] = tally[2] = 0;
  return Py_BuildValue("(LLL)", steps, ids, read);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"_lut_combine", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(lut_combine)), METH_FASTCALL,
     "torch.ops.mole_kernels.lut_combine on CPU tensors, called directly (the decode path)"},
    {"_lut_combine_quant", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(lut_combine_quant)),
     METH_FASTCALL, "torch.ops.mole_kernels.lut_combine_quant on CPU tensors, called directly (the decode path)"},
    {"_mixed_table", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(mixed_table)), METH_FASTCALL,
     "the arguments of torch.ops.mole_kernels.lut_gather_mixed checked once, as a handle for _lut_combine_mixed"},
    {"_lut_combine_mixed", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(lut_combine_mixed)),
     METH_FASTCALL, "a mixed table's decode-step layer call (residual + shared + the fused gather), called directly"},
    {"_mixed_read_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(mixed_read_step)),
     METH_FASTCALL, "a disk-tier mixed table's step: each part's unique rows read into its staging"},
    {"_lut_gather", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(lut_gather)), METH_FASTCALL,
     "torch.ops.mole_kernels.lut_gather on plain CPU tensors, called directly (NotImplemented otherwise)"},
    {"_lut_gather_quant", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(lut_gather_quant)),
     METH_FASTCALL,
     "torch.ops.mole_kernels.lut_gather_quant on plain CPU tensors, called directly (NotImplemented otherwise)"},
    {"_row_cache", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(row_cache)), METH_FASTCALL,
     "a disk-tier reader's cache of recent rows over its staging, for _read_cached"},
    {"_read_cached", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(read_cached)), METH_FASTCALL,
     "a disk-tier step's rows through a reader's row cache: each id's slot (rows no slot holds read from the file)"},
    {"_drop_cached_rows", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(drop_cached_rows)),
     METH_FASTCALL, "makes a row cache's next step forget every row it holds"},
    {"_wait_reads", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(wait_reads)), METH_FASTCALL,
     "waits for the storage reads a background _read_cached left running"},
    {"_plain_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plain_eager)), METH_FASTCALL,
     "whether a call with these ids may skip the dispatcher (eager, no grad, no dispatch mode or transform)"},
    {"_take_tally", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(take_tally)), METH_FASTCALL,
     "(steps, ids, tokens read) counted into a table's tally since the last call; zeroes it"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
