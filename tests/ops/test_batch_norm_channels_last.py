"""fastlt.ops.batch_norm_channels_last (CPU kernel only) against torch's training-mode batch norm, and
fastlt.models.base.BatchNorm2d against nn.BatchNorm2d."""

import pytest
import torch
from op_helpers import assert_close, backend, needs_cpp
from torch import nn

from fastlt.models.base import BatchNorm2d
from fastlt.ops import batch_norm_channels_last, batch_norm_channels_last_reference
from fastlt.ops.batch_norm_channels_last import uses_kernel

# (N, C, H, W): channel counts off and on the 16-value tile, a partial last tile (N * H * W * C not a multiple of
# lcm(C, 16)), single pixels, a single image
SHAPES = [(4, 24, 6, 5), (2, 3, 7, 3), (1, 16, 2, 2), (8, 48, 4, 4), (5, 40, 3, 3), (3, 17, 1, 2), (5, 64, 1, 1),
          (2, 1, 3, 3), (1, 24, 16, 16)]


def channels_last(*shape, dtype=torch.float32, mean=0.0, std=1.0, generator=None):
    return (torch.randn(*shape, dtype=dtype, generator=generator) * std + mean).to(memory_format=torch.channels_last)


def affine(channels, dtype=torch.float32):
    return torch.rand(channels, dtype=dtype) + 0.5, torch.randn(channels, dtype=dtype)


def outputs_and_grads(fn, x, weight, bias, grad, relu=False):
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    out, mean, invstd, var = fn(x, weight, bias, 1e-5, relu)
    grads = torch.autograd.grad(out, (x, weight, bias), grad)
    return (out.detach(), mean, invstd, var, *grads)


# (input dtype, parameter dtype, relu). No relu with bf16 parameters: torch rounds a bf16 module's statistics to bf16,
# so outputs within that rounding of 0 fall on either side of the ReLU and their gradients differ by a whole g
# (autocast's float32 parameters are compared with relu).
KERNEL_CASES = [(torch.float32, torch.float32, relu) for relu in (False, True)] + [
    (torch.float64, torch.float64, relu) for relu in (False, True)] + [
    (torch.bfloat16, torch.float32, relu) for relu in (False, True)] + [(torch.bfloat16, torch.bfloat16, False)]


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, parameter_dtype, relu", KERNEL_CASES)
def test_kernel_matches_reference(shape, dtype, parameter_dtype, relu):
    """The raw kernel (every layout is taken: non-channels_last inputs are copied) against torch's batch norm; a
    bf16 batch with float32 parameters is autocast's case. Statistics are float32 (float64 for fp64)."""
    x = channels_last(*shape, mean=3.0, std=2.0).to(dtype)
    weight, bias = (t.to(parameter_dtype) for t in affine(shape[1]))
    grad = torch.randn(shape).to(dtype)
    kernel = outputs_and_grads(_kernel_with_autograd, x, weight, bias, grad, relu)
    reference = outputs_and_grads(batch_norm_channels_last_reference, x, weight, bias, grad, relu)
    statistics = torch.float64 if dtype == torch.float64 else torch.float32
    for got, expected, expected_dtype in zip(kernel, reference, (dtype, statistics, statistics, statistics, dtype,
                                                                  parameter_dtype, parameter_dtype)):
        assert got.dtype == expected.dtype == expected_dtype
        assert_close(got, expected, dtype)  # a bf16 batch's float32 results: sums of bf16 values, bf16's tolerance
    assert kernel[0].is_contiguous(memory_format=torch.channels_last)


def _kernel_with_autograd(x, weight, bias, eps, relu):
    with backend("cpp"):
        return torch.ops.fastlt.batch_norm_channels_last(x, weight, bias, eps, relu)


@needs_cpp
def test_channels_last_cpu_batches_take_the_kernel_and_others_the_reference():
    x = channels_last(4, 24, 3, 3)
    assert uses_kernel(x) and uses_kernel(x.double()) and uses_kernel(x.bfloat16())  # bf16: autocast's
    assert not uses_kernel(x.contiguous())  # NCHW
    assert not uses_kernel(x.half())  # fp16: torch's kernel
    assert not uses_kernel(channels_last(4, 24, 1, 1))  # one pixel: channels_last and contiguous at once
    assert not uses_kernel(x[:, :, :, :2])  # a strided view


