"""`fastlt bench step`: one training step (batch 128, 32 with --quick: next batch, forward, loss, backward, SGD), two
kinds of rows.

Loss rows: where the time of a NCHW fp32 step goes, for CE, RIDE, BalPoE and SADE on the CIFAR ResNet-32, fused vs
eager loss. BalPoE and SADE compute all experts' losses in one fused call; their eager rows loop over the experts.
"eager" runs the loss under `fastlt.ops.use_backend("reference")`; CE is torch's own cross-entropy.

Format rows: for each model of MODELS (ResNet-32, RIDE ResNet-32, and the Fashion-MNIST-LT RIDE ResNet-8 on 28x28
grey images), the step in each layout / precision of FORMATS (NCHW fp32; channels_last fp32, the recipes' default on
oneDNN CPUs and CUDA; channels_last bf16, `train.precision: bf16`; the same under `train.compile`), with the speed-up
over NCHW fp32. The plot PLOT_PATH shows them. Every row uses fastlt's array loader (synthetic uint8 images, the
model's recipe augmentation: RIDE's CIFAR one with rotation 15, pad-4 crop and flip for Fashion-MNIST;
channels_last batches for the channels_last rows) and the fused loss: CE, or RIDE's loss for a multi-expert model.
The forward runs under autocast, the loss on fp32 logits, as `fastlt.engine.train_one_epoch` does.

Per step (median over the timed steps): data = waiting for the next batch; compute = forward + backbone backward +
SGD step; loss = the loss's forward + backward on detached logits (then fed back into the backbone's backward), so
the three add up to the step. The rows of a group (all loss rows; the format rows of one model) are timed
interleaved, one step of each in turn, so that a change in the machine's load hits them alike. first_step_s is
the first step's time (oneDNN primitive creation; torch.compile's compilation for the compiled rows).
"""

import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import fastlt
from fastlt.bench.timing import progress
from fastlt.data import LongTailSampler, make_loader
from fastlt.data.base import ArrayDataset
from fastlt.engine import autocast, build_sgd, maybe_compile, prepare_model
from fastlt.methods.balpoe import BalPoELoss
from fastlt.methods.sade import SADELoss
from fastlt.models import create_model

BATCH, QUICK_BATCH = 128, 32
CIFAR_AUGMENT = {"rotation": 15}  # RIDE's CIFAR recipes
# (registered model, its options, (channels, height, width) of its images, classes, loss: "ce" or "ride", the
# loader's augmentation options): a line each
MODELS = [
    ("resnet32", {}, (3, 32, 32), 100, "ce", CIFAR_AUGMENT),
    ("ride_resnet32", {"num_experts": 3}, (3, 32, 32), 100, "ride", CIFAR_AUGMENT),
    ("ride_resnet8", {"num_experts": 3, "in_channels": 1}, (1, 28, 28), 10, "ride", {}),  # fmnist_lt_ride
]
# row label: (channels_last, precision, torch.compile)
FORMATS = {
    "NCHW fp32": (False, "fp32", False),
    "channels_last fp32": (True, "fp32", False),
    "channels_last bf16": (True, "bf16", False),
    "channels_last fp32 compiled": (True, "fp32", True),
    "channels_last bf16 compiled": (True, "bf16", True),
}
BASELINE = "NCHW fp32"
PLOT_PATH = "runs/bench_step.png"


class SyntheticImages(ArrayDataset):
    """Random uint8 images with random labels (only the shapes and the pipeline matter), CIFAR's normalisation."""

    def __init__(self, num_samples: int, shape, num_classes: int, seed: int = 0):
        generator = np.random.default_rng(seed)
        channels, height, width = shape
        self.images = generator.integers(0, 256, (num_samples, height, width, channels), dtype=np.uint8)
        self.targets = generator.integers(0, num_classes, num_samples).astype(np.int64)
        self.num_classes = num_classes
        self.train_class_counts = np.bincount(self.targets, minlength=num_classes)
        self.source_indices = np.arange(num_samples)
        mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
        self.normalization = (mean[:channels], std[:channels])


