import pytest
import torch
import torch.nn.functional as F
from op_helpers import TOLERANCES, assert_close, backend, long_tail_counts, needs_cpp

import fastlt
from fastlt.ops import ride_loss, ride_loss_reference
from fastlt.ops._lt_constants import drw_weights, ldam_margins, ride_temperatures

def _inputs(shape, dtype=torch.float32, scale=10.0):
    E, B, C = shape
    logits = (torch.randn(E, B, C) * scale).to(dtype).requires_grad_(True)
    return logits, torch.randint(0, C, (B,)), long_tail_counts(C)


def _loss_and_grad(fn, logits, target, counts, **kwargs):
    loss = fn(logits, target, counts, **kwargs)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


def test_reference_matches_the_ride_formula_by_hand():
    torch.manual_seed(1)
    logits, target, counts = _inputs((2, 4, 6), torch.float64)
    margins, weights = ldam_margins(counts, 0.5), drw_weights(counts, 0.9999)
    temperatures = ride_temperatures(counts, 0.05, 1.0, drw=True)
    pbar = F.softmax(logits.detach().mean(0) / temperatures, -1)
    expected = 0
    for z in logits:
        ce = torch.stack([torch.logsumexp(z[i] - 30 * margins[target[i]] * F.one_hot(target[i], 6), 0)
                          - (z[i, target[i]] - 30 * margins[target[i]]) for i in range(4)])
        expected = expected + (weights[target] * ce).sum() / weights[target].sum()
        q = F.log_softmax(z / temperatures, -1)
        expected = expected - 0.45 * temperatures.mean() ** 2 * (pbar * (pbar.log() - q)).sum() / 4
    torch.testing.assert_close(ride_loss_reference(logits, target, counts, drw=True), expected)


@needs_cpp
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 2), (2, 5, 7), (3, 4, 33), (6, 3, 300), (4, 2, 8142)])
@pytest.mark.parametrize("drw", [False, True])
@pytest.mark.parametrize("diversity_factor", [-0.45, 0.0, 0.3])
def test_cpp_matches_reference_fp32(shape, drw, diversity_factor):
    logits, target, counts = _inputs(shape)
    kwargs = dict(drw=drw, diversity_factor=diversity_factor)
    expected_loss, expected_grad = _loss_and_grad(ride_loss_reference, logits, target, counts, **kwargs)
    with backend("cpp"):
        loss, grad = _loss_and_grad(ride_loss, logits, target, counts, **kwargs)
    assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6 * expected_grad.abs().max().item() + 1e-9, rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_low_precision_tolerance_table(dtype):
    logits, target, counts = _inputs((3, 6, 300), dtype)
    expected_loss, expected_grad = _loss_and_grad(ride_loss_reference, logits, target, counts, drw=True)
    with backend("cpp"):
        loss, grad = _loss_and_grad(ride_loss, logits, target, counts, drw=True)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close(loss, expected_loss, dtype)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(grad, expected_grad, atol=atol * expected_grad.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("name", [pytest.param("cpp", marks=needs_cpp), "reference"])
@pytest.mark.parametrize("drw", [False, True])
def test_gradcheck_fp64(name, drw):
    logits, target, counts = _inputs((3, 4, 5), torch.float64, scale=2.0)
    with backend(name):
        assert torch.autograd.gradcheck(lambda z: ride_loss(z, target, counts, scale=3.0, drw=drw), (logits,))


@needs_cpp
def test_strided_inputs_are_read_in_place():
    stacked = torch.randn(6, 3, 64) * 10  # [B, E, C], as torch.stack(outputs, dim=1) gives
    target = torch.randint(0, 64, (6,))
    counts = long_tail_counts(64)
    for view in (stacked.transpose(0, 1), torch.randn(3, 6, 128)[:, :, ::2] * 10):
        view = view.requires_grad_(True) if view.is_leaf else view.detach().requires_grad_(True)
        expected = _loss_and_grad(ride_loss_reference, view.contiguous(), target, counts, drw=True)
        with backend("cpp"):
            actual = _loss_and_grad(ride_loss, view, target, counts, drw=True)
        assert_close(actual[0], expected[0])
        torch.testing.assert_close(actual[1], expected[1], atol=1e-7, rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("dtype, magnitude", [(torch.float32, 1e4), (torch.float16, 6e4)])
def test_extreme_logits_and_count_ratios_stay_finite(dtype, magnitude):
    logits = ((torch.rand(3, 5, 50) * 2 - 1) * magnitude).to(dtype).requires_grad_(True)
    counts = torch.ones(50)
    counts[:3] = 1e6  # a 1e6 : 1 imbalance and classes with a single sample
    target = torch.randint(0, 50, (5,))
    with backend("cpp"):
        loss, grad = _loss_and_grad(ride_loss, logits, target, counts, drw=True)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    if dtype == torch.float32:
        expected_loss, expected_grad = _loss_and_grad(ride_loss_reference, logits, target, counts, drw=True)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-2)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


@needs_cpp
def test_nan_logit_makes_loss_and_its_row_nan():
    logits, target, counts = _inputs((2, 3, 10))
    with torch.no_grad():
        logits[1, 2, 4] = float("nan")
    with backend("cpp"):
        loss, grad = _loss_and_grad(ride_loss, logits, target, counts)
    assert torch.isnan(loss)
    assert torch.isnan(grad[:, 2]).all() and torch.isfinite(grad[:, :2]).all()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda z, y, n: (z, y + 100, n), "target must be in"),
        (lambda z, y, n: (z, y[:-1], n), "target must be"),
        (lambda z, y, n: (z, y.float(), n), "int64"),
        (lambda z, y, n: (z, y, n[:-1]), "class_counts must be"),
        (lambda z, y, n: (z, y, n - n), "positive"),
        (lambda z, y, n: (z, y, -n), "positive"),
        (lambda z, y, n: (z[0], y, n), "expert_logits must have 3 dims"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(change, message):
    logits, target, counts = _inputs((2, 3, 10))
    with pytest.raises(ValueError, match=message):
        ride_loss(*change(logits, target, counts))


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("drw_beta", 1.0, r"drw_beta must be a finite number in \[0, 1\)"),
        ("drw_beta", -0.5, "drw_beta"),
        ("base_temperature", 0.0, r"base_temperature must be a finite number in \(0, inf\)"),
        ("base_temperature", float("inf"), "base_temperature"),
        ("diversity_factor", float("nan"), "diversity_factor must be a finite number"),
        ("max_margin", float("inf"), "max_margin must be a finite number in"),
        ("max_margin", -0.1, "max_margin"),
        ("scale", float("nan"), "scale"),
        ("temperature_factor", 1.5, "temperature_factor"),
    ],
)
@pytest.mark.parametrize("name_backend", [pytest.param("cpp", marks=needs_cpp), "triton", "reference"])
def test_bad_hyperparameters_raise_the_same_value_error_on_every_backend(name, value, message, name_backend):
    logits, target, counts = _inputs((2, 3, 10))
    kwargs = {name: value, "drw": True}
    with backend(name_backend), pytest.raises(ValueError, match=message):
        ride_loss(logits, target, counts, **kwargs)
    with pytest.raises(ValueError, match=message):
        ride_loss_reference(logits, target, counts, **kwargs)
    with pytest.raises(ValueError, match=message):
        fastlt.RIDELoss(counts, **{key: v for key, v in kwargs.items() if key != "drw"})


