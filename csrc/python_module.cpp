// Makes the shared library importable as `tsbn_kernels._C`; importing it runs the TORCH_LIBRARY
// registrations. No Python bindings are needed: every op is reached through torch.ops.tsbn.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
