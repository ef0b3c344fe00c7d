import math

import numpy as np
import pytest
import torch
from op_helpers import COMPILED_BACKENDS, backend, call_cuda_kernel, needs_cuda, needs_cuda_build, raw_op, raw_ops

import fastlt
from fastlt.ops import shot_accuracy_per_tau, tau_normalize_reference, tau_sweep, tau_sweep_reference

TAUS = torch.linspace(0, 2, 21)


def _scores(features, weight, tau, bias=None):
    logits = features.double() @ tau_normalize_reference(weight.double(), float(tau)).t()
    return logits if bias is None else logits + bias.double()


def assert_argmax_equivalent(predictions, features, weight, taus, bias=None):
    """Each prediction attains the row maximum of the exact (fp64) scores, up to fp32 rounding of the scores."""
    for k, tau in enumerate(taus.tolist()):
        scores = _scores(features, weight, tau, bias)
        chosen = scores.gather(1, predictions[k].unsqueeze(1)).squeeze(1)
        best = scores.max(1).values
        assert torch.all(chosen >= best - 1e-5 * (1 + best.abs())), f"tau={tau}: a prediction is not a maximum"


@pytest.mark.parametrize("name", COMPILED_BACKENDS + ["reference"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 1, 3), (64, 10, 13), (33, 100, 7), (20, 8142, 9)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_predictions_are_argmax_of_tau_normalised_logits(name, shape, with_bias):
    n, c, d = shape
    features, weight = torch.randn(n, d), torch.randn(c, d) * torch.rand(c, 1) * 3
    bias = torch.randn(c) if with_bias else None
    taus = TAUS[::10] if (name == "triton" and c > 1000) else TAUS  # the interpreter is slow: 3 taus at C=8142
    with backend(name):
        predictions = tau_sweep(features, weight, taus, bias=bias)
    assert predictions.shape == (len(taus), n) and predictions.dtype == torch.long
    assert_argmax_equivalent(predictions, features, weight, taus, bias)


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_equals_reference_on_well_separated_data(name):
    features, weight = torch.randn(200, 16), torch.randn(30, 16)
    taus = torch.tensor([0.0, 0.5, 1.0, 1.5])
    with backend(name):
        torch.testing.assert_close(tau_sweep(features, weight, taus), tau_sweep_reference(features, weight, taus))


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_argmax_semantics_ties_infinities_nan(name):
    weight = torch.eye(4)
    features = torch.tensor([
        [1.0, 3.0, 3.0, 0.0],  # tie: first index wins
        [-math.inf, -math.inf, -math.inf, -math.inf],  # all -inf: index 0
        [0.0, math.nan, 5.0, math.nan],  # NaN wins, first NaN
        [0.0, 1.0, 2.0, math.inf],
    ])
    with backend(name):
        predictions = tau_sweep(features, weight, torch.tensor([0.0, 1.0]))
    expected = (features @ weight.t()).argmax(1)
    assert predictions.tolist() == [expected.tolist()] * 2


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_double_precision(name, dtype):
    features, weight = torch.randn(40, 24, dtype=dtype), torch.randn(12, 24, dtype=dtype)
    with backend(name):
        predictions = tau_sweep(features, weight, TAUS)
    assert_argmax_equivalent(predictions, features.float(), weight.float(), TAUS)


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_strided_inputs(name):
    features = torch.randn(16, 50).t()  # [50, 16] non-contiguous
    weight = torch.randn(20, 32)[:, ::2]  # [20, 16] strided
    with backend(name):
        predictions = tau_sweep(features, weight, TAUS)
    assert_argmax_equivalent(predictions, features, weight, TAUS)


def test_opcheck():
    args = (torch.randn(9, 5), torch.randn(7, 5), torch.tensor([0.0, 0.5, 1.0]), torch.randn(7), 1e-12)
    ops = [torch.ops.fastlt.tau_sweep.triton]
    if fastlt._extension.AVAILABLE:
        ops.append(torch.ops.fastlt.tau_sweep.default)
    for op in ops:
        torch.library.opcheck(op, args)
        torch.library.opcheck(op, args[:3] + (None, 1e-12))


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_torch_compile_fullgraph(name):
    features, weight, taus = torch.randn(30, 8), torch.randn(6, 8), torch.tensor([0.0, 1.0])
    with backend(name):
        compiled = torch.compile(lambda f, w, t: tau_sweep(f, w, t), fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(features, weight, taus), tau_sweep_reference(features, weight, taus))


@pytest.mark.parametrize("name", COMPILED_BACKENDS + ["reference"])
def test_bad_input_names_the_argument(name):
    f, w = torch.randn(4, 3), torch.randn(5, 3)
    cases = [
        (dict(features=torch.randn(4), weight=w), "features"),
        (dict(features=f, weight=torch.randn(5, 4)), "disagree on D"),
        (dict(features=f.long(), weight=w), "features"),
        (dict(features=torch.randn(0, 3), weight=w), "features"),
        (dict(features=f, weight=w, taus=[0.5, -1.0]), "tau"),
        (dict(features=f, weight=w, taus=torch.zeros(2, 2)), "taus"),
        (dict(features=f, weight=w, bias=torch.randn(4)), "bias"),
    ]
    with backend(name):
        for kwargs, needle in cases:
            with pytest.raises(ValueError, match=needle):
                tau_sweep(**kwargs)


@pytest.mark.parametrize("name", COMPILED_BACKENDS + ["reference"])
@pytest.mark.parametrize("eps", [0.0, -1e-3, float("nan"), float("inf")])
def test_invalid_eps_is_refused_by_every_backend(name, eps):
    """The compiled backends returned predictions for eps <= 0 / NaN (every tau > 0 picked the dead class)."""
    weight = torch.randn(5, 3)
    weight[2] = 0
    with backend(name), pytest.raises(ValueError, match="eps"):
        tau_sweep(torch.randn(4, 3), weight, [0.0, 1.0], eps=eps)


@pytest.mark.parametrize("op_name", raw_ops("tau_sweep"))
def test_raw_op_refuses_what_the_wrapper_refuses(op_name):
    op = raw_op(op_name)
    f, w, taus = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0.0, 1.0])
    cases = [
        ((torch.randn(4), w, taus, None, 1e-12), "features"),
        ((f, torch.randn(5, 4), taus, None, 1e-12), "disagree on D"),
        ((f.long(), w, taus, None, 1e-12), "features"),
        ((torch.randn(0, 3), w, taus, None, 1e-12), "features"),
        ((f, torch.randn(0, 3), taus, None, 1e-12), "weight"),
        ((f, w, torch.tensor([0.5, -1.0]), None, 1e-12), "tau"),
        ((f, w, torch.tensor([0.5, float("nan")]), None, 1e-12), "tau"),
        ((f, w, torch.tensor([float("inf")]), None, 1e-12), "tau"),
        ((f, w, torch.zeros(2, 2), None, 1e-12), "taus"),
        ((f, w, torch.zeros(0), None, 1e-12), "taus"),
        ((f, w, torch.tensor([0, 1]), None, 1e-12), "taus"),
        ((f, w, taus, torch.randn(4), 1e-12), "bias"),
        ((f, w, taus, torch.randn(5, 1), 1e-12), "bias"),
        ((f, w, taus, None, 0.0), "eps"),
        ((f, w, taus, None, float("nan")), "eps"),
    ]
    for args, needle in cases:
        with pytest.raises(ValueError, match=needle):
            op(*args)
        with backend("reference"), pytest.raises(ValueError, match=needle):
            tau_sweep(*args[:3], bias=args[3], eps=args[4])


