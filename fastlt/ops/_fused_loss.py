"""torch.library glue of the fused losses: the ops whose forward returns the loss together with its gradients
(ride_loss, reslt_loss, prior_shifted_ce: a C++ and a Triton op each; linear_ride_loss: also its ``.torch`` op).

Every such op takes ``compute_grad`` as its last argument and returns ``(loss, *gradients, *extras)``: ``loss`` a
scalar (or ``[B]`` per-row losses), then d loss / d input for each differentiable input (``[0]``-shaped without
``compute_grad``), then outputs for logging. The plain losses take ``reduction`` (0 none, 1 mean, 2 sum:
``_checks.REDUCTIONS``) and ``ignore_index`` before ``compute_grad`` and return ``(loss, grad_logits, row_terms)``:

- ``grad_logits``: d loss / d logits for a scalar loss, d (sum of the row losses) / d logits for ``none``; zero
  rows for ignored labels;
- ``row_terms``: ``[B, T]`` each row's contribution to each of the loss's T terms (per-expert CE and diversity,
  per-branch CE, ...), already divided by the term's normaliser under ``mean``; the loss is their sum (over terms
  for ``none``, over everything otherwise). They are what ``return_components=True`` reports (:func:`components`).

The autograd formula (:func:`register`) is the same for all of them, so each property below holds for every op:

- The backward hands out the forward's gradients, scaled by ``grad_output`` in place: fwd+bwd needs no memory beyond
  one gradient. A buffer is handed out at most once, since the caller owns it from then on (AccumulateGrad may make
  it a parameter's ``.grad``, which later steps add to); a later backward through the same graph
  (``retain_graph=True``) recomputes the gradients by calling the op again, and a gradient already returned never
  changes. A ``[B]`` grad_output (``reduction="none"``) scales the rows into a new tensor and keeps the buffer.
- When the backward is itself differentiated (``create_graph=True``: gradient penalties, meta-learning), the
  gradients come from the op's eager formula instead, so the second-order terms are kept; for that and for the
  recomputation the op's inputs are saved (references, no copy).
- ``torch.func`` transforms cannot see through a torch.library autograd formula: ``fastlt.ops._backend.resolve``
  sends such calls (every op's) to the eager reference.
"""

import torch
from torch._subclasses.fake_tensor import is_fake

from fastlt.ops import _checks, _library

LOGITS_GRADIENT = {0: 1}  # a plain loss's d loss / d logits (input 0) is its output 1


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


def fake_loss_forward(num_terms):
    """The fake implementation of a plain loss op, whose row terms are ``[B, num_terms(*op_arguments)]``."""

    def fake_forward(logits, *args):
        reduction, compute_grad = args[-3], args[-1]
        batch = logits.shape[-2]
        loss_dtype = _checks.accumulate_dtype(logits.dtype)
        loss = logits.new_empty((batch,) if reduction == 0 else (), dtype=loss_dtype)
        grad = logits.new_empty(logits.shape if compute_grad else (0,))
        return loss, grad, logits.new_empty((batch, num_terms(logits, *args)), dtype=loss_dtype)

    return fake_forward


def _traced(tensor) -> bool:
    """Whether ``tensor`` is being traced (torch.compile, opcheck, a torch.func transform): no in-place work or
    data-dependent branch on it."""
    return (torch.compiler.is_compiling() or is_fake(tensor)
            or torch._C._functorch.is_functorch_wrapped_tensor(tensor))


def _scaled(gradient: torch.Tensor, grad_loss: torch.Tensor, in_place: bool) -> torch.Tensor:
    """d loss / d input * grad_output: a scalar grad_output scales ``gradient`` in place when ``in_place`` (eager
    mode only); a ``[B]`` one (per-row losses) scales each row of the ``[..., B, C]`` gradient into a new tensor."""
    if grad_loss.dim() == 1:
        return gradient * grad_loss.to(gradient.dtype)[:, None]
    scale = grad_loss.to(gradient.dtype)
    if not in_place or _traced(grad_loss):
        return gradient * scale
    if grad_loss.item() != 1.0:
        gradient.mul_(scale)
    return gradient


def register(qualified_name: str, loss_formula, fake_forward, gradient_outputs: dict = LOGITS_GRADIENT) -> None:
    """Fake and autograd registrations of the fused-loss op ``qualified_name`` (e.g. ``"fastlt::reslt_loss"``).

    ``loss_formula(*op_arguments_but_compute_grad)`` is the op's loss in differentiable eager PyTorch (the
    second-order path); ``fake_forward`` the op's fake implementation; ``gradient_outputs`` maps the index of each
    differentiable input to the index of the output holding its gradient."""
    op = _library._overload(qualified_name)

    def setup_context(ctx, inputs, output):
        ctx.num_inputs = len(inputs)
        is_tensor = [isinstance(value, torch.Tensor) for value in inputs]
        ctx.scalars = [None if tensor else value for value, tensor in zip(inputs, is_tensor)]
        ctx.is_tensor = is_tensor
        ctx.save_for_backward(*[value if tensor else None for value, tensor in zip(inputs, is_tensor)])
        # Not saved tensors: handed out once, the buffers are the caller's, and a saved tensor's version check would
        # then refuse a later backward. Non-differentiable outputs have no grad_fn, so this makes no cycle.
        ctx.gradients = {index: output[position] for index, position in gradient_outputs.items()}
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # else autograd allocates a zero "gradient" for each gradient output

    def backward(ctx, grad_loss, *_grads_of_other_outputs):
        grads = [None] * ctx.num_inputs
        wanted = [index for index in gradient_outputs if ctx.needs_input_grad[index]]
        if grad_loss is None or not wanted:  # only the (non-differentiable) other outputs were used
            return tuple(grads)
        inputs = [tensor if is_tensor else scalar
                  for tensor, scalar, is_tensor in zip(ctx.saved_tensors, ctx.scalars, ctx.is_tensor)]
        if torch.is_grad_enabled() and not _traced(grad_loss):  # create_graph=True: the backward is recorded
            loss = loss_formula(*inputs[:-1])
            second_order = torch.autograd.grad(loss, [inputs[index] for index in wanted], grad_loss,
                                               create_graph=True, allow_unused=True)
            for index, grad in zip(wanted, second_order):
                grads[index] = torch.zeros_like(inputs[index]) if grad is None else grad
            return tuple(grads)
        gradients = ctx.gradients
        if gradients is None or any(gradients[index].numel() != inputs[index].numel() for index in wanted):
            # handed out already (or the forward ran without compute_grad): the op again, for buffers of our own
            output = op(*inputs[:-1], True)
            gradients = {index: output[position] for index, position in gradient_outputs.items()}
        hand_out = grad_loss.dim() == 0 and not _traced(grad_loss)
        if hand_out:
            ctx.gradients = None
        for index in wanted:
            grads[index] = _scaled(gradients[index], grad_loss, in_place=hand_out)
        return tuple(grads)

    _library.register_fake(qualified_name, fake_forward)
    torch.library.register_autograd(qualified_name, backward, setup_context=setup_context)
