// The Python module fastlt._C. Importing it loads the op library: each op's schema and CPU kernel are registered at
// the bottom of csrc/cpu/<op>.cpp, its CUDA kernel at the bottom of csrc/cuda/<op>.cu (docs/architecture.md).
#include <torch/extension.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlt compiled kernels (ops are registered under torch.ops.fastlt)";
#ifdef FASTLT_WITH_CUDA
  m.def("built_with_cuda", [] { return true; });
#else
  m.def("built_with_cuda", [] { return false; });
#endif
}
