"""The fused losses' CUDA and Triton backends: the Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (set in
tests/conftest.py) on tiny shapes, as the interpreter is slow; the CUDA launchers can only be checked for refusing CPU
tensors on a machine without a GPU (their values are tested by the `gpu`-marked cases on a CUDA machine)."""

import pytest
import torch
from op_helpers import (TOLERANCES, assert_close, backend, call_cuda_kernel, needs_cpp, needs_cuda, needs_cuda_build,
                        raw_op)

import fastlt
from fastlt.ops import prior_shifted_ce, prior_shifted_ce_reference, reslt_loss, reslt_loss_reference
from fastlt.ops import ride_loss, ride_loss_reference
from fastlt.ops._lt_constants import prior_logit_shifts


def _counts(num_classes):
    return (100.0 * torch.exp(-torch.arange(num_classes) / num_classes * 6)).floor().clamp_min(1)


def _inputs(shape, dtype=torch.float32, scale=10.0, device="cpu"):
    E, B, C = shape
    logits = (torch.randn(E, B, C) * scale).to(dtype=dtype, device=device).requires_grad_(True)
    return logits, torch.randint(0, C, (B,), device=device), _counts(C).to(device)


def _loss_and_grad(fn, logits, target, counts, **kwargs):
    loss = fn(logits, target, counts, **kwargs)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


def _tables(num_classes, weights):
    return torch.rand(num_classes), (torch.rand(num_classes) + 0.5 if weights else None), torch.rand(num_classes) + 0.5


@needs_cuda_build
def test_ride_loss_cuda_launcher_refuses_cpu_tensors():
    logits, target, _ = _inputs((2, 3, 10))
    margins, weights, temperatures = _tables(10, weights=True)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        call_cuda_kernel("ride_loss", logits.detach(), target, margins, weights, temperatures, -0.45, 1, -100, True)


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 7), (3, 4, 1100)])  # 1100 > one 1024-class block
@pytest.mark.parametrize("drw", [False, True])
@pytest.mark.parametrize("diversity_factor", [-0.45, 0.0])
def test_ride_loss_triton_matches_reference_fp32(shape, drw, diversity_factor):
    logits, target, counts = _inputs(shape)
    kwargs = dict(drw=drw, diversity_factor=diversity_factor)
    expected_loss, expected_grad = _loss_and_grad(ride_loss_reference, logits, target, counts, **kwargs)
    with backend("triton"):
        loss, grad = _loss_and_grad(ride_loss, logits, target, counts, **kwargs)
    assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6 * expected_grad.abs().max().item() + 1e-9, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ride_loss_triton_low_precision_tolerance_table(dtype):
    logits, target, counts = _inputs((2, 4, 40), dtype)
    expected_loss, expected_grad = _loss_and_grad(ride_loss_reference, logits, target, counts, drw=True)
    with backend("triton"):
        loss, grad = _loss_and_grad(ride_loss, logits, target, counts, drw=True)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close(loss, expected_loss, dtype)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(grad, expected_grad, atol=atol * expected_grad.abs().max().item(), rtol=rtol)


def test_ride_loss_triton_gradcheck_fp64():
    logits, target, counts = _inputs((2, 2, 3), torch.float64, scale=2.0)
    with backend("triton"):
        assert torch.autograd.gradcheck(lambda z: ride_loss(z, target, counts, scale=3.0, drw=True), (logits,))


def test_ride_loss_triton_reads_strided_inputs():
    view = (torch.randn(5, 2, 12) * 10).transpose(0, 1).requires_grad_(True)  # [B, E, C] storage, as torch.stack(dim=1)
    target, counts = torch.randint(0, 12, (5,)), _counts(12)
    expected = _loss_and_grad(ride_loss_reference, view, target, counts, drw=True)
    with backend("triton"):
        actual = _loss_and_grad(ride_loss, view, target, counts, drw=True)
    assert_close(actual[0], expected[0])
    torch.testing.assert_close(actual[1], expected[1], atol=1e-7, rtol=1e-5)