def _loss(kind: str, counts: torch.Tensor):
    """The loss of a case, a function of the detached fp32 [E, B, C] or [B, C] logits."""
    if kind == "ce":
        return lambda logits, targets: F.cross_entropy(logits, targets)
    if kind == "balpoe":
        return BalPoELoss(counts, taus=[0.0, 1.0, 2.0])
    if kind == "sade":
        return SADELoss(counts, tau=2.0)
    return lambda logits, targets: fastlt.ops.ride_loss(logits, targets, counts, drw=True)


class StepTimer:
    """One case's model, optimizer, loader and loss; `step()` runs one training step and records its split."""

    def __init__(self, model_name, options, shape, num_classes, kind, augment, backend, format_name, batch, batches):
        channels_last, self.precision, compiled = FORMATS[format_name]
        self.row = {"model": model_name, "loss": kind, "impl": "torch" if kind == "ce" else
                    ("fused" if backend != "reference" else "eager"), "format": format_name}
        self.kind, self.backend, self.batch = kind, backend, batch
        torch.manual_seed(0)
        dataset = SyntheticImages(batch * batches, shape, num_classes)
        loader = make_loader(dataset, batch, train=True, loader="torch", num_workers=0, channels_last=channels_last,
                             **augment,
                             sampler=LongTailSampler(dataset, strategy="instance_balanced", seed=0))
        model = prepare_model(create_model(model_name, num_classes=num_classes, **options).train(),
                              torch.device("cpu"), channels_last)
        self.optimizer = build_sgd(model, lr=0.1, weight_decay=5e-4, nesterov=True)
        self.model = maybe_compile(model, enabled=compiled)
        counts = torch.as_tensor(dataset.train_class_counts, dtype=torch.float64).clamp_min(1)
        self.loss_fn = _loss(kind, counts)
        self.batches = iter(loader)
        self.samples = {"data": [], "compute": [], "loss": []}

    def step(self, record: bool = True) -> float:
        tick = time.perf_counter()
        images, targets = next(self.batches)
        started = time.perf_counter()
        with fastlt.ops.use_backend(self.backend):
            with autocast("cpu", self.precision):
                output = self.model(images)
            logits = (output.logits if self.kind == "ce" else output.expert_logits).float()
            detached = logits.detach().requires_grad_(True)
            loss_started = time.perf_counter()
            loss = self.loss_fn(detached, targets)
            loss.backward()
            loss_done = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            logits.backward(detached.grad)
            self.optimizer.step()
        done = time.perf_counter()
        if record:
            self.samples["data"].append(started - tick)
            self.samples["loss"].append(loss_done - loss_started)
            self.samples["compute"].append((loss_started - started) + (done - loss_done))
        return done - tick

    def result(self) -> dict:
        # medians: on a shared machine a single preempted step would dominate a mean
        per_step = {key: 1e3 * statistics.median(values) for key, values in self.samples.items()}
        step_ms = sum(per_step.values())
        return {**self.row, "data_ms": per_step["data"], "compute_ms": per_step["compute"],
                "loss_ms": per_step["loss"], "step_ms": step_ms, "loss_pct": 100 * per_step["loss"] / step_ms,
                "batch": self.batch, "threads": torch.get_num_threads()}


def time_interleaved(cases, batch: int, steps: int, warmup: int, bar) -> list:
    """Result rows of `cases` (StepTimer arguments but the batch and its count), timed one step of each in turn."""
    timers = []
    for case in cases:
        timers.append(StepTimer(*case, batch=batch, batches=steps + warmup))
        first_step_s = timers[-1].step(record=False)
        for _ in range(warmup - 1):
            timers[-1].step(record=False)
        timers[-1].row["first_step_s"] = first_step_s
        bar.update()
    for _ in range(steps):
        for timer in timers:
            timer.step()
    return [timer.result() for timer in timers]


