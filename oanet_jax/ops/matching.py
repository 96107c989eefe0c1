"""Ground-truth to prediction matching with detectron2 ``Matcher`` semantics, static shapes.

Given a similarity (usually IoU) matrix ``[G, N]`` between padded ground truth and predictions
(anchors or proposals), every prediction gets the index of its best ground truth and a label:

1. ``matched_vals, matched_idx = max / argmax over valid G`` (first index on ties).
2. With ``thresholds = (t_1, ..., t_k)`` and ``labels = (l_0, ..., l_k)``, a prediction gets
   ``l_i`` when ``t_i <= matched_val < t_{i+1}`` (with ``t_0 = -inf``, ``t_{k+1} = +inf``); the
   RPN default ``(0.3, 0.7), (0, -1, 1)`` is negative below 0.3, ignored in [0.3, 0.7), positive
   from 0.7.
3. ``allow_low_quality_matches``: for each valid ground truth, every prediction whose similarity
   equals that ground truth's maximum (all ties) gets label 1. Its ``matched_idx`` stays the
   argmax of step 1, exactly as detectron2. Note the detectron2 quirk that this inherits: a valid
   ground truth that overlaps nothing (maximum 0) makes every prediction at similarity 0
   positive, so degenerate (zero-area) boxes must be marked invalid upstream.

Padded ground truth (``gt_valid`` False) never matches. With no valid ground truth, every
prediction gets ``labels[0]`` (background) and ``matched_idx`` 0, like detectron2's empty case
(crowd regions, if given, still mark predictions ignored).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

Array = jnp.ndarray


def match(
    similarity: Array,
    thresholds: Sequence[float] = (0.3, 0.7),
    labels: Sequence[int] = (0, -1, 1),
    allow_low_quality_matches: bool = False,
    gt_valid: Array | None = None,
    gt_ignore: Array | None = None,
    ignore_similarity: Array | None = None,
    ignore_threshold: float = 0.7,
    ignore_label: int = -1,
) -> tuple[Array, Array]:
    """Match predictions to ground truth (detectron2 ``Matcher``), see the module docstring.

    Crowd / ignore regions (optional, not part of detectron2, which drops crowd annotations):
    ground truth with ``gt_ignore`` True (and ``gt_valid`` True) is removed from matching and is
    never a match target; instead a prediction that did not end up positive gets
    ``ignore_label`` when its ``ignore_similarity`` (default: ``similarity``; pass e.g.
    ``ioa(anchors, boxes).T`` for intersection over the anchor's area) with any such region is
    ``>= ignore_threshold``. Positives found against real ground truth are kept.

    Args:
      similarity: [G, N] float similarity (e.g. IoU) of G ground truth vs. N predictions.
      thresholds: increasing thresholds (Python floats, static).
      labels: ``len(thresholds) + 1`` labels (Python ints, static), one per interval.
      allow_low_quality_matches: add detectron2's low-quality positives (static bool).
      gt_valid: [G] bool, False for padding; None means all valid.
      gt_ignore: [G] bool crowd / ignore regions; None means none.
      ignore_similarity: [G, N] float similarity used for the ignore test; None uses
        ``similarity``.
      ignore_threshold: threshold of the ignore test (static float).
      ignore_label: label given to predictions inside an ignore region (static int).

    Returns:
      matched_idx: [N] int32 index into G of the best valid, non-ignored ground truth
        (0 where there is none).
      labels: [N] int32 label per prediction.
    """
    thresholds = tuple(float(t) for t in thresholds)
    labels = tuple(int(v) for v in labels)
    if len(labels) != len(thresholds) + 1:
        raise ValueError(f"need len(labels) == len(thresholds) + 1: {thresholds}, {labels}")
    if any(lo > hi for lo, hi in zip(thresholds[:-1], thresholds[1:], strict=True)):
        raise ValueError(f"thresholds must be increasing: {thresholds}")

    sim = jnp.asarray(similarity, dtype=jnp.float32)
    num_gt, num_pred = sim.shape
    if gt_valid is None:
        gt_valid = jnp.ones((num_gt,), dtype=bool)
    gt_valid = jnp.asarray(gt_valid, dtype=bool)
    matchable = gt_valid
    if gt_ignore is not None:
        gt_ignore = jnp.asarray(gt_ignore, dtype=bool)
        matchable = gt_valid & ~gt_ignore

    if num_gt == 0:
        return (
            jnp.zeros((num_pred,), jnp.int32),
            jnp.full((num_pred,), labels[0], jnp.int32),
        )

    masked = jnp.where(matchable[:, None], sim, -jnp.inf)
    matched_vals = jnp.max(masked, axis=0)
    matched_idx = jnp.argmax(masked, axis=0).astype(jnp.int32)

    bounds = (-jnp.inf, *thresholds, jnp.inf)
    out = jnp.full((num_pred,), labels[0], jnp.int32)
    for label, lo, hi in zip(labels, bounds[:-1], bounds[1:], strict=True):
        out = jnp.where((matched_vals >= lo) & (matched_vals < hi), label, out)

    if allow_low_quality_matches:
        best_per_gt = jnp.max(masked, axis=1, keepdims=True)  # [G, 1]
        is_best = (masked == best_per_gt) & matchable[:, None]
        out = jnp.where(jnp.any(is_best, axis=0), 1, out)

    any_gt = jnp.any(matchable)
    matched_idx = jnp.where(any_gt, matched_idx, 0)
    out = jnp.where(any_gt, out, labels[0])

    if gt_ignore is not None:
        crowd = gt_valid & gt_ignore
        isim = sim if ignore_similarity is None else jnp.asarray(ignore_similarity, jnp.float32)
        in_crowd = jnp.any(crowd[:, None] & (isim >= ignore_threshold), axis=0)
        out = jnp.where(in_crowd & (out != 1), ignore_label, out)
    return matched_idx, out
