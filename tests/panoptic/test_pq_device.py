"""On-device PQ (`panoptic.pq_device`) against panopticapi (the reference).

The same perturbed predictions as tests/panoptic/test_pq.py (real COCO sample and synthetic ground
truth with crowd, void, stale areas and JSON/PNG mismatches) are evaluated by panopticapi (its
single-core function, per image) and by the device path: ground truth converted once with
`ground_truth_to_device`, predictions renumbered as the merge numbers them (segment j -> id j + 1,
contiguous categories), images padded to one canvas and batched. All PQ / SQ / RQ / n values,
per class too, must agree to 1e-9; so must the per-category TP / FP / FN counts.
"""

from __future__ import annotations

import json

import chex
import jax
import numpy as np
import pytest
from test_pq import (  # the helpers of the host tests, shared
    _assert_results_equal,
    _assert_stat_equal,
    _ref_image_stat,
    _ref_results,
    _write_png,
    perturb,
    synthetic_gt,  # noqa: F401 - pytest fixture
)

from oanet_jax.data import synthetic, transforms
from oanet_jax.data.coco_panoptic import CategoryTable
from oanet_jax.panoptic import io as pio
from oanet_jax.panoptic import pq, pq_device

pan_eval = pytest.importorskip("panopticapi.evaluation")

MAX_GT = 48
MAX_PRED = 96


def _pred_to_device(pred_map, segments, table, num_pred, canvas):
    """A perturbed prediction renumbered as the merge does: segment j -> id j + 1."""
    order = {int(s["id"]): j + 1 for j, s in enumerate(segments)}
    assert len(order) <= num_pred
    uniq, inverse = np.unique(pred_map, return_inverse=True)
    ids = np.array([order.get(int(i), 0) for i in uniq], np.int32)[inverse.reshape(-1)]
    out = np.zeros(canvas, np.int32)
    out[: pred_map.shape[0], : pred_map.shape[1]] = ids.reshape(pred_map.shape)
    category = np.zeros(num_pred, np.int32)
    valid = np.zeros(num_pred, bool)
    for s in segments:
        category[order[int(s["id"])] - 1] = table.to_contiguous(s["category_id"])
        valid[order[int(s["id"])] - 1] = True
    return out, category, valid


def _device_stat(gt_items, pred_items, table, canvas, batch_size=4):
    """Runs the device path over (gt dict, (pred_map, segments)) items in padded batches."""
    acc = pq_device.DevicePQAccumulator(table.dataset_ids)
    for start in range(0, len(gt_items), batch_size):
        gts = gt_items[start : start + batch_size]
        preds = [
            _pred_to_device(m, s, table, MAX_PRED, canvas)
            for m, s in pred_items[start : start + batch_size]
        ]
        n = len(gts)
        while len(gts) < batch_size:  # pad the last batch with copies (not counted)
            gts, preds = gts + gts[:1], preds + preds[:1]
        stats = pq_device.pq_stats(
            np.stack([g["index_map"] for g in gts]),
            np.stack([g["category"] for g in gts]),
            np.stack([g["iscrowd"] for g in gts]),
            np.stack([g["area"] for g in gts]),
            np.stack([g["valid"] for g in gts]),
            np.stack([p[0] for p in preds]),
            np.stack([p[1] for p in preds]),
            np.stack([p[2] for p in preds]),
            num_classes=table.num_classes,
        )
        acc.add(stats, np.arange(len(stats["tp"])) < n)
    return acc


