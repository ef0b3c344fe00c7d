"""fastlt.RIDELoss / ResLTLoss / PriorShiftedCE: the modules give the functional ops' numbers, switch RIDE's DRW
phase at the official epoch, and read lists of expert logits that share one buffer in place."""

import pytest
import torch

import fastlt
from fastlt.losses import stack_experts

NUM_CLASSES = 12
COUNTS = torch.tensor([600.0, 400, 250, 150, 101, 100, 60, 30, 20, 19, 5, 1])


def _logits(num_experts=3, batch=5, requires_grad=True):
    return (torch.randn(num_experts, batch, NUM_CLASSES) * 10).requires_grad_(requires_grad)


def _target(batch=5):
    return torch.randint(0, NUM_CLASSES, (batch,))


# ---- RIDELoss ----


@pytest.mark.parametrize("drw_epoch", [160, 80, 0])
def test_ride_drw_switches_on_from_drw_epoch_zero_based(drw_epoch):
    criterion = fastlt.RIDELoss(COUNTS, drw_epoch=drw_epoch)
    assert criterion.drw == (drw_epoch <= 0)  # before any set_epoch: epoch 0
    for epoch, expected in [(drw_epoch - 1, False), (drw_epoch, True), (drw_epoch + 40, True)]:
        criterion.set_epoch(epoch)
        assert criterion.drw is expected


@pytest.mark.parametrize("epoch, drw", [(159, False), (160, True)])
def test_ride_module_equals_functional_op_at_each_phase(epoch, drw):
    logits, target = _logits(), _target()
    kwargs = dict(scale=30.0, max_margin=0.4, diversity_factor=-0.2, temperature_factor=0.02, base_temperature=1.5,
                  drw_beta=0.999)
    criterion = fastlt.RIDELoss(COUNTS.tolist(), drw_epoch=160, **kwargs)
    criterion.set_epoch(epoch)
    expected = fastlt.ops.ride_loss(logits, target, COUNTS, drw=drw, **kwargs)
    torch.testing.assert_close(criterion(logits, target), expected, rtol=0, atol=0)


def test_ride_switch_also_turns_on_the_per_class_temperatures():
    """The diversity term (loss minus its diversity-free part) involves the temperatures, not the DRW weights."""
    logits, target = _logits(), _target()
    with_diversity, without = fastlt.RIDELoss(COUNTS), fastlt.RIDELoss(COUNTS, diversity_factor=0.0)
    diversity_terms = []
    for epoch in (159, 160):
        with_diversity.set_epoch(epoch)
        without.set_epoch(epoch)
        diversity_terms.append(with_diversity(logits, target) - without(logits, target))
    assert not torch.allclose(diversity_terms[0], diversity_terms[1])


def test_ride_list_and_stacked_inputs_give_the_same_loss_and_gradients():
    experts = [(torch.randn(5, NUM_CLASSES) * 10).requires_grad_(True) for _ in range(3)]  # separate tensors
    target = _target()
    criterion = fastlt.RIDELoss(COUNTS)
    loss_from_list = criterion(experts, target)
    grads_from_list = torch.autograd.grad(loss_from_list, experts)
    stacked = torch.stack([expert.detach() for expert in experts]).requires_grad_(True)
    loss_from_stacked = criterion(stacked, target)
    (grad_stacked,) = torch.autograd.grad(loss_from_stacked, stacked)
    torch.testing.assert_close(loss_from_list, loss_from_stacked, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(grads_from_list), grad_stacked, rtol=0, atol=0)


# ---- stack_experts ----


def test_list_of_views_of_one_buffer_is_read_in_place_and_gradients_reach_the_buffer():
    buffer = _logits()
    experts = list(buffer.unbind(0))
    view = stack_experts(experts)
    assert view.data_ptr() == buffer.data_ptr() and view._base is buffer
    target = _target()
    (grad_from_list,) = torch.autograd.grad(fastlt.RIDELoss(COUNTS)(experts, target), buffer)
    (expected,) = torch.autograd.grad(fastlt.ops.ride_loss(buffer, target, COUNTS), buffer)
    torch.testing.assert_close(grad_from_list, expected, rtol=0, atol=0)


