"""PanopticEvaluator (PQ in memory) and the ground truth, on the real COCO panoptic sample.

* Ground truth as prediction (crowd segments included) through the files path
  (prediction_to_original, PNG writing, pq_compute): PQ 100; the same for stuff mIoU.
* The evaluator API: ``reset / process / evaluate`` on the ground truth as a padded "merge output":
  PQ 100 in memory, equal to `pq.pq_compute` on the files it writes with ``write_predictions``,
  on a prediction that is not the ground truth too; each PNG decoded once over several
  evaluations; the device-statistics hook.
"""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from oanet_jax.data import transforms
from oanet_jax.data.coco_panoptic import CategoryTable
from oanet_jax.eval import ground_truth as gt_lib
from oanet_jax.eval.panoptic import PanopticEvaluator, summarize_pq
from oanet_jax.eval.semantic import SemanticEvaluator, StuffConfusion
from oanet_jax.panoptic import io as pan_io
from oanet_jax.panoptic import pq

PADDED = (700, 704)


def _gt_as_merge_output(gt_map, segments_info, table, padded):
    """A padded 'merge output' (id map + segment arrays, contiguous ids) equal to the GT."""
    h, w = gt_map.shape
    big = np.zeros(padded, np.int32)
    big[:h, :w] = gt_map
    cats = [table.to_contiguous(s["category_id"]) for s in segments_info]
    segments = {
        "id": np.asarray([s["id"] for s in segments_info], np.int32),
        "category": np.asarray(cats, np.int32),
        "isthing": np.asarray([table.isthing[c] for c in cats]),
        "score": np.ones(len(cats), np.float32),
        "valid": np.asarray([np.any(gt_map == s["id"]) for s in segments_info]),
    }
    return big, segments


@pytest.fixture(scope="module")
def coco_gt(coco_sample_dir, tmp_path_factory):
    """The sample as the eval split: (config.data, ground truth JSON dict)."""
    gt_json = json.loads((coco_sample_dir / "panoptic_examples.json").read_text())
    gt_json["categories"] = json.loads(
        (coco_sample_dir / "panoptic_coco_categories.json").read_text()
    )
    gt_file = tmp_path_factory.mktemp("gt") / "gt.json"
    gt_file.write_text(json.dumps(gt_json))
    data = ml_collections.ConfigDict(
        {
            "root": "",
            "eval": {
                "panoptic_json": str(gt_file),
                "panoptic_dir": str(coco_sample_dir / "panoptic_examples"),
                "instances_json": "",
            },
        }
    )
    return data, gt_json


def test_ground_truth_as_prediction_scores_100(coco_sample_dir, coco_gt, tmp_path):
    data, gt_json = coco_gt
    gt_file = data.eval.panoptic_json
    gt_folder = coco_sample_dir / "panoptic_examples"
    table = CategoryTable.from_categories(gt_json["categories"])
    pred_folder = tmp_path / "pred"
    annotations = []
    stuff = StuffConfusion(table.num_things, table.num_stuff)
    for ann in gt_json["annotations"]:
        gt_map = pan_io.read_panoptic_png(gt_folder / ann["file_name"])
        assert gt_map.max() > (1 << 16)  # real COCO ids use all three bytes
        padded, segments = _gt_as_merge_output(gt_map, ann["segments_info"], table, PADDED)
        id_map, segs = transforms.prediction_to_original(
            padded, segments, gt_map.shape, gt_map.shape, table
        )
        np.testing.assert_array_equal(id_map, gt_map)
        segs = pan_io.write_prediction(str(pred_folder), ann["file_name"], id_map, segs)
        annotations.append(
            {"image_id": ann["image_id"], "file_name": ann["file_name"], "segments_info": segs}
        )
        semantic = gt_lib.semantic_from_panoptic(gt_map, ann["segments_info"], table)
        stuff_pred = np.where(
            semantic >= table.num_things, semantic.astype(np.int64) - table.num_things, -1
        )
        stuff.update(stuff_pred, semantic)
    pred_file = tmp_path / "pred.json"
    pan_io.write_predictions_json(str(pred_file), annotations, gt_json["categories"])
    result = pq.pq_compute(str(gt_file), str(pred_file), str(gt_folder), str(pred_folder))
    summary = summarize_pq(result, table)
    assert summary["PQ"] == pytest.approx(100.0)
    assert summary["PQ_th"] == pytest.approx(100.0) and summary["PQ_st"] == pytest.approx(100.0)
    assert summary["n_th"] > 0 and summary["n_st"] > 0
    assert summary["per_class"]["person"]["PQ"] == pytest.approx(100.0)
    miou = stuff.result(table)
    assert miou["mIoU"] == pytest.approx(100.0) and miou["n"] > 0


