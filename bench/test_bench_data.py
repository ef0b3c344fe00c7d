"""pytest-benchmark twins of `bench/data.py` (`pytest bench/test_bench_data.py --benchmark-only`)."""

import numpy as np
import pytest
import torch

from fastlt.bench.data import inat_like_counts, python_class_aware_epoch, run_loader
from fastlt.data.sampling import LongTailSampler


@pytest.fixture(scope="module")
def inat_targets():
    counts = inat_like_counts()
    return np.random.default_rng(0).permutation(np.repeat(np.arange(len(counts)), counts)), counts


@pytest.mark.parametrize("strategy", ["class_balanced", "square_root", "class_aware"])
def test_fastlt_sampler_epoch(benchmark, inat_targets, strategy):
    targets, _ = inat_targets
    sampler = LongTailSampler(targets, strategy=strategy, seed=0)
    epochs = iter(range(10**9))
    indices = benchmark(lambda: sampler.indices(next(epochs)))
    assert len(indices) == len(targets)


def test_weighted_random_sampler_epoch(benchmark, inat_targets):
    targets, counts = inat_targets
    weights = torch.as_tensor(1.0 / counts[targets], dtype=torch.double)
    sampler = torch.utils.data.WeightedRandomSampler(weights, len(targets), replacement=True)
    assert len(benchmark.pedantic(lambda: list(sampler), rounds=3)) == len(targets)


def test_python_class_aware_generator_epoch(benchmark, inat_targets):
    targets, _ = inat_targets
    epoch = benchmark.pedantic(lambda: python_class_aware_epoch(targets, len(targets)), rounds=1)
    assert len(epoch) == len(targets)


def test_loader_quick(benchmark):
    rows = benchmark.pedantic(lambda: run_loader(quick=True), rounds=1)
    assert {row["loader"].split()[0] for row in rows} == {"DALI", "torch"}
