"""fastlt.ops.batch_norm_channels_last: training-mode batch normalisation of a channels_last ``[N, C, H, W]`` CPU batch,
equal to torch's (output, batch mean and 1 / std, as ``aten.native_batch_norm`` in training, and the unbiased batch
variance that the running variance averages), for the channel counts torch's CPU kernel is slow on.

torch vectorises its channels_last loops over the C channels of one pixel, so the channels past the last full vector
run scalar: on AVX-512 the RIDE CIFAR experts' 24-channel layers take 3-4x longer per element than 48 channels, and
their 30 batch norms cost the channels_last step more than its NCHW twin's. The kernel tiles the table of pixels by
lcm(C, 16) values so that every ISA vectorises all of it (BENCHMARKS.md has the figures; docs/architecture.md 2).

CPU only, on purpose: it mends torch's CPU kernel; on CUDA, cuDNN's batch norm has no such tail, and every other
device, dtype or layout takes torch's own batch norm (the reference). :class:`fastlt.models.base.BatchNorm2d` uses it.

Kernel: csrc/cpu/batch_norm_channels_last.cpp; tests: tests/ops/test_batch_norm_channels_last.py; benchmark:
bench/ops.py.
"""

import torch

from fastlt import _extension
from fastlt.ops import _backend, _checks, _library

OP = "fastlt.batch_norm_channels_last"
# The arguments of fastlt::batch_norm_channels_last and its backward, as the C++ source defines them.
SCHEMA = "(Tensor input, Tensor weight, Tensor bias, float eps, bool relu) -> (Tensor, Tensor, Tensor, Tensor)"
BACKWARD_SCHEMA = ("(Tensor grad, Tensor input, Tensor weight, Tensor mean, Tensor invstd, Tensor? relu_output) -> "
                   "(Tensor, Tensor, Tensor)")
KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
LOW_PRECISION = (torch.bfloat16, torch.float16)  # their parameters may be float32 (autocast keeps them so)


def batch_norm_channels_last_reference(input, weight, bias, eps=1e-5, relu=False):
    """torch's training-mode batch norm (then torch.relu with ``relu``): ``(output, mean, invstd, unbiased_var)``.
    Differentiable by autograd."""
    eps = _validate(input, weight, bias, eps, relu)
    # weight.contiguous(): torch's CPU backward reads a strided (e.g. expanded) weight as if it were contiguous when
    # the batch is channels_last or 1x1
    output, mean, invstd = torch.ops.aten.native_batch_norm(input, weight.contiguous(), bias, None, None, True, 0.0,
                                                            eps)
    dtype = statistics_dtype(input)
    output = torch.relu(output) if relu else output
    return output, mean.to(dtype), invstd.to(dtype), input.detach().to(dtype).var(dim=(0, 2, 3))


def statistics_dtype(input: torch.Tensor) -> torch.dtype:
    """The dtype of the statistics: float64 for an fp64 batch, float32 otherwise (bf16 under autocast too)."""
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def batch_norm_channels_last(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                             relu: bool = False):
    """Training-mode batch norm of ``input`` ``[N, C, H, W]`` with affine ``weight`` / ``bias`` ``[C]``, then a ReLU
    with ``relu`` (fused: no pass of its own forward or backward): returns
    ``(output, mean, invstd, unbiased_var)``, the batch statistics per channel (``nn.BatchNorm2d`` averages
    ``mean`` and ``unbiased_var`` into its running statistics; float32, float64 for an fp64 batch). The compiled
    kernel runs channels_last fp32 / fp64 / bf16 CPU batches (its output is channels_last; a bf16 batch may have
    float32 parameters, as under autocast); anything else runs torch's batch norm. Differentiable in input,
    weight and bias; the statistics are not.

    >>> x = torch.randn(8, 24, 4, 4).to(memory_format=torch.channels_last)
    >>> bn = torch.nn.BatchNorm2d(24)
    >>> out, mean, invstd, var = fastlt.ops.batch_norm_channels_last(x, bn.weight, bn.bias)
    >>> out.is_contiguous(memory_format=torch.channels_last)
    True
    """
    eps = _validate(input, weight, bias, eps, relu)
    if uses_kernel(input) and _backend.resolve(OP, input, weight, bias) == "cpp":
        return torch.ops.fastlt.batch_norm_channels_last(input, weight, bias, eps, relu)
    return batch_norm_channels_last_reference(input, weight, bias, eps, relu)