@needs_cpp
def test_cpp_op_checks_its_own_arguments():
    logits, target, counts = _inputs((2, 3, 10))
    margins = torch.zeros(10)
    with pytest.raises(ValueError, match="target must be in"):
        torch.ops.fastlt.ride_loss(logits.detach(), target + 10, margins, None, torch.ones(10), -0.45, False)
    with pytest.raises(ValueError, match="temperatures must be"):
        torch.ops.fastlt.ride_loss(logits.detach(), target, margins, None, torch.ones(9), -0.45, False)
    with pytest.raises(ValueError, match="diversity_factor must be finite"):
        torch.ops.fastlt.ride_loss(logits.detach(), target, margins, None, torch.ones(10), float("nan"), False)


@needs_cpp
def test_backward_scales_by_grad_output_and_keeps_one_gradient_buffer():
    logits, target, counts = _inputs((2, 3, 10))
    with backend("cpp"):
        _, unit_grad = _loss_and_grad(ride_loss, logits, target, counts)
        (ride_loss(logits, target, counts) * 2.5).backward()
    torch.testing.assert_close(logits.grad, 2.5 * unit_grad)
    logits.grad = None
    with backend("cpp"):
        loss = ride_loss(logits, target, counts)
        loss.backward(retain_graph=True)
        (loss * 2).backward(retain_graph=True)  # scales the saved buffer in place, after the first was copied
        torch.testing.assert_close(logits.grad, 3 * unit_grad)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # never a wrong gradient
            loss.backward()


@needs_cpp
def test_no_gradient_is_computed_without_requires_grad():
    logits, target, counts = _inputs((2, 3, 10))
    with backend("cpp"):
        loss = ride_loss(logits.detach(), target, counts)
    assert not loss.requires_grad
    _, grad = torch.ops.fastlt.ride_loss(logits.detach(), target, torch.zeros(10), None, torch.ones(10), -0.45, False)
    assert grad.numel() == 0


@needs_cpp
def test_opcheck():
    logits, target, counts = _inputs((2, 3, 10))
    for weights in (None, torch.rand(10) + 0.5):
        args = (logits, target, torch.rand(10), weights, torch.rand(10) + 0.5, -0.45, True)
        torch.library.opcheck(torch.ops.fastlt.ride_loss.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@needs_cpp
@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    logits, target, counts = _inputs((3, 4, 20))
    compiled = torch.compile(lambda z: ride_loss(z, target, counts, drw=True), fullgraph=True)
    with backend("cpp"):
        expected = _loss_and_grad(ride_loss, logits, target, counts, drw=True)
        loss = compiled(logits)
        (grad,) = torch.autograd.grad(loss, logits)
    assert_close(loss.detach(), expected[0])
    assert_close(grad, expected[1])


@pytest.mark.parametrize("name", [pytest.param("cpp", marks=needs_cpp), "triton", "reference"])
def test_int32_targets_and_a_list_of_counts_are_accepted(name):
    logits, target, counts = _inputs((2, 3, 10))
    expected = ride_loss_reference(logits, target, counts, drw=True)
    with backend(name):
        assert_close(ride_loss(logits, target.int(), counts.tolist(), drw=True), expected)
        with pytest.raises(ValueError, match="LDAM's margin n\\^-1/4 of a class without training samples"):
            ride_loss(logits, target, [0.0] + counts.tolist()[1:])
