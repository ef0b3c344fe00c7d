import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from fastlt.data import LongTailSampler, epoch_indices, exponential_counts
from fastlt.data.sampling import (
    STRATEGIES,
    ClassGroups,
    class_probabilities,
    global_epoch_indices,
    progressive_probabilities,
    shard,
)

COUNTS = np.asarray(exponential_counts(1000, 50, 8))  # 1000 ... 20
DRAWS = 200_000


def shuffled_targets(counts, seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))


def class_frequencies(indices, targets):
    return np.bincount(targets[indices], minlength=int(targets.max()) + 1)


@pytest.mark.parametrize("strategy, q, expected", [
    ("instance_balanced", None, class_probabilities(COUNTS, 1.0)),
    ("class_balanced", None, np.full(8, 1 / 8)),
    ("ride_balanced", None, np.full(8, 1 / 8)),
    ("square_root", None, np.sqrt(COUNTS) / np.sqrt(COUNTS).sum()),
    ("q_power", 0.3, COUNTS ** 0.3 / (COUNTS ** 0.3).sum()),
    ("q_power", -0.5, COUNTS ** -0.5 / (COUNTS ** -0.5).sum()),
    ("class_aware", None, np.full(8, 1 / 8)),
])
def test_class_frequencies_match_the_target_distribution(strategy, q, expected):
    targets = shuffled_targets(COUNTS)
    indices = epoch_indices(targets, strategy=strategy, q=q, epoch=2, seed=11, num_samples=DRAWS)
    observed = class_frequencies(indices, targets)
    assert chisquare(observed, expected * DRAWS).pvalue > 1e-3
    # the test can fail: the same draws against the instance-balanced profile are rejected (unless they are it)
    if strategy != "instance_balanced":
        assert chisquare(observed, class_probabilities(COUNTS, 1.0) * DRAWS).pvalue < 1e-12


@pytest.mark.parametrize("epoch, lam", [(1, 0.0), (4, 0.5), (7, 1.0), (9, 1.0)])
def test_progressive_sampler_follows_lambda(epoch, lam):
    expected = (1 - lam) * COUNTS / COUNTS.sum() + lam / len(COUNTS)
    assert np.allclose(progressive_probabilities(COUNTS, epoch, 7), expected)
    targets = shuffled_targets(COUNTS)
    indices = epoch_indices(targets, strategy="progressive", total_epochs=7, epoch=epoch, num_samples=DRAWS)
    assert chisquare(class_frequencies(indices, targets), expected * DRAWS).pvalue > 1e-3


def test_instance_balanced_epoch_is_a_permutation():
    targets = shuffled_targets(COUNTS)
    indices = epoch_indices(targets, strategy="instance_balanced", epoch=0)
    assert np.array_equal(np.sort(indices), np.arange(len(targets)))
    assert not np.array_equal(indices, np.arange(len(targets)))