@pytest.mark.parametrize("name", COMPILED_BACKENDS + ["reference"])
def test_nan_weight_row_matches_reference(name):
    features, weight = torch.randn(6, 4), torch.randn(5, 4)
    weight[3, 1] = float("nan")
    taus = torch.tensor([0.0, 0.5, 1.0])
    with backend(name):
        torch.testing.assert_close(tau_sweep(features, weight, taus), tau_sweep_reference(features, weight, taus))


@needs_cuda_build
def test_cuda_kernel_refuses_cpu_tensors():
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        call_cuda_kernel("tau_sweep", torch.randn(3, 4), torch.randn(5, 4), torch.ones(2), None, 1e-12)


def test_shot_accuracy_per_tau_counts_class_means():
    class_counts = np.array([500, 150, 60, 30, 10, 5])  # many: 0,1; medium: 2,3; few: 4,5
    targets = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 5, 5])
    predictions = torch.tensor([
        [0, 0, 1, 2, 3, 3, 4, 5, 5, 5],  # all right
        [0, 1, 1, 0, 3, 0, 0, 5, 0, 0],  # class 0: 1/2, 1: 1, 2: 0, 3: 1/2, 4: 0, 5: 1/3
    ])
    rows = shot_accuracy_per_tau(predictions, targets, class_counts, taus=[0.0, 1.0])
    assert rows[0] == {"tau": 0.0, "overall": 100.0, "many": 100.0, "medium": 100.0, "few": 100.0}
    assert rows[1]["many"] == pytest.approx(75.0)
    assert rows[1]["medium"] == pytest.approx(25.0)
    assert rows[1]["few"] == pytest.approx(100 / 6)
    assert rows[1]["overall"] == pytest.approx(100 * (0.5 + 1 + 0 + 0.5 + 0 + 1 / 3) / 6)
    with pytest.raises(ValueError, match="targets"):
        shot_accuracy_per_tau(predictions, targets + 10, class_counts)


@pytest.mark.parametrize("taus", [[0.0], [0.0, 1.0, 2.0], [[0.0, 1.0]]])
def test_shot_accuracy_per_tau_needs_one_tau_per_row(taus):
    """Fewer taus than rows silently dropped rows; more gave a bare IndexError."""
    predictions = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="taus must hold one value per row of predictions"):
        shot_accuracy_per_tau(predictions, torch.zeros(4, dtype=torch.long), np.array([5, 5]), taus=taus)
    row = shot_accuracy_per_tau(predictions[0], torch.zeros(4, dtype=torch.long), np.array([5, 5]), taus=0.5)
    assert [r["tau"] for r in row] == [0.5]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_cuda_predictions(name):
    features, weight = torch.randn(5000, 512, device="cuda"), torch.randn(1000, 512, device="cuda")
    with backend(name):
        predictions = tau_sweep(features, weight, TAUS.cuda())
    assert_argmax_equivalent(predictions.cpu(), features.cpu(), weight.cpu(), TAUS)