def _compare(tmp_path, gt_anns, gt_folder, gt_maps, categories, variants, seed, canvas):
    """Perturbed prediction sets: device path and in-memory path vs panopticapi."""
    table = CategoryTable.from_categories(categories)
    cats = {c["id"]: c for c in categories}
    to_contiguous = {d: c for c, d in enumerate(table.dataset_ids)}
    gt_items = [
        pq_device.ground_truth_to_device(
            gt_maps[a["file_name"]], a["segments_info"], to_contiguous, MAX_GT, canvas
        )
        for a in gt_anns
    ]
    rng = np.random.default_rng(seed)
    totals = {"tp": 0, "fp": 0, "fn": 0, "ignored": 0}
    for v in range(variants):
        pred_folder = tmp_path / f"pred{v}"
        ref_total = pan_eval.PQStat()
        pred_items = []
        for gt_ann in gt_anns:
            gt_map = gt_maps[gt_ann["file_name"]]
            pred_map, segments = perturb(
                gt_map, gt_ann["segments_info"], categories, rng, int(rng.integers(0, 9))
            )
            _write_png(pred_folder, gt_ann["file_name"], pred_map)
            pred_ann = {
                "image_id": gt_ann["image_id"],
                "file_name": gt_ann["file_name"],
                "segments_info": segments,
            }
            ref_total += _ref_image_stat(gt_ann, pred_ann, gt_folder, pred_folder, cats)
            pred_items.append((pred_map, segments))
        acc = _device_stat(gt_items, pred_items, table, canvas)
        _assert_stat_equal(acc.to_pq_stat(), ref_total)
        ref_results = _ref_results(ref_total, cats)
        _assert_results_equal(acc.summarize(categories), ref_results)
        in_memory = pq.evaluate_id_maps(
            [(gt_maps[a["file_name"]], a["segments_info"]) for a in gt_anns],
            pred_items,
            categories,
            num_workers=1,
        )
        _assert_results_equal(in_memory, ref_results)
        for s in ref_total.pq_per_cat.values():
            totals["tp"] += s.tp
            totals["fp"] += s.fp
            totals["fn"] += s.fn
        totals["ignored"] += sum(len(s) for _, s in pred_items)
    totals["ignored"] -= totals["tp"] + totals["fp"]
    return totals


def test_device_pq_equals_panopticapi_on_coco_sample(coco_sample_dir, tmp_path):
    gt_json = json.loads((coco_sample_dir / "panoptic_examples.json").read_text())
    categories = json.loads((coco_sample_dir / "panoptic_coco_categories.json").read_text())
    gt_folder = coco_sample_dir / "panoptic_examples"
    gt_maps = {
        a["file_name"]: pio.read_panoptic_png(gt_folder / a["file_name"])
        for a in gt_json["annotations"]
    }
    canvas = (432, 640)  # both images (427x640, 360x640) padded with void
    totals = _compare(
        tmp_path, gt_json["annotations"], gt_folder, gt_maps, categories, 12, 3, canvas
    )
    assert totals["tp"] > 0 and totals["fp"] > 0 and totals["fn"] > 0 and totals["ignored"] > 0


def test_device_pq_equals_panopticapi_on_synthetic(synthetic_gt, tmp_path):  # noqa: F811
    gt_json, gt_folder, gt_maps = synthetic_gt
    totals = _compare(
        tmp_path,
        gt_json["annotations"],
        gt_folder,
        gt_maps,
        gt_json["categories"],
        4,
        5,
        (100, 128),
    )
    assert totals["tp"] > 0 and totals["fp"] > 0 and totals["fn"] > 0 and totals["ignored"] > 0