def test_decoded_ground_truth_matches_the_png(coco_gt):
    data, gt_json = coco_gt
    gt = gt_lib.load_panoptic_ground_truth(data)
    for ann in gt_json["annotations"]:
        image = gt.image(ann["image_id"])
        id_map = pan_io.read_panoptic_png(f"{gt.folder}/{ann['file_name']}")
        source = np.asarray([0] + [s["source_id"] for s in image.segments_info])
        assert image.index_map.dtype == np.uint8
        np.testing.assert_array_equal(source[image.index_map], id_map)
        np.testing.assert_array_equal(
            image.semantic, gt_lib.semantic_from_panoptic(id_map, ann["segments_info"], gt.table)
        )
        assert [s["id"] for s in image.segments_info] == list(range(1, len(source)))
    assert gt.decode_count == len(gt_json["annotations"])
    with pytest.raises(KeyError, match="no annotation"):
        gt.image(123456789)


def _batch(gt, gt_json, shift=0):
    """Host inputs/outputs of one batch of 3 (the 2 sample images + 1 padding example): the
    ground truth (moved right by `shift` pixels) as the merge output of both orderings."""
    inputs = {k: [] for k in ("image_id", "image_shape", "orig_shape", "example_valid")}
    id_maps, tables = [], []
    for ann in gt_json["annotations"]:
        gt_map = pan_io.read_panoptic_png(f"{gt.folder}/{ann['file_name']}")
        if shift:  # a different prediction: the map moved right by `shift` pixels
            gt_map = np.pad(gt_map, ((0, 0), (shift, 0)))[:, : gt_map.shape[1]]
        padded, segments = _gt_as_merge_output(gt_map, ann["segments_info"], gt.table, PADDED)
        id_maps.append(padded)
        tables.append(segments)
        inputs["image_id"].append(ann["image_id"])
        inputs["image_shape"].append(gt_map.shape)
        inputs["orig_shape"].append(gt_map.shape)
        inputs["example_valid"].append(True)
    id_maps.append(np.full(PADDED, 5, np.int32))  # padding example: garbage, must be skipped
    tables.append({k: v[:1] for k, v in tables[0].items()})
    for k, v in (("image_id", -1), ("image_shape", (0, 0)), ("orig_shape", (0, 0))):
        inputs[k].append(v)
    inputs["example_valid"].append(False)
    width = max(len(t["id"]) for t in tables)
    segments = {
        k: np.stack([np.pad(t[k], (0, width - len(t[k]))) for t in tables]) for k in tables[0]
    }
    merged = {"id_map": np.stack(id_maps), "segments": segments}
    outputs = {"panoptic": {"score": merged, "srm": merged}}
    return {k: np.asarray(v) for k, v in inputs.items()}, outputs


