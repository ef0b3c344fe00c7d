"""`fastlt bench step`: where one training step's time goes, for CE, RIDE, BalPoE and SADE on the CIFAR ResNet-32
(batch 128, synthetic 32x32 images through fastlt's array loader with RIDE's CIFAR augmentation), fused vs eager loss.
BalPoE and SADE compute all experts' losses in one fused call; their eager rows loop over the experts.

Per step (median over the timed steps): data = waiting for the next batch; compute = forward + backbone backward +
SGD step; loss = the loss's forward + backward on detached logits (then fed back into the backbone's backward), so
the three add up to the step. "eager" runs the loss under `fastlt.ops.use_backend("reference")`; CE is torch's own
cross-entropy.
"""

import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import fastlt
from fastlt.methods.balpoe import BalPoELoss
from fastlt.methods.sade import SADELoss
from fastlt.bench.timing import progress
from fastlt.data import LongTailSampler, make_loader
from fastlt.data.base import ArrayDataset
from fastlt.engine import build_sgd
from fastlt.models import create_model

BATCH, NUM_CLASSES = 128, 100


class SyntheticCIFAR(ArrayDataset):
    """Random uint8 32x32x3 images with CIFAR-100-LT r=100 counts (only the shapes and the pipeline matter)."""

    normalization = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))

    def __init__(self, num_samples: int, seed: int = 0):
        generator = np.random.default_rng(seed)
        self.images = generator.integers(0, 256, (num_samples, 32, 32, 3), dtype=np.uint8)
        self.targets = generator.integers(0, NUM_CLASSES, num_samples).astype(np.int64)
        self.num_classes = NUM_CLASSES
        self.train_class_counts = np.bincount(self.targets, minlength=NUM_CLASSES)
        self.source_indices = np.arange(num_samples)


def _loss(kind: str, counts: torch.Tensor):
    """(name, function of the detached [E, B, C] or [B, C] logits) for each case."""
    if kind == "ce":
        return lambda logits, targets: F.cross_entropy(logits, targets)
    if kind == "balpoe":
        return BalPoELoss(counts, taus=[0.0, 1.0, 2.0])
    if kind == "sade":
        return SADELoss(counts, tau=2.0)
    return lambda logits, targets: fastlt.ops.ride_loss(logits, targets, counts, drw=True)


def time_steps(model_name: str, kind: str, backend: str, steps: int, warmup: int = 1) -> dict:
    torch.manual_seed(0)
    dataset = SyntheticCIFAR(BATCH * (steps + warmup))
    loader = make_loader(dataset, BATCH, train=True, loader="torch", num_workers=0, rotation=15,
                         sampler=LongTailSampler(dataset, strategy="instance_balanced", seed=0))
    model = create_model(model_name, num_classes=NUM_CLASSES).train()
    optimizer = build_sgd(model, lr=0.1, weight_decay=5e-4, nesterov=True)
    counts = torch.as_tensor(dataset.train_class_counts, dtype=torch.float64).clamp_min(1)
    loss_fn = _loss(kind, counts)
    samples = {"data": [], "compute": [], "loss": []}
    batches = iter(loader)
    with fastlt.ops.use_backend(backend):
        for step in range(steps + warmup):
            tick = time.perf_counter()
            images, targets = next(batches)
            started = time.perf_counter()
            output = model(images)
            logits = output.logits if kind == "ce" else output.expert_logits
            detached = logits.detach().requires_grad_(True)
            loss_started = time.perf_counter()
            loss = loss_fn(detached, targets)
            loss.backward()
            loss_done = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            logits.backward(detached.grad)
            optimizer.step()
            done = time.perf_counter()
            if step >= warmup:
                samples["data"].append(started - tick)
                samples["loss"].append(loss_done - loss_started)
                samples["compute"].append((loss_started - started) + (done - loss_done))
    # medians: on a shared machine a single preempted step would dominate a mean
    per_step = {key: 1e3 * statistics.median(values) for key, values in samples.items()}
    step_ms = sum(per_step.values())
    return {"model": model_name, "loss": kind, "impl": "torch" if kind == "ce" else
            ("fused" if backend != "reference" else "eager"), "data_ms": per_step["data"],
            "compute_ms": per_step["compute"], "loss_ms": per_step["loss"], "step_ms": step_ms,
            "loss_pct": 100 * per_step["loss"] / step_ms, "threads": torch.get_num_threads()}


def problem(quick=False):
    return (f"CIFAR ResNet-32 (CE) and RIDE ResNet-32 (3 experts: RIDE, BalPoE, SADE losses), batch {BATCH}, "
            f"{NUM_CLASSES} classes, synthetic 32x32 images, {2 if quick else 6} timed steps after 1 warm-up step")


def run(quick: bool = False) -> list:
    steps = 2 if quick else 6
    cases = [("resnet32", "ce", "auto")] + [("ride_resnet32", kind, backend) for kind in ("ride", "balpoe", "sade")
                                            for backend in ("auto", "reference")]
    return [time_steps(model, kind, backend, steps) for model, kind, backend in progress(cases, "fastlt bench step")]


if __name__ == "__main__":
    from fastlt.bench.timing import format_table

    print(format_table(run()))
