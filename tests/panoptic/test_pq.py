"""PQ evaluator against panopticapi (the reference) on real COCO and synthetic data.

Predictions are random perturbations of the ground truth (segments merged, split, dropped,
relabelled, shifted, shrunk around the IoU = 0.5 threshold, void painted, false positives added);
the synthetic ground truth is perturbed too (crowd segments, void painted without updating the JSON
areas, JSON segments absent from the PNG, PNG ids absent from the JSON). Per image, the TP / FP / FN
counts per category must equal panopticapi's exactly and the IoU sums to 1e-9; per prediction set,
All / Things / Stuff / per-class PQ, SQ, RQ to 1e-9. panopticapi's `pq_compute` forks, so its
single-core function is called directly.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from oanet_jax.data import synthetic
from oanet_jax.panoptic import pq
from oanet_jax.panoptic.io import id_map_to_rgb, read_panoptic_png

pan_eval = pytest.importorskip("panopticapi.evaluation")


# ----------------------------------------------------------------------------- helpers


def _ref_image_stat(gt_ann, pred_ann, gt_folder, pred_folder, categories):
    """panopticapi's PQStat for one image (its single-core worker, stdout silenced)."""
    pair = [(copy.deepcopy(gt_ann), copy.deepcopy(pred_ann))]
    with contextlib.redirect_stdout(io.StringIO()):
        return pan_eval.pq_compute_single_core(
            0, pair, str(gt_folder), str(pred_folder), categories
        )


def _ref_results(stat, categories):
    results = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        results[name], per_class = stat.pq_average(categories, isthing=isthing)
        if name == "All":
            results["per_class"] = per_class
    return results


def _assert_results_equal(ours, ref):
    assert list(ours) == list(ref)
    for name in ("All", "Things", "Stuff"):
        assert ours[name]["n"] == ref[name]["n"], name
        for key in ("pq", "sq", "rq"):
            assert abs(ours[name][key] - ref[name][key]) <= 1e-9, (name, key)
    assert ours["per_class"].keys() == ref["per_class"].keys()
    for cat, values in ref["per_class"].items():
        for key in ("pq", "sq", "rq"):
            assert abs(ours["per_class"][cat][key] - values[key]) <= 1e-9, (cat, key)


