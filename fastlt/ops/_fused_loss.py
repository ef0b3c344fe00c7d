"""torch.library glue of the fused losses (ride_loss, reslt_loss, prior_shifted_ce, each as a C++ and a Triton op).

Every such op takes ``reduction`` (0 none, 1 mean, 2 sum: ``_checks.REDUCTIONS``), ``ignore_index`` and
``compute_grad`` as its last three arguments and returns ``(loss, grad_logits, row_terms)``:

- ``loss``: a scalar (mean, sum) or the ``[B]`` per-row losses (none), in the accumulation dtype;
- ``grad_logits``: d loss / d logits for a scalar loss, d (sum of the row losses) / d logits for ``none``; zero
  rows for ignored labels;
- ``row_terms``: ``[B, T]`` each row's contribution to each of the loss's T terms (per-expert CE and diversity,
  per-branch CE, ...), already divided by the term's normaliser under ``mean``; the loss is their sum (over terms
  for ``none``, over everything otherwise). They are what ``return_components=True`` reports (:func:`components`).

The backward only scales the saved gradient by ``grad_output`` (in place in eager mode for a scalar loss, so fwd+bwd
needs no memory beyond one gradient; :func:`scale_saved_gradient`). When the backward is itself differentiated
(``create_graph=True``: gradient penalties, meta-learning), it recomputes the gradient through the op's eager
formula instead, so the second-order terms are kept; for that the op's inputs are saved (references, no copy).
``torch.func`` transforms cannot see through a torch.library autograd formula: :func:`use_reference` sends such
calls to the eager reference.
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
    """d loss / d logits * grad_output. A scalar loss's backward scales the saved buffer in place in eager mode (no
    second gradient-sized tensor; a second backward through the same graph then fails autograd's version check
    instead of returning a wrong gradient). A ``[B]`` grad_output (``reduction="none"``) scales each row of the
    ``[..., B, C]`` gradient into a new tensor, so per-row losses can be backpropagated more than once (Jacobians,
    ``retain_graph=True``). Compiled graphs stay functional."""
    if grad_loss.dim() == 1:
        return grad_logits * grad_loss.to(grad_logits.dtype)[:, None]
    scale = grad_loss.to(grad_logits.dtype)
    if torch.compiler.is_compiling() or is_fake(grad_loss):  # traced (torch.compile, opcheck): no data-dependent branch
        return grad_logits * scale
    if grad_loss.item() != 1.0:
        grad_logits.mul_(scale)
    return grad_logits


def reduce_row_terms(row_terms: torch.Tensor, reduction: int) -> torch.Tensor:
    """The loss from ``[B, T]`` row terms: their sum, or the per-row sums for ``reduction`` 0 (none)."""
    return row_terms.sum(1) if reduction == 0 else row_terms.sum()


def components(row_terms: torch.Tensor, names: dict, reduction: int) -> dict:
    """``return_components`` of a fused loss: ``{name: the sum of the row terms at names[name] (an index or a
    slice)}``, over rows for mean / sum, per row for none (a leading [B] dimension). Detached: for logging. The
    components add up to the loss."""
    row_terms = row_terms.detach()
    if reduction != 0:
        row_terms = row_terms.sum(0)
    return {name: row_terms[..., where] for name, where in names.items()}


def _fake_forward(num_terms):
    def fake_forward(logits, *args):
        reduction, compute_grad = args[-3], args[-1]
        batch = logits.shape[-2]
        loss_dtype = _checks.accumulate_dtype(logits.dtype)
        loss = logits.new_empty((batch,) if reduction == 0 else (), dtype=loss_dtype)
        grad = logits.new_empty(logits.shape if compute_grad else (0,))
        return loss, grad, logits.new_empty((batch, num_terms(logits, *args)), dtype=loss_dtype)

    return fake_forward


def register(qualified_name: str, loss_formula, num_terms) -> None:
    """Fake and autograd registrations of the op ``qualified_name`` (e.g. ``"fastlt::reslt_loss"``).
    ``loss_formula(*op_arguments_but_compute_grad)`` is the op's loss in differentiable eager PyTorch, used when the
    backward is differentiated. ``num_terms(*op_arguments)``: T of the op's ``[B, T]`` row terms."""

    def setup_context(ctx, inputs, output):
        grad_logits, *row_terms = output[1:]
        ctx.num_inputs = len(inputs)
        is_tensor = [isinstance(value, torch.Tensor) for value in inputs]
        ctx.scalars = [None if tensor else value for value, tensor in zip(inputs, is_tensor)]
        ctx.is_tensor = is_tensor
        ctx.save_for_backward(grad_logits, *[value if tensor else None for value, tensor in zip(inputs, is_tensor)])
        ctx.mark_non_differentiable(grad_logits, *row_terms)
        ctx.set_materialize_grads(False)  # else autograd allocates a zero "gradient" for grad_logits, as big as it

    def backward(ctx, grad_loss, _grad_of_grad_logits, *_grad_of_row_terms):
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

    torch.library.register_fake(qualified_name)(_fake_forward(num_terms))
    torch.library.register_autograd(qualified_name, backward, setup_context=setup_context)