def test_split_of_a_fused_head_output_is_a_strided_view():
    """One Linear with E*C outputs split per expert: [B, C] views at offsets C apart, row stride E*C."""
    fused = (torch.randn(5, 3 * NUM_CLASSES) * 10).requires_grad_(True)
    experts = fused.split(NUM_CLASSES, dim=1)
    view = stack_experts(experts)
    assert view.data_ptr() == fused.data_ptr() and view.stride() == (NUM_CLASSES, 3 * NUM_CLASSES, 1)
    torch.testing.assert_close(view, torch.stack(experts), rtol=0, atol=0)
    target = _target()
    (grad,) = torch.autograd.grad(fastlt.RIDELoss(COUNTS)(experts, target), fused)
    copied = torch.stack(experts).detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(fastlt.ops.ride_loss(copied, target, COUNTS), copied)
    torch.testing.assert_close(grad, torch.cat(list(expected), dim=1), rtol=0, atol=0)


@pytest.mark.parametrize(
    "make_list",
    [
        lambda x: [x[0], x[2], x[1]],  # non-uniform offsets
        lambda x: [x[2], x[1], x[0]],  # negative step
        lambda x: [x[0], x[0], x[0]],  # zero step
        lambda x: [x[0], x[1][:, :], torch.randn(5, NUM_CLASSES)],  # not one base
        lambda x: [x[0].detach(), x[1].detach(), x[2].detach()],  # shared storage, no autograd base
    ],
)
def test_other_lists_are_copied_by_stack(make_list):
    buffer = _logits(requires_grad=False)
    experts = make_list(buffer)
    stacked = stack_experts(experts)
    torch.testing.assert_close(stacked, torch.stack(experts), rtol=0, atol=0)
    assert stacked.data_ptr() != buffer.data_ptr()


def test_single_expert_list_and_tensor_pass_through_without_copy():
    logits = torch.randn(5, NUM_CLASSES)
    assert stack_experts([logits]).data_ptr() == logits.data_ptr()
    stacked = torch.randn(2, 5, NUM_CLASSES)
    assert stack_experts(stacked) is stacked
    with pytest.raises(TypeError):
        stack_experts([])


def test_module_rejects_bad_counts_at_construction():
    with pytest.raises(ValueError, match="positive"):
        fastlt.RIDELoss([10.0, 0.0])


# ---- ResLTLoss / PriorShiftedCE ----


def test_reslt_module_from_counts_or_masks_equals_functional_op():
    logits, target = _logits(), _target()
    groups = fastlt.ops.reslt_groups(COUNTS)
    expected = fastlt.ops.reslt_loss(logits, target, groups, beta=0.99, log_eps=1e-7)
    from_counts = fastlt.ResLTLoss(COUNTS.tolist(), beta=0.99)
    from_masks = fastlt.ResLTLoss(groups, beta=0.99)
    assert torch.equal(from_counts.group_masks, groups)
    torch.testing.assert_close(from_counts(logits, target), expected, rtol=0, atol=0)
    torch.testing.assert_close(from_masks(list(logits.unbind(0)), target), expected, rtol=0, atol=0)


def test_reslt_module_with_cutoffs_and_two_branches():
    criterion = fastlt.ResLTLoss(COUNTS, beta=0.85, cutoffs=[8], num_branches=2)
    assert criterion.group_masks.sum(1).tolist() == [NUM_CLASSES, NUM_CLASSES - 8]
    logits, target = _logits(num_experts=2), _target()
    expected = fastlt.ops.reslt_loss(logits, target, criterion.group_masks, beta=0.85, log_eps=1e-7)
    torch.testing.assert_close(criterion(logits, target), expected, rtol=0, atol=0)


def test_reslt_module_and_method_use_the_official_epsilon():
    from types import SimpleNamespace

    from fastlt.methods import build_method

    logits, target = _logits(), _target()
    with torch.no_grad():
        logits[:, 0, target[0]] = -1000.0  # a hopeless sample: the official loss caps it at -log(1e-7)
    groups = fastlt.ops.reslt_groups(COUNTS)
    official = fastlt.ops.reslt_loss(logits, target, groups, beta=0.99, log_eps=1e-7)
    exact = fastlt.ops.reslt_loss(logits, target, groups, beta=0.99, log_eps=0.0)
    assert fastlt.ResLTLoss(COUNTS, beta=0.99).log_eps == 1e-7
    torch.testing.assert_close(fastlt.ResLTLoss(COUNTS, beta=0.99)(logits, target), official, rtol=0, atol=0)
    torch.testing.assert_close(fastlt.ResLTLoss(COUNTS, beta=0.99, log_eps=0)(logits, target), exact, rtol=0, atol=0)
    assert exact - official > 10.0
    method = build_method({"name": "reslt", "beta": 0.99}, COUNTS, model=None)
    torch.testing.assert_close(method.loss_fn(SimpleNamespace(branch_logits=logits), target), official, rtol=0, atol=0)


