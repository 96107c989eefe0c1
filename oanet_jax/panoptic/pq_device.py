"""Panoptic quality on the accelerator: jitted, static-shape per-image matching, exact on the host.

Same rules and numbers as panopticapi's ``pq_compute`` (see `oanet_jax.panoptic.pq` for the rules:
IoU > 0.5 with the void-corrected union, ground-truth areas from the JSON, FP ignored when more
than half of it lies in void plus the last-listed crowd segment of its category, PNG ids absent
from the JSON neither segments nor void). The device does the pixel work (one joint histogram per
image) and the matching with INTEGER arithmetic (``IoU > 0.5`` as ``2 |g n p| > union``); it
returns small integer arrays. The host divides intersection by union in float64 and sums, so the
IoU sums equal panopticapi to rounding (float32 on device could not).

Conventions (all arrays batched over B images; shapes are static: G, P, H, W from the arrays):

* Ground truth, made on the host once per image by `ground_truth_to_device`: an INDEX map
  ``int32 [H, W]`` where value ``k`` in ``1..G`` is the k-th row of the padded ground-truth table,
  ``0`` is void (also the padding outside the image) and ``G + 1`` (`UNLISTED`) marks pixels whose
  PNG id is not in segments_info (neither a segment nor void, as panopticapi); and the table
  ``category`` int32 [G] (contiguous ids), ``iscrowd`` bool [G], ``area`` int32 [G] (the JSON
  ``area``, else the pixel count), ``valid`` bool [G]. Rows are in panopticapi's dict order.
* Prediction: the merge's id map (`oanet_jax.panoptic.merge`: detection slot d -> id d + 1, stuff
  class s -> id D + 1 + s, so P = D + S) at the ORIGINAL image size, padded with void to [H, W]
  (`resize_to_original` makes it), with the merge's segment table ``category`` int32 [P]
  (contiguous) and ``valid`` bool [P]. A predicted segment exists when it is valid and has pixels
  in the map (segments that vanish in the resize are not segments, as
  `data.transforms.crop_and_resize_to_original` drops them). Pixels of a non-valid row do not
  occur in the merge's output; they would count only towards that row's area.
* Joint histogram: ``key = gt_index * (P + 1) + pred_id`` and one ``jax.ops.segment_sum`` with
  ``(G + 2) * (P + 1)`` static segments, per image.

Matching is per (gt, pred) pair as panopticapi: the IoU > 0.5 rule makes matches unique whenever
each JSON area is at least the segment's pixel count (always true of COCO). A ground-truth segment
with two matches (only possible with JSON areas smaller than the PNG) is reported in
``tp_pairs`` and the host accumulator refuses it (`pq.evaluate_id_maps` handles that case).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oanet_jax.ops.resize import nearest_source_index
from oanet_jax.panoptic.pq import (
    VOID,
    PanopticFormatError,
    PQStat,
    _category_dict,
    _index_of,
    ground_truth_table,
)

__all__ = [
    "GT_KEYS",
    "DevicePQAccumulator",
    "ground_truth_to_device",
    "pq_stats",
    "resize_to_original",
]


# ----------------------------------------------------------------------------- host: ground truth

GT_KEYS = ("index_map", "category", "iscrowd", "area", "valid")
"""Keys of `ground_truth_to_device`'s dict, in the order of `pq_stats`'s first five arguments."""


def ground_truth_to_device(
    id_map: np.ndarray,
    segments_info: Sequence[Mapping[str, Any]],
    category_to_contiguous: Mapping[int, int],
    max_segments: int,
    canvas_size: tuple[int, int] | None = None,
    image: str = "image",
) -> dict[str, np.ndarray]:
    """Converts one decoded COCO panoptic ground truth into the device's padded index form.

    Args:
      id_map: [H, W] non-negative integer segment ids of the PNG (0 = void), e.g.
        `panoptic.io.read_panoptic_png`.
      segments_info: the image's ground-truth segments (``id``, ``category_id``, optional
        ``iscrowd`` and ``area``); duplicate ids: the last entry wins (panopticapi's dict).
      category_to_contiguous: {dataset category id: contiguous id}.
      max_segments: G, the padded table length (>= the number of distinct segment ids).
      canvas_size: (Hmax, Wmax) >= (H, W) to pad the map to with void; default (H, W).
      image: name for error messages.

    Returns:
      {'index_map': int32 [Hmax, Wmax] (0 void, k = row k - 1, G + 1 unlisted PNG id),
      'category': int32 [G], 'iscrowd': bool [G], 'area': int32 [G], 'valid': bool [G]}
      (padding rows: category 0, area 0, valid False).

    Raises:
      PanopticFormatError: malformed segments_info, a segment with id 0, an unknown category,
        more than `max_segments` segments, or a map larger than the canvas.
    """
    id_map = np.asarray(id_map)
    if id_map.ndim != 2:
        raise ValueError(f"{image}: id_map must be [H, W], got shape {id_map.shape}")
    ids, cats, crowd, json_areas = ground_truth_table(segments_info, image)
    g = int(max_segments)
    if ids.size > g:
        raise PanopticFormatError(
            f"{image}: {ids.size} ground-truth segments, more than max_segments={g}"
        )
    if np.any(ids == VOID):
        raise PanopticFormatError(f"{image}: ground-truth segment with id 0, reserved for void")
    unknown = [int(c) for c in cats if int(c) not in category_to_contiguous]
    if unknown:
        raise PanopticFormatError(f"{image}: unknown ground-truth category ids {unknown}")
    h, w = id_map.shape
    hmax, wmax = (h, w) if canvas_size is None else (int(v) for v in canvas_size)
    if h > hmax or w > wmax:
        raise PanopticFormatError(f"{image}: id map {h}x{w} does not fit the canvas {hmax}x{wmax}")

    flat = id_map.ravel().astype(np.int64)
    row = _index_of(flat, ids)
    index = np.where(row >= 0, row + 1, np.where(flat == VOID, 0, g + 1)).astype(np.int32)
    pixels = np.bincount(index, minlength=g + 2)[1 : ids.size + 1]
    area = np.array(
        [int(pixels[j]) if a is None else int(a) for j, a in enumerate(json_areas)], np.int64
    )

    index_map = np.zeros((hmax, wmax), np.int32)
    index_map[:h, :w] = index.reshape(h, w)
    table = {
        "category": np.zeros(g, np.int32),
        "iscrowd": np.zeros(g, bool),
        "area": np.zeros(g, np.int32),
        "valid": np.zeros(g, bool),
    }
    n = ids.size
    table["category"][:n] = [category_to_contiguous[int(c)] for c in cats]
    table["iscrowd"][:n] = crowd
    table["area"][:n] = area
    table["valid"][:n] = True
    return {"index_map": index_map, **table}


# ----------------------------------------------------------------------------- device


def _resize_one(id_map: jax.Array, image_shape: jax.Array, orig_shape: jax.Array, canvas_size):
    """One image of `resize_to_original`: [Hp, Wp] ids, (h, w), (H, W) -> int32 [Hmax, Wmax]."""
    hmax, wmax = canvas_size
    h, w = image_shape[0], image_shape[1]
    big_h, big_w = orig_shape[0], orig_shape[1]
    dst_r = jnp.arange(hmax, dtype=jnp.int32)
    dst_c = jnp.arange(wmax, dtype=jnp.int32)
    rows = jnp.clip(nearest_source_index(dst_r, h, big_h), 0, id_map.shape[0] - 1)
    cols = jnp.clip(nearest_source_index(dst_c, w, big_w), 0, id_map.shape[1] - 1)
    out = id_map[rows[:, None], cols[None, :]]
    inside = (dst_r < big_h)[:, None] & (dst_c < big_w)[None, :]
    return jnp.where(inside, out, VOID).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("canvas_size",))
def resize_to_original(
    id_map: jax.Array,
    image_shape: jax.Array,
    orig_shape: jax.Array,
    *,
    canvas_size: tuple[int, int],
) -> jax.Array:
    """Device twin of `data.transforms.crop_and_resize_to_original` for the id map (exactly equal).

    Crops the top-left (h, w) window of the merge's padded id map and resizes it with nearest
    neighbour (pixel-centre rule, `ops.resize.nearest_source_index`, traced sizes) to the original
    (H, W), written into the top-left of a fixed canvas; the rest of the canvas is void.

    Args:
      id_map: [B, Hp, Wp] integer segment ids (0 = void).
      image_shape: [B, 2] int (h, w) of the resized image inside the padding (0 < h <= Hp).
      orig_shape: [B, 2] int (H, W) of the original image (0 < H <= Hmax, 0 < W <= Wmax).
      canvas_size: static (Hmax, Wmax).

    Returns:
      int32 [B, Hmax, Wmax] id maps.
    """
    fn = functools.partial(_resize_one, canvas_size=tuple(int(v) for v in canvas_size))
    return jax.vmap(fn)(
        jnp.asarray(id_map), jnp.asarray(image_shape, jnp.int32), jnp.asarray(orig_shape, jnp.int32)
    )


def _pq_one(
    gt_index,
    gt_category,
    gt_iscrowd,
    gt_area,
    gt_valid,
    pred_ids,
    pred_category,
    pred_valid,
    num_classes,
):
    """One image of `pq_stats` (same arguments without the batch axis; G, P >= 1)."""
    g = gt_category.shape[0]
    p = pred_category.shape[0]
    key = gt_index.reshape(-1) * (p + 1) + pred_ids.reshape(-1)
    counts = jax.ops.segment_sum(
        jnp.ones(key.shape, jnp.int32), key, num_segments=(g + 2) * (p + 1)
    ).reshape(g + 2, p + 1)
    pred_area = counts[:, 1:].sum(axis=0)  # [P], every pixel of the prediction
    void_inter = counts[0, 1:]  # [P]
    inter = counts[1 : g + 1, 1:]  # [G, P]

    pred_present = pred_valid & (pred_area > 0)
    same_cat = gt_category[:, None] == pred_category[None, :]
    union = pred_area[None, :] + gt_area[:, None] - inter - void_inter[None, :]
    candidate = (gt_valid & ~gt_iscrowd)[:, None] & pred_present[None, :] & same_cat
    tp = candidate & (inter > 0) & (2 * inter > union)  # IoU > 0.5, exactly
    tp_pairs = tp.sum(axis=1, dtype=jnp.int32)  # [G]
    first = jnp.argmax(tp, axis=1)
    matched = tp_pairs > 0
    tp_inter = jnp.where(matched, jnp.take_along_axis(inter, first[:, None], 1)[:, 0], 0)
    tp_union = jnp.where(matched, jnp.take_along_axis(union, first[:, None], 1)[:, 0], 0)
    fn = gt_valid & ~gt_iscrowd & ~matched

    # FP: unmatched, not mostly in void + the last-listed crowd segment of its category.
    rows = jnp.arange(g, dtype=jnp.int32)[:, None]
    crowd_row = jnp.max(
        jnp.where((gt_valid & gt_iscrowd)[:, None] & same_cat, rows, -1), axis=0, initial=-1
    )  # [P]
    crowd_inter = jnp.where(
        crowd_row >= 0,
        jnp.take_along_axis(inter, jnp.maximum(crowd_row, 0)[None, :], 0)[0],
        0,
    )
    ignored = 2 * (void_inter + crowd_inter) > pred_area
    fp = pred_present & ~tp.any(axis=0) & ~ignored

    def per_class(values, classes):
        return jax.ops.segment_sum(values.astype(jnp.int32), classes, num_segments=num_classes)

    return {
        "tp": per_class(tp_pairs, gt_category),
        "fp": per_class(fp, pred_category),
        "fn": per_class(fn, gt_category),
        "tp_category": jnp.where(matched, gt_category, -1),
        "tp_intersection": tp_inter,
        "tp_union": tp_union,
        "tp_pairs": tp_pairs,
    }


@functools.partial(jax.jit, static_argnames=("num_classes",))
def pq_stats(
    gt_index_map: jax.Array,
    gt_category: jax.Array,
    gt_iscrowd: jax.Array,
    gt_area: jax.Array,
    gt_valid: jax.Array,
    pred_id_map: jax.Array,
    pred_category: jax.Array,
    pred_valid: jax.Array,
    *,
    num_classes: int,
) -> dict[str, jax.Array]:
    """Per-image PQ matching on device (see the module docstring for the conventions).

    Jitted; a new batch of the same shapes (B, H, W, G >= 1, P >= 1) and C never retraces. Cost
    per image: one scatter-add over H * W pixels into (G + 2) * (P + 1) int32 bins, then
    O(G * P) work. Maps must hold values in range (gt 0..G + 1, pred 0..P).

    Args:
      gt_index_map: [B, H, W] int32 ground-truth index map (0 void, 1..G rows, G + 1 unlisted).
      gt_category: [B, G] int32 contiguous category of each ground-truth row.
      gt_iscrowd: [B, G] bool.
      gt_area: [B, G] int32 area of each row (JSON area, else pixel count).
      gt_valid: [B, G] bool, False for padding rows.
      pred_id_map: [B, H, W] int32 predicted ids in 0..P (0 void), at the ground truth's size.
      pred_category: [B, P] int32 contiguous category of predicted segment id ``j + 1``.
      pred_valid: [B, P] bool.
      num_classes: static C, the number of contiguous categories.

    Returns:
      dict of int32 arrays: 'tp', 'fp', 'fn' [B, C] per-class counts; per ground-truth row
      [B, G]: 'tp_category' (its category when matched, else -1), 'tp_intersection' and
      'tp_union' (integer IoU numerator and denominator of its match, 0 when unmatched),
      'tp_pairs' (number of matches, 0 or 1 unless JSON areas are below pixel counts).
      Feed them to `DevicePQAccumulator.add`.
    """
    fn = functools.partial(_pq_one, num_classes=int(num_classes))
    return jax.vmap(fn)(
        jnp.asarray(gt_index_map, jnp.int32),
        jnp.asarray(gt_category, jnp.int32),
        jnp.asarray(gt_iscrowd, bool),
        jnp.asarray(gt_area, jnp.int32),
        jnp.asarray(gt_valid, bool),
        jnp.asarray(pred_id_map, jnp.int32),
        jnp.asarray(pred_category, jnp.int32),
        jnp.asarray(pred_valid, bool),
    )


# ----------------------------------------------------------------------------- host: accumulator


class DevicePQAccumulator:
    """Sums `pq_stats` outputs over batches on the host (int64 counts, float64 IoU sums).

    Args:
      contiguous_to_dataset: int [C] dataset category id of each contiguous id (e.g.
        ``CategoryTable.dataset_ids``).
    """

    def __init__(self, contiguous_to_dataset: Sequence[int] | np.ndarray) -> None:
        self.dataset_ids = np.asarray(contiguous_to_dataset, np.int64)
        c = self.dataset_ids.size
        self.tp = np.zeros(c, np.int64)
        self.fp = np.zeros(c, np.int64)
        self.fn = np.zeros(c, np.int64)
        self.iou = np.zeros(c, np.float64)

    def add(self, stats: Mapping[str, Any], example_valid: np.ndarray | None = None) -> None:
        """Adds one batch of `pq_stats` output.

        Args:
          stats: the dict returned by `pq_stats` (device or numpy arrays), batch B.
          example_valid: bool [B]: count only these images (padding examples of a last batch
            are False); default: all.

        Raises:
          ValueError: a ground-truth segment matched twice (JSON area below its pixel count).
        """
        s = {k: np.asarray(v) for k, v in jax.device_get(dict(stats)).items()}
        if example_valid is not None:
            keep = np.asarray(example_valid, bool)
            s = {k: v[keep] for k, v in s.items()}
        if np.any(s["tp_pairs"] > 1):
            raise ValueError(
                "a ground-truth segment has two matches (its JSON area is below its pixel count); "
                "the device path sums one IoU per segment: use pq.evaluate_id_maps"
            )
        self.tp += s["tp"].sum(axis=0)
        self.fp += s["fp"].sum(axis=0)
        self.fn += s["fn"].sum(axis=0)
        matched = s["tp_category"] >= 0
        ious = s["tp_intersection"][matched].astype(np.float64) / s["tp_union"][matched]
        self.iou += np.bincount(s["tp_category"][matched], weights=ious, minlength=self.iou.size)

    def to_pq_stat(self) -> PQStat:
        """The sums as a `pq.PQStat` keyed by dataset category ids."""
        stat = PQStat()
        for j in np.flatnonzero(self.tp + self.fp + self.fn):
            entry = stat[int(self.dataset_ids[j])]
            entry.tp, entry.fp, entry.fn = int(self.tp[j]), int(self.fp[j]), int(self.fn[j])
            entry.iou = float(self.iou[j])
        return stat

    def summarize(
        self, categories: Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        """The `pq.pq_compute` result dict (`PQStat.summarize`) over dataset `categories`."""
        return self.to_pq_stat().summarize(_category_dict(categories))
