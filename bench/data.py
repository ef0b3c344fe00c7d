"""Benchmarks behind `fastlt bench sampler` and `fastlt bench loader` (figures in BENCHMARKS.md).

- sampler: one epoch at iNaturalist-2018 size (8,142 classes, 437,513 samples, largest class 1,000, smallest 2)
  for fastlt's samplers, torch's WeightedRandomSampler and a Python class-aware generator like the official
  classifier-balancing one.
- loader: DALI CPU pipeline vs torch DataLoader (2 workers) on generated JPEGs: decode + RandomResizedCrop 224 +
  flip + normalise, class-balanced order from the same sampler, images/s.
"""

import os
import random
import statistics
import tempfile
import time

import numpy as np
import torch

from fastlt.bench.timing import progress
from fastlt.data.sampling import LongTailSampler

INAT_CLASSES, INAT_SAMPLES, INAT_MAX, INAT_MIN = 8142, 437_513, 1000, 2


def inat_like_counts():
    """A monotone profile with iNat-2018's class count, size, largest and smallest class:
    ``n_i = max(2, floor(1000 * (2/1000) ** ((i/(C-1)) ** a)))`` with `a` solved for the total."""
    position = np.arange(INAT_CLASSES) / (INAT_CLASSES - 1)

    def profile(exponent):
        sizes = np.floor(INAT_MAX * (INAT_MIN / INAT_MAX) ** (position ** exponent))
        return np.maximum(INAT_MIN, sizes).astype(np.int64)

    low, high = 0.01, 1.0
    for _ in range(60):  # the total falls as the exponent grows: bisect
        middle = (low + high) / 2
        low, high = (low, middle) if profile(middle).sum() > INAT_SAMPLES else (middle, high)
    return profile((low + high) / 2)


def python_class_aware_epoch(targets, num_samples, samples_per_class=4, seed=0):
    """classifier-balancing's `ClassAwareSampler`: Python RandomCycleIter over classes and per-class lists."""
    rng = random.Random(seed)

    def cycle(items):
        items = list(items)
        while True:
            rng.shuffle(items)
            yield from items

    buckets = [[] for _ in range(int(targets.max()) + 1)]
    for index, label in enumerate(targets.tolist()):
        buckets[label].append(index)
    class_iter = cycle(range(len(buckets)))
    data_iters = [cycle(bucket) for bucket in buckets]
    out = []
    while len(out) < num_samples:
        cls = next(class_iter)
        out.extend(next(data_iters[cls]) for _ in range(samples_per_class))
    return out[:num_samples]


