// The Python module `mole_kernels._C`. Importing it loads this library, whose static initialisers
// register the torch ops (torch.ops.mole_kernels.*). It also holds direct calls for the CPU decode
// path and the public gathers, past the dispatcher (csrc/direct_calls.h says why; the ops stay the public way), and
// the check that says when they may run.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "direct_calls.h"

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

// _read_unique_file(handle, ids, row_bytes, seg_offset, seg_bytes, strict, dst) -> (inverse, unique rows)
PyObject* read_unique_file(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 7, "_read_unique_file(handle, ids, row_bytes, seg_offset, seg_bytes, strict, dst)");
  TORCH_CHECK_TYPE(PyBool_Check(args[5]), "strict must be a bool");
  const at::Tensor& ids = tensor_arg(args[1], "ids");
  const at::Tensor& dst = tensor_arg(args[6], "dst");
  const int64_t handle = int_arg(args[0], "handle"), row_bytes = int_arg(args[2], "row_bytes");
  const int64_t seg_offset = int_arg(args[3], "seg_offset"), seg_bytes = int_arg(args[4], "seg_bytes");
  std::tuple<at::Tensor, int64_t> result;
  {
    pybind11::gil_scoped_release no_gil;  // file reads: let other Python threads run meanwhile
    result = mole::read_unique_file(handle, ids, row_bytes, seg_offset, seg_bytes, args[5] == Py_True, dst);
  }
  PyObject* inverse = THPVariable_Wrap(std::get<0>(result));
  if (inverse == nullptr) return nullptr;
  return Py_BuildValue("(NL)", inverse, static_cast<long long>(std::get<1>(result)));
  END_HANDLE_TH_ERRORS
}

// _plain_eager(ids) -> bool: whether nothing needs to see an op called with `ids`, so that the direct
// calls above may run instead: grad mode off, ids a plain tensor, no Python dispatch mode, no functorch
// transform (torch.compile is asked in Python, where dynamo answers it). One call, not four from Python:
// a decode step asks it first thing, when all of this code is cold.
PyObject* plain_eager(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 1, "_plain_eager(ids)");
  const bool plain = !at::GradMode::is_enabled() && THPVariable_CheckExact(args[0]) &&
                     c10::impl::TorchDispatchModeTLS::stack_len() == 0 &&
                     !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
  return PyBool_FromLong(plain);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"_lut_combine", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(lut_combine)), METH_FASTCALL,
     "torch.ops.mole_kernels.lut_combine on CPU tensors, called directly (the decode path)"},
    {"_lut_combine_quant", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(lut_combine_quant)),
     METH_FASTCALL, "torch.ops.mole_kernels.lut_combine_quant on CPU tensors, called directly (the decode path)"},
    {"_lut_gather", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(lut_gather)), METH_FASTCALL,
     "torch.ops.mole_kernels.lut_gather on plain CPU tensors, called directly (NotImplemented otherwise)"},
    {"_lut_gather_quant", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(lut_gather_quant)),
     METH_FASTCALL,
     "torch.ops.mole_kernels.lut_gather_quant on plain CPU tensors, called directly (NotImplemented otherwise)"},
    {"_read_unique_file", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(read_unique_file)),
     METH_FASTCALL, "TableStore.read_unique on the file named by a TableStore.handle(), called directly"},
    {"_plain_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plain_eager)), METH_FASTCALL,
     "whether a call with these ids may skip the dispatcher (eager, no grad, no dispatch mode or transform)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
