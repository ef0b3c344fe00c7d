import pytest
import torch
import torch.nn.functional as F
from op_helpers import TOLERANCES, assert_close, backend, long_tail_counts, needs_cpp

from fastlt.ops import prior_shifted_ce, prior_shifted_ce_reference

def _inputs(shape, dtype=torch.float32, scale=10.0):
    E, B, C = shape
    logits = (torch.randn(E, B, C) * scale).to(dtype).requires_grad_(True)
    taus = torch.linspace(-1.0, 2.0, E).tolist()  # one per expert (RIDE-style experts with different adjustments)
    return logits, torch.randint(0, C, (B,)), long_tail_counts(C), taus


def _loss_and_grad(fn, logits, target, counts, taus):
    loss = fn(logits, target, counts, taus=taus)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


def test_reference_matches_the_formula_by_hand():
    logits, target, counts, taus = _inputs((2, 4, 6), torch.float64)
    prior = counts.double() / counts.sum()
    expected = 0
    for expert, tau in zip(logits, taus):
        shifted = expert + tau * prior.log()
        expected = expected + sum(torch.logsumexp(shifted[i], 0) - shifted[i, target[i]] for i in range(4)) / 4
    torch.testing.assert_close(prior_shifted_ce_reference(logits, target, counts, taus=taus), expected)


@pytest.mark.parametrize("name", [pytest.param("cpp", marks=needs_cpp), "reference"])
def test_zero_tau_is_plain_cross_entropy(name):
    logits, target, counts, _ = _inputs((1, 5, 9))
    with backend(name):
        loss = prior_shifted_ce(logits, target, counts, taus=[0.0])
    assert_close(loss, F.cross_entropy(logits[0], target))


@needs_cpp
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 2), (2, 5, 7), (3, 4, 33), (5, 3, 300), (6, 2, 64),
                                   (2, 2, 8142)])