def _time_ms(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def problem_run_sampler(quick=False):
    return (f"one epoch of iNaturalist-2018-size targets ({INAT_CLASSES} classes, {INAT_SAMPLES:,} samples, "
            f"largest class {INAT_MAX}, smallest {INAT_MIN})")


def problem_run_loader(quick=False):
    num_images, rounds = (400, 1) if quick else (2000, 3)
    return (f"{num_images} generated 320x240 JPEGs in 20 classes -> RandomResizedCrop 224 + flip + normalise, "
            f"batch 64, class-balanced order, {rounds} timed epochs each")


def run_sampler(quick=False):
    """One row per (sampler, output) at iNat size: median and best epoch time in ms, speed-up vs WRS."""
    counts = inat_like_counts()
    targets = np.random.default_rng(0).permutation(np.repeat(np.arange(INAT_CLASSES), counts))
    fast_repeats, slow_repeats = (5, 2) if quick else (30, 5)
    rows = []

    def add(name, output, function, repeats):
        median, best = _time_ms(function, repeats)
        rows.append({"sampler": name, "output": output, "epoch_ms": round(median, 2), "best_ms": round(best, 2),
                     "repeats": repeats})

    samplers = {strategy: LongTailSampler(targets, strategy=strategy, seed=0, total_epochs=90)
                for strategy in ("class_balanced", "square_root", "progressive", "class_aware", "instance_balanced")}
    for sampler in samplers.values():
        sampler.indices(0)  # compile / load the numba cache outside the timing
    epochs = iter(range(10**9))
    for strategy, sampler in samplers.items():
        add(f"fastlt {strategy}", "numpy (DALI)", lambda s=sampler: s.indices(next(epochs)), fast_repeats)
    class_balanced = samplers["class_balanced"]
    add("fastlt class_balanced", "list (DataLoader)", lambda: list(class_balanced), fast_repeats)
    weights = torch.as_tensor(1.0 / counts[targets], dtype=torch.double)
    weighted = torch.utils.data.WeightedRandomSampler(weights, len(targets), replacement=True)
    add("torch WeightedRandomSampler", "list (DataLoader)", lambda: list(weighted), slow_repeats)
    add("torch WeightedRandomSampler", "torch.multinomial only",
        lambda: torch.multinomial(weights, len(targets), replacement=True), slow_repeats)
    add("Python class-aware generator", "list", lambda: python_class_aware_epoch(targets, len(targets)),
        1 if quick else 3)
    reference = next(row["epoch_ms"] for row in rows if row["output"] == "list (DataLoader)"
                     and row["sampler"].startswith("torch"))
    for row in rows:
        row["speedup_vs_wrs_list"] = round(reference / row["epoch_ms"], 1)
    return rows


def generated_jpeg_dataset(folder, num_images, num_classes=20, size=(320, 240), seed=0):
    """A long-tailed tree of smooth-with-noise JPEGs (about the size of an ImageNet photo) and its list file."""
    from PIL import Image

    from fastlt.data.listfile import ListFileDataset

    weights = 10.0 ** (-np.arange(num_classes) / (num_classes - 1))  # ratio 10 between the first and last class
    counts = np.maximum(1, np.round(weights / weights.sum() * num_images)).astype(int)
    list_file = os.path.join(folder, "train.txt")
    if not os.path.exists(list_file):
        rng = np.random.default_rng(seed)
        ys, xs = np.mgrid[0:size[1], 0:size[0]]
        lines = []
        for cls, count in enumerate(counts):
            for index in range(count):
                phase = rng.uniform(0, 6.3, 3)
                base = 127 + 100 * np.sin(xs[..., None] / 37.0 + ys[..., None] / 53.0 + phase)
                pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
                name = f"class_{cls}_{index}.jpg"
                Image.fromarray(pixels).save(os.path.join(folder, name), quality=90)
                lines.append(f"{name} {cls}")
        with open(list_file, "w") as handle:
            handle.write("\n".join(lines) + "\n")
    return ListFileDataset(folder, list_file)


def _images_per_second(loader, epoch):
    loader.set_epoch(epoch)
    start = time.perf_counter()
    seen = sum(len(labels) for _, labels in loader)
    return seen / (time.perf_counter() - start)


def run_loader(quick=False, folder=None):
    """DALI CPU vs torch DataLoader(2 workers), decode + RandomResizedCrop 224 + flip + normalise, images/s."""
    from fastlt.data.loaders import make_loader

    num_images, rounds = (400, 1) if quick else (2000, 3)
    with tempfile.TemporaryDirectory() as scratch:
        dataset = generated_jpeg_dataset(folder or scratch, num_images)
        rates = {"dali": [], "torch": []}
        loaders = {}
        for backend in rates:
            sampler = LongTailSampler(dataset, strategy="class_balanced", seed=0)
            loaders[backend] = make_loader(dataset, 64, train=True, sampler=sampler, loader=backend,
                                           num_threads=2, num_workers=2)
            _images_per_second(loaders[backend], epoch=0)  # warm-up: pipeline build, worker start, page cache
        for epoch in progress(range(1, rounds + 1), "fastlt bench loader"):  # alternate: both see the same load
            for backend, loader in loaders.items():
                rates[backend].append(_images_per_second(loader, epoch))
    torch_rate = statistics.median(rates["torch"])
    rows = []
    for backend, label in (("dali", "DALI CPU (2 threads)"), ("torch", "torch DataLoader (2 workers)")):
        rate = statistics.median(rates[backend])
        rows.append({"loader": label, "images": len(dataset), "batch": 64, "img_per_s": round(rate, 1),
                     "best_img_per_s": round(max(rates[backend]), 1), "rounds": rounds,
                     "ratio_vs_dataloader": round(rate / torch_rate, 2)})
    return rows


def markdown_table(rows):
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[column]) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m fastlt.bench.data [--quick]: both tables as markdown (same rows as the CLI)
    import sys

    quick = "--quick" in sys.argv
    print(markdown_table(run_sampler(quick)), end="\n\n")
    print(markdown_table(run_loader(quick)))