def test_prior_shifted_ce_module_equals_functional_op():
    logits, target = _logits(num_experts=2), _target()
    criterion = fastlt.PriorShiftedCE(COUNTS, taus=[1.0, 0.5])
    expected = fastlt.ops.prior_shifted_ce(logits, target, COUNTS, taus=[1.0, 0.5])
    torch.testing.assert_close(criterion(logits, target), expected, rtol=0, atol=0)
    experts = [(torch.randn(5, NUM_CLASSES) * 10).requires_grad_(True) for _ in range(2)]
    stacked = torch.stack(experts)
    torch.testing.assert_close(criterion(experts, target), criterion(stacked, target), rtol=0, atol=0)


@pytest.mark.slow
def test_modules_compile_fullgraph_with_list_inputs():
    """Under torch.compile the list is stacked (dynamo cannot trace storage offsets); values and grads match eager."""
    buffer, target = _logits(), _target()
    criterion = fastlt.RIDELoss(COUNTS)
    compiled = torch.compile(lambda z: criterion(list(z.unbind(0)), target), fullgraph=True)
    (grad,) = torch.autograd.grad(compiled(buffer), buffer)
    (expected,) = torch.autograd.grad(criterion(buffer, target), buffer)
    torch.testing.assert_close(grad, expected)


def test_ride_distill_loss_is_e_times_ride_plus_tempered_kl():
    torch.manual_seed(0)
    counts = torch.tensor([300.0, 80, 20, 4])
    student = (torch.randn(4, 6, 4) * 20).requires_grad_(True)
    teacher = torch.randn(6, 4) * 20
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    criterion = fastlt.RIDEDistillLoss(fastlt.RIDELoss(counts), temperature=2.0, distill_factor=0.5)
    criterion.set_epoch(500)  # DRW on: the epoch reaches the inner RIDE loss
    assert criterion.ride_loss.drw
    ride = fastlt.ops.ride_loss_reference(student, target, counts, drw=True)
    p_teacher = torch.softmax(teacher / 2.0, 1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(student.mean(0) / 2.0, 1))).sum() / 6
    expected = 4 * (ride + 0.5 * 4.0 * kl)
    torch.testing.assert_close(criterion(student, target, teacher), expected, rtol=1e-5, atol=1e-5)
    unscaled = fastlt.RIDEDistillLoss(fastlt.RIDELoss(counts), temperature=2.0, distill_factor=0.5,
                                      scale_by_experts=False)
    unscaled.set_epoch(500)
    torch.testing.assert_close(unscaled(student, target, teacher) * 4, expected, rtol=1e-5, atol=1e-5)
    # the teacher is a constant: no gradient reaches it even when it requires one
    teacher.requires_grad_(True)
    criterion(student, target, teacher).backward()
    assert teacher.grad is None and student.grad is not None


def test_ride_distill_loss_refuses_bad_input():
    criterion = fastlt.RIDEDistillLoss(fastlt.RIDELoss(torch.tensor([5.0, 2])))
    with pytest.raises(ValueError, match="teacher_logits must be"):
        criterion(torch.randn(2, 3, 2), torch.tensor([0, 1, 0]), torch.randn(3, 5))
    with pytest.raises(ValueError, match="temperature must be a finite number in \\(0, inf\\)"):
        fastlt.RIDEDistillLoss(fastlt.RIDELoss(torch.tensor([5.0, 2])), temperature=0)


def test_prior_shifted_ce_module_takes_one_tau_a_single_head_and_label_smoothing():
    logits, target = _logits(num_experts=1), _target()
    criterion = fastlt.PriorShiftedCE(COUNTS.tolist(), taus=1.0, label_smoothing=0.1)
    expected = fastlt.ops.prior_shifted_ce(logits, target, COUNTS, taus=[1.0], label_smoothing=0.1)
    torch.testing.assert_close(criterion(logits[0], target.int()), expected)
    with pytest.raises(ValueError, match="label_smoothing"):
        fastlt.PriorShiftedCE(COUNTS, taus=1.0, label_smoothing=-0.1)


# ---- reduction, ignore_index and components (docs/methods.md 6.5) ----

