"""torch.library glue of the fused losses (ride_loss, reslt_loss, prior_shifted_ce, each as a C++ and a Triton op).
Every such op returns ``(loss, d loss / d logits)`` and takes ``compute_grad`` as its last argument; registered here:
the fake (meta) implementation and an autograd formula.

The backward only scales the saved gradient by ``grad_output`` (in place in eager mode, so fwd+bwd needs no memory
beyond one gradient). When the backward is itself differentiated (``create_graph=True``: gradient penalties,
meta-learning), it recomputes the gradient through the op's eager formula instead, so the second-order terms are
kept; for that the op's inputs are saved (references, no copy). ``torch.func`` transforms cannot see through a
torch.library autograd formula: :func:`use_reference` sends such calls to the eager reference.
"""

import torch
from torch._subclasses.fake_tensor import is_fake

from fastlt.ops import _checks


def use_reference(logits: torch.Tensor) -> bool:
    """Whether a call must take the eager reference: ``logits`` is traced by a torch.func transform (grad, vmap,
    jacrev, ...), which cannot run through the fused ops' autograd formula."""
    if torch.compiler.is_compiling():  # dynamo cannot trace the check; compiled graphs hold the fused op
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(logits)


def scale_saved_gradient(grad_logits, grad_loss):
    """d loss / d logits * grad_output. Eager mode scales the saved buffer in place (no second gradient-sized
    tensor; a second backward through the same graph then fails autograd's version check instead of returning a
    wrong gradient). Compiled graphs stay functional."""
    if torch.compiler.is_compiling() or is_fake(grad_loss):  # traced (torch.compile, opcheck): no data-dependent branch
        return grad_logits * grad_loss.to(grad_logits.dtype)
    if grad_loss.item() != 1.0:
        grad_logits.mul_(grad_loss.to(grad_logits.dtype))
    return grad_logits


def _fake_forward(logits, *args):
    compute_grad = args[-1]
    grad_shape = logits.shape if compute_grad else (0,)
    loss_dtype = _checks.accumulate_dtype(logits.dtype)
    return logits.new_empty((), dtype=loss_dtype), logits.new_empty(grad_shape)


def register(qualified_name: str, loss_formula) -> None:
    """Fake and autograd registrations of the op ``qualified_name`` (e.g. ``"fastlt::reslt_loss"``).
    ``loss_formula(*op_arguments_but_compute_grad)`` is the op's loss in differentiable eager PyTorch, used when the
    backward is differentiated."""

    def setup_context(ctx, inputs, output):
        _, grad_logits = output
        ctx.num_inputs = len(inputs)
        is_tensor = [isinstance(value, torch.Tensor) for value in inputs]
        ctx.scalars = [None if tensor else value for value, tensor in zip(inputs, is_tensor)]
        ctx.is_tensor = is_tensor
        ctx.save_for_backward(grad_logits, *[value if tensor else None for value, tensor in zip(inputs, is_tensor)])
        ctx.mark_non_differentiable(grad_logits)
        ctx.set_materialize_grads(False)  # else autograd allocates a zero "gradient" for grad_logits, as big as it

    def backward(ctx, grad_loss, _grad_of_grad_logits):
        no_grads = (None,) * (ctx.num_inputs - 1)
        if grad_loss is None:  # only the (non-differentiable) gradient output was used
            return (None, *no_grads)
        grad_logits, *saved = ctx.saved_tensors
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and not is_fake(grad_loss):
            inputs = [tensor if is_tensor else scalar for tensor, scalar, is_tensor in
                      zip(saved, ctx.scalars, ctx.is_tensor)]
            logits = inputs[0]
            loss = loss_formula(*inputs[:-1])
            (grad,) = torch.autograd.grad(loss, logits, grad_loss, create_graph=True)
            return (grad, *no_grads)
        return (scale_saved_gradient(grad_logits, grad_loss), *no_grads)

    torch.library.register_fake(qualified_name)(_fake_forward)
    torch.library.register_autograd(qualified_name, backward, setup_context=setup_context)
