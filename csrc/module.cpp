// The Python module fastrlhf._C: importing it loads the library, whose TORCH_LIBRARY_FRAGMENT blocks
// register the CPU kernels as torch.ops.fastrlhf_cpp.*. It has no Python functions of its own.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
