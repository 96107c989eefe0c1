"""Tests for oanet_jax.data.tfds (TFDS ``coco/2017_panoptic`` examples -> reader records).

On a hand-made TFDS-shaped example; the TFDS source end to end (a real TFDS dataset written from
the COCO sample) is in test_pipeline.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from oanet_jax.data import coco_panoptic, tfds


def _tfds_handmade():
    # 6 x 8 image, segments: 10 (thing label 0), 20 (stuff label 2), 30 (crowd thing label 1).
    ids = np.zeros((6, 8), np.int64)
    ids[0:3, 0:4] = 10
    ids[3:6, :] = 20
    ids[1:2, 5:8] = 30 + 256 * 3  # exercise the G channel: id 798
    pan = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)
    features = {
        "image": np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3),
        "panoptic_image": pan,
        "image/id": np.int64(77),
        "image/filename": b"000077.jpg",
        "panoptic_objects": {
            "id": np.asarray([10, 20, 798], np.int64),
            "label": np.asarray([0, 2, 1], np.int64),
            "is_crowd": np.asarray([False, False, True]),
            "bbox": np.zeros((3, 4), np.float32),
            "area": np.asarray([12, 24, 3], np.int64),
        },
    }
    return features, ids


def test_tfds_features_to_record_handmade():
    features, ids = _tfds_handmade()
    # TFDS label k -> contiguous id: labels 0, 1 things, 2 stuff; map label 1 -> class 0 etc.
    to_contiguous = np.asarray([1, 0, 2], np.int32)
    isthing = np.asarray([True, True, False])
    rec = tfds.tfds_features_to_record(features, to_contiguous, isthing)
    assert rec["image_id"] == 77 and rec["file_name"] == "000077.jpg"
    np.testing.assert_array_equal(rec["image"], features["image"])
    expected_sem = np.full((6, 8), 255, np.uint8)
    for sid, label in ((10, 0), (20, 2), (798, 1)):
        expected_sem[ids == sid] = to_contiguous[label]
    np.testing.assert_array_equal(rec["semantic"], expected_sem)
    np.testing.assert_array_equal(rec["segment_ids"], [10, 798])
    np.testing.assert_array_equal(rec["classes"], [1, 0])
    np.testing.assert_array_equal(rec["is_crowd"], [False, True])
    np.testing.assert_array_equal(rec["masks"][0], (ids == 10).astype(np.uint8))
    np.testing.assert_array_equal(rec["masks"][1], (ids == 798).astype(np.uint8))
    np.testing.assert_array_equal(rec["boxes"], [[0, 0, 4, 3], [5, 1, 8, 2]])
    assert rec["masks"].dtype == np.uint8 and rec["boxes"].dtype == np.float32
    np.testing.assert_array_equal(rec["ann_ids"], [-1, -1])
    # Errors: a PNG id without annotation; a label outside the mapping.
    bad = dict(features, panoptic_objects=dict(features["panoptic_objects"]))
    bad["panoptic_objects"]["id"] = np.asarray([10, 20, 799], np.int64)
    with pytest.raises(ValueError, match="image id 77.*798"):
        tfds.tfds_features_to_record(bad, to_contiguous, isthing)
    bad["panoptic_objects"]["id"] = np.asarray([10, 20, 798], np.int64)
    bad["panoptic_objects"]["label"] = np.asarray([0, 3, 1], np.int64)
    with pytest.raises(ValueError, match="out of range"):
        tfds.tfds_features_to_record(bad, to_contiguous, isthing)


def test_tfds_label_mapping():
    cats = [
        {"id": 101, "name": "sky", "isthing": 0},
        {"id": 5, "name": "tie", "isthing": 1},
        {"id": 1, "name": "person", "isthing": 1},
    ]
    table = coco_panoptic.CategoryTable.from_categories(cats)  # person, tie, sky
    names = [c["name"] for c in sorted(cats, key=lambda c: c["id"])]  # TFDS: file order
    mapping, isthing = tfds.tfds_label_mapping(names, table)
    assert mapping.tolist() == [0, 1, 2] and isthing.tolist() == [True, True, False]
    mapping, isthing = tfds.tfds_label_mapping(["sky", "person", "tie"], table)
    assert mapping.tolist() == [2, 0, 1]
    mapping, isthing = tfds.tfds_label_mapping(["a", "b", "c"], num_thing_classes=2)
    assert mapping.tolist() == [0, 1, 2] and isthing.tolist() == [True, True, False]
    with pytest.raises(ValueError, match="not in the category table"):
        tfds.tfds_label_mapping(["sky", "dog"], table)
