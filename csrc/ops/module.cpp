// The Python module streamkl._C. Importing it runs the static TORCH_LIBRARY registrations; it exposes
// no Python functions of its own (everything goes through torch.ops.streamkl).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "StreamKL native operators", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
