"""Seedable, DDP-aware, resumable long-tail samplers (docs/methods.md section 2.2).

Every strategy picks a class, then takes the next index of that class's own reshuffled, cycling bucket, so an epoch
costs O(N + C) in numba, whatever the class count (no O(N*C) build, no 2**24 cap of `torch.multinomial`):

- ``instance_balanced`` (q = 1): plain shuffling; ``class_balanced`` (q = 0, also RIDE's balanced sampler:
  uniform class, then the next index of its bucket); ``square_root`` (q = 1/2); ``q_power`` (any q):
  ``p_j = n_j**q / sum_i n_i**q``;
- ``progressive``: ``lam = epoch / (total_epochs - 1)`` with 0-based epochs (the official 1-based
  ``(epoch - 1) / (T - 1)``), ``p = (1 - lam) p_IB + lam p_CB``;
- ``class_aware``: Decoupling's ClassAwareSampler: cycle a reshuffled class list and take ``samples_per_class``
  (default 4) consecutive indices from each class;
- ``sequential``: 0, 1, ..., N-1 (evaluation), sharded like the others.

Epochs are 0-based, as torch's `DistributedSampler.set_epoch`, Lightning and the fastlt trainer count them.

``persistent=True`` (the default) keeps every class's bucket (its shuffled order and how far it has been read) and
class_aware's class cycle from one epoch to the next, as the official samplers' long-lived iterators do: over cRT's 10
epochs a head image is then seen about once, instead of its bucket restarting every epoch. ``persistent=False``
restarts them every epoch. ``replacement=True`` draws i.i.d. with replacement instead of from buckets: a class with
probability p_j, then a uniform instance of it, i.e. per-instance weight p_j / n_j (the official square-root
sampler, `MixedPrioritizedSampler` with nroot 2: weight sqrt(n_j) / n_j).

An epoch is a pure function of (seed, epoch) and the strategy: the bucket state an epoch starts from is that left by
epochs 0 .. epoch-1 (replayed when needed, cached when epochs run in order), so resuming and every DDP rank build the
same global order. Each rank keeps the slots ``rank::world_size`` (padded by wrapping, as `DistributedSampler`), so
shards are disjoint and equal-length. Classes with no samples are never drawn.
"""

import math
import numbers
import operator

import numpy as np
import torch

from fastlt.data import _sampling_kernels as kernels

STRATEGIES = (
    "sequential",
    "instance_balanced",
    "class_balanced",
    "ride_balanced",
    "square_root",
    "q_power",
    "progressive",
    "class_aware",
)
_FIXED_Q = {"instance_balanced": 1.0, "class_balanced": 0.0, "ride_balanced": 0.0, "square_root": 0.5}
_MASK_64 = (1 << 64) - 1


