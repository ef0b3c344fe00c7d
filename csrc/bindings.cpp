// The fastlt op library: every schema, and the CPU (and, when built, CUDA) kernels registered against it.
// Autograd and fake (meta) implementations are registered from Python in fastlt/ops/<op>.py.
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY(fastlt, m) {
  m.def("expert_aggregate(Tensor logits, str reduce, Tensor? weights, Tensor? active) -> Tensor");
  m.def(
      "expert_aggregate_backward(Tensor grad, Tensor logits, str reduce, Tensor? weights, Tensor? active, "
      "bool weights_requires_grad) -> (Tensor, Tensor)");
  m.def("tau_normalize(Tensor weight, float tau, float eps) -> Tensor");
  m.def("tau_normalize_backward(Tensor grad, Tensor weight, float tau, float eps) -> Tensor");
  m.def("tau_sweep(Tensor features, Tensor weight, Tensor taus, Tensor? bias, float eps) -> Tensor");
  m.def(
      "ride_loss(Tensor expert_logits, Tensor target, Tensor target_margins, Tensor? class_weights, "
      "Tensor temperatures, float diversity_factor, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "reslt_loss(Tensor branch_logits, Tensor target, Tensor group_masks, float beta, float log_eps, "
      "bool compute_grad) -> (Tensor, Tensor)");
  m.def("prior_shifted_ce(Tensor expert_logits, Tensor target, Tensor logit_shifts, bool compute_grad) -> "
        "(Tensor, Tensor)");
  m.def(
      "linear_ride_loss(Tensor features, Tensor weight, Tensor? bias, Tensor target, Tensor target_margins, "
      "Tensor? class_weights, Tensor temperatures, float scale, bool normalize, float diversity_factor, "
      "int chunk_size, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlt, CPU, m) {
  m.impl("expert_aggregate", &fastlt::cpu::expert_aggregate);
  m.impl("expert_aggregate_backward", &fastlt::cpu::expert_aggregate_backward);
  m.impl("tau_normalize", &fastlt::cpu::tau_normalize);
  m.impl("tau_normalize_backward", &fastlt::cpu::tau_normalize_backward);
  m.impl("tau_sweep", &fastlt::cpu::tau_sweep);
  m.impl("ride_loss", &fastlt::cpu::ride_loss);
  m.impl("reslt_loss", &fastlt::cpu::reslt_loss);
  m.impl("prior_shifted_ce", &fastlt::cpu::prior_shifted_ce);
  m.impl("linear_ride_loss", &fastlt::cpu::linear_ride_loss);
}

#ifdef FASTLT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastlt, CUDA, m) {
  m.impl("expert_aggregate", &fastlt::cuda::expert_aggregate);
  m.impl("expert_aggregate_backward", &fastlt::cuda::expert_aggregate_backward);
  m.impl("tau_normalize", &fastlt::cuda::tau_normalize);
  m.impl("tau_normalize_backward", &fastlt::cuda::tau_normalize_backward);
  m.impl("tau_sweep", &fastlt::cuda::tau_sweep);
  m.impl("ride_loss", &fastlt::cuda::ride_loss);
  m.impl("reslt_loss", &fastlt::cuda::reslt_loss);
  m.impl("prior_shifted_ce", &fastlt::cuda::prior_shifted_ce);
}
#endif
