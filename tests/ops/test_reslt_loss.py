"""reslt_loss on every backend: the reference, the C++ kernels, the Triton kernels (run on CPU tensors under
TRITON_INTERPRET=1, tests/conftest.py, on small shapes as the interpreter is slow) and, in `gpu`-marked cases, the CUDA
kernels and Triton on a CUDA device."""

import loss_cases
import pytest
import torch
import torch.nn.functional as F
from loss_cases import nested_groups
from op_helpers import (COMPILED_BACKENDS, assert_close, backend, backend_param, call_cuda_kernel,
                        loss_and_grad, loss_inputs, needs_cpp, needs_cuda, needs_cuda_build, on_cpu, raw_op,
                        raw_ops)

import fastlt
from fastlt.ops import reslt_groups, reslt_loss, reslt_loss_reference

CIFAR100_COUNTS = (500 * 0.01 ** (torch.arange(100) / 99)).floor()  # CIFAR-100-LT, r = 100


def _inputs(shape, dtype=torch.float32, scale=10.0, device="cpu"):
    """loss_inputs with ResLT's nested group masks in place of the class counts."""
    logits, target, _ = loss_inputs(shape, dtype, scale, device)
    return logits, target, nested_groups(shape[0], shape[2]).to(device)


def test_reference_matches_the_reslt_formula_by_hand():
    logits, target, groups = _inputs((3, 6, 7), torch.float64)
    target[:3] = 6  # tail samples: every branch counts them
    pairs = individual = fused = 0
    for i in range(6):
        for b in range(3):
            if groups[b, target[i]]:
                individual = individual - torch.log_softmax(logits[b, i], 0)[target[i]]
                pairs += 1
        fused = fused - torch.log_softmax(logits[:, i].sum(0), 0)[target[i]] / 6
    expected = 0.8 * individual / pairs + 0.2 * fused
    torch.testing.assert_close(reslt_loss_reference(logits, target, groups, beta=0.8), expected)


def test_reference_log_eps_is_the_official_resLT_cross_entropy():
    """ResLT's crossEntropy (ImageNetLT/ImageNetTrain_reslt_ride.py): -(w * (onehot * log(softmax(z) + 1e-7)).sum(1))
    .sum(), with I_loss normalised by the in-group pairs and F_loss by the batch."""
    logits, target, groups = _inputs((3, 6, 7), torch.float64, scale=30.0)
    onehot = F.one_hot(target, 7).double()

    def official_cross_entropy(z, weight):
        return -(weight * (onehot * torch.log(torch.softmax(z, 1) + 1e-7)).sum(1)).sum()

    in_group = groups[:, target].double()
    individual = sum(official_cross_entropy(logits[b], in_group[b]) for b in range(3)) / in_group.sum()
    fused = official_cross_entropy(logits.sum(0), torch.ones(6, dtype=torch.float64)) / 6
    expected = 0.99 * individual + 0.01 * fused
    torch.testing.assert_close(reslt_loss_reference(logits, target, groups, beta=0.99, log_eps=1e-7), expected)
    exact = reslt_loss_reference(logits, target, groups, beta=0.99)
    assert (exact - expected).abs() > 1e-6  # at scale 30 the epsilon matters: 0 is not the official loss


@pytest.mark.parametrize("name, shape", [("reference", (3, 4, 5)), backend_param("cpp", (3, 4, 5)),
                                         ("triton", (2, 2, 3))])
@pytest.mark.parametrize("log_eps", [1e-7, 0.05])
def test_log_eps_gradcheck_fp64(name, shape, log_eps):
    logits, target, groups = _inputs(shape, torch.float64, scale=3.0)
    with backend(name):
        assert torch.autograd.gradcheck(lambda z: reslt_loss(z, target, groups, beta=0.7, log_eps=log_eps), (logits,))


LOG_EPS_CASES = ([on_cpu("cpp", (3, 6, 40), dtype, log_eps) for dtype in [torch.float64, torch.float32]
                  for log_eps in [1e-7, 1e-3, 0.3]]
                 + [on_cpu("triton", (3, 5, 1100), torch.float32, log_eps) for log_eps in [1e-7, 0.05]])


@pytest.mark.parametrize("name, device, shape, dtype, log_eps", LOG_EPS_CASES)
def test_log_eps_matches_reference(name, device, shape, dtype, log_eps):
    logits, target, groups = _inputs(shape, dtype, scale=8.0, device=device)
    expected_loss, expected_grad = loss_and_grad(reslt_loss_reference, logits, target, groups, beta=0.9,
                                                 log_eps=log_eps)
    with backend(name):
        loss, grad = loss_and_grad(reslt_loss, logits, target, groups, beta=0.9, log_eps=log_eps)
    assert_close(loss, expected_loss, dtype)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6 * expected_grad.abs().max().item() + 1e-12, rtol=1e-5)


