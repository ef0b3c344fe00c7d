"""Mixup / CutMix with every stage-1 loss: the mixed loss lam * L(y_a) + (1 - lam) * L(y_b) (the official BalPoE
form, fastlt.engine.mix.MixedBatch.loss) computed by the fused ops on each backend equals the same combination of
an independent reference (the official formula written out, or the op's eager reference), loss and gradients."""

import pytest
import torch
import torch.nn.functional as F
from op_helpers import backend, backend_param

import fastlt
from fastlt.engine.mix import Mixup
from fastlt.methods.balpoe import BalPoELoss
from fastlt.methods.sade import SADELoss, sade_logit_shifts

COUNTS = torch.tensor([300.0, 120, 60, 25, 12, 6, 3])
NUM_CLASSES, BATCH = 7, 9
LOG_PRIOR = (COUNTS.double() / COUNTS.double().sum()).log()


def ldam_drw_official(drw):
    """LDAM-DRW as the official LDAMLoss: CE(z - s * m_y on the label, y, weight = DRW class weights)."""
    margins = COUNTS.double() ** -0.25
    margins = margins * (0.5 / margins.max())
    weights = None
    if drw:
        weights = (1 - 0.9999) / (1 - 0.9999 ** COUNTS.double())
        weights = weights / weights.sum() * NUM_CLASSES

    def loss(logits, y):
        return F.cross_entropy(logits[0] - 30.0 * margins[y][:, None] * F.one_hot(y, NUM_CLASSES), y, weight=weights)

    return loss


def reslt_official(fused_log_eps):
    """ResLT's CIFAR / iNat script (fused_log_eps 0: nn.CrossEntropyLoss on the summed logits) or ImageNet-LT's
    (1e-7 in both terms), beta 0.9, groups by the shot rule."""
    groups = fastlt.ops.reslt_groups(COUNTS)

    def cross_entropy(z, y, weight, eps):
        return -(weight * torch.log(torch.softmax(z, 1) + eps).gather(1, y[:, None])[:, 0]).sum()

    def loss(logits, y):
        in_group = groups[:, y].double()
        branch = sum(cross_entropy(logits[b], y, in_group[b], 1e-7) for b in range(3)) / in_group.sum()
        fused = (F.cross_entropy(logits.sum(0), y) if fused_log_eps == 0
                 else cross_entropy(logits.sum(0), y, torch.ones(BATCH, dtype=torch.float64), 1e-7) / BATCH)
        return 0.9 * branch + 0.1 * fused

    return loss


def ride(drw):
    def build():
        criterion = fastlt.RIDELoss(COUNTS)
        criterion.set_epoch(160 if drw else 0)
        return lambda logits, y: criterion(logits, y)

    def reference(logits, y):
        return fastlt.ops.ride_loss_reference(logits, y, COUNTS, drw=drw)

    return build, reference


def ride_distill():
    teacher = torch.randn(BATCH, NUM_CLASSES, dtype=torch.float64) * 20

    def build():
        criterion = fastlt.RIDEDistillLoss(fastlt.RIDELoss(COUNTS))
        return lambda logits, y: criterion(logits, y, teacher)

    def reference(logits, y):
        # the KL term needs no label: lam * (ride_a + kl) + (1 - lam) * (ride_b + kl) = ... + kl, times E
        student = F.log_softmax(logits.mean(0) / 1.5, 1)
        kl = F.kl_div(student, F.log_softmax(teacher / 1.5, 1), log_target=True, reduction="batchmean")
        return 3 * (fastlt.ops.ride_loss_reference(logits, y, COUNTS) + 1.5**2 * kl)

    return build, reference


def sade_official(logits, y):
    shifts = sade_logit_shifts(COUNTS, tau=2.0)
    return sum(F.cross_entropy(logits[k] + shifts[k], y) for k in range(3))


# name -> (build the fused loss: () -> loss(logits, y), reference loss(logits, y), number of experts / branches).
# Plain CE (the ce method: F.cross_entropy, no fused op) is checked against the mixed targets below.
CASES = {
    "ldam": (lambda: fastlt.RIDELoss(COUNTS, diversity_factor=0.0), ldam_drw_official(drw=False), 1),
    "ldam_drw": (lambda: _at_epoch(fastlt.RIDELoss(COUNTS, diversity_factor=0.0), 160), ldam_drw_official(drw=True),
                 1),
    "balanced_softmax": (lambda: fastlt.PriorShiftedCE(COUNTS, taus=[1.0]),
                         lambda logits, y: F.cross_entropy(logits[0] + LOG_PRIOR, y), 1),
    "ride": (*ride(drw=False), 3),
    "ride_drw": (*ride(drw=True), 3),
    "ride_distill": (*ride_distill(), 3),
    "balpoe": (lambda: BalPoELoss(COUNTS, taus=[0.0, 1.0, 2.0]),
               lambda logits, y: sum(F.cross_entropy(logits[k] + k * LOG_PRIOR, y) for k in range(3)) / 3, 3),
    "sade": (lambda: SADELoss(COUNTS, tau=2.0), sade_official, 3),
    "reslt_cifar": (lambda: fastlt.ResLTLoss(COUNTS, beta=0.9, fused_log_eps=0.0), reslt_official(0.0), 3),
    "reslt_imagenet": (lambda: fastlt.ResLTLoss(COUNTS, beta=0.9), reslt_official(1e-7), 3),
}


