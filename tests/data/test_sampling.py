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


@pytest.mark.parametrize("epoch, lam", [(0, 0.0), (3, 0.5), (6, 1.0), (8, 1.0)])
def test_progressive_sampler_follows_lambda(epoch, lam):
    """0-based epochs (torch's convention): instance-balanced at epoch 0, class-balanced at epoch T - 1."""
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
    assert state == {"epoch": 5, "seed": 3, "position": 37, "persistent": True}
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
        resumed.load_state_dict({"epoch": 0, "seed": 3, "position": 10**9, "persistent": True})
    with pytest.raises(ValueError, match="persistent"):
        resumed.load_state_dict({**state, "persistent": False})


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


@pytest.mark.parametrize("strategy", ["class_aware", "class_balanced", "ride_balanced", "square_root"])
def test_persistent_buckets_carry_over_epochs(strategy):
    """The official samplers keep each class's cycling iterator across epochs: over 10 short epochs every head image
    is drawn once before any is drawn twice. Restarting buckets each epoch (persistent=False) repeats head images."""
    targets = shuffled_targets([400, 40, 4])
    head = np.flatnonzero(targets == 0)

    def ten_epochs(persistent):
        sampler = LongTailSampler(targets, strategy=strategy, seed=2, num_samples=40, persistent=persistent)
        drawn = []
        for epoch in range(10):
            sampler.set_epoch(epoch)
            drawn += list(sampler)
        return np.asarray(drawn)

    carried = ten_epochs(True)
    head_draws = carried[targets[carried] == 0]
    assert 40 < len(head_draws) <= len(head) and len(set(head_draws.tolist())) == len(head_draws)
    restarted = ten_epochs(False)
    restarted_head = restarted[targets[restarted] == 0]
    assert len(set(restarted_head.tolist())) < len(restarted_head)


def test_persistent_epochs_are_pure_resumable_and_ddp_consistent():
    targets = shuffled_targets(COUNTS)
    in_order = LongTailSampler(targets, strategy="class_aware", seed=4, num_samples=500)
    epochs = []
    for epoch in range(4):
        in_order.set_epoch(epoch)
        epochs.append(list(in_order))
    # any epoch, asked out of order, by a fresh sampler (a resumed run) or the stateless function, is the same
    fresh = LongTailSampler(targets, strategy="class_aware", seed=4, num_samples=500)
    assert fresh.indices(3).tolist() == epochs[3] and fresh.indices(1).tolist() == epochs[1]
    assert in_order.indices(2).tolist() == epochs[2]
    assert epoch_indices(targets, strategy="class_aware", seed=4, num_samples=500, epoch=3).tolist() == epochs[3]
    resumed = LongTailSampler(targets, strategy="class_aware", seed=4, num_samples=500)
    resumed.load_state_dict({"epoch": 3, "seed": 4, "position": 123, "persistent": True})
    assert list(resumed) == epochs[3][123:]
    # ranks shard the same carried global order
    shards = [LongTailSampler(targets, strategy="class_aware", seed=4, num_samples=500, rank=rank, world_size=2)
              for rank in range(2)]
    for sampler in shards:
        sampler.set_epoch(3)
    assert np.array_equal(np.stack([list(sampler) for sampler in shards], 1).reshape(-1), epochs[3])


def test_square_root_with_replacement_is_iid_instance_weighting():
    """Official square-root sampling (MixedPrioritizedSampler, nroot 2): i.i.d. draws with replacement, each instance
    of class j with weight sqrt(n_j) / n_j, so instances of a class are equally likely and draws repeat freely."""
    counts = np.array([900, 100, 16])
    targets = shuffled_targets(counts)
    indices = epoch_indices(targets, strategy="square_root", replacement=True, num_samples=DRAWS, epoch=1)
    weights = (np.sqrt(counts) / counts)[targets]
    expected = np.bincount(targets, weights=weights) / weights.sum()
    assert chisquare(class_frequencies(indices, targets), expected * DRAWS).pvalue > 1e-3
    tail = np.bincount(indices[targets[indices] == 2], minlength=len(targets))[targets == 2]
    assert chisquare(tail, np.full(16, tail.sum() / 16)).pvalue > 1e-3
    # with replacement a small epoch repeats indices within a class pass (buckets never do before exhausting one)
    short = epoch_indices(targets, strategy="square_root", replacement=True, num_samples=300)
    assert len(set(short[targets[short] == 0].tolist())) < (targets[short] == 0).sum()
    with pytest.raises(ValueError, match="replacement"):
        LongTailSampler(targets, strategy="class_aware", replacement=True)


def test_rank_and_world_size_are_read_when_the_sampler_is_used(monkeypatch):
    """A sampler built before init_process_group shards by the process group it finds when iterated."""
    targets = shuffled_targets(COUNTS)
    sampler = LongTailSampler(targets, strategy="class_balanced", seed=0)
    assert (sampler.rank, sampler.world_size, len(sampler)) == (0, 1, len(targets))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 3)
    sampler.set_epoch(1)
    assert (sampler.rank, sampler.world_size, len(sampler)) == (3, 4, -(-len(targets) // 4))
    assert list(sampler) == epoch_indices(targets, strategy="class_balanced", epoch=1, rank=3, world_size=4).tolist()


def test_an_explicit_rank_before_init_process_group_is_checked_when_used(monkeypatch):
    """rank=1 with the process group's world size (read when used): accepted when built, before the group exists."""
    targets = shuffled_targets(COUNTS)
    sampler = LongTailSampler(targets, strategy="class_balanced", seed=0, rank=1)
    with pytest.raises(ValueError, match=r"rank=1, world_size=1 \(an unset world_size is the process group's"):
        len(list(sampler))  # still no process group: a world of one has no rank 1
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    assert list(sampler) == epoch_indices(targets, strategy="class_balanced", rank=1, world_size=2).tolist()
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        LongTailSampler(targets, rank=2, world_size=2)
    with pytest.raises(ValueError, match="rank must be an integer >= 0, got -1"):
        LongTailSampler(targets, rank=-1)


@pytest.mark.parametrize("options, message", [
    (dict(num_samples=2.7), "num_samples must be an integer >= 1, got 2.7"),  # not truncated to 2
    (dict(num_samples=0), "num_samples must be an integer >= 1, got 0"),  # an epoch of 0 steps
    (dict(num_samples=-1), "num_samples must be an integer >= 1, got -1"),
    (dict(num_samples=True), "num_samples must be an integer >= 1, got True"),
    (dict(strategy="class_aware", samples_per_class=2.5), "samples_per_class must be an integer >= 1, got 2.5"),
    (dict(strategy="q_power", q="abc"), "q must be a finite number, got 'abc'"),
    (dict(strategy="q_power", q=float("nan")), "q must be a finite number, got nan"),
    (dict(world_size=1.5), "world_size must be an integer >= 1, got 1.5"),
])
def test_sampler_sizes_must_be_whole_numbers(options, message):
    with pytest.raises(ValueError, match=message):
        LongTailSampler(shuffled_targets(COUNTS), **options)


def test_numpy_integer_sizes_are_accepted():
    sampler = LongTailSampler(shuffled_targets(COUNTS), num_samples=np.int64(40), rank=np.int32(0), world_size=1)
    assert len(sampler) == 40 and len(epoch_indices(shuffled_targets(COUNTS), num_samples=np.uint8(0))) == 0
