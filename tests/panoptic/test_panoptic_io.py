"""COCO panoptic IO: id <-> RGB (against panopticapi.utils), PNG round trips, segment
areas/bboxes (against loops), JSON (the crop/resize back to the original image is tested in
tests/data/test_transforms_inverse.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from oracles import blocky_ids, loop_areas_boxes
from PIL import Image

from oanet_jax.data import transforms
from oanet_jax.panoptic import io as pio
from oanet_jax.panoptic import pq

pan_utils = pytest.importorskip("panopticapi.utils")


def test_id_rgb_against_panopticapi():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1 << 24, (17, 13))
    ids[0, :3] = [0, 1, (1 << 24) - 1]
    rgb = pio.id_map_to_rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (17, 13, 3)
    np.testing.assert_array_equal(rgb, pan_utils.id2rgb(ids))
    back = pio.rgb_to_id(rgb)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, pan_utils.rgb2id(rgb))
    np.testing.assert_array_equal(back, ids)
    with pytest.raises(ValueError, match="must be in"):
        pio.id_map_to_rgb(np.array([[1 << 24]]))
    with pytest.raises(ValueError, match="must be in"):
        pio.id_map_to_rgb(np.array([[-1]]))
    with pytest.raises(ValueError, match="integer"):
        pio.id_map_to_rgb(np.zeros((2, 2), np.float32))


def test_png_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    ids = blocky_ids(rng, (45, 61), 30, block=3)
    ids[0, 0] = (1 << 24) - 1
    segs = [{"id": int(i), "category_id": 7, "score": np.float32(0.5)} for i in np.unique(ids) if i]
    segs.append({"id": 99, "category_id": 7})  # not in the map: dropped
    written = pio.write_prediction(tmp_path / "pred", "a.png", ids, segs)
    back = pio.read_panoptic_png(tmp_path / "pred" / "a.png")
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, ids)
    # Independent decoding: PIL + panopticapi's rgb2id.
    np.testing.assert_array_equal(
        pan_utils.rgb2id(np.array(Image.open(tmp_path / "pred" / "a.png"))), ids
    )
    expected = loop_areas_boxes(ids)
    assert [s["id"] for s in written] == [s["id"] for s in segs[:-1]]
    for s in written:
        assert (s["area"], s["bbox"]) == expected[s["id"]]
        assert s["category_id"] == 7
    # RGBA (alpha ignored, as panopticapi) and palette PNGs read the same ids.
    rgb = pio.id_map_to_rgb(ids)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (*ids.shape, 1), dtype=np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(pio.read_panoptic_png(tmp_path / "rgba.png"), ids)
    Image.fromarray(rgb, "RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(
        tmp_path / "p.png"
    )
    pal = Image.open(tmp_path / "p.png")
    assert pal.mode == "P"
    np.testing.assert_array_equal(
        pio.read_panoptic_png(tmp_path / "p.png"), pan_utils.rgb2id(np.array(pal.convert("RGB")))
    )
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "i16.png")
    with pytest.raises(pio.PanopticFormatError, match="cannot hold"):
        pio.read_panoptic_png(tmp_path / "i16.png")


def test_write_prediction_rejects_inconsistent_segments(tmp_path):
    ids = np.array([[0, 5], [6, 6]])
    with pytest.raises(pio.PanopticFormatError, match=r"\[6\] are in the id map but not"):
        pio.write_prediction(tmp_path, "x.png", ids, [{"id": 5, "category_id": 1}])
    dup = [{"id": 5, "category_id": 1}, {"id": 6, "category_id": 1}, {"id": 5, "category_id": 2}]
    with pytest.raises(pio.PanopticFormatError, match="duplicate segment id 5"):
        pio.write_prediction(tmp_path, "x.png", ids, dup)
    assert not (tmp_path / "x.png").exists()


def test_segments_area_boxes_against_loop():
    rng = np.random.default_rng(3)
    ids = blocky_ids(rng, (33, 47), 9, block=5)
    ids[rng.random(ids.shape) < 0.05] = 5  # scattered pixels: boxes span the image
    assert pio.segment_areas_and_boxes(ids) == loop_areas_boxes(ids)


def test_predictions_json_round_trip_and_pq(tmp_path, coco_sample_dir):
    """Written predictions (the ground truth itself, resized down and back) evaluate as
    `evaluate_id_maps` does on the same maps, and their JSON holds plain types."""
    gt_file = coco_sample_dir / "panoptic_examples.json"
    gt_json = json.loads(gt_file.read_text())
    gt_folder = coco_sample_dir / "panoptic_examples"
    annotations, gt_items, pred_items = [], [], []
    for ann in gt_json["annotations"]:
        gt_map = pio.read_panoptic_png(gt_folder / ann["file_name"])
        big_h, big_w = gt_map.shape
        small = transforms.crop_and_resize_to_original(
            gt_map, gt_map.shape, (big_h // 3, big_w // 3), ann["segments_info"]
        )[0]
        padded = np.zeros((big_h // 3 + 5, big_w // 3 + 7), np.int64)
        padded[: small.shape[0], : small.shape[1]] = small
        segs = [
            {"id": np.int64(s["id"]), "category_id": np.int32(s["category_id"])}
            for s in ann["segments_info"]
        ]
        pred_map, segs = transforms.crop_and_resize_to_original(
            padded, small.shape, gt_map.shape, segs
        )
        segs = pio.write_prediction(tmp_path / "pred", ann["file_name"], pred_map, segs)
        annotations.append(
            pio.segments_to_coco_annotation(np.int64(ann["image_id"]), ann["file_name"], segs)
        )
        gt_items.append((gt_map, ann["segments_info"]))
        pred_items.append((pred_map, segs))
    pio.write_predictions_json(tmp_path / "pred.json", annotations, gt_json["categories"])
    written = json.loads((tmp_path / "pred.json").read_text())
    assert written["categories"] == gt_json["categories"]
    seg0 = written["annotations"][0]["segments_info"][0]
    assert set(seg0) == {"id", "category_id", "iscrowd", "area", "bbox"}
    results = pq.pq_compute(str(gt_file), str(tmp_path / "pred.json"), str(gt_folder))
    assert results == pq.evaluate_id_maps(gt_items, pred_items, gt_json["categories"])
    assert 0.5 < results["All"]["pq"] < 1.0  # lossy resize: high but not perfect
    with pytest.raises(pio.PanopticFormatError, match="two annotations for image id"):
        pio.write_predictions_json(tmp_path / "dup.json", annotations * 2, [])
    assert not (tmp_path / "dup.json").exists()