def class_probabilities(class_counts, q):
    """Class sampling probabilities ``p_j = n_j**q / sum_i n_i**q`` (empty classes get 0).

    >>> class_probabilities([400, 100, 0], q=0.5).round(3).tolist()
    [0.667, 0.333, 0.0]
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    weights = np.where(counts > 0, counts ** float(q), 0.0)
    return weights / weights.sum()


def progressive_probabilities(class_counts, epoch, total_epochs):
    """Progressively-balanced probabilities for 0-based `epoch`: instance-balanced at 0, class-balanced at T - 1.

    >>> progressive_probabilities([300, 100], epoch=1, total_epochs=3).tolist()
    [0.625, 0.375]
    """
    if total_epochs < 2:
        raise ValueError(f"progressive sampling: total_epochs must be >= 2, got {total_epochs}")
    lam = min(max(epoch / (total_epochs - 1), 0.0), 1.0)
    return (1.0 - lam) * class_probabilities(class_counts, 1.0) + lam * class_probabilities(class_counts, 0.0)


def _mix64(value):
    value = (value + 0x9E3779B97F4A7C15) & _MASK_64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return value ^ (value >> 31)


def _epoch_state(seed, epoch):
    return np.uint64(_mix64(_mix64(int(seed) & _MASK_64) ^ (int(epoch) & _MASK_64)))


def _as_targets(targets):
    targets = getattr(targets, "targets", targets)  # a dataset or an array
    targets = np.asarray(targets)
    if targets.ndim != 1 or targets.size == 0:
        raise ValueError(f"targets must be a non-empty 1-D array, got shape {targets.shape}")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integers, got dtype {targets.dtype}")
    if targets.min() < 0:
        raise ValueError(f"targets must be >= 0, got {targets.min()}")
    return targets.astype(np.int64, copy=False)


class ClassGroups:
    """Sample ids grouped by class (built once, O(N)): from `targets`, or from `class_counts` when the dataset
    is stored class by class (sample ids 0..n_0-1 are class 0, then class 1, ...).

    >>> ClassGroups(class_counts=[2, 1]).order.tolist()
    [0, 1, 2]
    """

    def __init__(self, targets=None, *, class_counts=None):
        if (targets is None) == (class_counts is None):
            raise ValueError("pass exactly one of targets or class_counts")
        if targets is not None:
            targets = _as_targets(targets)
            self.order, self.offsets = kernels.group_by_class(targets, int(targets.max()) + 1)
        else:
            counts = np.asarray(class_counts, dtype=np.int64)
            if counts.ndim != 1 or counts.size == 0 or counts.min() < 0 or counts.sum() == 0:
                raise ValueError(f"class_counts must be a 1-D array of counts >= 0 with a positive sum, got {counts}")
            self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            self.order = np.arange(self.offsets[-1], dtype=np.int64)
        self.class_counts = np.diff(self.offsets)
        if self.class_counts.size >= 2**32 or self.class_counts.max() >= 2**32:
            raise ValueError("at most 2**32 - 1 classes and 2**32 - 1 samples per class are supported")
        if self.num_samples < 2**31:  # half the memory traffic in the draw loop
            self.order = self.order.astype(np.int32)

    @property
    def num_samples(self):
        return int(self.offsets[-1])


def check_count(name, value, minimum):
    """`value` as an int, if it is an integer >= `minimum`; a float is refused, not truncated (2.7 is no count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_strategy(strategy, q=None, total_epochs=None, samples_per_class=4, replacement=False):
    """Raise ValueError if a strategy is unknown or misses its parameter, or a parameter is not a valid value."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "q_power" and q is None:
        raise ValueError("strategy 'q_power' needs q")
    if q is not None and (isinstance(q, bool) or not isinstance(q, numbers.Real) or not math.isfinite(q)):
        raise ValueError(f"q must be a finite number, got {q!r}")
    if strategy == "progressive" and (total_epochs is None or total_epochs < 2):
        raise ValueError(f"strategy 'progressive' needs total_epochs >= 2, got {total_epochs}")
    check_count("samples_per_class", samples_per_class, 1)
    if not isinstance(replacement, bool):
        raise ValueError(f"replacement must be true or false, got {replacement!r}")
    if replacement and strategy in ("sequential", "class_aware"):
        raise ValueError(f"replacement=True draws classes by probability; strategy {strategy!r} has none")


def check_sampler_options(strategy, *, num_samples=None, persistent=True, q=None, total_epochs=None,
                          samples_per_class=4, replacement=False):
    """`LongTailSampler`'s argument checks, which read no data: a ValueError naming the argument."""
    check_strategy(strategy, q, total_epochs, samples_per_class, replacement)
    if not isinstance(persistent, bool):
        raise ValueError(f"persistent must be true or false, got {persistent!r}")
    if num_samples is not None:  # at least one: an epoch of none trains 0 steps and reports the untrained model
        check_count("num_samples", num_samples, 1)


class BucketState:
    """What carries over between epochs: the buckets' current shuffled order and read positions, and class_aware's
    class cycle. `work[offsets[c]:offsets[c+1]]` is bucket c (one bucket of every sample for instance_balanced)."""

    def __init__(self, groups, strategy):
        if strategy == "instance_balanced":
            self.work = np.arange(groups.num_samples, dtype=groups.order.dtype)
            self.offsets = groups.offsets[[0, -1]]
        else:
            self.work, self.offsets = groups.order.copy(), groups.offsets
        self.pointers = np.zeros(len(self.offsets) - 1, dtype=np.int64)
        self.classes = np.flatnonzero(groups.class_counts).astype(np.int64)
        self.class_pointer = np.zeros(1, dtype=np.int64)

    def copy(self):
        other = object.__new__(BucketState)
        other.offsets = self.offsets
        for name in ("work", "pointers", "classes", "class_pointer"):
            setattr(other, name, getattr(self, name).copy())
        return other


def _carries_state(strategy, replacement):
    return strategy != "sequential" and not replacement


def _draw_epoch(groups, strategy, epoch, seed, num_samples, buckets, q, total_epochs, samples_per_class, replacement):
    """One epoch's global order, advancing `buckets` (a BucketState) in place."""
    state = _epoch_state(seed, epoch)
    if strategy == "sequential":
        return np.arange(num_samples, dtype=np.int64) % groups.num_samples
    if strategy == "class_aware":
        return kernels.draw_class_aware(buckets.work, buckets.offsets, buckets.classes, buckets.pointers,
                                        buckets.class_pointer, int(samples_per_class), num_samples, state)
    if strategy == "instance_balanced":
        probabilities = np.ones(1)
    elif strategy == "progressive":
        probabilities = progressive_probabilities(groups.class_counts, epoch, total_epochs)
    else:
        probabilities = class_probabilities(groups.class_counts, _FIXED_Q.get(strategy, q))
    if replacement:
        if strategy == "instance_balanced":
            probabilities = class_probabilities(groups.class_counts, 1.0)
        keep, alias = kernels.build_alias_table(probabilities)
        return kernels.draw_with_replacement(groups.order, groups.offsets, keep, alias, num_samples, state)
    keep, alias = kernels.build_alias_table(probabilities)
    return kernels.draw_by_class_probability(buckets.work, buckets.offsets, keep, alias, buckets.pointers,
                                             num_samples, state)


def global_epoch_indices(groups, strategy="class_balanced", *, epoch=0, seed=0, num_samples=None, q=None,
                         total_epochs=None, samples_per_class=4, persistent=True, replacement=False, buckets=None):
    """One epoch's global sample order (every rank computes the same one) for a `ClassGroups`; `epoch` is 0-based.

    With `persistent`, the buckets start where epochs 0 .. epoch-1 left them (replayed here: O(epoch * num_samples);
    `LongTailSampler` caches them instead). `buckets`: a `BucketState` to start from and advance in place (then
    `persistent` is not consulted).
    """
    check_strategy(strategy, q, total_epochs, samples_per_class, replacement)
    num_samples = groups.num_samples if num_samples is None else check_count("num_samples", num_samples, 0)
    options = dict(q=q, total_epochs=total_epochs, samples_per_class=samples_per_class, replacement=replacement)
    if buckets is None:
        buckets = BucketState(groups, strategy)
        if persistent and _carries_state(strategy, replacement):
            for previous in range(int(epoch)):
                _draw_epoch(groups, strategy, previous, seed, num_samples, buckets, **options)
    return _draw_epoch(groups, strategy, epoch, seed, num_samples, buckets, **options)


def shard(global_indices, rank=0, world_size=1, drop_last=False):
    """This rank's slots ``rank::world_size`` of the global order, padded by wrapping (or truncated with
    `drop_last`) so every rank gets the same length.

    >>> shard(np.arange(5), rank=1, world_size=2).tolist()
    [1, 3, 0]
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    total = len(global_indices)
    per_rank = total // world_size if drop_last else -(-total // world_size)
    padded = global_indices[: per_rank * world_size]
    if len(padded) < per_rank * world_size:  # fewer than world_size slots missing: wrap around
        padded = np.concatenate([padded, global_indices[np.arange(per_rank * world_size - total) % total]])
    return padded[rank::world_size]


def epoch_indices(targets=None, *, class_counts=None, strategy="class_balanced", epoch=0, seed=0, rank=0,
                  world_size=1, num_samples=None, start=0, drop_last=False, **strategy_options):
    """This rank's indices for one epoch, from `targets` or `class_counts`, as a numpy int64 array (for DALI).

    `epoch` is 0-based. `num_samples` is the global epoch length (default N; e.g. ``max(n_c) * C`` for Decoupling's
    ClassAwareSampler); `start` resumes from a position inside this rank's shard. `persistent` and `replacement` as
    in the module docstring.

    >>> epoch_indices([0, 0, 0, 1], strategy="class_balanced", epoch=3, seed=7, num_samples=8).shape
    (8,)
    """
    groups = ClassGroups(targets, class_counts=class_counts)
    order = global_epoch_indices(groups, strategy, epoch=epoch, seed=seed, num_samples=num_samples,
                                 **strategy_options)
    return shard(order, rank, world_size, drop_last)[start:]


def _resolve_distributed(rank, world_size):
    """(rank, world_size): the given values, else the default process group's (1 process when there is none)."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    return rank, world_size


class LongTailSampler(torch.utils.data.Sampler):
    """`torch.utils.data.Sampler` over one of the `STRATEGIES`, sharded for DDP and resumable mid-epoch.

    Call `set_epoch(e)` with the 0-based epoch before each epoch (as `DistributedSampler`). `rank` / `world_size`
    default to the process group's, read when the sampler is used (iterated, measured, asked for indices), so a
    sampler built before `init_process_group` still shards (an explicit `rank` alone is checked against the group's
    size then too). `persistent` (default) carries each class's bucket and the class cycle over from one epoch to the
    next, as the official samplers do; `replacement` draws i.i.d. with replacement (module docstring). `num_samples`
    (the global epoch length, default N) must be a whole number >= 1.

    To checkpoint mid-epoch, save `state_dict(consumed=k)` with the number of this rank's samples the trainer has
    used: DataLoader workers and DALI read ahead, so the sampler cannot know it (without `consumed`, the count of
    indices `__iter__` has handed out is saved). `load_state_dict` makes the next iteration start there; the
    carried bucket state is rebuilt from (seed, epoch), so the state dict stays small. `indices(epoch)` gives the
    same order as a numpy array for DALI.

    >>> sampler = LongTailSampler([0, 0, 0, 0, 1], strategy="class_balanced", seed=0)
    >>> sampler.set_epoch(1)
    >>> len(list(sampler)) == len(sampler) == 5
    True
    """

    def __init__(self, targets=None, *, class_counts=None, strategy="class_balanced", seed=0, num_samples=None,
                 rank=None, world_size=None, drop_last=False, q=None, total_epochs=None, samples_per_class=4,
                 persistent=True, replacement=False):
        check_sampler_options(strategy, num_samples=num_samples, persistent=persistent, q=q, total_epochs=total_epochs,
                              samples_per_class=samples_per_class, replacement=replacement)
        for name, value, minimum in (("rank", rank, 0), ("world_size", world_size, 1)):
            if value is not None:
                check_count(name, value, minimum)
        if rank is not None and world_size is not None:
            _check_rank(rank, world_size)  # else when the sampler is used: it may be built before init_process_group
        self.groups = ClassGroups(targets, class_counts=class_counts)
        self.strategy = strategy
        self.seed = int(seed)
        self.num_samples = self.groups.num_samples if num_samples is None else int(num_samples)
        self._rank, self._world_size = rank, world_size
        self.drop_last = drop_last
        self.persistent = persistent
        self.options = {"q": q, "total_epochs": total_epochs, "samples_per_class": samples_per_class,
                        "replacement": replacement}
        self.epoch = 0
        self._carried = (0, None)  # (epoch, BucketState that epoch starts from), filled lazily
        self._resume_position = 0
        self._iteration = (0, 0, iter(()))  # (start, end, iterator) of the current pass, for state_dict

    @property
    def rank(self):
        return _resolve_distributed(self._rank, self._world_size)[0]

    @property
    def world_size(self):
        return _resolve_distributed(self._rank, self._world_size)[1]

    def _buckets_at(self, epoch):
        """A copy of the bucket state epoch `epoch` starts from (None: every epoch starts fresh)."""
        if not (self.persistent and _carries_state(self.strategy, self.options["replacement"])):
            return None
        carried_epoch, buckets = self._carried
        if buckets is None or carried_epoch > epoch:
            carried_epoch, buckets = 0, BucketState(self.groups, self.strategy)
        while carried_epoch < epoch:
            _draw_epoch(self.groups, self.strategy, carried_epoch, self.seed, self.num_samples, buckets, **self.options)
            carried_epoch += 1
        self._carried = (carried_epoch, buckets)
        return buckets.copy()

    def global_indices(self, epoch=None):
        """The global order of `epoch` (default: the current one), the same on every rank."""
        epoch = self.epoch if epoch is None else int(epoch)
        buckets = self._buckets_at(epoch)
        order = global_epoch_indices(self.groups, self.strategy, epoch=epoch, seed=self.seed,
                                     num_samples=self.num_samples, persistent=False,
                                     buckets=buckets, **self.options)
        if buckets is not None:
            self._carried = (epoch + 1, buckets)  # the next epoch starts where this one ended
        return order

    def indices(self, epoch=None, start=0):
        """This rank's indices for `epoch` (default: the current one) from position `start`, as numpy int64."""
        rank, world_size = _check_rank(self.rank, self.world_size)
        return shard(self.global_indices(epoch), rank, world_size, self.drop_last)[start:]

    def set_epoch(self, epoch):
        """Set the 0-based epoch the next iteration draws."""
        self.epoch = int(epoch)

    def __len__(self):
        world_size = self.world_size
        if self.drop_last:
            return self.num_samples // world_size
        return -(-self.num_samples // world_size)

    def iteration_indices(self):
        """What the next iteration yields, as numpy: the current epoch from a loaded resume position (used once)."""
        start, self._resume_position = self._resume_position, 0
        self._iteration = (start, start, iter(()))
        return self.indices(start=start)

    def __iter__(self):
        indices = self.iteration_indices()
        start = self._iteration[0]
        iterator = iter(indices.tolist())  # a plain list iterator: no Python code runs per sample
        self._iteration = (start, start + len(indices), iterator)
        return iterator

    def _position(self):
        """Samples of this epoch yielded so far: the list iterator knows how many it has left."""
        _, end, iterator = self._iteration
        return end - operator.length_hint(iterator)

    def state_dict(self, consumed=None):
        return {"epoch": self.epoch, "seed": self.seed, "position": self._position() if consumed is None else consumed,
                "persistent": self.persistent}

    def load_state_dict(self, state):
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        if state.get("persistent", self.persistent) != self.persistent:  # states saved before the key: no check
            raise ValueError(f"sampler state was saved with persistent={state['persistent']}, this sampler has "
                             f"persistent={self.persistent}: the epochs would differ")
        if not 0 <= state["position"] <= len(self):
            raise ValueError(f"sampler position {state['position']} is outside this rank's epoch of {len(self)}")
        self.epoch = state["epoch"]
        self._resume_position = state["position"]
        self._iteration = (state["position"], state["position"], iter(()))


def _check_rank(rank, world_size):
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size} (an unset "
                         "world_size is the process group's, 1 without one)")
    return rank, world_size