def test_ground_truth_conversion_unlisted_and_errors():
    gt = np.array([[0, 5, 5], [7, 7, 9]])  # 9 is in the PNG only; 11 in the JSON only
    segs = [
        {"id": 7, "category_id": 3, "iscrowd": 1},
        {"id": 5, "category_id": 1, "area": 10},
        {"id": 11, "category_id": 1, "area": 4},
        {"id": 7, "category_id": 1, "iscrowd": 0},  # duplicate: wins, at the first position
    ]
    out = pq_device.ground_truth_to_device(gt, segs, {1: 0, 3: 1}, 4, (3, 4))
    np.testing.assert_array_equal(out["index_map"], [[0, 2, 2, 0], [1, 1, 5, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(out["category"], [0, 0, 0, 0])
    np.testing.assert_array_equal(out["iscrowd"], [False, False, False, False])
    np.testing.assert_array_equal(out["area"], [2, 10, 4, 0])
    np.testing.assert_array_equal(out["valid"], [True, True, True, False])
    with pytest.raises(pq.PanopticFormatError, match="more than max_segments=2"):
        pq_device.ground_truth_to_device(gt, segs, {1: 0, 3: 1}, 2)
    with pytest.raises(pq.PanopticFormatError, match=r"unknown ground-truth category ids \[3\]"):
        pq_device.ground_truth_to_device(gt, segs[:1], {1: 0}, 4)
    with pytest.raises(pq.PanopticFormatError, match="does not fit"):
        pq_device.ground_truth_to_device(gt, segs, {1: 0, 3: 1}, 4, (1, 3))


def test_resize_to_original_equals_host():
    rng = np.random.default_rng(0)
    hp, wp, canvas = 40, 48, (70, 64)
    maps, image_shapes, orig_shapes, expected = [], [], [], []
    for _ in range(6):
        id_map = rng.integers(0, 9, (hp, wp)).astype(np.int32)
        h, w = int(rng.integers(1, hp + 1)), int(rng.integers(1, wp + 1))
        big_h, big_w = int(rng.integers(1, canvas[0] + 1)), int(rng.integers(1, canvas[1] + 1))
        segs = [{"id": i, "category_id": 1} for i in range(1, 9)]
        host, _ = transforms.crop_and_resize_to_original(id_map, (h, w), (big_h, big_w), segs)
        full = np.zeros(canvas, np.int32)
        full[:big_h, :big_w] = host
        maps.append(id_map)
        image_shapes.append((h, w))
        orig_shapes.append((big_h, big_w))
        expected.append(full)
    out = pq_device.resize_to_original(
        np.stack(maps), np.array(image_shapes), np.array(orig_shapes), canvas_size=canvas
    )
    assert out.dtype == np.int32 and out.shape == (6, *canvas)
    np.testing.assert_array_equal(np.asarray(out), np.stack(expected))


def test_one_trace_for_several_batches():
    rng = np.random.default_rng(1)
    b, h, w, g, p, c = 3, 17, 19, 5, 7, 4
    traced = jax.jit(
        chex.assert_max_traces(pq_device.pq_stats.__wrapped__, n=1),
        static_argnames=("num_classes",),
    )
    before = pq_device.pq_stats._cache_size()
    for _ in range(3):
        args = (
            rng.integers(0, g + 2, (b, h, w)).astype(np.int32),
            rng.integers(0, c, (b, g)).astype(np.int32),
            rng.random((b, g)) < 0.3,
            rng.integers(1, 50, (b, g)).astype(np.int32),
            rng.random((b, g)) < 0.8,
            rng.integers(0, p + 1, (b, h, w)).astype(np.int32),
            rng.integers(0, c, (b, p)).astype(np.int32),
            rng.random((b, p)) < 0.9,
        )
        ours = pq_device.pq_stats(*args, num_classes=c)
        again = traced(*args, num_classes=c)
        chex.assert_trees_all_equal(ours, again)
        assert ours["tp"].shape == (b, c) and ours["tp_union"].shape == (b, g)
    assert pq_device.pq_stats._cache_size() - before == 1


def test_double_match_is_refused():
    # Ground-truth JSON area 1, far below its 4 pixels: two predictions both have IoU > 0.5.
    gt_index = np.array([[[1, 1, 1, 1]]], np.int32)
    pred = np.array([[[1, 1, 2, 2]]], np.int32)
    stats = pq_device.pq_stats(
        gt_index,
        [[0]],
        [[False]],
        [[1]],
        [[True]],
        pred,
        [[0, 0]],
        [[True, True]],
        num_classes=1,
    )
    assert np.asarray(stats["tp_pairs"]).tolist() == [[2]]
    with pytest.raises(ValueError, match="two matches"):
        pq_device.DevicePQAccumulator([1]).add(stats)


def test_merge_output_to_pq_equals_host_path():
    """What the evaluator does: merge-style padded id maps -> resize_to_original -> pq_stats.

    The host twin: `data.transforms.crop_and_resize_to_original` (drops segments that vanish) then
    `pq.evaluate_id_maps`. Predictions are made at the model's resolution from the ground truth
    (nearest downsampling, ids renumbered as detection slots / stuff rows, some relabelled, some
    table rows invalid), so the resize back is lossy and small segments vanish.
    """
    rng = np.random.default_rng(7)
    categories = [{"id": c["id"], "isthing": c["isthing"]} for c in synthetic.CATEGORIES]
    table = CategoryTable.from_categories(categories)
    to_contiguous = {d: c for c, d in enumerate(table.dataset_ids)}
    num_pred, canvas, padded = 40, (96, 112), (64, 64)
    gt_dev, preds, shapes, origs, host_gt, host_pred = [], [], [], [], [], []
    for i in range(6):
        big = (int(rng.integers(40, canvas[0] + 1)), int(rng.integers(40, canvas[1] + 1)))
        ex = synthetic.generate_example(3, "train", i, big)
        segs = [dict(s, iscrowd=int(rng.random() < 0.15)) for s in ex.segments]
        scale = min(padded[0] / big[0], padded[1] / big[1])
        small = (max(1, int(big[0] * scale)), max(1, int(big[1] * scale)))
        rows = np.arange(small[0]) * big[0] // small[0]
        cols = np.arange(small[1]) * big[1] // small[1]
        down = ex.panoptic[rows[:, None], cols[None, :]]
        slot = {s["id"]: j + 1 for j, s in enumerate(rng.permutation(segs).tolist())}
        pred = np.zeros(padded, np.int32)
        uniq, inverse = np.unique(down, return_inverse=True)
        lut = np.array([slot.get(int(v), 0) for v in uniq], np.int32)
        pred[: small[0], : small[1]] = lut[inverse.reshape(down.shape)]
        category = np.zeros(num_pred, np.int32)
        valid = np.zeros(num_pred, bool)
        pred_segs = []
        for s in segs:
            cat = s["category_id"] if rng.random() > 0.2 else int(rng.choice(table.dataset_ids))
            category[slot[s["id"]] - 1] = to_contiguous[cat]
            valid[slot[s["id"]] - 1] = bool((pred == slot[s["id"]]).any())
            if valid[slot[s["id"]] - 1]:
                pred_segs.append({"id": slot[s["id"]], "category_id": cat})
        valid[len(segs) + 2] = True  # a valid row without pixels: not a segment
        extra = len(segs) + 1  # a valid segment only in the padding: cropped away
        pred[small[0] :, :] = extra
        pred[:, small[1] :] = extra
        valid[extra - 1] = bool((pred == extra).any())
        pred_segs.append({"id": extra, "category_id": table.dataset_ids[0]})
        orig_map, kept = transforms.crop_and_resize_to_original(pred, small, big, pred_segs)
        host_pred.append((orig_map, kept))
        host_gt.append((ex.panoptic, segs))
        gt_dev.append(
            pq_device.ground_truth_to_device(ex.panoptic, segs, to_contiguous, 32, canvas)
        )
        preds.append((pred, category, valid))
        shapes.append(small)
        origs.append(big)
    assert sum(len(s) for _, s in host_pred) < sum(int(p[2].sum()) for p in preds)  # vanished
    id_maps = pq_device.resize_to_original(
        np.stack([p[0] for p in preds]), np.array(shapes), np.array(origs), canvas_size=canvas
    )
    stats = pq_device.pq_stats(
        *(np.stack([g[k] for g in gt_dev]) for k in pq_device.GT_KEYS),
        id_maps,
        np.stack([p[1] for p in preds]),
        np.stack([p[2] for p in preds]),
        num_classes=table.num_classes,
    )
    acc = pq_device.DevicePQAccumulator(table.dataset_ids)
    acc.add(stats)
    _assert_results_equal(
        acc.summarize(categories), pq.evaluate_id_maps(host_gt, host_pred, categories)
    )