@pytest.mark.parametrize("name", [pytest.param("cpp", marks=needs_cpp), "reference"])
def test_log_eps_caps_the_loss_of_a_hopeless_sample(name):
    logits = torch.zeros(1, 1, 4, dtype=torch.float64)
    logits[0, 0, 3] = -800.0  # softmax of the label underflows to 0
    logits.requires_grad_(True)
    target, groups = torch.tensor([3]), torch.ones(1, 4, dtype=torch.bool)
    with backend(name):
        exact, exact_grad = loss_and_grad(reslt_loss, logits, target, groups, beta=0.5)
        capped, capped_grad = loss_and_grad(reslt_loss, logits, target, groups, beta=0.5, log_eps=1e-7)
    torch.testing.assert_close(exact, torch.tensor(800.0 + torch.log(torch.tensor(3.0)).item(), dtype=torch.float64))
    torch.testing.assert_close(capped, -torch.log(torch.tensor(1e-7, dtype=torch.float64)))
    assert exact_grad[0, 0, 3] == -1.0 and capped_grad.abs().max() < 1e-300  # p / (p + eps) = 0


@pytest.mark.parametrize("log_eps", [-1e-7, float("nan"), float("inf")])
def test_bad_log_eps_is_rejected(log_eps):
    logits, target, groups = _inputs((3, 3, 10))
    with pytest.raises(ValueError, match="log_eps"):
        reslt_loss(logits, target, groups, beta=0.9, log_eps=log_eps)


# ---- the epsilon per term: the official CIFAR / iNat scripts put it in the branch terms only ----


@pytest.mark.parametrize("name", ["reference", backend_param("cpp"), "triton"])
def test_fused_log_eps_zero_is_the_official_cifar_and_inat_reslt_loss(name):
    """CIFAR/cifarTrain_reslt_cifar100.py and Inat/iNaturalTrain_reslt.py: the branch terms with ResLT's crossEntropy
    (-log(softmax + 1e-7)), the fused term with the exact nn.CrossEntropyLoss()(z_H + z_M + z_T, y)."""
    logits, target, groups = _inputs((3, 6, 7), torch.float64, scale=30.0)
    onehot = F.one_hot(target, 7).double()
    in_group = groups[:, target].double()
    individual = sum(-(in_group[b] * (onehot * torch.log(torch.softmax(logits[b], 1) + 1e-7)).sum(1)).sum()
                     for b in range(3)) / in_group.sum()
    official = 0.995 * individual + 0.005 * torch.nn.CrossEntropyLoss()(logits.sum(0), target)
    with backend(name):
        loss = reslt_loss(logits, target, groups, beta=0.995, log_eps=1e-7, fused_log_eps=0.0)
        both = reslt_loss(logits, target, groups, beta=0.995, log_eps=1e-7)  # the ImageNet-LT scripts' loss
    torch.testing.assert_close(loss, official, rtol=1e-12, atol=0)
    assert (both - official).abs() > 1e-9  # at scale 30 the fused term's epsilon matters


@pytest.mark.parametrize("name", ["reference", backend_param("cpp"), "triton"])
def test_each_epsilon_reaches_only_its_own_term(name):
    logits, target, groups = _inputs((3, 5, 6), torch.float64, scale=8.0)
    with backend(name):
        _, split = reslt_loss(logits, target, groups, beta=0.8, log_eps=0.3, fused_log_eps=0.0, return_components=True)
        _, branch_eps = reslt_loss(logits, target, groups, beta=0.8, log_eps=0.3, return_components=True)
        _, exact = reslt_loss(logits, target, groups, beta=0.8, return_components=True)
    torch.testing.assert_close(split["branch"], branch_eps["branch"], rtol=1e-13, atol=0)
    torch.testing.assert_close(split["fused"], exact["fused"], rtol=1e-13, atol=0)
    assert (split["fused"] - branch_eps["fused"]).abs() > 1e-3


EPSILON_PAIRS = [(1e-7, 0.0), (1e-7, None), (0.3, 0.0), (0.0, 0.3), (0.05, 0.2)]  # (log_eps, fused_log_eps)
PER_TERM_CASES = ([on_cpu("cpp", (3, 6, 40), dtype, *pair) for dtype in [torch.float64, torch.float32]
                   for pair in EPSILON_PAIRS]
                  + [on_cpu("triton", (3, 5, 1100), torch.float32, *pair) for pair in [(1e-7, 0.0), (0.0, 0.3)]])


