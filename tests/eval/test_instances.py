"""COCO box / mask AP: the panoptic -> instances conversion against panopticapi's converter
output (COCO sample), the same from the decoded-ground-truth cache, AP 100 for the ground truth as
results, detection rescaling by hand."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from oanet_jax.data import synthetic
from oanet_jax.data.coco_panoptic import CategoryTable
from oanet_jax.eval import ground_truth as gt_lib
from oanet_jax.eval.instances import InstancesEvaluator, coco_instance_ap, detections_to_coco


def test_instances_from_panoptic_matches_panopticapi_converter(coco_sample_dir):
    from pycocotools import mask as mask_utils

    gt_json = json.loads((coco_sample_dir / "panoptic_examples.json").read_text())
    categories = json.loads((coco_sample_dir / "panoptic_coco_categories.json").read_text())
    gt_json["categories"] = categories
    ours = gt_lib.instances_from_panoptic(gt_json, str(coco_sample_dir / "panoptic_examples"))
    ref = json.loads((coco_sample_dir / "panoptic_coco_detection_format.json").read_text())
    thing_ids = {c["id"] for c in categories if c["isthing"]}
    ref_things = [a for a in ref["annotations"] if a["category_id"] in thing_ids]
    assert len(ours["annotations"]) == len(ref_things) > 0
    assert sum(a["iscrowd"] for a in ours["annotations"]) > 0
    assert {c["id"] for c in ours["categories"]} == thing_ids
    for a, r in zip(ours["annotations"], ref_things, strict=True):
        for key in ("image_id", "category_id", "area", "bbox", "iscrowd"):
            assert a[key] == r[key], key
        np.testing.assert_array_equal(
            mask_utils.decode(a["segmentation"]), mask_utils.decode(r["segmentation"])
        )

    # The ground truth as results: AP 100 for boxes and masks.
    image_ids = [im["id"] for im in ours["images"]]
    crowdless = [a for a in ours["annotations"] if not a["iscrowd"]]
    boxes = [{**a, "score": 1.0} for a in crowdless]
    segms = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "segmentation": a["segmentation"],
            "score": 1.0,
        }
        for a in crowdless
    ]
    for iou_type, res in (("bbox", boxes), ("segm", segms)):
        ap = coco_instance_ap(
            ours, [{k: v for k, v in r.items() if k != "id"} for r in res], image_ids, iou_type
        )
        assert ap["AP"] == pytest.approx(100.0) and ap["AP50"] == pytest.approx(100.0)
    assert coco_instance_ap(ours, [], image_ids, "bbox")["AP"] == 0.0


def test_instances_from_the_decoded_cache_equal_the_file_conversion(coco_sample_dir, tmp_path):
    gt_json = json.loads((coco_sample_dir / "panoptic_examples.json").read_text())
    gt_json["categories"] = json.loads(
        (coco_sample_dir / "panoptic_coco_categories.json").read_text()
    )
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    folder = str(coco_sample_dir / "panoptic_examples")
    data = ml_collections.ConfigDict(
        {"root": "", "eval": {"panoptic_json": str(tmp_path / "gt.json"), "panoptic_dir": folder}}
    )
    gt = gt_lib.load_panoptic_ground_truth(data)
    want = gt_lib.instances_from_panoptic(gt_json, folder)
    evaluator = InstancesEvaluator(gt)
    d = 3
    n = len(gt_json["annotations"])
    inputs = {
        "image_id": np.asarray([a["image_id"] for a in gt_json["annotations"]]),
        "image_shape": np.full((n, 2), 64),
        "orig_shape": np.full((n, 2), 64),
        "example_valid": np.ones(n, bool),
    }
    outputs = {
        "boxes": np.zeros((n, d, 4), np.float32),
        "scores": np.zeros((n, d), np.float32),
        "classes": np.zeros((n, d), np.int32),
        "valid": np.zeros((n, d), bool),
        "masks": np.zeros((n, d, 28, 28), np.float32),
    }
    evaluator.process(inputs, outputs)
    assert evaluator._ground_truth() == want
    assert evaluator.evaluate()["bbox"]["AP"] == 0.0  # no detection at all
    assert gt.decode_count == n


def test_detections_to_coco_rescales_to_the_original_image():
    from pycocotools import mask as mask_utils

    table = CategoryTable.from_categories(synthetic.CATEGORIES)
    boxes = np.asarray([[10, 5, 30, 25], [0, 0, 4, 4], [1, 1, 3, 3]], np.float32)
    masks = np.ones((3, 28, 28), np.float32)
    bbox, segm = detections_to_coco(
        42,
        boxes,
        np.asarray([0.9, 0.8, 0.7]),
        np.asarray([3, 1, 0]),
        np.asarray([True, True, False]),
        masks,
        (50, 100),
        (100, 200),
        table,
    )
    assert len(bbox) == len(segm) == 2
    assert bbox[0]["bbox"] == pytest.approx([20, 10, 40, 40])
    assert bbox[0]["category_id"] == synthetic.TIE and bbox[1]["category_id"] == synthetic.CAR
    assert bbox[0]["score"] == pytest.approx(0.9) and bbox[0]["image_id"] == 42
    decoded = mask_utils.decode(segm[0]["segmentation"])
    assert decoded.shape == (100, 200)
    expected = np.zeros((100, 200), np.uint8)
    expected[10:50, 20:60] = 1
    np.testing.assert_array_equal(decoded, expected)