def test_ride_loss_triton_nan_logit_makes_loss_and_its_row_nan():
    logits, target, counts = _inputs((2, 3, 10))
    with torch.no_grad():
        logits[1, 2, 4] = float("nan")
    with backend("triton"):
        loss, grad = _loss_and_grad(ride_loss, logits, target, counts)
    assert torch.isnan(loss)
    assert torch.isnan(grad[:, 2]).all() and torch.isfinite(grad[:, :2]).all()


def test_ride_loss_triton_opcheck():
    logits, target, _ = _inputs((2, 3, 10))
    for weights in (False, True):
        margins, class_weights, temperatures = _tables(10, weights)
        args = (logits, target, margins, class_weights, temperatures, -0.45, 1, -100, True)
        torch.library.opcheck(raw_op("ride_loss.triton"), args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_ride_loss_triton_torch_compile_fullgraph():
    logits, target, counts = _inputs((2, 3, 9))
    compiled = torch.compile(lambda z: ride_loss(z, target, counts, drw=True), fullgraph=True, backend="aot_eager")
    expected = _loss_and_grad(ride_loss_reference, logits, target, counts, drw=True)
    with backend("triton"):
        loss = compiled(logits)
        (grad,) = torch.autograd.grad(loss, logits)
    assert_close(loss.detach(), expected[0])
    assert_close(grad, expected[1])


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_ride_loss_cuda_matches_reference(name, dtype):
    if name == "cpp" and not fastlt._extension.HAS_CUDA:
        pytest.skip("extension built without CUDA kernels")
    logits, target, counts = _inputs((4, 64, 8142), dtype, device="cuda")
    expected_loss, expected_grad = _loss_and_grad(ride_loss_reference, logits, target, counts, drw=True)
    with backend(name):
        loss, grad = _loss_and_grad(ride_loss, logits, target, counts, drw=True)
    assert_close(loss, expected_loss, dtype)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(grad, expected_grad, atol=atol * expected_grad.abs().max().item(), rtol=rtol)


# ---- reslt_loss and prior_shifted_ce: the same checks, driven by a table of (op, reference, extra arguments) ----


def _nested_groups(num_branches, num_classes):
    """ResLT's groups: all classes, then ever smaller tails at high labels."""
    masks = torch.ones(num_branches, num_classes, dtype=torch.bool)
    for branch in range(1, num_branches):
        masks[branch, : num_classes * branch // num_branches] = False
    return masks


# name -> (op, reference, (num_experts, num_classes) -> (extra positional arguments, keyword arguments))
LOSSES = {
    "reslt_loss": (reslt_loss, reslt_loss_reference, lambda K, C: ((_nested_groups(K, C),), dict(beta=0.9))),
    "prior_shifted_ce": (prior_shifted_ce, prior_shifted_ce_reference,
                         lambda E, C: ((_counts(C),), dict(taus=torch.linspace(0.0, 2.0, E)))),
}


def _loss_case(name, shape, dtype=torch.float32, scale=10.0, device="cpu"):
    op, reference, extra = LOSSES[name]
    logits, target, _ = _inputs(shape, dtype, scale, device)
    args, kwargs = extra(shape[0], shape[2])
    args = tuple(arg.to(device) for arg in args)
    return op, reference, logits, target, args, kwargs


def _raw_triton_args(name, logits, target):
    """The arguments of the registered Triton op of ``name`` (as the op wrapper builds them)."""
    num_experts, _, num_classes = logits.shape
    if name == "reslt_loss":
        return (logits, target, _nested_groups(num_experts, num_classes).to(logits.device), 0.9, 1e-7, 1, -100, True)
    shifts = prior_logit_shifts(_counts(num_classes), torch.linspace(0.0, 2.0, num_experts, dtype=torch.float64))
    return (logits, target, shifts.to(logits.device, torch.float32), 1, -100, True)


def _triton_op(name):
    """The registered Triton op of ``name``: its ``triton`` overload (fastlt/ops/_library.py)."""
    return raw_op(f"{name}.triton")


def _run(fn, logits, target, args, kwargs):
    loss = fn(logits, target, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


@needs_cuda_build
@pytest.mark.parametrize("name", list(LOSSES))
def test_cuda_launcher_refuses_cpu_tensors(name):
    logits, target, _ = _inputs((2, 3, 10))
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        call_cuda_kernel(name, *_raw_triton_args(name, logits.detach(), target))


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (2, 3, 1100)])
def test_triton_matches_reference_fp32(name, shape):
    _, reference, logits, target, args, kwargs = _loss_case(name, shape)
    op = LOSSES[name][0]
    expected_loss, expected_grad = _run(reference, logits, target, args, kwargs)
    with backend("triton"):
        loss, grad = _run(op, logits, target, args, kwargs)
    assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6 * expected_grad.abs().max().item() + 1e-9, rtol=1e-5)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_tolerance_table(name, dtype):
    op, reference, logits, target, args, kwargs = _loss_case(name, (3, 4, 40), dtype)
    expected_loss, expected_grad = _run(reference, logits, target, args, kwargs)
    with backend("triton"):
        loss, grad = _run(op, logits, target, args, kwargs)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close(loss, expected_loss, dtype)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(grad, expected_grad, atol=atol * expected_grad.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("name", list(LOSSES))
def test_triton_gradcheck_fp64(name):
    op, _, logits, target, args, kwargs = _loss_case(name, (2, 2, 3), torch.float64, scale=2.0)
    with backend("triton"):
        assert torch.autograd.gradcheck(lambda z: op(z, target, *args, **kwargs), (logits,))


@pytest.mark.parametrize("log_eps", [1e-7, 0.05])
def test_reslt_loss_triton_log_eps_matches_reference_and_gradcheck(log_eps):
    logits, target, _ = _inputs((3, 5, 1100), scale=8.0)
    groups = _nested_groups(3, 1100)
    kwargs = dict(beta=0.9, log_eps=log_eps)
    expected_loss, expected_grad = _run(reslt_loss_reference, logits, target, (groups,), kwargs)
    with backend("triton"):
        loss, grad = _run(reslt_loss, logits, target, (groups,), kwargs)
        small, small_target, _ = _inputs((2, 2, 3), torch.float64, scale=3.0)
        assert torch.autograd.gradcheck(
            lambda z: reslt_loss(z, small_target, _nested_groups(2, 3), beta=0.7, log_eps=log_eps), (small,))
    assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6 * expected_grad.abs().max().item() + 1e-9, rtol=1e-5)


