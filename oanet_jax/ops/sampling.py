"""Balanced positive/negative sampling with a fixed output size (detectron2 ``subsample_labels``).

Semantics, for labels with ``-1`` = ignore, ``bg_label`` (0) = negative, anything else = positive:

* ``num_pos = min(#positives, int(num_samples * positive_fraction))``
* ``num_neg = min(#negatives, num_samples - num_pos)``
* ``num_pos`` positives and ``num_neg`` negatives are drawn uniformly without replacement.

Under ``jit`` the counts are data dependent but the output is not: there are always
``num_samples`` slots, positives first, then negatives, then padding slots marked invalid. The
random subset is chosen by giving every element an independent random 31-bit priority and taking
the ``k`` largest among the eligible ones with ``lax.top_k``, which is a uniformly random
k-subset (ties, of probability ~2^-31 per pair, go to the lower index). The result is a pure
function of ``key``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jnp.ndarray


def _top_indices(priority: Array, eligible: Array, k: int) -> Array:
    """Indices of the k largest priorities among eligible elements: [k] int32."""
    score = jnp.where(eligible, priority, -1)
    _, idx = jax.lax.top_k(score, k)
    return idx.astype(jnp.int32)


def sample_balanced(
    labels: Array,
    num_samples: int,
    positive_fraction: float,
    key: Array,
    valid: Array | None = None,
    bg_label: int = 0,
) -> tuple[Array, Array, Array]:
    """Draw a fixed-size balanced sample of positives and negatives.

    Args:
      labels: [N] int labels: -1 ignore, ``bg_label`` negative, any other value positive (1 for
        RPN anchors; class ids for RoI heads if ``bg_label`` is the background class).
      num_samples: total number of slots S (static Python int).
      positive_fraction: target fraction of positives (static Python float).
      key: a ``jax.random`` key.
      valid: [N] bool, False for padding (never sampled); None means all valid.
      bg_label: the negative label (static Python int).

    Returns:
      indices: [S] int32 indices into N: ``num_pos`` positives, then ``num_neg`` negatives, then
        padding slots (index 0).
      sampled_labels: [S] int32 ``labels[indices]``, -1 in padding slots.
      valid: [S] bool, True for the ``num_pos + num_neg`` filled slots.
    """
    labels = jnp.asarray(labels)
    (n,) = labels.shape
    num_samples = int(num_samples)
    max_pos = int(num_samples * positive_fraction)
    if valid is None:
        valid = jnp.ones((n,), dtype=bool)
    valid = jnp.asarray(valid, dtype=bool)
    positive = valid & (labels != -1) & (labels != bg_label)
    negative = valid & (labels == bg_label)

    num_pos = jnp.minimum(jnp.sum(positive, dtype=jnp.int32), max_pos)
    num_neg = jnp.minimum(jnp.sum(negative, dtype=jnp.int32), num_samples - num_pos)

    # Uniform random priorities in [0, 2^31); ineligible elements get -1 and lose every tie.
    bits = jax.random.bits(key, (n,), dtype=jnp.uint32)
    priority = jax.lax.shift_right_logical(bits, jnp.uint32(1)).astype(jnp.int32)

    slot = jnp.arange(num_samples, dtype=jnp.int32)
    k_pos = min(max_pos, n)
    k_neg = min(num_samples, n)
    pos_idx = _top_indices(priority, positive, k_pos) if k_pos > 0 else None
    neg_idx = _top_indices(priority, negative, k_neg) if k_neg > 0 else None

    indices = jnp.zeros((num_samples,), jnp.int32)
    if neg_idx is not None:
        from_neg = jnp.take(neg_idx, jnp.clip(slot - num_pos, 0, k_neg - 1))
        indices = jnp.where(slot >= num_pos, from_neg, indices)
    if pos_idx is not None:
        from_pos = jnp.take(pos_idx, jnp.clip(slot, 0, k_pos - 1))
        indices = jnp.where(slot < num_pos, from_pos, indices)
    slot_valid = slot < num_pos + num_neg
    indices = jnp.where(slot_valid, indices, 0)
    sampled_labels = jnp.where(slot_valid, jnp.take(labels, indices).astype(jnp.int32), -1)
    return indices, sampled_labels, slot_valid


def sample_balanced_mask(
    labels: Array,
    num_samples: int,
    positive_fraction: float,
    key: Array,
    valid: Array | None = None,
    bg_label: int = 0,
) -> tuple[Array, Array]:
    """The sample of :func:`sample_balanced` (same key, same choice) as masks over N.

    Convenient for dense losses (RPN): ``loss = sum(where(pos_mask | neg_mask, l, 0)) / S``.

    Args:
      labels, num_samples, positive_fraction, key, valid, bg_label: as in
        :func:`sample_balanced`.

    Returns:
      pos_mask: [N] bool, the sampled positives.
      neg_mask: [N] bool, the sampled negatives.
    """
    labels = jnp.asarray(labels)
    (n,) = labels.shape
    indices, sampled_labels, slot_valid = sample_balanced(
        labels, num_samples, positive_fraction, key, valid, bg_label
    )
    is_pos = slot_valid & (sampled_labels != bg_label)
    is_neg = slot_valid & (sampled_labels == bg_label)
    empty = jnp.zeros((n,), dtype=bool)
    pos_mask = empty.at[jnp.where(is_pos, indices, n)].set(True, mode="drop")
    neg_mask = empty.at[jnp.where(is_neg, indices, n)].set(True, mode="drop")
    return pos_mask, neg_mask