def test_each_class_cycles_through_reshuffled_buckets():
    """A class's draws come in consecutive runs that are each a permutation of the class (RandomCycleIter)."""
    targets = shuffled_targets([300, 7, 3])
    indices = epoch_indices(targets, strategy="class_balanced", num_samples=3000)
    for cls, size in ((1, 7), (2, 3)):
        drawn = indices[targets[indices] == cls]
        runs = drawn[: len(drawn) // size * size].reshape(-1, size)
        assert all(np.array_equal(np.sort(run), np.flatnonzero(targets == cls)) for run in runs)
        assert len({tuple(run) for run in runs}) > 1  # reshuffled between passes


def test_class_aware_takes_k_consecutive_from_each_class_in_cycles():
    targets = shuffled_targets(COUNTS)
    indices = epoch_indices(targets, strategy="class_aware", samples_per_class=4, num_samples=8 * 4 * 10)
    blocks = targets[indices].reshape(-1, 4)
    assert (blocks == blocks[:, :1]).all()  # 4 consecutive samples of one class
    passes = blocks[:, 0].reshape(-1, 8)
    assert all(sorted(p) == list(range(8)) for p in passes)  # each pass visits every class once
    assert len({tuple(p) for p in passes}) > 1


def test_deterministic_per_seed_and_epoch():
    targets = shuffled_targets(COUNTS)
    for strategy in ("class_balanced", "square_root", "class_aware", "instance_balanced"):
        first = epoch_indices(targets, strategy=strategy, epoch=3, seed=5)
        assert np.array_equal(first, epoch_indices(targets, strategy=strategy, epoch=3, seed=5))
        assert not np.array_equal(first, epoch_indices(targets, strategy=strategy, epoch=4, seed=5))
        assert not np.array_equal(first, epoch_indices(targets, strategy=strategy, epoch=3, seed=6))


def test_class_counts_input_means_class_sorted_storage():
    by_counts = epoch_indices(class_counts=COUNTS, epoch=1, seed=2)
    sorted_targets = np.repeat(np.arange(len(COUNTS)), COUNTS)
    assert np.array_equal(by_counts, epoch_indices(sorted_targets, epoch=1, seed=2))


@pytest.mark.parametrize("world_size, drop_last", [(3, False), (3, True), (4, False)])
def test_ddp_shards_are_disjoint_equal_and_cover_the_global_order(world_size, drop_last):
    targets = shuffled_targets(COUNTS)
    groups = ClassGroups(targets)
    global_order = global_epoch_indices(groups, "square_root", epoch=2, seed=1)
    shards = [epoch_indices(targets, strategy="square_root", epoch=2, seed=1, rank=rank, world_size=world_size,
                            drop_last=drop_last) for rank in range(world_size)]
    lengths = {len(part) for part in shards}
    assert len(lengths) == 1
    per_rank = lengths.pop()
    assert per_rank == (len(targets) // world_size if drop_last else -(-len(targets) // world_size))
    interleaved = np.stack(shards, axis=1).reshape(-1)  # slot s of the global order lives on rank s % W
    covered = min(len(global_order), per_rank * world_size)
    assert np.array_equal(interleaved[:covered], global_order[:covered])
    if not drop_last:  # padding wraps around to the start, as DistributedSampler
        assert np.array_equal(interleaved[covered:], global_order[: len(interleaved) - covered])
    tiny = [shard(np.arange(2), rank, world_size).tolist() for rank in range(world_size)]
    assert sum(tiny, []) == (np.arange(world_size) % 2).tolist()  # fewer samples than ranks: wraps again
    samplers = [LongTailSampler(targets, strategy="square_root", seed=1, rank=r, world_size=world_size,
                                drop_last=drop_last) for r in range(world_size)]
    for rank, sampler in enumerate(samplers):
        sampler.set_epoch(2)
        assert list(sampler) == shards[rank].tolist() and len(sampler) == per_rank


def test_mid_epoch_resume():
    targets = shuffled_targets(COUNTS)
    sampler = LongTailSampler(targets, strategy="class_aware", seed=3, rank=1, world_size=2)
    sampler.set_epoch(5)
    full = list(sampler)
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(37)]
    state = sampler.state_dict()
    assert state == {"epoch": 5, "seed": 3, "position": 37}
    resumed = LongTailSampler(targets, strategy="class_aware", seed=3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    assert list(resumed) == full  # the resume position only applies to one epoch
    resumed.load_state_dict(sampler.state_dict(consumed=100))
    assert list(resumed) == full[100:]
    assert np.array_equal(sampler.indices(5, start=100), full[100:])
    with pytest.raises(ValueError, match="seed"):
        LongTailSampler(targets, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        resumed.load_state_dict({"epoch": 0, "seed": 3, "position": 10**9})


def test_works_inside_a_torch_dataloader():
    targets = torch.as_tensor(shuffled_targets(COUNTS))
    dataset = torch.utils.data.TensorDataset(torch.arange(len(targets)), targets)
    sampler = LongTailSampler(targets.numpy(), strategy="class_balanced", seed=0, num_samples=512)
    sampler.set_epoch(1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, sampler=sampler)
    seen = torch.cat([index for index, _ in loader])
    assert seen.tolist() == sampler.indices(1).tolist()


def test_more_than_2_pow_24_samples():
    """torch.multinomial refuses more than 2**24 categories; the samplers index any size."""
    counts = np.array([2**24 + 3, 2])
    indices = epoch_indices(class_counts=counts, strategy="class_balanced", num_samples=4000)
    assert indices.max() < counts.sum() and (indices >= 2**24).any()
    assert abs(np.mean(indices >= 2**24 + 3) - 0.5) < 0.05


def test_many_classes_stay_linear():
    counts = np.ones(300_000, dtype=np.int64)  # an O(N*C) build would need 9e10 steps
    indices = epoch_indices(class_counts=counts, strategy="class_aware", samples_per_class=1)
    assert np.array_equal(np.sort(indices), np.arange(300_000))


def test_empty_classes_are_never_drawn():
    targets = shuffled_targets([50, 0, 30])
    for strategy in ("class_balanced", "class_aware", "square_root"):
        assert 1 not in targets[epoch_indices(targets, strategy=strategy, num_samples=2000)]


def test_bad_arguments_are_clear_errors():
    targets = shuffled_targets(COUNTS)
    with pytest.raises(ValueError, match="strategy"):
        epoch_indices(targets, strategy="balanced")
    with pytest.raises(ValueError, match="needs q"):
        LongTailSampler(targets, strategy="q_power")
    with pytest.raises(ValueError, match="total_epochs"):
        LongTailSampler(targets, strategy="progressive")
    with pytest.raises(ValueError, match="rank"):
        shard(np.arange(4), rank=2, world_size=2)
    with pytest.raises(ValueError, match="targets must be >= 0"):
        epoch_indices([0, -1, 2])
    with pytest.raises(ValueError, match="exactly one"):
        ClassGroups()
    with pytest.raises(ValueError, match="class_counts"):
        ClassGroups(class_counts=[0, 0])
    assert set(STRATEGIES) >= {"instance_balanced", "class_balanced", "square_root", "progressive", "class_aware"}
