"""torch.library glue of the fused losses whose C++ op returns ``(loss, d loss / d logits)`` and takes
``compute_grad`` as its last argument (reslt_loss, prior_shifted_ce): the fake (meta) implementation and an
autograd formula that only scales the saved gradient (see ride_loss.scale_saved_gradient)."""

import torch

from fastlt.ops import _checks
from fastlt.ops.ride_loss import scale_saved_gradient


def _fake_forward(logits, *args):
    compute_grad = args[-1]
    grad_shape = logits.shape if compute_grad else (0,)
    loss_dtype = _checks.accumulate_dtype(logits.dtype)
    return logits.new_empty((), dtype=loss_dtype), logits.new_empty(grad_shape)


def _setup_context(ctx, inputs, output):
    _, grad_logits = output
    ctx.num_inputs = len(inputs)
    ctx.save_for_backward(grad_logits)
    ctx.mark_non_differentiable(grad_logits)
    ctx.set_materialize_grads(False)  # else autograd allocates a zero "gradient" for grad_logits, as big as it


def _backward(ctx, grad_loss, _grad_of_grad_logits):
    no_grads = (None,) * (ctx.num_inputs - 1)
    if grad_loss is None:  # only the (non-differentiable) gradient output was used
        return (None, *no_grads)
    (grad_logits,) = ctx.saved_tensors
    return (scale_saved_gradient(grad_logits, grad_loss), *no_grads)


def register(qualified_name: str) -> None:
    """Fake and autograd registrations of the op ``qualified_name`` (e.g. ``"fastlt::reslt_loss"``)."""
    torch.library.register_fake(qualified_name)(_fake_forward)
    torch.library.register_autograd(qualified_name, _backward, setup_context=_setup_context)