def uses_kernel(input: torch.Tensor) -> bool:
    """Whether the compiled kernel runs ``input``: a channels_last (and not also contiguous) fp32 / fp64 / bf16 CPU
    batch, with the extension built."""
    return (_extension.AVAILABLE and input.device.type == "cpu" and input.dtype in KERNEL_DTYPES and input.dim() == 4
            and input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous())


def _validate(input, weight, bias, eps, relu):
    """The one argument check of the wrapper and the reference (the C++ op runs the same checks; its schema types
    relu). Returns eps as a float."""
    _checks.tensor(OP, "input", input, dims=4, floating=True)
    channels = input.shape[1]
    if input.numel() // channels < 2:  # (an empty input was refused above)
        raise ValueError(f"{OP}: input needs more than one value per channel in training, got shape "
                         f"{tuple(input.shape)}")
    for name, table in (("weight", weight), ("bias", bias)):
        _checks.tensor(OP, name, table, dims=1, floating=True)
        if table.shape[0] != channels:
            raise ValueError(f"{OP}: {name} must be [C]=[{channels}], got shape {tuple(table.shape)}")
        if table.dtype != input.dtype and not (input.dtype in LOW_PRECISION and table.dtype == torch.float32):
            also = " or torch.float32" if input.dtype in LOW_PRECISION else ""
            raise ValueError(f"{OP}: {name} must be {input.dtype}{also} like input, got {table.dtype}")
        _checks.same_device(OP, name, table, input, "input")
    if not isinstance(relu, bool):
        raise TypeError(f"{OP}: relu must be a bool, got {type(relu).__name__}")
    return _checks.number(OP, "eps", eps, low=0.0, low_open=True)


def _differentiable_backward(grad_output, input, weight, bias, eps, relu):
    """The gradients through the reference, themselves differentiable (create_graph=True: gradient penalties); the
    kernel's backward is not."""
    tensors = (input, weight, bias)
    with torch.enable_grad():
        output = batch_norm_channels_last_reference(input, weight, bias, eps, relu)[0]
        wanted = [tensor for tensor in tensors if tensor.requires_grad]
        grads = iter(torch.autograd.grad(output, wanted, grad_output, create_graph=True))
    return tuple(next(grads) if tensor.requires_grad else None for tensor in tensors)


def _fake_forward(input, weight, bias, eps, relu):
    channels, dtype = input.shape[1], statistics_dtype(input)
    return (torch.empty_like(input, memory_format=torch.channels_last), input.new_empty(channels, dtype=dtype),
            input.new_empty(channels, dtype=dtype), input.new_empty(channels, dtype=dtype))


def _fake_backward(grad, input, weight, mean, invstd, relu_output):
    return (torch.empty_like(input, memory_format=torch.channels_last), torch.empty_like(weight),
            torch.empty_like(weight))


def _setup_context(ctx, inputs, output):
    input, weight, bias, eps, relu = inputs
    result, mean, invstd, unbiased_var = output
    # the relu output gates the gradient (as torch's relu saves its output); bias only for create_graph's recompute
    ctx.save_for_backward(input, weight, bias, mean, invstd, result if relu else None)
    ctx.eps, ctx.relu = eps, relu
    ctx.mark_non_differentiable(mean, invstd, unbiased_var)


def _make_backward(backward_op):
    def backward(ctx, grad_output, grad_mean, grad_invstd, grad_var):
        input, weight, bias, mean, invstd, relu_output = ctx.saved_tensors
        if torch.is_grad_enabled():  # the backward is being recorded (create_graph=True)
            grads = _differentiable_backward(grad_output, input, weight, bias, ctx.eps, ctx.relu)
        else:
            grads = backward_op(grad_output, input, weight, mean, invstd, relu_output)
        return (*grads, None, None)

    return backward


if _extension.AVAILABLE:
    _library.register_with_backward_op("batch_norm_channels_last", "default", _fake_forward, _fake_backward,
                                       _make_backward, _setup_context)
