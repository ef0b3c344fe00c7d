// The Python module fastlt._C. Importing it loads the op library (csrc/bindings.cpp). It also exposes the CUDA
// launchers directly so tests can check that they refuse CPU tensors cleanly on machines without a GPU.
#include <torch/extension.h>

#include "kernels.h"


PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlt compiled kernels (ops are registered under torch.ops.fastlt)";
#ifdef FASTLT_WITH_CUDA
  m.def("built_with_cuda", [] { return true; });
  auto cuda = m.def_submodule("cuda_launchers", "CUDA kernels, callable directly (they require CUDA tensors)");
  cuda.def("expert_aggregate", &fastlt::cuda::expert_aggregate);
  cuda.def("tau_normalize", &fastlt::cuda::tau_normalize);
  cuda.def("tau_sweep", &fastlt::cuda::tau_sweep);
  cuda.def("ride_loss", &fastlt::cuda::ride_loss);
  cuda.def("reslt_loss", &fastlt::cuda::reslt_loss);
  cuda.def("prior_shifted_ce", &fastlt::cuda::prior_shifted_ce);
#else
  m.def("built_with_cuda", [] { return false; });
#endif
}