@needs_cpp
def test_large_mean_is_at_least_as_accurate_as_torch():
    """A mean far from zero (1e3, std 1): against fp64, every result of the kernel (shifted sums, x - mean before the
    scale) is as accurate as torch's fp32 batch norm or within 1e-6 relative (torch's output loses ~2e-4 here)."""
    x = channels_last(64, 24, 8, 8, mean=1e3)
    weight, bias = affine(24)
    grad = torch.randn(x.shape)
    truth = outputs_and_grads(batch_norm_channels_last_reference, x.double(), weight.double(), bias.double(),
                              grad.double())
    errors = {}
    for name in ("cpp", "reference"):
        with backend(name):
            results = outputs_and_grads(batch_norm_channels_last, x, weight, bias, grad)
        errors[name] = [((result.double() - expected).abs().max() / expected.abs().max()).item()
                        for result, expected in zip(results, truth)]
    for label, ours, torchs in zip(("output", "mean", "invstd", "var", "grad input", "grad weight", "grad bias"),
                                   errors["cpp"], errors["reference"]):
        assert ours <= max(torchs, 1e-6), f"{label}: {ours:.1e} vs torch's {torchs:.1e}"
    assert errors["cpp"][0] < 1e-5


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("name", ["cpp", "reference"])
def test_gradcheck_and_gradgradcheck_fp64(name, relu):
    if name == "cpp" and not uses_kernel(channels_last(2, 5, 3, 3, dtype=torch.float64)):
        pytest.skip("extension not built")
    x = channels_last(2, 5, 3, 4, dtype=torch.float64).requires_grad_()
    weight, bias = (t.requires_grad_() for t in affine(5, torch.float64))
    with backend(name):
        def call(x, weight, bias):
            return batch_norm_channels_last(x, weight, bias, 1e-5, relu)[0]

        assert torch.autograd.gradcheck(call, (x, weight, bias))
        assert torch.autograd.gradgradcheck(call, (x, weight, bias))


@needs_cpp
@pytest.mark.parametrize("relu", [False, True])
def test_opcheck(relu):
    x = channels_last(3, 24, 4, 5)
    weight, bias = affine(24)
    torch.library.opcheck(torch.ops.fastlt.batch_norm_channels_last.default, (x, weight, bias, 1e-5, relu))
    out, mean, invstd, _ = torch.ops.fastlt.batch_norm_channels_last(x, weight, bias, 1e-5, relu)
    torch.library.opcheck(torch.ops.fastlt.batch_norm_channels_last_backward.default,
                          (torch.randn_like(out), x, weight, mean, invstd, out if relu else None))


@needs_cpp
def test_compiles_fullgraph():
    x = channels_last(4, 24, 3, 3)
    weight, bias = affine(24)
    compiled = torch.compile(lambda x: batch_norm_channels_last(x, weight, bias)[0], fullgraph=True)
    assert_close(compiled(x), batch_norm_channels_last_reference(x, weight, bias)[0])


@pytest.mark.parametrize("call, error", [
    (lambda x, w, b: (x[0], w, b, 1e-5), r"input must have 4 dims"),
    (lambda x, w, b: (x[:1, :, :1, :1], w, b, 1e-5), r"more than one value per channel"),
    (lambda x, w, b: (x[:, :0], w[:0], b[:0], 1e-5), r"input must not be empty"),  # no channel
    (lambda x, w, b: (x, w[:3], b, 1e-5), r"weight must be \[C\]=\[24\]"),
    (lambda x, w, b: (x, w, b.double(), 1e-5), r"bias must be torch.float32 like input"),
    (lambda x, w, b: (x, w, b, 0.0), r"eps must be"),
    (lambda x, w, b: (x, w.to("meta"), b, 1e-5), r"weight is on meta but input is on cpu"),
])
@pytest.mark.parametrize("name", ["auto", "reference"])
def test_bad_arguments_are_named(call, error, name):
    x = channels_last(4, 24, 3, 3)
    weight, bias = affine(24)
    with backend(name), pytest.raises(ValueError, match=error):
        batch_norm_channels_last(*call(x, weight, bias))


@pytest.mark.parametrize("name", ["auto", "reference"])
def test_relu_must_be_a_bool(name):
    x = channels_last(4, 24, 3, 3)
    weight, bias = affine(24)
    with backend(name), pytest.raises(TypeError, match="relu must be a bool, got str"):
        batch_norm_channels_last(x, weight, bias, 1e-5, "yes")


@needs_cpp
@pytest.mark.parametrize("call, error", [
    (lambda x, w, b: (x[0], w, b, 1e-5), r"input must be \[N, C, H, W\]"),
    (lambda x, w, b: (x[:1, :, :1, :1], w, b, 1e-5), r"more than one value per channel"),
    (lambda x, w, b: (x, w[:3], b, 1e-5), r"weight must be \[C\]=\[24\]"),
    (lambda x, w, b: (x.half(), w, b, 1e-5), r"input must be float32/float64/bfloat16"),
    (lambda x, w, b: (x, w.bfloat16(), b, 1e-5), r"weight must be Float like input"),
    (lambda x, w, b: (x.bfloat16(), w.double(), b, 1e-5), r"weight must be BFloat16 or float32 like input"),
    (lambda x, w, b: (x, w, b, -1.0), r"eps must be"),
])
def test_raw_kernel_names_bad_arguments(call, error):
    x = channels_last(4, 24, 3, 3)
    weight, bias = affine(24)
    with pytest.raises(ValueError, match=error):
        torch.ops.fastlt.batch_norm_channels_last(*call(x, weight, bias), False)


