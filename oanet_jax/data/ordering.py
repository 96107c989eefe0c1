"""The order of the examples: which record, flip and scale every stream position gets.

Everything here is a pure function of the data seed and the position, so a run is reproducible
and a resume continues exactly.

Raw-folder source, training (:class:`TrainPlan`): epoch ``e`` uses a permutation of the record
indices drawn with numpy from ``(seed, e)`` (:func:`epoch_permutation`); host ``h`` of ``P`` takes
slots ``h, h + P, ...`` of it (each host gets ``L = n // P`` examples per epoch, the rest of the
permutation is dropped); epochs repeat forever. Flip and scale of an example are drawn from a
numpy generator seeded with ``(seed, g)``, ``g = epoch * L * P + slot`` its global position
(:func:`augmentation`). The stream is a pure function of ``(seed, position)`` (``shuffle_buffer``
is not used: the permutation is global), so ``start_step = k`` starts at per-host position
``k * B`` and yields exactly batches ``k, k + 1, ...`` of a run from step 0. Eval
(:func:`eval_indices`): records in the reader's order, host ``h`` takes ``h::P``, every host
yields the same number of batches (the last ones padded with ``example_valid = False``).

TFDS source: host ``h`` reads a contiguous slice of the split (:func:`host_ranges`); the shuffle
is tf.data's (see :mod:`oanet_jax.data.pipeline`), flip and scale come from
:func:`augmentation` at global position ``q * P + h``, ``q`` the per-host position.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


def _seeded_rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


@functools.lru_cache(maxsize=8)
def epoch_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
    """The permutation of record indices of one training epoch (numpy, from (seed, epoch)).

    Args:
        seed: data seed.
        epoch: epoch number.
        num_records: n.

    Returns:
        int64 [n], read-only.
    """
    perm = _seeded_rng(seed, 0, epoch).permutation(num_records)
    perm.flags.writeable = False
    return perm


def augmentation(
    seed: int, global_position: int, num_sizes: int, random_flip: bool
) -> tuple[bool, int]:
    """Flip and scale choice of the example at ``global_position`` (stateless in the position).

    Args:
        seed: data seed.
        global_position: position of the example in the global (all-host) stream.
        num_sizes: number of ``min_size_train`` choices.
        random_flip: whether flipping is enabled.

    Returns:
        (flip: bool, size_index: int).
    """
    rng = _seeded_rng(seed, 1, global_position)
    flip = bool(rng.random() < 0.5)
    size_index = int(rng.integers(num_sizes))
    return (flip and random_flip), size_index


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """The training stream of one host: position -> (record index, flip, short side).

    Attributes:
        num_records: n.
        seed: data seed.
        process_index: h.
        process_count: P.
        sizes: ``min_size_train`` choices.
        random_flip: whether flipping is enabled.
    """

    num_records: int
    seed: int
    process_index: int
    process_count: int
    sizes: tuple[int, ...]
    random_flip: bool = True

    def __post_init__(self):
        if self.num_records < self.process_count:
            raise ValueError(
                f"{self.num_records} records cannot be split over {self.process_count} hosts"
            )
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")

    @property
    def per_host_epoch(self) -> int:
        """L = n // P examples per host and epoch."""
        return self.num_records // self.process_count

    def __call__(self, position: int) -> tuple[int, bool, int, int]:
        """Plans the example at per-host position ``position``.

        Returns:
            (record index, flip, short side, global position).
        """
        length = self.per_host_epoch
        epoch, slot = divmod(int(position), length)
        global_slot = slot * self.process_count + self.process_index
        perm = epoch_permutation(self.seed, epoch, self.num_records)
        global_position = epoch * length * self.process_count + global_slot
        flip, size_index = augmentation(
            self.seed, global_position, len(self.sizes), self.random_flip
        )
        return int(perm[global_slot]), flip, int(self.sizes[size_index]), global_position


def eval_indices(
    num_records: int, process_index: int, process_count: int, batch_size: int
) -> np.ndarray:
    """Record indices of one host in eval, padded with -1 to a whole number of batches.

    Host h takes ``h::P``; every host gets ``ceil(ceil(n / P) / B)`` batches (at least one).

    Args:
        num_records: n.
        process_index: h.
        process_count: P.
        batch_size: per-host batch B.

    Returns:
        int64 [num_batches * B].
    """
    per_host = -(-num_records // process_count)
    num_batches = max(1, -(-per_host // batch_size))
    own = np.arange(process_index, num_records, process_count, dtype=np.int64)
    out = np.full((num_batches * batch_size,), -1, np.int64)
    out[: len(own)] = own
    return out


def host_ranges(total: int, process_count: int, training: bool) -> list[tuple[int, int]]:
    """[start, end) example ranges of each host over a split (TFDS source).

    Training: ``n // P`` contiguous examples per host (the rest dropped, so every host takes
    the same number of steps); eval: near-even slices covering the split.

    Args:
        total: n, examples in the split.
        process_count: P.
        training: training or eval split of the examples.

    Returns:
        P pairs (start, end).
    """
    if training:
        length = total // process_count
        return [(h * length, (h + 1) * length) for h in range(process_count)]
    base, rem = divmod(total, process_count)
    ranges, start = [], 0
    for h in range(process_count):
        end = start + base + (1 if h < rem else 0)
        ranges.append((start, end))
        start = end
    return ranges