def format_cases(quick: bool) -> dict:
    """{model: [its format rows' StepTimer arguments]}; --quick leaves out the compiled rows (minutes each)."""
    formats = [name for name, (_, _, compiled) in FORMATS.items() if not (quick and compiled)]
    return {model: [(model, options, shape, classes, kind, augment, "auto", name) for name in formats]
            for model, options, shape, classes, kind, augment in MODELS}


def loss_rows(batch: int, steps: int, warmup: int, bar) -> list:
    cases = [("resnet32", {}, (3, 32, 32), 100, "ce", CIFAR_AUGMENT, "auto", BASELINE)] + [
        ("ride_resnet32", {"num_experts": 3}, (3, 32, 32), 100, kind, CIFAR_AUGMENT, backend, BASELINE)
        for kind in ("ride", "balpoe", "sade") for backend in ("auto", "reference")]
    return time_interleaved(cases, batch, steps, warmup, bar)


def format_rows(quick: bool, batch: int, steps: int, warmup: int, bar) -> list:
    """The format rows of every model, each with its speed-up over the model's NCHW fp32 row."""
    rows = []
    for cases in format_cases(quick).values():
        group = time_interleaved(cases, batch, steps, warmup, bar)
        baseline = next(row["step_ms"] for row in group if row["format"] == BASELINE)
        rows += [{**row, "speedup": baseline / row["step_ms"]} for row in group]
    return rows


def settings(quick: bool):
    """(batch, timed steps, warm-up steps)."""
    return (QUICK_BATCH, 2, 2) if quick else (BATCH, 10, 2)


def problem(quick=False):
    batch, steps, warmup = settings(quick)
    models = ", ".join(f"{name} ({'x'.join(map(str, shape))}, {classes} classes, {kind.upper()} loss)"
                       for name, _, shape, classes, kind, _ in MODELS)
    formats = ", ".join(name for name, (_, _, compiled) in FORMATS.items() if not (quick and compiled))
    return (f"batch {batch}, synthetic images; loss rows: ResNet-32 (CE) and RIDE ResNet-32 (RIDE, BalPoE, SADE), "
            f"NCHW fp32; format rows: {models} in {formats}; {steps} timed steps interleaved after {warmup} warm-up "
            "steps")


def run(quick: bool = False, plot_path: str = PLOT_PATH) -> list:
    batch, steps, warmup = settings(quick)
    total = 7 + sum(map(len, format_cases(quick).values()))
    with progress(None, "fastlt bench step", total=total) as bar:
        rows = loss_rows(batch, steps, warmup, bar)
        formats = format_rows(quick, batch, steps, warmup, bar)
    if plot_path:
        plot_formats(formats, plot_path)
        print(f"fastlt bench step: wrote {plot_path}", file=sys.stderr)
    return rows + formats


def plot_formats(rows: list, path: str) -> None:
    """A PNG of the format rows: step time per format (bars, labelled with the speed-up) for each model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(row["model"] for row in rows))
    formats = list(dict.fromkeys(row["format"] for row in rows))
    figure = Figure(figsize=(2.2 + 1.1 * len(models) * len(formats) / 2, 4), dpi=120)
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    width = 0.8 / len(formats)
    for index, name in enumerate(formats):
        cells = [next((row for row in rows if row["model"] == model and row["format"] == name), None)
                 for model in models]
        positions = [m + (index - (len(formats) - 1) / 2) * width for m, cell in enumerate(cells) if cell]
        bars = axis.bar(positions, [cell["step_ms"] for cell in cells if cell], width, label=name)
        axis.bar_label(bars, labels=[f"{cell['speedup']:.2f}x" for cell in cells if cell], fontsize=7)
    axis.set_xticks(range(len(models)), models)
    axis.set_ylabel(f"training step, batch {rows[0]['batch']} (ms, median)")
    axis.set_title(f"fastlt bench step, {rows[0]['threads']} CPU thread(s): speed-up over {BASELINE}", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path)


if __name__ == "__main__":
    from fastlt.bench.timing import format_table

    print(format_table(run()))
