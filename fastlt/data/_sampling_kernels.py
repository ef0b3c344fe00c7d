"""numba kernels behind `fastlt.data.sampling`: O(N) grouping, O(C) alias tables, O(1) work per drawn sample.

The random stream is splitmix64 with an explicit 64-bit state, so an epoch depends only on its (seed, epoch), on the
bucket state passed in (`work` and `pointers`, updated in place so that it can carry over to the next epoch) and on
nothing global (numba's and numpy's global generators stay untouched). One 64-bit output serves a whole draw: its
high 32 bits pick the class (and, through the fraction of `hi * C`, the alias coin), its low 32 bits the position
inside the class. Bounded integers use the multiply-shift `(bits32 * bound) >> 32`, valid for bound < 2**32.
"""

import numpy as np
from numba import njit

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_LOW_32 = np.uint64(0xFFFFFFFF)
_SHIFT_32 = np.uint64(32)
KEEP_ALWAYS = 1 << 32  # alias threshold that is never reached by a 32-bit fraction


@njit(cache=True, inline="always")
def _splitmix(state):
    z = (state ^ (state >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


@njit(cache=True, inline="always")
def _below(bits32, bound):
    """An integer in [0, bound) from 32 random bits."""
    return np.int64((bits32 * np.uint64(bound)) >> _SHIFT_32)


@njit(cache=True, inline="always")
def _alias_class(bits, keep, alias):
    """A class from the alias table (keep, alias), drawn with the high 32 bits of `bits`: the class index from
    hi * C, the alias coin from the fraction of it."""
    scaled = (bits >> _SHIFT_32) * np.uint64(keep.shape[0])
    cls = np.int64(scaled >> _SHIFT_32)
    if (scaled & _LOW_32) >= keep[cls]:
        cls = alias[cls]
    return cls


@njit(cache=True, inline="always")
def _take_next(work, start, size, pointers, cls, bits32):
    """Next index of class `cls` from its cycling, lazily reshuffled bucket `work[start:start+size]`.

    One Fisher-Yates step per draw: the bucket's unread tail stays uniformly shuffled, so the stream is a random
    permutation of the class, then another, ... at O(1) per sample and with no up-front shuffle.
    """
    position = pointers[cls]
    if position == size:
        position = 0
    pick = start + position + _below(bits32, size - position)
    chosen = work[pick]
    work[pick] = work[start + position]
    work[start + position] = chosen
    pointers[cls] = position + 1
    return chosen


@njit(cache=True)
def group_by_class(targets, num_classes):
    """(order, offsets): `order[offsets[c]:offsets[c+1]]` are the sample ids of class c, ascending (counting sort)."""
    offsets = np.zeros(num_classes + 1, dtype=np.int64)
    for label in targets:
        offsets[label + 1] += 1
    for cls in range(num_classes):
        offsets[cls + 1] += offsets[cls]
    fill = offsets[:-1].copy()
    order = np.empty(targets.shape[0], dtype=np.int64)
    for sample in range(targets.shape[0]):
        label = targets[sample]
        order[fill[label]] = sample
        fill[label] += 1
    return order, offsets


@njit(cache=True)
def build_alias_table(probabilities):
    """Vose's alias table: column `c` is kept when a 32-bit fraction is below `keep[c]`, else `alias[c]` is used."""
    num = probabilities.shape[0]
    scaled = probabilities * (num / probabilities.sum())
    keep = np.full(num, KEEP_ALWAYS, dtype=np.uint64)
    alias = np.arange(num, dtype=np.int64)
    small = np.empty(num, dtype=np.int64)
    large = np.empty(num, dtype=np.int64)
    num_small = 0
    num_large = 0
    for cls in range(num):
        if scaled[cls] < 1.0:
            small[num_small] = cls
            num_small += 1
        else:
            large[num_large] = cls
            num_large += 1
    while num_small > 0 and num_large > 0:
        num_small -= 1
        light = small[num_small]
        heavy = large[num_large - 1]
        keep[light] = np.uint64(scaled[light] * 4294967296.0)
        alias[light] = heavy
        scaled[heavy] = (scaled[heavy] + scaled[light]) - 1.0
        if scaled[heavy] < 1.0:
            num_large -= 1
            small[num_small] = heavy
            num_small += 1
    return keep, alias


@njit(cache=True)
def draw_by_class_probability(work, offsets, keep, alias, pointers, num_samples, state):
    """Per sample: a class from the alias table, then the next index of that class's bucket (`pointers[c]` items of
    bucket c are already used in its current pass)."""
    out = np.empty(num_samples, dtype=np.int64)
    for slot in range(num_samples):
        state += _GOLDEN
        bits = _splitmix(state)
        cls = _alias_class(bits, keep, alias)
        start = offsets[cls]
        out[slot] = _take_next(work, start, offsets[cls + 1] - start, pointers, cls, bits & _LOW_32)
    return out


@njit(cache=True)
def draw_with_replacement(order, offsets, keep, alias, num_samples, state):
    """Per sample, independently: a class from the alias table, then a uniform instance of that class (i.i.d. draws
    with replacement; with p_c = n_c**q / sum n**q this is per-instance weight n_c**q / n_c)."""
    out = np.empty(num_samples, dtype=np.int64)
    for slot in range(num_samples):
        state += _GOLDEN
        bits = _splitmix(state)
        cls = _alias_class(bits, keep, alias)
        start = offsets[cls]
        out[slot] = order[start + _below(bits & _LOW_32, offsets[cls + 1] - start)]
    return out


@njit(cache=True)
def draw_class_aware(work, offsets, classes, pointers, class_pointer, samples_per_class, num_samples, state):
    """Decoupling's ClassAwareSampler: cycle a reshuffled class list (`classes`, `class_pointer[0]` of them used in
    the current pass), `samples_per_class` indices from each."""
    out = np.empty(num_samples, dtype=np.int64)
    slot = 0
    while slot < num_samples:
        state += _GOLDEN
        cls = _take_next(classes, 0, classes.shape[0], class_pointer, 0, _splitmix(state) & _LOW_32)
        start = offsets[cls]
        for _ in range(min(samples_per_class, num_samples - slot)):
            state += _GOLDEN
            out[slot] = _take_next(work, start, offsets[cls + 1] - start, pointers, cls, _splitmix(state) & _LOW_32)
            slot += 1
    return out