def _at_epoch(criterion, epoch):
    criterion.set_epoch(epoch)
    return criterion


def a_mixed_batch(seed, **options):
    """A MixedBatch the Mixup drew (the first mixed step of `seed`)."""
    mixup = Mixup(**options, seed=seed)
    images, labels = torch.rand(BATCH, 1, 8, 8), torch.arange(BATCH) % NUM_CLASSES
    return next(mixed for mixed in (mixup(images, labels) for _ in range(50)) if mixed is not None)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name, options", [backend_param("cpp", dict(mixup_alpha=0.4)),
                                           backend_param("cpp", dict(cutmix_alpha=1.0)),
                                           ("triton", dict(mixup_alpha=0.4))],  # the interpreter is slow
                         ids=["cpp-mixup", "cpp-cutmix", "triton-mixup"])
def test_mixed_loss_and_gradients_equal_the_reference(name, options, case):
    build, reference, num_heads = CASES[case]
    mixed = a_mixed_batch(seed=len(case), **options)
    assert not torch.equal(mixed.target_a, mixed.target_b)
    logits = (torch.randn(num_heads, BATCH, NUM_CLASSES, dtype=torch.float64) * 8).requires_grad_(True)
    expected = mixed.loss(reference, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    with backend(name):
        loss = mixed.loss(build(), logits)
        (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("case, soft_loss", [
    ("ce", lambda logits, soft: -(soft * F.log_softmax(logits[0], 1)).sum(1).mean()),
    ("balanced_softmax", lambda logits, soft: fastlt.ops.prior_shifted_ce(logits, soft, COUNTS, taus=[1.0])),
    ("balpoe", lambda logits, soft: fastlt.ops.prior_shifted_ce(logits, soft, COUNTS, taus=[0.0, 1.0, 2.0]) / 3),
])
def test_for_cross_entropies_the_official_form_is_the_cross_entropy_of_the_mixed_targets(case, soft_loss):
    """CE is linear in the target, so the two label sets' combination equals one call on the soft target
    lam * onehot(y_a) + (1 - lam) * onehot(y_b) (timm's / torchvision's mixed labels)."""
    build, _, num_heads = CASES[case] if case != "ce" else (lambda: lambda z, y: F.cross_entropy(z[0], y), None, 1)
    mixed = a_mixed_batch(seed=4, mixup_alpha=0.4)
    logits = (torch.randn(num_heads, BATCH, NUM_CLASSES, dtype=torch.float64) * 8).requires_grad_(True)
    soft = (mixed.lam * F.one_hot(mixed.target_a, NUM_CLASSES).double()
            + (1 - mixed.lam) * F.one_hot(mixed.target_b, NUM_CLASSES).double())
    official = mixed.loss(build(), logits)
    torch.testing.assert_close(official, soft_loss(logits, soft), rtol=1e-12, atol=0)


@pytest.mark.parametrize("implementation", [backend_param("cpp"), "triton"])
@pytest.mark.parametrize("with_teacher", [False, True])
def test_mixed_fused_head_equals_the_reference_on_the_materialised_logits(implementation, with_teacher):
    """RIDE's fused classifier head (LinearRIDELoss) called once per label set: loss and gradients of the features
    and the weight equal the eager RIDE (+ distillation) loss of its logits."""
    head = fastlt.LinearRIDELoss(COUNTS, num_experts=3, in_features=5).double()
    head.set_epoch(160)
    features = torch.randn(3, BATCH, 5, dtype=torch.float64, requires_grad=True)
    teacher = (torch.randn(BATCH, NUM_CLASSES, dtype=torch.float64) * 20,) if with_teacher else ()
    mixed = a_mixed_batch(seed=6, cutmix_alpha=1.0)

    def reference(logits, y, *teacher_logits):
        if not teacher_logits:
            return fastlt.ops.ride_loss_reference(logits, y, COUNTS, drw=True)
        distill = fastlt.RIDEDistillLoss(fastlt.RIDELoss(COUNTS, drw_epoch=0))
        with backend("reference"):
            return distill(logits, y, *teacher_logits)

    expected = mixed.loss(lambda f, y, *t: reference(head.logits(f), y, *t), features, *teacher)
    expected_grads = torch.autograd.grad(expected, (features, head.weight))
    with backend(implementation):
        loss = mixed.loss(head, features, *teacher)
        grads = torch.autograd.grad(loss, (features, head.weight))
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12)