def _assert_stat_equal(ours: pq.PQStat, ref) -> None:
    cats = {c for c, s in ref.pq_per_cat.items() if s.tp + s.fp + s.fn} | {
        c for c, s in ours.pq_per_cat.items() if s.tp + s.fp + s.fn
    }
    for c in cats:
        o, r = ours.pq_per_cat.get(c, pq.PQStatCat()), ref.pq_per_cat.get(c)
        r = r if r is not None else pan_eval.PQStatCat()
        assert (o.tp, o.fp, o.fn) == (r.tp, r.fp, r.fn), c
        assert abs(o.iou - r.iou) <= 1e-9, c


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def perturb(gt_map, gt_segments, categories, rng, num_ops):
    """A random prediction (id map int64 [H, W], segments_info) derived from the ground truth."""
    all_cats = [c["id"] for c in categories]
    h, w = gt_map.shape
    yy, xx = np.mgrid[:h, :w]
    pred = np.zeros((h, w), np.int64)
    cat_of: dict[int, int] = {}
    next_id = [int(rng.integers(1, 1000))]

    def new_id() -> int:
        next_id[0] += int(rng.integers(1, 3000))
        return next_id[0]

    def random_cat() -> int:
        return int(rng.choice(all_cats))

    for seg in gt_segments:
        if rng.random() < 0.05:
            continue  # missed entirely
        nid = new_id()
        pred[gt_map == seg["id"]] = nid
        cat_of[nid] = seg["category_id"] if rng.random() > 0.1 else random_cat()
    if rng.random() < 0.3:  # void of the ground truth swallowed by a random predicted segment
        ids = [i for i in cat_of if np.any(pred == i)]
        if ids:
            pred[gt_map == 0] = int(rng.choice(ids))

    for op in rng.integers(0, 9, num_ops):
        ids = [int(i) for i in np.unique(pred) if i != 0]
        if not ids:
            break
        a = int(rng.choice(ids))
        m = pred == a
        if op == 0:  # merge another segment into a
            pred[pred == int(rng.choice(ids))] = a
        elif op == 1:  # split by a random line
            angle = rng.uniform(0, np.pi)
            proj = yy * np.cos(angle) + xx * np.sin(angle)
            cut = np.quantile(proj[m], rng.uniform(0.2, 0.8))
            nid = new_id()
            pred[m & (proj > cut)] = nid
            cat_of[nid] = cat_of[a] if rng.random() < 0.7 else random_cat()
        elif op == 2:  # drop: to void or to another segment
            pred[m] = 0 if rng.random() < 0.5 else int(rng.choice(ids))
        elif op == 3:  # relabel
            cat_of[a] = random_cat()
        elif op == 4:  # shift by a few pixels
            dy, dx = (int(v) for v in rng.integers(-4, 5, 2))
            if rng.random() < 0.5:
                pred[m] = 0
            pred[_shift(m, dy, dx)] = a
        elif op == 5:  # paint void
            y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
            pred[y0 : y0 + int(rng.integers(1, h // 2)), x0 : x0 + int(rng.integers(1, w // 2))] = 0
        elif op == 6:  # extra false positive (rectangle or disc), maybe in void or crowd
            nid = new_id()
            cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
            r = int(rng.integers(2, max(3, min(h, w) // 4)))
            shape = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            if rng.random() < 0.5:
                shape = (abs(yy - cy) < r) & (abs(xx - cx) < 2 * r)
            pred[shape] = nid
            cat_of[nid] = random_cat()
        elif op == 7:  # shrink to a fraction of the rows around IoU 0.5
            cut = np.quantile(yy[m], rng.uniform(0.35, 0.65))
            pred[m & (yy > cut)] = 0 if rng.random() < 0.5 else new_id()
            for i in np.unique(pred[m]):
                cat_of.setdefault(int(i), cat_of[a])
        else:  # grow: dilate by a few pixels over neighbours
            grown = m.copy()
            for _ in range(int(rng.integers(1, 4))):
                grown = grown | _shift(grown, 1, 0) | _shift(grown, -1, 0)
                grown = grown | _shift(grown, 0, 1) | _shift(grown, 0, -1)
            pred[grown] = a
    present = [int(i) for i in np.unique(pred) if i != 0]
    segments = [{"id": i, "category_id": cat_of[i], "iscrowd": 0} for i in present]
    rng.shuffle(segments)
    return pred, segments


def _write_png(folder: pathlib.Path, name: str, id_map: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(id_map_to_rgb(id_map), "RGB").save(folder / name)


def _compare_prediction_sets(tmp_path, gt_json, gt_folder, gt_maps, categories, variants, seed):
    """Writes `variants` perturbed prediction sets and compares them with panopticapi."""
    cats = {c["id"]: c for c in categories}
    rng = np.random.default_rng(seed)
    gt_json_file = tmp_path / "gt.json"
    gt_json_file.write_text(json.dumps(gt_json))
    totals = {"pred": 0, "tp": 0, "fp": 0, "fn": 0}
    for v in range(variants):
        pred_folder = tmp_path / f"pred{v}"
        annotations, pred_items = [], []
        ref_total = pan_eval.PQStat()
        for gt_ann in gt_json["annotations"]:
            gt_map = gt_maps[gt_ann["file_name"]]
            pred_map, segments = perturb(
                gt_map, gt_ann["segments_info"], categories, rng, int(rng.integers(0, 9))
            )
            pred_ann = {
                "image_id": gt_ann["image_id"],
                "file_name": gt_ann["file_name"],
                "segments_info": segments,
            }
            _write_png(pred_folder, gt_ann["file_name"], pred_map)
            annotations.append(pred_ann)
            pred_items.append((pred_map, segments))
            totals["pred"] += len(segments)

            ref = _ref_image_stat(gt_ann, pred_ann, gt_folder, pred_folder, cats)
            ref_total += ref
            ours = pq.PQStat()
            pairs = pq.pair_counts(
                read_panoptic_png(gt_folder / gt_ann["file_name"]),
                read_panoptic_png(pred_folder / gt_ann["file_name"]),
            )
            ours.add(pq.match_image(*pairs, gt_ann["segments_info"], segments, cats))
            _assert_stat_equal(ours, ref)

        pred_json_file = tmp_path / f"pred{v}.json"
        pred_json_file.write_text(json.dumps({"annotations": annotations}))
        ref_results = _ref_results(ref_total, cats)
        ours = pq.pq_compute(str(gt_json_file), str(pred_json_file), str(gt_folder), num_workers=2)
        _assert_results_equal(ours, ref_results)
        in_memory = pq.evaluate_id_maps(
            [(gt_maps[a["file_name"]], a["segments_info"]) for a in gt_json["annotations"]],
            pred_items,
            categories,
            num_workers=1,
        )
        _assert_results_equal(in_memory, ref_results)
        for s in ref_total.pq_per_cat.values():
            totals["tp"] += s.tp
            totals["fp"] += s.fp
            totals["fn"] += s.fn
    return totals


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def synthetic_gt(tmp_path_factory):
    """Synthetic ground truth with crowd segments, painted void, stale areas, JSON/PNG mismatch."""
    root = tmp_path_factory.mktemp("pq_synth")
    synthetic.generate(str(root / "data"), 24, 0, seed=11, size=(96, 128))
    gt_json = json.loads((root / "data" / "train" / "panoptic.json").read_text())
    rng = np.random.default_rng(0)
    gt_folder = root / "gt"
    gt_maps = {}
    for ann in gt_json["annotations"]:
        gt_map = read_panoptic_png(root / "data" / "train" / "panoptic" / ann["file_name"])
        segs = ann["segments_info"]
        for seg in segs:
            seg["iscrowd"] = int(rng.random() < 0.2)
        if rng.random() < 0.5:  # void painted; the JSON areas kept (stale) half of the time
            y0, x0 = int(rng.integers(0, 96)), int(rng.integers(0, 128))
            gt_map[y0 : y0 + int(rng.integers(4, 40)), x0 : x0 + int(rng.integers(4, 60))] = 0
            if rng.random() < 0.5:
                for seg in segs:
                    seg["area"] = int(np.sum(gt_map == seg["id"]))
        if rng.random() < 0.15 and len(segs) > 1:  # a PNG segment missing from the JSON
            segs.pop(int(rng.integers(0, len(segs))))
        if rng.random() < 0.15:  # a JSON segment missing from the PNG
            segs.append({"id": 7, "category_id": 1, "iscrowd": 0, "area": 50, "bbox": [0] * 4})
        _write_png(gt_folder, ann["file_name"], gt_map)
        gt_maps[ann["file_name"]] = gt_map
    return gt_json, gt_folder, gt_maps


# ----------------------------------------------------------------------------- tests


def test_identity_with_panopticapi_on_coco_sample(coco_sample_dir, tmp_path):
    gt_json = json.loads((coco_sample_dir / "panoptic_examples.json").read_text())
    categories = json.loads((coco_sample_dir / "panoptic_coco_categories.json").read_text())
    gt_json["categories"] = categories
    gt_folder = coco_sample_dir / "panoptic_examples"
    gt_maps = {
        a["file_name"]: read_panoptic_png(gt_folder / a["file_name"])
        for a in gt_json["annotations"]
    }
    assert sum(s["iscrowd"] for a in gt_json["annotations"] for s in a["segments_info"]) == 3
    totals = _compare_prediction_sets(
        tmp_path, gt_json, gt_folder, gt_maps, categories, variants=20, seed=1
    )
    # The perturbations exercise every outcome, including predictions ignored (void / crowd).
    assert totals["tp"] > 0 and totals["fp"] > 0 and totals["fn"] > 0
    assert totals["pred"] > totals["tp"] + totals["fp"]


def test_identity_with_panopticapi_on_synthetic(synthetic_gt, tmp_path):
    gt_json, gt_folder, gt_maps = synthetic_gt
    totals = _compare_prediction_sets(
        tmp_path, gt_json, gt_folder, gt_maps, gt_json["categories"], variants=8, seed=2
    )
    assert totals["tp"] > 0 and totals["fp"] > 0 and totals["fn"] > 0
    assert totals["pred"] > totals["tp"] + totals["fp"]


def test_perfect_prediction_and_threading_invariance(synthetic_gt, tmp_path):
    gt_json, gt_folder, _ = synthetic_gt
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(gt_json))
    # The ground truth as a prediction, minus its JSON/PNG mismatches.
    pred_json = copy.deepcopy(gt_json)
    for ann in pred_json["annotations"]:
        present = set(np.unique(read_panoptic_png(gt_folder / ann["file_name"])).tolist())
        ann["segments_info"] = [s for s in ann["segments_info"] if s["id"] in present]
        extra = present - {0} - {s["id"] for s in ann["segments_info"]}
        ann["segments_info"] += [{"id": i, "category_id": 101} for i in sorted(extra)]
    pred_file = tmp_path / "pred.json"
    pred_file.write_text(json.dumps(pred_json))
    one = pq.pq_compute(str(gt_file), str(pred_file), str(gt_folder), str(gt_folder), num_workers=1)
    four = pq.pq_compute(
        str(gt_file), str(pred_file), str(gt_folder), str(gt_folder), num_workers=4
    )
    assert one == four  # images are summed in order whatever the number of threads
    cats = {c["id"]: c for c in gt_json["categories"]}
    pairs = list(zip(gt_json["annotations"], pred_json["annotations"], strict=True))
    with contextlib.redirect_stdout(io.StringIO()):
        ref = pan_eval.pq_compute_single_core(
            0, copy.deepcopy(pairs), str(gt_folder), str(gt_folder), cats
        )
    _assert_results_equal(one, _ref_results(ref, cats))
    assert 0.0 < one["All"]["pq"] < 1.0  # crowd and stale areas of the perturbed ground truth


def test_ground_truth_as_prediction_scores_one(coco_sample_dir):
    gt_file = coco_sample_dir / "panoptic_examples.json"
    gt_json = json.loads(gt_file.read_text())
    folder = str(coco_sample_dir / "panoptic_examples")
    results = pq.pq_compute(str(gt_file), str(gt_file), folder, folder)
    noncrowd = {
        s["category_id"]
        for a in gt_json["annotations"]
        for s in a["segments_info"]
        if not s["iscrowd"]
    }
    assert results["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": len(noncrowd)}
    things = {c["id"] for c in gt_json["categories"] if c["isthing"]}
    assert results["Things"]["n"] == len(noncrowd & things)
    assert results["Stuff"]["n"] == len(noncrowd - things)


# ----------------------------------------------------------------------------- malformed


@pytest.fixture()
def one_image(synthetic_gt, tmp_path):
    """A ground-truth JSON with one image and a prediction folder holding a copy of its PNG."""
    gt_json, gt_folder, gt_maps = synthetic_gt
    ann = copy.deepcopy(gt_json["annotations"][0])
    gt_map = gt_maps[ann["file_name"]]
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps({"annotations": [ann], "categories": gt_json["categories"]}))
    present = [int(i) for i in np.unique(gt_map) if i != 0]
    _write_png(tmp_path / "pred", ann["file_name"], gt_map)
    segments = [{"id": i, "category_id": 101} for i in present]
    pred = {"image_id": ann["image_id"], "file_name": ann["file_name"], "segments_info": segments}
    return gt_file, gt_folder, tmp_path / "pred", pred, present


def _run_pred(one_image, pred_anns):
    gt_file, gt_folder, pred_folder, _, _ = one_image
    pred_file = pred_folder.parent / "pred.json"
    pred_file.write_text(json.dumps({"annotations": pred_anns}))
    return pq.pq_compute(str(gt_file), str(pred_file), str(gt_folder), str(pred_folder))


def _ref_raises(one_image, pred_ann):
    gt_file, gt_folder, pred_folder, _, _ = one_image
    gt_ann = json.loads(gt_file.read_text())["annotations"][0]
    cats = {c["id"]: c for c in json.loads(gt_file.read_text())["categories"]}
    with pytest.raises(KeyError):
        _ref_image_stat(gt_ann, pred_ann, gt_folder, pred_folder, cats)


def test_valid_fixture_prediction_is_accepted(one_image):
    results = _run_pred(one_image, [one_image[3]])
    assert results["All"]["n"] > 0


def test_segment_in_png_not_in_json(one_image):
    pred = one_image[3]
    missing = pred["segments_info"].pop(1)["id"]
    with pytest.raises(
        pq.PanopticFormatError, match=rf"image {pred['image_id']}.*\[{missing}\].*PNG but not"
    ):
        _run_pred(one_image, [pred])
    _ref_raises(one_image, pred)


def test_segment_in_json_not_in_png(one_image):
    pred = one_image[3]
    pred["segments_info"].append({"id": 424242, "category_id": 1})
    with pytest.raises(
        pq.PanopticFormatError, match=r"\[424242\] are in segments_info but not in the PNG"
    ):
        _run_pred(one_image, [pred])
    _ref_raises(one_image, pred)


def test_unknown_category(one_image):
    pred = one_image[3]
    pred["segments_info"][0]["category_id"] = 999
    sid = pred["segments_info"][0]["id"]
    with pytest.raises(
        pq.PanopticFormatError, match=rf"segments \[{sid}\] have unknown category ids \[999\]"
    ):
        _run_pred(one_image, [pred])
    _ref_raises(one_image, pred)


def test_duplicate_segment_id(one_image):
    pred = one_image[3]
    pred["segments_info"].append(dict(pred["segments_info"][0], category_id=1))
    sid = pred["segments_info"][0]["id"]
    with pytest.raises(pq.PanopticFormatError, match=rf"duplicate predicted segment ids \[{sid}\]"):
        _run_pred(one_image, [pred])


def test_void_id_in_json(one_image):
    pred = one_image[3]
    pred["segments_info"].append({"id": 0, "category_id": 1})
    with pytest.raises(pq.PanopticFormatError, match="id 0, reserved for void"):
        _run_pred(one_image, [pred])


def test_missing_and_duplicate_image_predictions(one_image):
    pred = one_image[3]
    with pytest.raises(pq.PanopticFormatError, match=f"no prediction for image {pred['image_id']}"):
        _run_pred(one_image, [dict(pred, image_id=-5)])
    with pytest.raises(
        pq.PanopticFormatError, match=f"two predictions for image {pred['image_id']}"
    ):
        _run_pred(one_image, [pred, pred])


def test_shape_mismatch(one_image):
    gt_file, gt_folder, pred_folder, pred, _ = one_image
    _write_png(pred_folder, pred["file_name"], np.zeros((5, 7), np.int64))
    pred["segments_info"] = []
    with pytest.raises(pq.PanopticFormatError, match="prediction PNG is 5x7"):
        _run_pred(one_image, [pred])
    with pytest.raises(pq.PanopticFormatError, match="image #0"):
        pq.evaluate_id_maps([(np.zeros((2, 2), int), [])], [(np.zeros((2, 3), int), [])], [])
    with pytest.raises(pq.PanopticFormatError, match="1 ground-truth images but 0 predictions"):
        pq.evaluate_id_maps([(np.zeros((2, 2), int), [])], [], [])


def test_pair_counts_against_loop():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, (23, 31)) * 70000
    pred = np.repeat(rng.integers(0, 5, (23, 8)), 4, axis=1)[:, :31] + (1 << 31)
    g, p, c = pq.pair_counts(gt, pred)
    expected = {}
    for a, b in zip(gt.ravel().tolist(), pred.ravel().tolist(), strict=True):
        expected[(a, b)] = expected.get((a, b), 0) + 1
    assert sorted(expected) == list(zip(g.tolist(), p.tolist(), strict=True))
    assert [expected[k] for k in sorted(expected)] == c.tolist()
    with pytest.raises(ValueError, match="ids must be in"):
        pq.pair_counts(gt - 1, pred)


@pytest.mark.parametrize("seed", range(4))
def test_pair_counts_dense_and_sorted_paths_agree(seed):
    """Dense bincount (small ids or candidate hints) and run-key sort give the same histogram."""
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 40)), int(rng.integers(1, 50)))
    small_gt = rng.integers(0, 6, shape)
    small_pred = np.repeat(rng.integers(0, 9, (shape[0], shape[1] // 3 + 1)), 3, axis=1)
    small_pred = small_pred[:, : shape[1]]
    big_gt = small_gt * 1_000_003  # RGB-sized ids: the sort path unless hinted
    loop: dict[tuple[int, int], int] = {}
    for a, b in zip(big_gt.ravel().tolist(), small_pred.ravel().tolist(), strict=True):
        loop[(a, b)] = loop.get((a, b), 0) + 1
    expected = [np.array(v) for v in zip(*sorted((*k, n) for k, n in loop.items()), strict=True)]
    all_ids = sorted({int(v) for v in big_gt.ravel()})
    for kwargs in (
        {},  # sort path (large gt ids)
        {"gt_candidates": all_ids},  # dense via the hint
        {"gt_candidates": [0, *all_ids[1:-1]]},  # hint missing an id: still exact
        {"gt_candidates": [-5, 7]},  # invalid hint: ignored
        {"gt_candidates": [], "pred_candidates": range(9)},
    ):
        got = pq.pair_counts(big_gt, small_pred, **kwargs)
        for a, b in zip(got, expected, strict=True):
            assert a.dtype == np.int64 and np.array_equal(a, b), kwargs
    small = pq.pair_counts(small_gt, small_pred)  # both small: dense without hints
    assert np.array_equal(small[0] * 1_000_003, expected[0])
    assert np.array_equal(small[2], expected[2])
    with pytest.raises(ValueError, match="ids must be in"):
        pq.pair_counts(small_gt - 1, small_pred, gt_candidates=[-1, 0, 1, 2, 3, 4])


def test_threshold_void_and_crowd_rules_by_hand(tmp_path):
    """Hand-made cases at the exact boundaries (IoU = 0.5, ignored fraction = 0.5)."""
    cats = [
        {"id": i, "name": str(i), "isthing": int(i < 100), "color": [0, 0, 0]}
        for i in (1, 2, 3, 101)
    ]
    gt = np.zeros((8, 8), np.int64)  # row 1 is void
    gt[0, :4] = 10  # cat 1
    gt[2, :] = 11  # cat 2
    gt[3, :4] = 12  # cat 3 crowd
    gt[3, 4:] = 13  # cat 3 crowd, listed last: the one panopticapi uses
    gt[4:6, :] = 14  # cat 1
    gt[6:, :] = 15  # cat 101
    gt_cats = {10: 1, 11: 2, 12: 3, 13: 3, 14: 1, 15: 101}
    gt_segs = [
        {"id": i, "category_id": c, "iscrowd": int(i in (12, 13)), "area": int((gt == i).sum())}
        for i, c in gt_cats.items()
    ]
    pred = np.zeros((8, 8), np.int64)
    pred[0, :2] = 100  # cat 1: IoU 2/4 = 0.5 exactly -> not a match: FP, and 10 is FN
    pred[1, :2] = pred[2, :2] = 101  # cat 2: half in void (not more) -> FP, and 11 is FN
    pred[1, 2:5] = pred[2, 2] = 102  # cat 2: 3/4 in void -> ignored
    pred[3, :4] = 103  # cat 3 on the first crowd segment -> FP
    pred[3, 4:6] = 104  # cat 3 on the last crowd segment -> ignored
    pred[3, 6:] = 106  # cat 3 on the last crowd segment -> ignored
    pred[4, :] = pred[1, 5:] = pred[5, 0] = 105  # cat 1: IoU 9 / (12 + 16 - 9 - 3) -> TP
    pred_cats = {100: 1, 101: 2, 102: 2, 103: 3, 104: 3, 105: 1, 106: 3}
    pred_segs = [{"id": i, "category_id": c} for i, c in pred_cats.items()]

    ours = pq.PQStat()
    ours.add(
        pq.match_image(*pq.pair_counts(gt, pred), gt_segs, pred_segs, {1: 0, 2: 0, 3: 0, 101: 0})
    )
    expected = {1: (1, 1, 1), 2: (0, 1, 1), 3: (0, 1, 0), 101: (0, 0, 1)}
    assert {c: (s.tp, s.fp, s.fn) for c, s in ours.pq_per_cat.items()} == expected
    assert ours[1].iou == 9 / 16

    _write_png(tmp_path / "gt", "a.png", gt)
    _write_png(tmp_path / "pred", "a.png", pred)
    gt_ann = {"image_id": 1, "file_name": "a.png", "segments_info": gt_segs}
    pred_ann = {"image_id": 1, "file_name": "a.png", "segments_info": pred_segs}
    cat_map = {c["id"]: c for c in cats}
    ref = _ref_image_stat(gt_ann, pred_ann, tmp_path / "gt", tmp_path / "pred", cat_map)
    _assert_stat_equal(ours, ref)
    results = pq.evaluate_id_maps([(gt, gt_segs)], [(pred, pred_segs)], cats)
    _assert_results_equal(results, _ref_results(ref, cat_map))
    assert results["Things"]["n"] == 3 and results["Stuff"]["n"] == 1


def test_pair_counts_edge_cases():
    one = pq.pair_counts(np.array([[3]]), np.array([[4]]))
    assert [a.tolist() for a in one] == [[3], [4], [1]]
    same = pq.pair_counts(np.full((5, 7), 2, np.uint8), np.zeros((5, 7), np.int16))
    assert [a.tolist() for a in same] == [[2], [0], [35]]
    assert all(a.dtype == np.int64 for a in same)
    # Non-contiguous views and raw RGBX words masked to 24 bits.
    gt = np.arange(24, dtype=np.int64).reshape(4, 6)[:, ::2] % 3
    words = (np.arange(12, dtype=np.uint32) % 2) | np.uint32(0xAB000000)
    g, p, c = pq.pair_counts(gt.ravel().astype(np.uint32), words, id_mask=0xFFFFFF)
    expected: dict[tuple[int, int], int] = {}
    for a, b in zip(gt.ravel().tolist(), (words & 0xFFFFFF).tolist(), strict=True):
        expected[(a, b)] = expected.get((a, b), 0) + 1
    assert list(zip(g.tolist(), p.tolist(), strict=True)) == sorted(expected)
    assert c.tolist() == [expected[k] for k in sorted(expected)]
    assert np.array_equal(pq.pair_counts(gt, gt)[2], [4, 4, 4])


def test_ground_truth_table_is_panopticapis_dict():
    ids, cats, crowd, areas = pq.ground_truth_table(
        [
            {"id": 5, "category_id": 1, "iscrowd": 1, "area": 3},
            {"id": 9, "category_id": 2},
            {"id": 5, "category_id": 3, "iscrowd": 0},  # last wins, first position kept
        ]
    )
    assert ids.tolist() == [5, 9] and cats.tolist() == [3, 2]
    assert crowd.tolist() == [False, False] and areas == [None, None]
    with pytest.raises(pq.PanopticFormatError, match="img: malformed ground-truth"):
        pq.ground_truth_table([{"id": 1}], "img")