@pytest.mark.parametrize("name", list(LOSSES))
def test_triton_reads_strided_inputs(name):
    op, reference, _, target, args, kwargs = _loss_case(name, (3, 5, 12))
    view = (torch.randn(5, 3, 12) * 10).transpose(0, 1).requires_grad_(True)
    expected = _run(reference, view, target, args, kwargs)
    with backend("triton"):
        actual = _run(op, view, target, args, kwargs)
    assert_close(actual[0], expected[0])
    torch.testing.assert_close(actual[1], expected[1], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", list(LOSSES))
def test_triton_nan_logit_makes_loss_and_its_row_nan(name):
    op, _, logits, target, args, kwargs = _loss_case(name, (2, 3, 10))
    with torch.no_grad():
        logits[0, 2, 4] = float("nan")  # branch / expert 0: in every ResLT group
    with backend("triton"):
        loss, grad = _run(op, logits, target, args, kwargs)
    assert torch.isnan(loss)
    assert torch.isnan(grad[0, 2]).all() and torch.isfinite(grad[:, :2]).all()


@pytest.mark.parametrize("name", list(LOSSES))
def test_triton_opcheck(name):
    logits, target, _ = _inputs((2, 3, 10))
    torch.library.opcheck(_triton_op(name), _raw_triton_args(name, logits, target),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("name", list(LOSSES))
def test_triton_torch_compile_fullgraph(name):
    op, reference, logits, target, args, kwargs = _loss_case(name, (2, 3, 9))
    compiled = torch.compile(lambda z: op(z, target, *args, **kwargs), fullgraph=True, backend="aot_eager")
    expected = _run(reference, logits, target, args, kwargs)
    with backend("triton"):
        loss = compiled(logits)
        (grad,) = torch.autograd.grad(loss, logits)
    assert_close(loss.detach(), expected[0])
    assert_close(grad, expected[1])


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("backend_name", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_cuda_matches_reference(name, backend_name, dtype):
    if backend_name == "cpp" and not fastlt._extension.HAS_CUDA:
        pytest.skip("extension built without CUDA kernels")
    op, reference, logits, target, args, kwargs = _loss_case(name, (3, 64, 8142), dtype, device="cuda")
    expected_loss, expected_grad = _run(reference, logits, target, args, kwargs)
    with backend(backend_name):
        loss, grad = _run(op, logits, target, args, kwargs)
    assert_close(loss, expected_loss, dtype)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(grad, expected_grad, atol=atol * expected_grad.abs().max().item(), rtol=rtol)


# ---- second order and torch.func: the fused ops' backward recomputes through the eager formula when differentiated

SECOND_ORDER_CASES = {
    "ride_loss": lambda C: (ride_loss, ride_loss_reference, (_counts(C),), dict(scale=3.0, drw=True)),
    "ride_loss_without_diversity": lambda C: (ride_loss, ride_loss_reference, (_counts(C),),
                                              dict(scale=3.0, drw=True, diversity_factor=0.0)),
    "reslt_loss": lambda C: (reslt_loss, reslt_loss_reference, (_nested_groups(2, C),), dict(beta=0.7, log_eps=0.01)),
    "prior_shifted_ce": lambda C: (prior_shifted_ce, prior_shifted_ce_reference, (_counts(C),),
                                   dict(taus=[1.0, 0.5])),
}
SECOND_ORDER_BACKENDS = [pytest.param("cpp", marks=needs_cpp), "triton"]


def _penalised_gradients(fn, features, weight, target, args, kwargs):
    """d/d(features, weight) of loss + ||d loss / d logits||^2 with logits = features @ weight (a gradient penalty)."""
    features, weight = features.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logits = features @ weight
    loss = fn(logits, target, *args, **kwargs)
    (grad_logits,) = torch.autograd.grad(loss, logits, create_graph=True)
    return torch.autograd.grad(loss + grad_logits.square().sum(), (features, weight))


@pytest.mark.parametrize("case", list(SECOND_ORDER_CASES))
@pytest.mark.parametrize("name", SECOND_ORDER_BACKENDS)
def test_create_graph_keeps_the_second_order_term(case, name):
    op, reference, args, kwargs = SECOND_ORDER_CASES[case](4)
    features, weight = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    target = torch.tensor([0, 1, 3])
    expected = _penalised_gradients(reference, features, weight, target, args, kwargs)
    first_order_only = torch.autograd.grad(reference(features @ weight.requires_grad_(True), target, *args, **kwargs),
                                           weight)[0]
    with backend(name):
        actual = _penalised_gradients(op, features, weight, target, args, kwargs)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want)
    assert (actual[1] - first_order_only).abs().max() > 1e-6  # the penalty's term is there


@needs_cpp
@pytest.mark.parametrize("case", ["ride_loss_without_diversity", "reslt_loss", "prior_shifted_ce"])
def test_gradgradcheck_fp64(case):
    """cpp only: the Triton ops share the autograd glue (and the interpreter makes gradgradcheck slow)."""
    op, _, args, kwargs = SECOND_ORDER_CASES[case](3)
    logits, target = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True), torch.tensor([0, 2])
    with backend("cpp"):
        assert torch.autograd.gradgradcheck(lambda z: op(z, target, *args, **kwargs), (logits,))


@pytest.mark.parametrize("case", list(SECOND_ORDER_CASES))
@pytest.mark.parametrize("name", SECOND_ORDER_BACKENDS)
def test_torch_func_grad_and_vmap(case, name):
    op, reference, args, kwargs = SECOND_ORDER_CASES[case](4)
    logits, target = torch.randn(2, 3, 4, dtype=torch.float64), torch.tensor([0, 1, 3])
    batched = torch.randn(5, 2, 3, 4, dtype=torch.float64)

    def loss_of(fn):
        return lambda z: fn(z, target, *args, **kwargs)

    with backend(name):
        grad = torch.func.grad(loss_of(op))(logits)
        per_sample = torch.vmap(loss_of(op))(batched)
    torch.testing.assert_close(grad, torch.func.grad(loss_of(reference))(logits))
    torch.testing.assert_close(per_sample, torch.stack([loss_of(reference)(z) for z in batched]))


# ---- the registered ops called directly refuse what the wrappers refuse (the Triton ops check as the C++ ops do) ----


def _raw_arguments(name, E=2, B=3, C=10):
    logits, target = torch.randn(E, B, C), torch.randint(0, C, (B,))
    if name == "ride_loss":
        margins, weights, temperatures = _tables(C, weights=True)
        return [logits, target, margins, weights, temperatures, -0.45, 1, -100, True]
    if name == "reslt_loss":
        return [logits, target, _nested_groups(E, C), 0.9, 1e-7, 1, -100, True]
    return [logits, target, torch.zeros(E, C), 1, -100, True]


def _with(arguments, index, value):
    arguments = list(arguments)
    arguments[index] = value
    return arguments


RAW_REFUSALS = {
    "target = C": lambda name, a: _with(a, 1, torch.full_like(a[1], a[0].shape[2])),
    "negative target": lambda name, a: _with(a, 1, a[1] - a[1].max() - 1),
    "int32 target": lambda name, a: _with(a, 1, a[1].int()),
    "target of B - 1 rows": lambda name, a: _with(a, 1, a[1][:-1]),
    "2-d logits": lambda name, a: _with(a, 0, a[0][0]),
    "integer logits": lambda name, a: _with(a, 0, a[0].long()),
    "table one class short": lambda name, a: _with(a, 2, a[2][..., :-1]),
    "table of wrong rank": lambda name, a: _with(a, 2, a[2].reshape(-1)[:3] if name == "ride_loss" else a[2][0]),
}
RAW_OP_REFUSALS = {
    ("ride_loss", "class_weights of 3"): lambda a: _with(a, 3, torch.ones(3)),
    ("ride_loss", "temperatures one short"): lambda a: _with(a, 4, a[4][:-1]),
    ("ride_loss", "NaN diversity_factor"): lambda a: _with(a, 5, float("nan")),
    ("reslt_loss", "float group_masks"): lambda a: _with(a, 2, a[2].float()),
    ("reslt_loss", "an all-False group_masks row"): lambda a: _with(a, 2, torch.cat([a[2][:1], ~a[2][:1] & a[2][:1]])),
    ("reslt_loss", "beta 1.5"): lambda a: _with(a, 3, 1.5),
    ("reslt_loss", "NaN log_eps"): lambda a: _with(a, 4, float("nan")),
    ("prior_shifted_ce", "shifts [E, C - 1]"): lambda a: _with(a, 2, a[2][:, :-1]),
    ("prior_shifted_ce", "shifts [E - 1, C]"): lambda a: _with(a, 2, a[2][:1]),
}
RAW_CASES = ([(name, what, (lambda change: lambda a, name=name: change(name, a))(change))
              for name in ("ride_loss", "reslt_loss", "prior_shifted_ce") for what, change in RAW_REFUSALS.items()]
             + [(name, what, change) for (name, what), change in RAW_OP_REFUSALS.items()])


@pytest.mark.parametrize("suffix", [pytest.param("", marks=needs_cpp), "_triton"])
@pytest.mark.parametrize("name, what, change", RAW_CASES, ids=[f"{n}-{w}" for n, w, _ in RAW_CASES])
def test_raw_ops_refuse_bad_arguments_with_value_error(name, what, change, suffix):
    op = raw_op(name + suffix.replace("_", "."))  # the compiled op or its triton overload (fastlt/ops/_library.py)
    op(*_raw_arguments(name))  # the unchanged arguments are fine
    with pytest.raises(ValueError, match=r"fastlt\.(ride_loss|reslt_loss|prior_shifted_ce)"):
        op(*change(_raw_arguments(name)))
