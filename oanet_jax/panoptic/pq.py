"""Panoptic quality (PQ, SQ, RQ) with the exact semantics of panopticapi's `pq_compute`.

PQ (Kirillov et al., "Panoptic Segmentation", CVPR 2019) per category c:
``PQ_c = sum_{TP} IoU / (|TP| + |FP| / 2 + |FN| / 2)``, ``SQ_c = sum_{TP} IoU / |TP|`` (0 without
TP), ``RQ_c = |TP| / (|TP| + |FP| / 2 + |FN| / 2)``; All/Things/Stuff average over the categories
with at least one TP, FP or FN. Per image, with panopticapi's conventions:

* Void: ground-truth pixels with id 0 (VOID). A predicted segment and a ground-truth segment of the
  same category, the latter not crowd, match (one TP) when
  ``IoU = |g n p| / (|p| + |g| - |g n p| - |p n void|) > 0.5``, where ``|p|`` is the predicted
  segment's pixel count in the PNG and ``|g|`` is the ground-truth segment's ``area`` from the
  JSON (its pixel count when the JSON has no area). IoU > 0.5 makes matches unique.
* FN: unmatched, non-crowd ground-truth segments.
* FP: unmatched predicted segments, except those with more than half of their pixels in void plus
  the crowd segment of their category (when the image has several crowd segments of one category,
  panopticapi uses the last one listed; so does this module).
* Ground-truth ids in the PNG that are not in the JSON are neither segments nor void (ignored, as
  panopticapi does), and JSON segments absent from the PNG still count as FN.

The joint histogram of (ground-truth id, predicted id) is computed without Python loops over
pixels: pixels are grouped into runs where neither map changes along the flattened image, and the
run lengths are summed per (gt id, pred id) key (a sort of the runs and one `np.add.reduceat`).
Matching is vectorised over the pairs. Images are processed in a thread pool (PNG decoding and
numpy release the GIL), never with fork.

Differences from panopticapi (by design): malformed predictions raise `PanopticFormatError` (a
ValueError) naming the image and segments (panopticapi raises KeyError for some and silently
accepts others: duplicate segment ids, a segment with id 0, two predictions for one image); an
average over zero categories is 0.0 with ``n = 0`` (panopticapi raises ZeroDivisionError);
nothing is printed unless ``verbose=True``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from oanet_jax.panoptic.io import PanopticFormatError, read_id_words

__all__ = [
    "VOID",
    "ImageStats",
    "PQStat",
    "PQStatCat",
    "PanopticFormatError",
    "evaluate_id_maps",
    "ground_truth_table",
    "match_image",
    "pair_counts",
    "segment_ids",
    "pq_compute",
    "print_results",
]

VOID = 0
_ID_MASK_24 = np.uint32(0xFFFFFF)
_MAX_ID = (1 << 32) - 1  # in-memory id maps: ids must fit in 32 bits (keys are gt << 32 | pred)


# ----------------------------------------------------------------------------- accumulators


@dataclasses.dataclass
class PQStatCat:
    """Per-category sums: IoU over true positives and the TP / FP / FN counts."""

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, other: PQStatCat) -> PQStatCat:
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


@dataclasses.dataclass(frozen=True)
class ImageStats:
    """Matching outcome of one image (dataset category ids).

    Attributes:
      tp_categories: int64 [T] category of each true positive (pairs ordered by (gt id, pred id)).
      tp_ious: float64 [T] IoU of each true positive.
      fn_categories: int64 [F] category of each false negative.
      fp_categories: int64 [P] category of each false positive.
    """

    tp_categories: np.ndarray
    tp_ious: np.ndarray
    fn_categories: np.ndarray
    fp_categories: np.ndarray


class PQStat:
    """PQ accumulator over images, with panopticapi's `PQStat` interface.

    ``stat[category_id]`` is a `PQStatCat`; ``stat += other`` merges; ``pq_average`` averages as
    panopticapi does; `add` folds in one image's `ImageStats`; `summarize` gives the result dict
    of `pq_compute`.
    """

    def __init__(self) -> None:
        self.pq_per_cat: collections.defaultdict[int, PQStatCat] = collections.defaultdict(
            PQStatCat
        )

    def __getitem__(self, category_id: int) -> PQStatCat:
        return self.pq_per_cat[category_id]

    def __iadd__(self, other: PQStat) -> PQStat:
        for label, cat in other.pq_per_cat.items():
            self.pq_per_cat[label] += cat
        return self

    def add(self, image: ImageStats) -> None:
        """Adds one image's matches (IoUs summed in pair order, as panopticapi)."""
        for cat, iou in zip(image.tp_categories.tolist(), image.tp_ious.tolist(), strict=True):
            entry = self.pq_per_cat[cat]
            entry.tp += 1
            entry.iou += iou
        for cat in image.fn_categories.tolist():
            self.pq_per_cat[cat].fn += 1
        for cat in image.fp_categories.tolist():
            self.pq_per_cat[cat].fp += 1

    def pq_average(
        self, categories: Mapping[int, Mapping[str, Any]], isthing: bool | None
    ) -> tuple[dict[str, float | int], dict[int, dict[str, float]]]:
        """Average PQ / SQ / RQ over `categories` (things only, stuff only, or all for None).

        Args:
          categories: {category id: category dict with 'isthing'}.
          isthing: True: things, False: stuff, None: all.

        Returns:
          ({'pq', 'sq', 'rq', 'n'}, {category id: {'pq', 'sq', 'rq', 'tp', 'fp', 'fn'}}): the
          average over the `n` categories with TP + FP + FN > 0 (0.0 with n = 0 when there is
          none), and per category values as panopticapi's (all 0.0 for categories without TP, FP
          or FN, which the average leaves out) plus the category's TP / FP / FN counts, by which
          a report tells these absent categories from a PQ of 0.
        """
        pq = sq = rq = 0.0
        n = 0
        per_class: dict[int, dict[str, float]] = {}
        for label, info in categories.items():
            if isthing is not None and isthing != (info["isthing"] == 1):
                continue
            stat = self.pq_per_cat.get(label, PQStatCat())
            counts = {"tp": stat.tp, "fp": stat.fp, "fn": stat.fn}
            if stat.tp + stat.fp + stat.fn == 0:
                per_class[label] = {"pq": 0.0, "sq": 0.0, "rq": 0.0, **counts}
                continue
            n += 1
            denom = stat.tp + 0.5 * stat.fp + 0.5 * stat.fn
            pq_c = stat.iou / denom
            sq_c = stat.iou / stat.tp if stat.tp != 0 else 0.0
            rq_c = stat.tp / denom
            per_class[label] = {"pq": pq_c, "sq": sq_c, "rq": rq_c, **counts}
            pq += pq_c
            sq += sq_c
            rq += rq_c
        if n == 0:
            return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}, per_class
        return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class

    def summarize(
        self, categories: Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        """The `pq_compute` result dict: 'All', 'per_class', 'Things', 'Stuff'."""
        cats = _category_dict(categories)
        results: dict[str, Any] = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            results[name], per_class = self.pq_average(cats, isthing=isthing)
            if name == "All":
                results["per_class"] = per_class
        return results


def _category_dict(
    categories: Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
) -> dict[int, Mapping[str, Any]]:
    """{id: category dict} from a list of category dicts (later duplicates win) or a mapping."""
    if isinstance(categories, Mapping):
        return {int(k): v for k, v in categories.items()}
    return {int(c["id"]): c for c in categories}


# ----------------------------------------------------------------------------- per image


_scratch = threading.local()  # per-thread reusable flag buffer of `_run_starts`


def _run_starts(g: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Positions i (ascending, int64) where ``g[i + 1] != g[i]`` or ``p[i + 1] != p[i]``.

    The flags live in a per-thread scratch buffer that is reused: fresh arrays of this size
    come from the OS each time, and their page faults cost more than the comparisons. The change
    flags are scanned 8 at a time (bool bytes viewed as uint64 words), then only the
    words with a change are expanded (`take` of whole 8-byte rows, much faster than fancy
    indexing): id maps change rarely, so this reads the flags about 8x faster than
    `np.flatnonzero` on the whole mask.

    Args:
      g, p: 1-D arrays of the same length n >= 1.

    Returns:
      int64 [R - 1] positions, R the number of runs.
    """
    m = g.size - 1
    size = -(-m // 8) * 8
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < 2 * size:
        buf = _scratch.buf = np.zeros(2 * size, bool)
    flags, other = buf[:size], buf[size : size + m]
    np.not_equal(g[1:], g[:-1], out=flags[:m])
    flags[m:] = False
    np.not_equal(p[1:], p[:-1], out=other)
    np.logical_or(flags[:m], other, out=flags[:m])
    words = np.flatnonzero(flags.view(np.uint64) != 0)
    hits = np.flatnonzero(flags.reshape(-1, 8).take(words, axis=0))
    return words[hits >> 3] * 8 + (hits & 7)


_SMALL_IDS = 256  # ids below this are their own index in the dense joint histogram
_DENSE_SIDE = 1 << 16  # largest id range per side for the dense joint histogram
_DENSE_CELLS = 1 << 18  # largest dense joint histogram (2 MB of float64)


def _compact(
    values: np.ndarray, candidates: Sequence[int] | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Small indices for `values`, if cheap: (index [R], sorted value table [K]) or None.

    Indices are the values themselves when they lie in [0, _SMALL_IDS); else positions in the
    sorted unique `candidates` (a hint; ignored when empty or out of [0, 2^32)) when every value
    is one of them; else the values themselves when they lie in [0, _DENSE_SIDE); otherwise None.
    """
    lo, hi = int(values.min()), int(values.max())
    in_range = lo >= 0 and hi < _DENSE_SIDE
    if in_range and hi < _SMALL_IDS:
        return values, np.arange(hi + 1, dtype=np.int64)
    if candidates is not None:
        table = np.unique(np.asarray(candidates, np.int64))
        if table.size and table[0] >= 0 and table[-1] <= _MAX_ID:
            idx = np.minimum(np.searchsorted(table, values), table.size - 1)
            if np.array_equal(table[idx], values):
                return idx, table
    if in_range:
        return values, np.arange(hi + 1, dtype=np.int64)
    return None


def segment_ids(segments_info: Sequence[Mapping[str, Any]]) -> list[int]:
    """The ids an id map with these segments should hold (theirs and void): `pair_counts` hint."""
    return [VOID, *(int(s["id"]) for s in segments_info)]


def pair_counts(
    gt_ids: np.ndarray,
    pred_ids: np.ndarray,
    id_mask: int | None = None,
    gt_candidates: Sequence[int] | np.ndarray | None = None,
    pred_candidates: Sequence[int] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joint histogram of two segment id maps, without Python loops over pixels.

    Pixels are grouped into maximal runs along the flattened maps where neither id changes; the
    run lengths are then summed per (gt id, pred id) key: by a dense `np.bincount` over compact
    indices when both sides have few possible ids (small ids, or every id among the given
    candidates), else by a sort of the (usually few thousand) run keys. Both give the same result.

    Args:
      gt_ids: [...] non-negative integer ids (any integer dtype).
      pred_ids: same shape as `gt_ids`.
      id_mask: if given, ids are ``value & id_mask`` (for raw RGBX words: 0xFFFFFF).
      gt_candidates: optional ids the ground-truth map probably holds (e.g. its segments' ids and
        0); only a speed hint: ids outside it are still counted exactly.
      pred_candidates: the same for the prediction.

    Returns:
      (gt, pred, count): int64 [M] arrays over the M distinct (gt id, pred id) pairs present,
      sorted by (gt id, pred id); count > 0 is the number of pixels of the pair.

    Raises:
      ValueError: shapes differ, or an id is negative or >= 2^32.
    """
    g = np.ravel(gt_ids)
    p = np.ravel(pred_ids)
    if np.shape(gt_ids) != np.shape(pred_ids):
        raise ValueError(f"id maps differ in shape: {np.shape(gt_ids)} vs {np.shape(pred_ids)}")
    n = g.size
    if n == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    changes = _run_starts(g, p)
    bounds = np.empty(changes.size + 2, np.int64)  # run r covers [bounds[r], bounds[r + 1])
    bounds[0] = 0
    np.add(changes, 1, out=bounds[1:-1])
    bounds[-1] = n
    lengths = bounds[1:] - bounds[:-1]
    gs = g[bounds[:-1]].astype(np.int64)
    ps = p[bounds[:-1]].astype(np.int64)
    if id_mask is not None:
        gs &= id_mask
        ps &= id_mask

    gc = _compact(gs, gt_candidates)
    pc = _compact(ps, pred_candidates) if gc is not None else None
    if gc is not None and pc is not None and gc[1].size * pc[1].size <= _DENSE_CELLS:
        (gi, gvals), (pi, pvals) = gc, pc
        width = pvals.size
        dense = np.bincount(gi * width + pi, weights=lengths, minlength=gvals.size * width)
        cells = np.flatnonzero(dense)
        return gvals[cells // width], pvals[cells % width], dense[cells].astype(np.int64)

    if id_mask is None:
        for name, v in (("ground-truth", gs), ("predicted", ps)):
            if v.min() < 0 or v.max() > _MAX_ID:
                raise ValueError(f"{name} ids must be in [0, 2^32), got [{v.min()}, {v.max()}]")
    keys = (gs << 32) | ps
    order = keys.argsort()
    keys = keys[order]
    first = np.empty(keys.size, bool)  # first run of each distinct key in sorted order
    first[0] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    heads = np.flatnonzero(first)
    counts = np.add.reduceat(lengths[order], heads)
    uniq = keys[heads]
    return uniq >> 32, uniq & _MAX_ID, counts


def ground_truth_table(
    gt_segments: Iterable[Mapping[str, Any]], image: str = "image"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Any]]:
    """Ground-truth segments as panopticapi sees them: its ``{id: segment}`` dict, as arrays.

    Duplicate ids: the last entry wins, at the position of the first (a dict's semantics); the
    table order decides which crowd segment of a category counts (the last one).

    Args:
      gt_segments: ground-truth segments_info (``id``, ``category_id``, optional ``iscrowd`` and
        ``area``).
      image: name of the image for error messages.

    Returns:
      (ids int64 [N], category ids int64 [N], iscrowd bool [N], JSON areas: list of N ints or
      None where the JSON has no ``area``).

    Raises:
      PanopticFormatError: a segment lacks ``id`` or ``category_id`` or has non-integer values.
    """
    try:
        gt_by_id = {int(s["id"]): s for s in gt_segments}
        ids = np.fromiter(gt_by_id, np.int64, len(gt_by_id))
        cats = np.fromiter(
            (int(s["category_id"]) for s in gt_by_id.values()), np.int64, len(gt_by_id)
        )
        crowd = np.fromiter(
            (s.get("iscrowd", 0) == 1 for s in gt_by_id.values()), bool, len(gt_by_id)
        )
        areas = [s.get("area") for s in gt_by_id.values()]
    except (KeyError, TypeError, ValueError) as e:
        raise PanopticFormatError(f"{image}: malformed ground-truth segments_info ({e!r})") from e
    return ids, cats, crowd, areas


def _index_of(query: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Position of each `query` value in the unique array `keys` (-1 if absent), int64."""
    if keys.size == 0:
        return np.full(query.shape, -1, np.int64)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    pos = np.minimum(np.searchsorted(sorted_keys, query), keys.size - 1)
    return np.where(sorted_keys[pos] == query, order[pos], -1)


def match_image(
    gt_pairs: np.ndarray,
    pred_pairs: np.ndarray,
    counts: np.ndarray,
    gt_segments: Iterable[Mapping[str, Any]],
    pred_segments: Iterable[Mapping[str, Any]],
    categories: Mapping[int, Any],
    image: str = "image",
) -> ImageStats:
    """PQ matching of one image from its joint histogram (see the module docstring for the rules).

    Args:
      gt_pairs, pred_pairs, counts: int64 [M] output of `pair_counts`.
      gt_segments: ground-truth segments_info (``id``, ``category_id``, ``iscrowd``, optional
        ``area``); duplicate ids: the last entry wins, as in panopticapi.
      pred_segments: predicted segments_info (``id``, ``category_id``); must match the PNG exactly.
      categories: {dataset category id: ...}; predicted categories must be keys.
      image: name of the image for error messages.

    Returns:
      The image's `ImageStats`.

    Raises:
      PanopticFormatError: malformed prediction (ids in the PNG but not in the JSON or vice versa,
        duplicate ids, id 0 in segments_info, unknown category, missing keys).
    """
    gt_ids, gt_cat, gt_crowd, gt_area_json = ground_truth_table(gt_segments, image)

    # Prediction: strict.
    pred_list = list(pred_segments)
    try:
        pred_ids = np.fromiter((int(s["id"]) for s in pred_list), np.int64, len(pred_list))
        pred_cat = np.fromiter((int(s["category_id"]) for s in pred_list), np.int64, len(pred_list))
    except (KeyError, TypeError, ValueError) as e:
        raise PanopticFormatError(
            f"{image}: malformed predicted segments_info, each segment needs integer 'id' and "
            f"'category_id' ({e!r})"
        ) from e
    if len(set(pred_ids.tolist())) != pred_ids.size:
        uniq_ids, id_counts = np.unique(pred_ids, return_counts=True)
        raise PanopticFormatError(
            f"{image}: duplicate predicted segment ids {uniq_ids[id_counts > 1].tolist()} in "
            "segments_info"
        )
    if (pred_ids == VOID).any():
        raise PanopticFormatError(
            f"{image}: predicted segments_info has a segment with id 0, reserved for void"
        )

    gidx = _index_of(gt_pairs, gt_ids)
    pidx = _index_of(pred_pairs, pred_ids)
    num_pred = pred_ids.size
    stray = (pidx < 0) & (pred_pairs != VOID)
    if stray.any():
        raise PanopticFormatError(
            f"{image}: predicted segment ids {np.unique(pred_pairs[stray]).tolist()} are in the "
            "PNG but not in segments_info"
        )
    has_pred = pidx >= 0
    pred_area = np.bincount(pidx[has_pred], weights=counts[has_pred], minlength=num_pred)
    absent = pred_area == 0
    if absent.any():
        raise PanopticFormatError(
            f"{image}: predicted segment ids {pred_ids[absent].tolist()} are in segments_info but "
            "not in the PNG"
        )
    unknown = np.fromiter((c not in categories for c in pred_cat.tolist()), bool, num_pred)
    if unknown.any():
        raise PanopticFormatError(
            f"{image}: predicted segments {pred_ids[unknown].tolist()} have unknown category ids "
            f"{pred_cat[unknown].tolist()}"
        )

    # Ground-truth areas: from the JSON (panopticapi), else the pixel count.
    has_gt = gidx >= 0
    gt_area = np.bincount(gidx[has_gt], weights=counts[has_gt], minlength=gt_ids.size)
    for j, a in enumerate(gt_area_json):
        if a is not None:
            gt_area[j] = a

    on_void = (gt_pairs == VOID) & has_pred
    void_inter = np.bincount(pidx[on_void], weights=counts[on_void], minlength=num_pred)

    # True positives: any (gt, pred) pair of one category, gt not crowd, with IoU > 0.5.
    both = has_gt & has_pred
    g_b, p_b, c_b = gidx[both], pidx[both], counts[both]
    cand = ~gt_crowd[g_b] & (gt_cat[g_b] == pred_cat[p_b])
    g_b, p_b, c_b = g_b[cand], p_b[cand], c_b[cand]
    union = pred_area[p_b] + gt_area[g_b] - c_b - void_inter[p_b]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = c_b / union
    tp = iou > 0.5
    gt_matched = np.zeros(gt_ids.size, bool)
    pred_matched = np.zeros(num_pred, bool)
    gt_matched[g_b[tp]] = True
    pred_matched[p_b[tp]] = True

    # False negatives: unmatched, non-crowd ground truth.
    fn = ~gt_matched & ~gt_crowd

    # False positives: unmatched predictions not mostly in void + their category's crowd region.
    crowd_of_cat: dict[int, int] = {}
    for gid, cat, crowd in zip(gt_ids.tolist(), gt_cat.tolist(), gt_crowd.tolist(), strict=True):
        if crowd:
            crowd_of_cat[cat] = gid
    ignored_inter = void_inter
    if crowd_of_cat and num_pred:
        crowd_id = np.fromiter(
            (crowd_of_cat.get(c, -1) for c in pred_cat.tolist()), np.int64, num_pred
        )
        on_crowd = has_pred & (gt_pairs == crowd_id[np.maximum(pidx, 0)])
        ignored_inter = void_inter + np.bincount(
            pidx[on_crowd], weights=counts[on_crowd], minlength=num_pred
        )
    fp = ~pred_matched & ~(ignored_inter / pred_area > 0.5)

    return ImageStats(
        tp_categories=gt_cat[g_b[tp]],
        tp_ious=iou[tp],
        fn_categories=gt_cat[fn],
        fp_categories=pred_cat[fp],
    )


# ----------------------------------------------------------------------------- drivers


def _run(fn: Callable[[Any], ImageStats], items: Sequence[Any], num_workers: int | None) -> PQStat:
    """Maps `fn` over `items` (threads when num_workers > 1), summing in item order."""
    stat = PQStat()
    workers = _default_workers() if num_workers is None else int(num_workers)
    if workers <= 1 or len(items) <= 1:
        for item in items:
            stat.add(fn(item))
        return stat
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        for image_stats in pool.map(fn, items):
            stat.add(image_stats)
    return stat


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _evaluate_files(
    item: tuple[Mapping[str, Any], Mapping[str, Any]],
    gt_folder: str,
    pred_folder: str,
    categories: Mapping[int, Any],
) -> ImageStats:
    gt_ann, pred_ann = item
    name = f"image {gt_ann['image_id']} (prediction {pred_ann['file_name']})"
    gt_words, gt_shape = read_id_words(os.path.join(gt_folder, gt_ann["file_name"]))
    pred_words, pred_shape = read_id_words(os.path.join(pred_folder, pred_ann["file_name"]))
    if gt_shape != pred_shape:
        raise PanopticFormatError(
            f"{name}: prediction PNG is {pred_shape[0]}x{pred_shape[1]} (HxW), ground truth is "
            f"{gt_shape[0]}x{gt_shape[1]}"
        )
    pairs = pair_counts(
        gt_words,
        pred_words,
        id_mask=0xFFFFFF,
        gt_candidates=segment_ids(gt_ann["segments_info"]),
        pred_candidates=segment_ids(pred_ann["segments_info"]),
    )
    return match_image(
        *pairs, gt_ann["segments_info"], pred_ann["segments_info"], categories, image=name
    )


def pq_compute(
    gt_json_file: str,
    pred_json_file: str,
    gt_folder: str | None = None,
    pred_folder: str | None = None,
    num_workers: int | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Drop-in replacement for panopticapi's ``pq_compute`` (same arguments and result).

    Args:
      gt_json_file: COCO panoptic ground-truth JSON (with 'annotations' and 'categories').
      pred_json_file: COCO panoptic predictions JSON ('annotations'; one per ground-truth image,
        predictions for other images are ignored).
      gt_folder: ground-truth PNG folder; default: `gt_json_file` without '.json'.
      pred_folder: prediction PNG folder; default: `pred_json_file` without '.json'.
      num_workers: threads over images (default: the CPUs available; <= 1: serial).
      verbose: print panopticapi's summary table.

    Returns:
      {'All': {'pq', 'sq', 'rq', 'n'}, 'per_class': {category id: {'pq', 'sq', 'rq'}},
      'Things': {...}, 'Stuff': {...}} with values in [0, 1], as panopticapi.

    Raises:
      FileNotFoundError: a folder is missing. PanopticFormatError: a missing or duplicate
      prediction for an image, or a malformed prediction (message names image and segments).
    """
    with open(gt_json_file) as f:
        gt_json = json.load(f)
    with open(pred_json_file) as f:
        pred_json = json.load(f)
    if gt_folder is None:
        gt_folder = gt_json_file.replace(".json", "")
    if pred_folder is None:
        pred_folder = pred_json_file.replace(".json", "")
    for kind, folder in (("ground-truth", gt_folder), ("prediction", pred_folder)):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{kind} segmentation folder {folder} does not exist")
    categories = _category_dict(gt_json["categories"])

    preds: dict[int, Mapping[str, Any]] = {}
    for ann in pred_json["annotations"]:
        if ann["image_id"] in preds:
            raise PanopticFormatError(
                f"{pred_json_file}: two predictions for image {ann['image_id']}"
            )
        preds[ann["image_id"]] = ann
    items = []
    for gt_ann in gt_json["annotations"]:
        if gt_ann["image_id"] not in preds:
            raise PanopticFormatError(
                f"{pred_json_file}: no prediction for image {gt_ann['image_id']}"
            )
        items.append((gt_ann, preds[gt_ann["image_id"]]))

    stat = _run(
        lambda item: _evaluate_files(item, gt_folder, pred_folder, categories), items, num_workers
    )
    results = stat.summarize(categories)
    if verbose:
        print_results(results)
    return results


def evaluate_id_maps(
    gt: Iterable[tuple[np.ndarray, Sequence[Mapping[str, Any]]]],
    pred: Iterable[tuple[np.ndarray, Sequence[Mapping[str, Any]]]],
    categories: Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    num_workers: int | None = 1,
) -> dict[str, Any]:
    """PQ of in-memory id maps (no PNG round trip), same rules and result as `pq_compute`.

    Args:
      gt: per image (id_map [H, W] non-negative integer ids, 0 = void; segments_info).
      pred: per image, in the same order (id_map [H, W]; segments_info with DATASET category ids).
      categories: category dicts (with 'id' and 'isthing') or {id: category dict}.
      num_workers: threads over images (None: the CPUs available; <= 1: serial, the default:
        the per-image work is a few passes over the maps, bound by memory bandwidth and the GIL,
        and two threads were measured slower than one on a 2-core machine).

    Returns:
      The `pq_compute` result dict.

    Raises:
      PanopticFormatError: different numbers of images, shapes that differ, malformed predictions
      (images are named by their position, ``image #i``).
    """
    cats = _category_dict(categories)
    gt_list = list(gt)
    pred_list = list(pred)
    if len(gt_list) != len(pred_list):
        raise PanopticFormatError(
            f"{len(gt_list)} ground-truth images but {len(pred_list)} predictions"
        )

    def one(i: int) -> ImageStats:
        (gt_map, gt_segs), (pred_map, pred_segs) = gt_list[i], pred_list[i]
        name = f"image #{i}"
        gt_map, pred_map = np.asarray(gt_map), np.asarray(pred_map)
        if gt_map.shape != pred_map.shape:
            raise PanopticFormatError(
                f"{name}: predicted id map has shape {pred_map.shape}, ground truth {gt_map.shape}"
            )
        try:
            pairs = pair_counts(
                gt_map,
                pred_map,
                gt_candidates=segment_ids(gt_segs),
                pred_candidates=segment_ids(pred_segs),
            )
        except ValueError as e:
            raise PanopticFormatError(f"{name}: {e}") from e
        return match_image(*pairs, gt_segs, pred_segs, cats, image=name)

    return _run(one, range(len(gt_list)), num_workers).summarize(cats)


def print_results(results: Mapping[str, Any]) -> None:
    """Prints panopticapi's PQ / SQ / RQ / N table (percentages)."""
    print("{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format("", "PQ", "SQ", "RQ", "N"))
    print("-" * (10 + 7 * 4))
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        print(
            f"{name:10s}| {100 * r['pq']:5.1f}  {100 * r['sq']:5.1f}  {100 * r['rq']:5.1f} "
            f"{r['n']:5d}"
        )