def test_panoptic_evaluator_in_memory_equals_files(coco_gt, tmp_path):
    data, gt_json = coco_gt
    gt = gt_lib.load_panoptic_ground_truth(data)
    evaluator = PanopticEvaluator(gt, ("score", "srm"))
    inputs, outputs = _batch(gt, gt_json)
    evaluator.process(inputs, outputs)
    result = evaluator.evaluate()["panoptic"]
    assert result["score"]["PQ"] == pytest.approx(100.0) == result["srm"]["PQ"]
    assert result["score"]["n_th"] > 0 and result["score"]["n_st"] > 0
    assert evaluator.image_ids == [a["image_id"] for a in gt_json["annotations"]]
    assert evaluator.files == {}  # nothing written by default
    assert gt.decode_count == 2

    # A prediction that is not the ground truth: in memory == pq_compute on the written files.
    evaluator = PanopticEvaluator(gt, ("srm",), write_predictions=True, output_dir=str(tmp_path))
    shifted_inputs, shifted = _batch(gt, gt_json, shift=10)
    evaluator.process(shifted_inputs, shifted)
    memory = evaluator.evaluate()["panoptic"]["srm"]
    assert 5.0 < memory["PQ"] < 100.0
    files = pq.pq_compute(
        evaluator.files["panoptic_gt_json"],
        evaluator.files["panoptic_srm_json"],
        gt.folder,
        evaluator.files["panoptic_srm_folder"],
    )
    assert memory == summarize_pq(files, gt.table)

    # reset forgets the images, not the decoded ground truth.
    evaluator.reset()
    with pytest.raises(ValueError, match="no valid example"):
        evaluator.evaluate()
    evaluator.process(inputs, outputs)
    assert evaluator.evaluate()["panoptic"]["srm"]["PQ"] == pytest.approx(100.0)
    semantic = SemanticEvaluator(gt)  # shares the decoded images
    semantic.process(inputs, {"stuff_labels": np.full((3, *PADDED), -1, np.int32)})
    assert semantic.evaluate()["stuff"]["mIoU"] == 0.0
    assert gt.decode_count == 2


def test_device_pq_inputs_equal_ground_truth_to_device(coco_gt, tmp_path):
    """`DevicePQ.batch_arrays` (cached index maps + cached tables) == converting the raw PNGs,
    also for a PNG id the JSON does not list (neither void nor a segment: index G + 1)."""
    from oanet_jax.eval.panoptic import DevicePQ
    from oanet_jax.panoptic import pq_device

    data, gt_json = coco_gt
    gt_json = json.loads(json.dumps(gt_json))
    dropped = gt_json["annotations"][0]["segments_info"].pop(0)  # its pixels become unlisted
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(gt_json))
    data = ml_collections.ConfigDict(data.to_dict())
    data.eval.panoptic_json = str(gt_file)
    gt = gt_lib.load_panoptic_ground_truth(data)
    dev = DevicePQ(gt, ("srm",))
    annotations = gt_json["annotations"]
    batch = {
        "image_id": np.asarray([a["image_id"] for a in annotations] + [-1]),
        "example_valid": np.asarray([True] * len(annotations) + [False]),
        "orig_shape": np.zeros((len(annotations) + 1, 2), np.int32),
    }
    to_contiguous = {int(d): c for c, d in enumerate(gt.table.dataset_ids)}
    for _ in range(2):  # the second call uses the cached tables
        arrays = dev.batch_arrays(batch)
        for i, ann in enumerate(annotations):
            raw = pan_io.read_panoptic_png(f"{gt.folder}/{ann['file_name']}")
            want = pq_device.ground_truth_to_device(
                raw, ann["segments_info"], to_contiguous, dev.max_segments, dev.canvas
            )
            for key, value in want.items():
                np.testing.assert_array_equal(arrays[f"gt_{key}"][i], value, err_msg=key)
        assert not arrays["gt_index_map"][-1].any() and not arrays["gt_valid"][-1].any()
    raw = pan_io.read_panoptic_png(f"{gt.folder}/{annotations[0]['file_name']}")
    assert (
        arrays["gt_index_map"][0][: raw.shape[0], : raw.shape[1]][raw == dropped["id"]]
        == dev.max_segments + 1
    ).all()