MODULES = {
    "ride": (lambda **kw: fastlt.RIDELoss(COUNTS, **kw), 3),
    "reslt": (lambda **kw: fastlt.ResLTLoss(COUNTS, beta=0.9, **kw), 3),
    "prior_shifted_ce": (lambda **kw: fastlt.PriorShiftedCE(COUNTS, taus=[1.0, 0.5], **kw), 2),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_module_reductions_and_ignored_rows_agree_with_each_other(name):
    make, num_experts = MODULES[name]
    torch.manual_seed(3)
    logits = _logits(num_experts, batch=6)
    target = _target(6)
    target[[1, 4]] = -100
    per_row = make(reduction="none")(logits, target)
    total = make(reduction="sum")(logits, target)
    assert per_row.shape == (6,)
    assert per_row[1] == 0 and per_row[4] == 0
    torch.testing.assert_close(per_row.sum(), total)
    # an ignored row is the same as a row that is not there, for the sum
    kept = torch.tensor([0, 2, 3, 5])
    torch.testing.assert_close(make(reduction="sum")(logits[:, kept], target[kept]), total)
    (grad,) = torch.autograd.grad(make()(logits, target), logits)
    assert grad[:, [1, 4]].abs().max() == 0 and grad[:, kept].abs().max() > 0


@pytest.mark.parametrize("name", list(MODULES))
def test_module_components_add_up_to_the_loss(name):
    make, num_experts = MODULES[name]
    torch.manual_seed(4)
    logits, target = _logits(num_experts), _target()
    for reduction in ("mean", "sum", "none"):
        loss, components = make(reduction=reduction)(logits, target, return_components=True)
        total = sum(value.sum(-1) if value.dim() == loss.dim() + 1 else value for value in components.values())
        torch.testing.assert_close(total, loss.detach(), rtol=1e-5, atol=1e-5)
        assert all(not value.requires_grad for value in components.values())


def test_module_ignore_index_other_than_the_default():
    criterion = fastlt.PriorShiftedCE(COUNTS, taus=1.0, ignore_index=NUM_CLASSES - 1)
    logits, target = _logits(1), torch.tensor([0, 3, NUM_CLASSES - 1, 5, NUM_CLASSES - 1])
    expected = torch.nn.functional.cross_entropy(
        logits[0] + fastlt.ops._lt_constants.prior_logit_shifts(COUNTS, torch.ones(1))[0].float(), target,
        ignore_index=NUM_CLASSES - 1)
    torch.testing.assert_close(criterion(logits, target), expected)
    assert "ignore_index=11" in repr(criterion)


def test_modules_refuse_a_bad_reduction_or_ignore_index_at_construction():
    with pytest.raises(ValueError, match="reduction"):
        fastlt.RIDELoss(COUNTS, reduction="average")
    with pytest.raises(TypeError, match="ignore_index"):
        fastlt.ResLTLoss(COUNTS, beta=0.5, ignore_index=-1.5)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_ride_distill_loss_reduces_its_kl_as_the_ride_loss(reduction):
    torch.manual_seed(5)
    student, teacher, target = _logits(), torch.randn(5, NUM_CLASSES) * 10, _target()
    criterion = fastlt.RIDEDistillLoss(fastlt.RIDELoss(COUNTS, reduction=reduction), scale_by_experts=False)
    mean = fastlt.RIDEDistillLoss(fastlt.RIDELoss(COUNTS), scale_by_experts=False)
    loss = criterion(student, target, teacher)
    assert loss.shape == ((5,) if reduction == "none" else ())
    ride_sum = fastlt.ops.ride_loss(student, target, COUNTS, reduction="sum")
    ride_mean = fastlt.ops.ride_loss(student, target, COUNTS)
    # without DRW every RIDE term is a row mean, so sum = mean x B for the RIDE part and for the KL
    torch.testing.assert_close(loss.sum() - ride_sum, (mean(student, target, teacher) - ride_mean) * 5,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODULES))
def test_per_row_losses_have_the_references_jacobian(name):
    """reduction="none" can be backpropagated more than once (a Jacobian runs one backward per row)."""
    make, num_experts = MODULES[name]
    torch.manual_seed(6)
    logits, target = _logits(num_experts, batch=4).detach().double(), _target(4)
    target[2] = -100
    criterion = make(reduction="none")
    jacobian = torch.autograd.functional.jacobian(lambda z: criterion(z, target), logits)
    with fastlt.ops.use_backend("reference"):
        expected = torch.autograd.functional.jacobian(lambda z: criterion(z, target), logits)
    torch.testing.assert_close(jacobian, expected)
    assert jacobian[2].abs().max() == 0  # the ignored row's loss depends on nothing
