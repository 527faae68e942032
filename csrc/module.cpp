// The Python module `mole_kernels._C`. It holds no functions: importing it loads
// this library, whose static initialisers register the torch ops
// (torch.ops.mole_kernels.*). Kept free of pybind11 so it compiles in seconds.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