@pytest.mark.parametrize("name, device, shape, dtype, log_eps, fused_log_eps", PER_TERM_CASES)
def test_per_term_epsilons_match_reference(name, device, shape, dtype, log_eps, fused_log_eps):
    logits, target, groups = _inputs(shape, dtype, scale=8.0, device=device)
    epsilons = dict(log_eps=log_eps, fused_log_eps=fused_log_eps)
    expected_loss, expected_grad = loss_and_grad(reslt_loss_reference, logits, target, groups, beta=0.9, **epsilons)
    with backend(name):
        loss, grad = loss_and_grad(reslt_loss, logits, target, groups, beta=0.9, **epsilons)
    assert_close(loss, expected_loss, dtype)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6 * expected_grad.abs().max().item() + 1e-12, rtol=1e-5)


@pytest.mark.parametrize("name, shape", [("reference", (3, 4, 5)), backend_param("cpp", (3, 4, 5)),
                                         ("triton", (2, 2, 3))])
@pytest.mark.parametrize("log_eps, fused_log_eps", [(0.05, 0.0), (0.0, 0.05), (1e-7, 0.3)])
def test_per_term_epsilons_gradcheck_fp64(name, shape, log_eps, fused_log_eps):
    logits, target, groups = _inputs(shape, torch.float64, scale=3.0)
    with backend(name):
        assert torch.autograd.gradcheck(
            lambda z: reslt_loss(z, target, groups, beta=0.7, log_eps=log_eps, fused_log_eps=fused_log_eps), (logits,))


@pytest.mark.parametrize("fused_log_eps", [-1e-7, float("nan"), float("inf"), "0"])
def test_bad_fused_log_eps_is_rejected(fused_log_eps):
    logits, target, groups = _inputs((3, 3, 10))
    with pytest.raises((ValueError, TypeError), match="fused_log_eps"):
        reslt_loss(logits, target, groups, beta=0.9, fused_log_eps=fused_log_eps)
    with pytest.raises((ValueError, TypeError), match="fused_log_eps"):
        fastlt.ResLTLoss(groups, beta=0.9, fused_log_eps=fused_log_eps)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cpp", "triton"])
@pytest.mark.parametrize("log_eps, fused_log_eps", [(1e-7, 0.0), (1e-7, None), (0.0, 0.3)])
def test_cuda_per_term_epsilons_match_the_reference(name, log_eps, fused_log_eps):
    if name == "cpp" and not fastlt._extension.HAS_CUDA:
        pytest.skip("extension built without CUDA kernels")
    logits, target, groups = _inputs((3, 5, 1100), scale=8.0, device="cuda")
    epsilons = dict(log_eps=log_eps, fused_log_eps=fused_log_eps)
    expected_loss, expected_grad = loss_and_grad(reslt_loss_reference, logits, target, groups, beta=0.9, **epsilons)
    with backend(name):
        loss, grad = loss_and_grad(reslt_loss, logits, target, groups, beta=0.9, **epsilons)
    assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6 * expected_grad.abs().max().item() + 1e-12, rtol=1e-5)


def test_groups_by_the_shot_rule():
    counts = torch.tensor([500.0, 101, 100, 20, 19, 1])
    masks = reslt_groups(counts)
    assert masks.tolist() == [[True] * 6, [False, False, True, True, True, True], [False] * 4 + [True, True]]
    assert reslt_groups(counts, num_branches=2).tolist() == masks[:2].tolist()
    with pytest.raises(ValueError, match="group 2 selects no class"):
        reslt_groups(torch.tensor([500.0, 50, 30]))


def test_groups_by_the_papers_cutoffs():
    cifar = reslt_groups(CIFAR100_COUNTS, cutoffs=[35, 70])
    assert cifar[1].nonzero().flatten().tolist() == list(range(35, 100))
    assert cifar[2].nonzero().flatten().tolist() == list(range(70, 100))
    assert torch.equal(cifar, reslt_groups(CIFAR100_COUNTS))  # r = 100: the cut-offs are the shot rule
    imagenet_remapped = torch.linspace(5, 1280, 1000).floor()  # ascending after the frequency remap
    imagenet = reslt_groups(imagenet_remapped, cutoffs=[825, 220])
    assert imagenet.sum(1).tolist() == [1000, 825, 220] and imagenet[1, :825].all() and imagenet[2, :220].all()
    inat = reslt_groups(torch.linspace(2, 1000, 8142).floor(), cutoffs=[6600], num_branches=2)
    assert inat.shape == (2, 8142) and inat[1].sum() == 6600 and inat[1, :6600].all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cutoffs=[35]), "3 branches need 2 cutoffs"),
        (dict(cutoffs=[70, 35]), "not inside group 1"),
        (dict(cutoffs=[35, 100]), "group 2 selects no class"),
        (dict(num_branches=4), "at most 3 branches"),
        (dict(num_branches=0), "num_branches must be >= 1"),
    ],
)
def test_bad_group_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        reslt_groups(CIFAR100_COUNTS, **kwargs)


