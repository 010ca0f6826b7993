// Makes the op library importable as the Python module `ocrkernels._C`. Importing it runs the
// TORCH_LIBRARY registrations of the other translation units; the module itself is empty.
// (The LibTorch build in CMakeLists.txt leaves this file out.)
#include <Python.h>

static struct PyModuleDef ocrkernels_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                                 nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ocrkernels_c_module); }
