// Makes the op library importable as the Python module `ocrkernels._C`. Importing it runs the
// TORCH_LIBRARY registrations of the other translation units. The module holds one function,
// cpu_isa(): the instruction set the CPU kernels run with ("avx512", "avx2" or "baseline"; see
// cpu/gemm_kernels.h), so that benchmarks can say which one they measured.
// (The LibTorch build in CMakeLists.txt leaves this file out.)
#include <Python.h>

#include "cpu/gemm_kernels.h"

static PyObject* cpu_isa(PyObject*, PyObject*) {
  using ocrkernels::cpu::Isa;
  const Isa isa = ocrkernels::cpu::cpu_isa();
  return PyUnicode_FromString(isa == Isa::avx512 ? "avx512"
                              : isa == Isa::avx2 ? "avx2"
                                                 : "baseline");
}

static PyMethodDef ocrkernels_c_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The instruction set of the CPU kernels: 'avx512', 'avx2' or 'baseline'."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef ocrkernels_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                                 ocrkernels_c_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ocrkernels_c_module); }