def test_cutoffs_need_frequency_sorted_labels():
    with pytest.raises(ValueError, match="sorted by class frequency"):
        reslt_groups(CIFAR100_COUNTS[torch.randperm(100)], cutoffs=[35, 70])


MATCH_CASES = ([on_cpu("cpp", shape, beta) for shape in [(1, 1, 1), (2, 3, 2), (2, 5, 7), (3, 4, 33), (3, 6, 300),
                                                         (3, 2, 8142), (4, 3, 50)]
                for beta in [0.0, 0.72, 0.995, 1.0]]
               + [on_cpu("triton", shape, 0.9) for shape in [(1, 1, 1), (3, 5, 7), (2, 3, 1100)]])


@pytest.mark.parametrize("name, device, shape, beta", MATCH_CASES)
def test_matches_reference_fp32(name, device, shape, beta):
    logits, target, groups = _inputs(shape, device=device)
    expected_loss, expected_grad = loss_and_grad(reslt_loss_reference, logits, target, groups, beta=beta)
    with backend(name):
        loss, grad = loss_and_grad(reslt_loss, logits, target, groups, beta=beta)
    assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6 * expected_grad.abs().max().item() + 1e-9, rtol=1e-5)


@needs_cpp
def test_no_label_in_any_group_leaves_only_the_fused_term():
    logits, target, _ = _inputs((2, 4, 6))
    groups = torch.zeros(2, 6, dtype=torch.bool)
    groups[0, 0] = groups[1, 1] = True
    target.fill_(3)
    with backend("cpp"):
        loss, grad = loss_and_grad(reslt_loss, logits, target, groups, beta=0.9)
    expected_loss, expected_grad = loss_and_grad(reslt_loss_reference, logits, target, groups, beta=0.9)
    torch.testing.assert_close(loss, 0.1 * F.cross_entropy(logits.detach().sum(0), target))
    assert_close(loss, expected_loss)
    assert_close(grad, expected_grad)


@pytest.mark.parametrize("name, device, shape, dtype", loss_cases.tolerance_cases())
def test_dtype_tolerance_table(name, device, shape, dtype):
    logits, target, groups = _inputs(shape, dtype, device=device)
    loss_cases.check_within_dtype_tolerance(reslt_loss, reslt_loss_reference, name, dtype, logits, target, groups,
                                            beta=0.9)


@pytest.mark.parametrize("name, shape", [("reference", (2, 4, 5)), ("reference", (3, 4, 5)),
                                         backend_param("cpp", (2, 4, 5)), backend_param("cpp", (3, 4, 5)),
                                         ("triton", (2, 2, 3))])  # small: the interpreter runs every probe
def test_gradcheck_fp64(name, shape):
    logits, target, groups = _inputs(shape, torch.float64, scale=2.0)
    with backend(name):
        assert torch.autograd.gradcheck(lambda z: reslt_loss(z, target, groups, beta=0.7), (logits,))