# ---- the module ----

@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_module_trains_as_nn_batchnorm(momentum, layout):
    """Outputs, gradients, running statistics and the batch counter over three training steps, then evaluation."""
    torch.manual_seed(0)
    ours, theirs = BatchNorm2d(24, momentum=momentum), nn.BatchNorm2d(24, momentum=momentum)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    for _ in range(3):
        x = torch.randn(8, 24, 5, 6).to(memory_format=layout) * 2 + 1
        got = outputs_and_module_grads(ours, x)
        expected = outputs_and_module_grads(theirs, x)
        for a, b in zip(got, expected):
            assert_close(a, b)
        assert_close(ours.running_mean, theirs.running_mean)
        assert_close(ours.running_var, theirs.running_var)
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()
    ours.eval(), theirs.eval()
    x = torch.randn(8, 24, 5, 6).to(memory_format=layout)
    assert_close(ours(x).detach(), theirs(x).detach())  # eval on running statistics equal up to rounding
    if layout == torch.contiguous_format:  # NCHW is nn.BatchNorm2d's own forward all along
        torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=0, atol=0)
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def outputs_and_module_grads(module, x, parameters_of=None):
    x = x.detach().clone().requires_grad_()
    out = module(x)
    cotangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    parameters_of = parameters_of or module
    grads = torch.autograd.grad(out, (x, parameters_of.weight, parameters_of.bias), cotangent)
    return (out.detach(), *grads)


def test_module_falls_back_to_torch_where_the_kernel_does_not_run():
    """fp16, NCHW and non-affine modules are nn.BatchNorm2d's forward, bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(4, 24, 3, 3)
    for module_args, batch in [({}, x), ({}, x.to(memory_format=torch.channels_last).half()),
                               ({"affine": False}, x.to(memory_format=torch.channels_last)),
                               ({"track_running_stats": False}, x.to(memory_format=torch.channels_last))]:
        ours, theirs = BatchNorm2d(24, **module_args), nn.BatchNorm2d(24, **module_args)
        ours.load_state_dict(theirs.state_dict())
        if batch.dtype == torch.float16:
            ours, theirs = ours.half(), theirs.half()
        torch.testing.assert_close(ours(batch), theirs(batch), rtol=0, atol=0)


@needs_cpp
def test_module_compiles_fullgraph_in_training():
    torch.manual_seed(0)
    eager, compiled_module = BatchNorm2d(24), BatchNorm2d(24)
    compiled = torch.compile(compiled_module, fullgraph=True)
    for _ in range(2):
        x = channels_last(4, 24, 3, 3)
        assert_close(compiled(x).detach(), eager(x).detach())
    assert_close(compiled_module.running_var, eager.running_var)
    assert compiled_module.num_batches_tracked.item() == 2


@needs_cpp
def test_module_under_bf16_autocast_trains_as_nn_batchnorm():
    """CPU autocast hands the batch norm a bf16 batch with the module's float32 parameters: the kernel's output,
    gradients and running statistics against nn.BatchNorm2d's (bf16 tolerance for the bf16 results)."""
    torch.manual_seed(0)
    ours, theirs = BatchNorm2d(24), nn.BatchNorm2d(24)
    ours.load_state_dict(theirs.state_dict())
    x = (torch.randn(8, 24, 5, 6) * 2 + 1).to(memory_format=torch.channels_last).bfloat16()
    got, expected = outputs_and_module_grads(ours, x), outputs_and_module_grads(theirs, x)
    assert [t.dtype for t in got] == [t.dtype for t in expected] == [torch.bfloat16, torch.bfloat16, torch.float32,
                                                                      torch.float32]
    for a, b in zip(got, expected):
        assert_close(a, b, torch.bfloat16)
    assert_close(ours.running_mean, theirs.running_mean)
    assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_module_with_relu_is_batch_norm_then_relu(layout):
    """relu=True: the fused ReLU (channels_last) or F.relu after nn.BatchNorm2d's forward (NCHW), against
    nn.BatchNorm2d then F.relu: outputs, gradients, running statistics."""
    torch.manual_seed(0)
    ours, theirs = BatchNorm2d(24, relu=True), nn.BatchNorm2d(24)
    ours.load_state_dict(theirs.state_dict())
    assert "relu=True" in repr(ours)
    x = torch.randn(8, 24, 5, 6).to(memory_format=layout)
    got = outputs_and_module_grads(ours, x)
    expected = outputs_and_module_grads(lambda t: torch.nn.functional.relu(theirs(t)), x, theirs)
    for a, b in zip(got, expected):
        assert_close(a, b)
    assert got[0].min() >= 0
    assert_close(ours.running_var, theirs.running_var)