def test_cpp_matches_reference_fp32(shape):
    logits, target, counts, taus = _inputs(shape)
    expected_loss, expected_grad = _loss_and_grad(prior_shifted_ce_reference, logits, target, counts, taus)
    with backend("cpp"):
        loss, grad = _loss_and_grad(prior_shifted_ce, logits, target, counts, taus)
    assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6 * expected_grad.abs().max().item() + 1e-9, rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_low_precision_tolerance_table(dtype):
    logits, target, counts, taus = _inputs((3, 6, 300), dtype)
    expected_loss, expected_grad = _loss_and_grad(prior_shifted_ce_reference, logits, target, counts, taus)
    with backend("cpp"):
        loss, grad = _loss_and_grad(prior_shifted_ce, logits, target, counts, taus)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close(loss, expected_loss, dtype)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(grad, expected_grad, atol=atol * expected_grad.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("name", [pytest.param("cpp", marks=needs_cpp), "reference"])
@pytest.mark.parametrize("num_experts", [1, 3])
def test_gradcheck_fp64(name, num_experts):
    logits, target, counts, taus = _inputs((num_experts, 4, 5), torch.float64, scale=2.0)
    with backend(name):
        assert torch.autograd.gradcheck(lambda z: prior_shifted_ce(z, target, counts, taus=taus), (logits,))


@needs_cpp
def test_strided_inputs_are_read_in_place():
    stacked = torch.randn(6, 3, 64) * 10  # [B, E, C], as torch.stack(outputs, dim=1) gives
    target, counts, taus = torch.randint(0, 64, (6,)), long_tail_counts(64), [1.0, 0.5, 0.0]
    for view in (stacked.transpose(0, 1), torch.randn(3, 6, 128)[:, :, ::2] * 10):
        view = view.requires_grad_(True) if view.is_leaf else view.detach().requires_grad_(True)
        expected = _loss_and_grad(prior_shifted_ce_reference, view.contiguous(), target, counts, taus)
        with backend("cpp"):
            actual = _loss_and_grad(prior_shifted_ce, view, target, counts, taus)
        assert_close(actual[0], expected[0])
        torch.testing.assert_close(actual[1], expected[1], atol=1e-7, rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("dtype, magnitude", [(torch.float32, 1e4), (torch.float16, 6e4)])
def test_extreme_logits_and_count_ratios_stay_finite(dtype, magnitude):
    logits = ((torch.rand(2, 5, 50) * 2 - 1) * magnitude).to(dtype).requires_grad_(True)
    counts = torch.ones(50)
    counts[:3] = 1e6  # a 1e6 : 1 imbalance and classes with a single sample
    target, taus = torch.randint(0, 50, (5,)), [1.0, 2.0]
    with backend("cpp"):
        loss, grad = _loss_and_grad(prior_shifted_ce, logits, target, counts, taus)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    if dtype == torch.float32:
        expected_loss, expected_grad = _loss_and_grad(prior_shifted_ce_reference, logits, target, counts, taus)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-2)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


@needs_cpp
def test_nan_logit_makes_loss_and_its_row_nan():
    logits, target, counts, taus = _inputs((2, 3, 10))
    with torch.no_grad():
        logits[1, 2, 4] = float("nan")
    with backend("cpp"):
        loss, grad = _loss_and_grad(prior_shifted_ce, logits, target, counts, taus)
    assert torch.isnan(loss)
    assert torch.isnan(grad[1, 2]).all() and torch.isfinite(grad[0]).all() and torch.isfinite(grad[1, :2]).all()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda z, y, n, t: (z, y + 100, n, t), "target must be in"),
        (lambda z, y, n, t: (z, y[:-1], n, t), "target must be"),
        (lambda z, y, n, t: (z, y, n[:-1], t), "class_counts must be"),
        (lambda z, y, n, t: (z, y, n - n, t), "positive"),
        (lambda z, y, n, t: (z, y, -n, t), "positive"),
        (lambda z, y, n, t: (z, y, n, t[:1]), "one value per expert"),
        (lambda z, y, n, t: (z, y, n, [float("inf"), 1.0]), "finite"),
        (lambda z, y, n, t: (z[0, 0], y, n, t), "expert_logits must have 3 dims"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(change, message):
    logits, target, counts, taus = _inputs((2, 3, 10))
    logits, target, counts, taus = change(logits, target, counts, taus)
    with pytest.raises(ValueError, match=message):
        prior_shifted_ce(logits, target, counts, taus=taus)


@needs_cpp
def test_cpp_op_checks_its_own_arguments():
    logits, target, _, _ = _inputs((2, 3, 10))
    with pytest.raises(ValueError, match="target must be in"):
        torch.ops.fastlt.prior_shifted_ce(logits.detach(), target + 10, torch.zeros(2, 10), False)
    with pytest.raises(ValueError, match="logit_shifts must be"):
        torch.ops.fastlt.prior_shifted_ce(logits.detach(), target, torch.zeros(1, 10), False)


@needs_cpp
def test_backward_scales_by_grad_output_and_keeps_one_gradient_buffer():
    logits, target, counts, taus = _inputs((2, 3, 10))
    with backend("cpp"):
        _, unit_grad = _loss_and_grad(prior_shifted_ce, logits, target, counts, taus)
        (prior_shifted_ce(logits, target, counts, taus=taus) * 2.5).backward()
    torch.testing.assert_close(logits.grad, 2.5 * unit_grad)
    _, grad = torch.ops.fastlt.prior_shifted_ce(logits.detach(), target, torch.zeros(2, 10), False)
    assert grad.numel() == 0


@needs_cpp
def test_opcheck():
    logits, target, _, _ = _inputs((2, 3, 10))
    torch.library.opcheck(torch.ops.fastlt.prior_shifted_ce.default, (logits, target, torch.randn(2, 10), True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@needs_cpp
@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    logits, target, counts, taus = _inputs((3, 4, 20))
    compiled = torch.compile(lambda z: prior_shifted_ce(z, target, counts, taus=taus), fullgraph=True)
    with backend("cpp"):
        expected = _loss_and_grad(prior_shifted_ce, logits, target, counts, taus)
        loss = compiled(logits)
        (grad,) = torch.autograd.grad(loss, logits)
    assert_close(loss.detach(), expected[0])
    assert_close(grad, expected[1])


# ---- conveniences: single head, int32 targets, a list of counts, one tau, soft targets, label smoothing ----

BACKENDS = [pytest.param("cpp", marks=needs_cpp), "triton", "reference"]


@pytest.mark.parametrize("name", BACKENDS)
def test_single_head_int32_targets_list_counts_and_one_tau(name):
    logits, target, counts, _ = _inputs((1, 5, 9))
    expected_loss, expected_grad = _loss_and_grad(prior_shifted_ce_reference, logits, target, counts, [0.7])
    head = logits.detach()[0].requires_grad_(True)
    with backend(name):
        loss = prior_shifted_ce(head, target.int(), counts.tolist(), taus=0.7)
        (grad,) = torch.autograd.grad(loss, head)
        two_experts = prior_shifted_ce(logits.detach().expand(2, 5, 9), target, counts, taus=0.7)
    assert_close(loss.detach(), expected_loss)
    assert_close(grad, expected_grad[0])
    assert_close(two_experts, 2 * expected_loss)


@pytest.mark.parametrize("name", BACKENDS)
def test_soft_targets_and_label_smoothing_match_cross_entropy(name):
    logits, target, counts, taus = _inputs((2, 4, 6), torch.float64)
    shifts = [tau * (counts.double() / counts.sum()).log() for tau in taus]
    probabilities = torch.softmax(torch.randn(4, 6, dtype=torch.float64), 1)
    with backend(name):
        soft = prior_shifted_ce(logits, probabilities, counts, taus=taus)
        smoothed = prior_shifted_ce(logits, target, counts, taus=taus, label_smoothing=0.1)
    torch.testing.assert_close(soft, sum(F.cross_entropy(z + s, probabilities) for z, s in zip(logits, shifts)))
    torch.testing.assert_close(smoothed, sum(F.cross_entropy(z + s, target, label_smoothing=0.1)
                                             for z, s in zip(logits, shifts)))
    onehot = F.one_hot(target, 6).double()
    torch.testing.assert_close(prior_shifted_ce(logits, onehot, counts, taus=taus),
                               prior_shifted_ce(logits, target, counts, taus=taus))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(target=lambda t: torch.rand(4, 5)), "must be \\[B, C\\]"),
        (dict(target=lambda t: -torch.rand(4, 6)), "finite and >= 0"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(counts=lambda n: torch.cat([n[:-1], torch.zeros(1)])), "log prior of a class without training"),
    ],
)
def test_conveniences_refuse_what_is_ill_defined(change, message):
    logits, target, counts, taus = _inputs((2, 4, 6))
    target = change.get("target", lambda t: t)(target)
    counts = change.get("counts", lambda n: n)(counts)
    with pytest.raises(ValueError, match=message):
        prior_shifted_ce(logits, target, counts, taus=taus, label_smoothing=change.get("label_smoothing", 0.0))