@pytest.mark.parametrize("name, num_classes", [backend_param("cpp", 64), ("triton", 12)])  # the interpreter is slow
def test_strided_inputs_are_read_in_place(name, num_classes):
    stacked = torch.randn(6, 3, num_classes) * 10  # [B, K, C], as torch.stack(outputs, dim=1) gives
    target = torch.randint(0, num_classes, (6,))
    groups = nested_groups(3, num_classes)
    for view in (stacked.transpose(0, 1), torch.randn(3, 6, 2 * num_classes)[:, :, ::2] * 10):
        view = view.requires_grad_(True) if view.is_leaf else view.detach().requires_grad_(True)
        expected = loss_and_grad(reslt_loss_reference, view.contiguous(), target, groups, beta=0.9)
        with backend(name):
            actual = loss_and_grad(reslt_loss, view, target, groups, beta=0.9)
        assert_close(actual[0], expected[0])
        torch.testing.assert_close(actual[1], expected[1], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_strided_target_matches_contiguous(name):
    logits = torch.randn(3, 8, 20, dtype=torch.float64)
    groups = reslt_groups(torch.arange(200, 0, -10), cutoffs=[7, 14])
    target = torch.randint(0, 20, (16,))[::2]
    assert not target.is_contiguous()
    with backend(name):
        torch.testing.assert_close(reslt_loss(logits, target, groups, beta=0.9),
                                   reslt_loss_reference(logits, target.contiguous(), groups, beta=0.9))


@needs_cpp
@pytest.mark.parametrize("dtype, magnitude", [(torch.float32, 1e4), (torch.float16, 6e4)])
def test_extreme_logits_stay_finite(dtype, magnitude):
    logits = ((torch.rand(3, 5, 50) * 2 - 1) * magnitude).to(dtype).requires_grad_(True)
    target, groups = torch.randint(0, 50, (5,)), nested_groups(3, 50)
    with backend("cpp"):
        loss, grad = loss_and_grad(reslt_loss, logits, target, groups, beta=0.9)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    if dtype == torch.float32:
        expected_loss, expected_grad = loss_and_grad(reslt_loss_reference, logits, target, groups, beta=0.9)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-2)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_nan_logit_makes_loss_and_its_row_nan(name):
    logits, target, groups = _inputs((3, 3, 10))
    with torch.no_grad():
        logits[1, 2, 4] = float("nan")
    with backend(name):
        loss, grad = loss_and_grad(reslt_loss, logits, target, groups, beta=0.9)
    assert torch.isnan(loss)
    assert torch.isnan(grad[:, 2]).all() and torch.isfinite(grad[:, :2]).all()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda z, y, g: (z, y + 100, g), "target must be in"),
        (lambda z, y, g: (z, y[:-1], g), "target must be"),
        (lambda z, y, g: (z, y, g[:, :-1]), "group_masks must be"),
        (lambda z, y, g: (z, y, g[:2]), "group_masks must be"),
        (lambda z, y, g: (z, y, g.float()), "bool"),
        (lambda z, y, g: (z, y, torch.cat([g[:2], torch.zeros_like(g[:1])])), "row 2 selects no class"),
        (lambda z, y, g: (z[0], y, g), "branch_logits must have 3 dims"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(change, message):
    logits, target, groups = _inputs((3, 3, 10))
    with pytest.raises(ValueError, match=message):
        reslt_loss(*change(logits, target, groups), beta=0.9)


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan")])
@pytest.mark.parametrize("name", [pytest.param("cpp", marks=needs_cpp), "triton", "reference"])
def test_beta_outside_zero_one_is_rejected(beta, name):
    logits, target, groups = _inputs((3, 3, 10))
    with backend(name), pytest.raises(ValueError, match=r"beta must be a finite number in \[0, 1\]"):
        reslt_loss(logits, target, groups, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        fastlt.ResLTLoss(groups, beta=beta)


@needs_cpp
def test_cpp_op_checks_its_own_arguments():
    logits, target, groups = _inputs((2, 3, 10))
    with pytest.raises(ValueError, match="target must be in"):
        torch.ops.fastlt.reslt_loss(logits.detach(), target + 10, groups, 0.9, 0.0, 0.0, 1, -100, False)
    with pytest.raises(ValueError, match="every row of group_masks"):
        torch.ops.fastlt.reslt_loss(logits.detach(), target, groups & False, 0.9, 0.0, 0.0, 1, -100, False)
    with pytest.raises(ValueError, match="group_masks must be bool"):
        torch.ops.fastlt.reslt_loss(logits.detach(), target, groups.float(), 0.9, 0.0, 0.0, 1, -100, False)
    for bad in (-1e-7, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="log_eps"):
            torch.ops.fastlt.reslt_loss(logits.detach(), target, groups, 0.9, bad, 0.0, 1, -100, False)
        with pytest.raises(ValueError, match="fused_log_eps"):
            torch.ops.fastlt.reslt_loss(logits.detach(), target, groups, 0.9, 0.0, bad, 1, -100, False)


@needs_cpp
def test_backward_scales_by_grad_output_and_keeps_one_gradient_buffer():
    logits, target, groups = _inputs((3, 3, 10))
    with backend("cpp"):
        _, unit_grad = loss_and_grad(reslt_loss, logits, target, groups, beta=0.9)
        (reslt_loss(logits, target, groups, beta=0.9) * 2.5).backward()
    torch.testing.assert_close(logits.grad, 2.5 * unit_grad)
    with backend("cpp"):
        loss = reslt_loss(logits.detach(), target, groups, beta=0.9)
    assert not loss.requires_grad
    _, grad, _ = torch.ops.fastlt.reslt_loss(logits.detach(), target, groups, 0.9, 0.0, 0.0, 1, -100, False)
    assert grad.numel() == 0


@pytest.mark.parametrize("op_name", raw_ops("reslt_loss"))
def test_opcheck(op_name):
    logits, target, groups = _inputs((3, 3, 10))
    torch.library.opcheck(raw_op(op_name), (logits, target, groups, 0.9, 1e-7, 0.0, 1, -100, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@needs_cuda_build
def test_cuda_launcher_refuses_cpu_tensors():
    logits, target, groups = _inputs((2, 3, 10))
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        call_cuda_kernel("reslt_loss", logits.detach(), target, groups, 0.9, 1e-7, 0.0, 1, -100, True)


@pytest.mark.parametrize("name, compiler, shape", [pytest.param("cpp", "inductor", (3, 4, 20),
                                                                marks=[needs_cpp, pytest.mark.slow]),
                                                   ("triton", "aot_eager", (2, 3, 9))])
def test_torch_compile_fullgraph_matches_eager(name, compiler, shape):
    logits, target, groups = _inputs(shape)
    compiled = torch.compile(lambda z: reslt_loss(z, target, groups, beta=0.9), fullgraph=True, backend=compiler)
    expected = loss_and_grad(reslt_loss_reference, logits, target, groups, beta=0.9)
    with backend(name):
        loss = compiled(logits)
        (grad,) = torch.autograd.grad(loss, logits)
    assert_close(loss.detach(), expected[0])
    assert_close(grad, expected[1])


@pytest.mark.parametrize("name", [pytest.param("cpp", marks=needs_cpp), "triton", "reference"])
def test_int32_targets_are_accepted(name):
    logits, target, groups = _inputs((3, 4, 10))
    with backend(name):
        loss = reslt_loss(logits, target.int(), groups, beta=0.9)
    assert_close(loss, reslt_loss_reference(logits, target, groups, beta=0.9))


def test_module_groups_from_counts_with_an_empty_class():
    counts = torch.tensor([500.0, 300, 120, 60, 30, 10, 0])
    criterion = fastlt.ResLTLoss(counts, beta=0.9)
    assert criterion.group_masks[:, -1].all()  # no sample: a tail class, in every group
    with pytest.raises(ValueError, match="class_counts"):
        fastlt.ResLTLoss(torch.tensor([5.0, -1.0, 3.0]), beta=0.9)


def test_soft_targets_are_refused_clearly():
    logits, target, groups = _inputs((3, 4, 10))
    with pytest.raises(ValueError, match="takes no probability \\(soft\\) targets"):
        reslt_loss(logits, torch.softmax(torch.randn(4, 10), 1), groups, beta=0.9)
    with pytest.raises(ValueError, match="takes no probability \\(soft\\) targets"):
        fastlt.RIDELoss(torch.arange(1.0, 11.0))(logits * 30, torch.softmax(torch.randn(4, 10), 1))


@pytest.mark.parametrize("name", [pytest.param("cpp", marks=needs_cpp), "triton", "reference"])
def test_a_branch_outside_its_group_adds_nothing_even_an_infinite_cross_entropy(name):
    logits = torch.tensor([[[-1.0, 0.5, 3.0]], [[-float("inf"), 1.8, 9.2]], [[5.0, -4.3, 8.9]]], dtype=torch.float64)
    groups = torch.tensor([[True, True, True], [False, False, True], [True, True, False]])
    target = torch.tensor([0])  # branch 1 is not in class 0's group: its CE (inf) must not enter L_ice
    with backend(name):
        loss = reslt_loss(logits.requires_grad_(True), target, groups, beta=0.995)
        (grad,) = torch.autograd.grad(loss, logits)
    assert loss == float("inf")  # the fused term: sum of the branches' target logits is -inf
    assert not torch.isnan(grad[0]).any() and not torch.isnan(grad[2]).any()


# ---- reduction, ignore_index and return_components (docs/methods.md 6.5) ----

BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp), "triton"]
IGNORED_ROWS = {"no row": [], "some rows": [1, 4], "every row": [0, 1, 2, 3, 4]}


def _with_ignored_rows(shape, ignored, dtype=torch.float32, scale=10.0, ignore_index=-100, device="cpu"):
    logits, target, groups = _inputs(shape, dtype, scale)
    target[IGNORED_ROWS[ignored]] = ignore_index
    return logits.detach().to(device).requires_grad_(True), target.to(device), groups.to(device)


def _loss_grad_components(fn, logits, target, groups, grad_output, **kwargs):
    """(loss, d <loss, grad_output> / d logits, components); grad_output scales each row under "none"."""
    loss, components = fn(logits, target, groups, beta=0.9, return_components=True, **kwargs)
    (grad,) = torch.autograd.grad(loss, logits, grad_output if loss.dim() else None)
    return loss.detach(), grad, components


def _assert_components_add_up(components, loss, reduction, num_branches):
    assert set(components) == {"branch", "fused"} and not components["fused"].requires_grad
    leading = tuple(loss.shape)  # [B] under "none", () otherwise
    assert components["branch"].shape == (*leading, num_branches) and components["fused"].shape == leading
    torch.testing.assert_close(components["branch"].sum(-1) + components["fused"], loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignored", list(IGNORED_ROWS))
def test_reductions_and_ignored_rows_match_the_reference(name, reduction, ignored):
    logits, target, groups = _with_ignored_rows((3, 5, 9), ignored)
    grad_output = torch.rand(5) + 0.5
    kwargs = dict(reduction=reduction)
    expected = _loss_grad_components(reslt_loss_reference, logits, target, groups, grad_output, **kwargs)
    with backend(name):
        loss, grad, components = _loss_grad_components(reslt_loss, logits, target, groups, grad_output, **kwargs)
    assert loss.shape == ((5,) if reduction == "none" else ())
    assert_close(loss, expected[0])
    torch.testing.assert_close(grad, expected[1], atol=1e-6 * expected[1].abs().max().item() + 1e-9, rtol=1e-5)
    for key in ("branch", "fused"):
        assert_close(components[key], expected[2][key])
    _assert_components_add_up(components, loss, reduction, 3)
    ignored_rows = IGNORED_ROWS[ignored]
    assert (grad[:, ignored_rows] == 0).all()  # exactly 0, not a small number
    if reduction == "none":
        assert (loss[ignored_rows] == 0).all()
    if ignored == "every row":
        assert (loss == 0).all() and (grad == 0).all()  # no NaN from an empty normaliser


@pytest.mark.parametrize("name", BACKENDS)
def test_mean_is_torch_cross_entropy_with_ignore_index_and_none_sums_to_sum(name):
    logits, target, groups = _with_ignored_rows((3, 5, 9), "some rows", torch.float64)
    kept = target != -100
    in_group = groups[:, target.clamp_min(0)] & kept  # [K, B]
    # L_ice's normaliser G is the number of (branch, kept row) pairs in a group: the ignore_index mean over them
    branch_targets = torch.where(in_group, target, -100).reshape(-1)
    expected = (0.9 * F.cross_entropy(logits.reshape(15, 9), branch_targets, ignore_index=-100)
                + 0.1 * F.cross_entropy(logits.sum(0), target, ignore_index=-100))
    with backend(name):
        mean = reslt_loss(logits, target, groups, beta=0.9)
        total = reslt_loss(logits, target, groups, beta=0.9, reduction="sum")
        rows = reslt_loss(logits, target, groups, beta=0.9, reduction="none")
    torch.testing.assert_close(mean, expected)
    torch.testing.assert_close(rows.sum(), total)
    assert total > mean  # "sum" has no normaliser


def _ignoring_loss(name, reduction):
    """A tiny fp64 case with one ignored row: (logits, the loss as a scalar function of them). Under "none" the
    scalar is sum_b w_b * loss_b, so its backward feeds the op a [B] grad_output."""
    logits, target, groups = _inputs((2, 3, 3), torch.float64, scale=2.0)
    target[1] = -100
    row_weights = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)

    def loss_of(z):
        with backend(name):
            loss = reslt_loss(z, target, groups, beta=0.7, log_eps=1e-3, reduction=reduction)
        return (loss * row_weights).sum() if reduction == "none" else loss

    return logits, loss_of


@pytest.mark.parametrize("name, reduction", [("reference", "mean"), ("reference", "none"),
                                             pytest.param("cpp", "mean", marks=needs_cpp)])
def test_gradcheck_fp64_with_ignored_rows(name, reduction):
    logits, loss_of = _ignoring_loss(name, reduction)
    assert torch.autograd.gradcheck(loss_of, (logits,))


@pytest.mark.parametrize("name", [pytest.param("cpp", marks=needs_cpp), "triton"])
def test_reduction_none_gradient_fp64_matches_finite_differences(name):
    """gradcheck itself cannot run here: it backpropagates twice through one graph, and the fused ops scale their
    saved gradient in place by a [B] grad_output (fastlt/ops/_fused_loss.py), so autograd refuses the second pass."""
    logits, loss_of = _ignoring_loss(name, "none")
    (analytic,) = torch.autograd.grad(loss_of(logits), logits)
    numeric = torch.zeros_like(analytic)
    step = 1e-6
    with torch.no_grad():
        for index in range(logits.numel()):
            shift = torch.zeros(logits.numel(), dtype=torch.float64)
            shift[index] = step
            shift = shift.view_as(logits)
            numeric.view(-1)[index] = (loss_of(logits + shift) - loss_of(logits - shift)) / (2 * step)
    torch.testing.assert_close(analytic, numeric, atol=1e-7, rtol=1e-6)
    assert (analytic[:, 1] == 0).all()


@pytest.mark.parametrize("name", BACKENDS)
def test_an_ignored_row_with_non_finite_logits_adds_nothing(name):
    logits, target, groups = _with_ignored_rows((3, 5, 9), "some rows")
    with torch.no_grad():
        logits[2, 1, 0], logits[:, 4] = -float("inf"), float("nan")  # rows 1 and 4 are ignored
    expected = reslt_loss_reference(logits.detach()[:, [0, 2, 3]], target[[0, 2, 3]], groups, beta=0.9)
    with backend(name):
        loss = reslt_loss(logits, target, groups, beta=0.9)
        (grad,) = torch.autograd.grad(loss, logits)
    assert_close(loss.detach(), expected)
    assert (grad[:, [1, 4]] == 0).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", [pytest.param("cpp", marks=needs_cpp), "triton", "reference"])
def test_an_ignore_index_outside_the_classes_is_never_used_as_a_class(name):
    logits, target, groups = _with_ignored_rows((3, 5, 9), "some rows", ignore_index=1000)
    expected = reslt_loss_reference(logits, target.masked_fill(target == 1000, -100), groups, beta=0.9)
    with backend(name):
        loss = reslt_loss(logits, target, groups, beta=0.9, ignore_index=1000)
    assert_close(loss, expected)


@pytest.mark.parametrize("op_name", raw_ops("reslt_loss"))
@pytest.mark.parametrize("reduction", [0, 1])
def test_opcheck_with_reduction_and_ignored_rows(op_name, reduction):
    logits, target, groups = _with_ignored_rows((3, 5, 10), "some rows")
    torch.library.opcheck(raw_op(op_name), (logits, target, groups, 0.9, 1e-7, 0.0, reduction, -100, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("name", [pytest.param("cpp", marks=needs_cpp), "triton"])
def test_torch_compile_fullgraph_reduction_none(name):
    loss_cases.check_torch_compile_fullgraph_with_reduction_none("reslt_loss", name)


@pytest.mark.parametrize("name", [pytest.param("cpp", marks=needs_cpp), "triton"])
def test_create_graph_with_reduction_none(name):
    loss_cases.check_create_graph_with_reduction_none("reslt_loss", name)


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_reduction_or_ignore_index_is_rejected(name):
    logits, target, groups = _inputs((3, 3, 10))
    with backend(name):
        for reduction in ("avg", None, 1):
            with pytest.raises(ValueError, match="reduction"):
                reslt_loss(logits, target, groups, beta=0.9, reduction=reduction)
        with pytest.raises(TypeError, match="ignore_index"):
            reslt_loss(logits, target, groups, beta=0.9, ignore_index=-100.0)
        with pytest.raises(ValueError, match="target must be in"):  # 10 is no class and not ignore_index
            reslt_loss(logits, torch.tensor([0, 10, -100]), groups, beta=0.9)
        with pytest.raises(ValueError, match="target must be in"):  # -100 is a label only while it is ignore_index
            reslt_loss(logits, torch.tensor([0, 1, -100]), groups, beta=0.9, ignore_index=-1)


@pytest.mark.parametrize("op_name", raw_ops("reslt_loss"))
def test_raw_ops_refuse_a_bad_reduction_code(op_name):
    logits, target, groups = _inputs((2, 3, 10))
    raw_op(op_name)(logits.detach(), target, groups, 0.9, 0.0, 0.0, 2, -100, False)  # sum is fine
    with pytest.raises(ValueError, match="reduction"):
        raw_op(op_name)(logits.detach(), target, groups, 0.9, 0.0, 0.0, 3, -100, False)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cpp", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignored", list(IGNORED_ROWS))
def test_cuda_reductions_and_ignored_rows_match_the_reference(name, reduction, ignored):
    if name == "cpp" and not fastlt._extension.HAS_CUDA:
        pytest.skip("extension built without CUDA kernels")
    logits, target, groups = _with_ignored_rows((3, 5, 1100), ignored, device="cuda")
    grad_output = torch.rand(5, device="cuda") + 0.5
    kwargs = dict(reduction=reduction)
    expected = _loss_grad_components(reslt_loss_reference, logits, target, groups, grad_output, **kwargs)
    with backend(name):
        loss, grad, components = _loss_grad_components(reslt_loss, logits, target, groups, grad_output, **kwargs)
    assert_close(loss, expected[0])
    torch.testing.assert_close(grad, expected[1], atol=1e-6 * expected[1].abs().max().item() + 1e-9, rtol=1e-5)
    for key in ("branch", "fused"):
        assert_close(components[key], expected[2][key])
    assert (grad[:, IGNORED_ROWS[ignored]] == 0).all()


# ---- second order, torch.func and the raw op's refusals: the checks shared with the other fused losses ----


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_create_graph_keeps_the_second_order_term(name):
    loss_cases.check_create_graph_keeps_the_second_order_term("reslt_loss", name)


@needs_cpp
def test_gradgradcheck_fp64():
    """cpp only: the Triton ops share the autograd glue (and the interpreter makes gradgradcheck slow)."""
    loss_cases.check_gradgradcheck_fp64("reslt_loss", "cpp")


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_torch_func_grad_and_vmap(name):
    loss_cases.check_torch_func_grad_and_vmap("reslt_loss", name)


@pytest.mark.parametrize("overload", raw_ops("reslt_loss"))
@pytest.mark.parametrize("change", loss_cases.raw_refusals("reslt_loss"))
def test_raw_ops_refuse_bad_arguments_with_value_error(overload, change):
    loss_cases.check_raw_op_refuses_with_value_error(overload, change)
