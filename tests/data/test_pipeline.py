"""Tests for oanet_jax.data.pipeline.

Per-example transforms are checked on hand-made records against independent references (torch's
grid_sample, antialiased bilinear and nearest-exact interpolation, hand-computed detectron2 sizes);
the tf.data pipeline end to end on the real COCO sample and on a small generated synthetic set
(order, determinism, resume, host sharding, eval padding), and the TFDS source on a hand-made
TFDS-shaped example and on the COCO sample written as a real TFDS ``coco/2017_panoptic`` dataset
(read through TFDS's own Coco builder; its batches must equal the raw-folder reader's).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # oracle; imported before tensorflow (conftest too)
import torch.nn.functional as F  # noqa: E402

from configs import base, tiny  # noqa: E402
from oanet_jax.data import coco_panoptic, pipeline, synthetic  # noqa: E402

# ------------------------------------------------------------------------------------ helpers

EXPECTED_DTYPES = {
    "image": np.float32,
    "semantic": np.uint8,
    "image_shape": np.int32,
    "orig_shape": np.int32,
    "scale": np.float32,
    "image_id": np.int64,
    "flipped": np.bool_,
    "example_valid": np.bool_,
    "boxes": np.float32,
    "classes": np.int32,
    "is_crowd": np.bool_,
    "valid": np.bool_,
    "masks": np.float32,
}


def _expected_shapes(cfg: pipeline.TransformConfig, batch: int | None = None) -> dict:
    hp, wp = cfg.image_size
    m, s = cfg.max_instances, cfg.mask_size
    shapes = {
        "image": (hp, wp, 3),
        "semantic": (hp, wp),
        "image_shape": (2,),
        "orig_shape": (2,),
        "scale": (),
        "image_id": (),
        "flipped": (),
        "example_valid": (),
        "boxes": (m, 4),
        "classes": (m,),
        "is_crowd": (m,),
        "valid": (m,),
        "masks": (m, s, s),
    }
    if batch is not None:
        shapes = {k: (batch, *v) for k, v in shapes.items()}
    return shapes


def _check_keys(ex: dict, cfg: pipeline.TransformConfig, batch: int | None = None) -> None:
    shapes = _expected_shapes(cfg, batch)
    assert set(ex) == set(shapes)
    for k, shape in shapes.items():
        assert ex[k].shape == shape, (k, ex[k].shape, shape)
        assert ex[k].dtype == EXPECTED_DTYPES[k], (k, ex[k].dtype)


def _check_padding(ex: dict) -> None:
    """Unbatched example: image 0 and semantic 255 outside image_shape, zero rows past valid."""
    h, w = (int(v) for v in ex["image_shape"])
    assert np.all(ex["image"][h:] == 0) and np.all(ex["image"][:, w:] == 0)
    assert np.all(ex["semantic"][h:] == 255) and np.all(ex["semantic"][:, w:] == 255)
    n = int(ex["valid"].sum())
    assert np.all(ex["valid"][:n]) and not np.any(ex["valid"][n:])  # valid rows first
    for k in ("boxes", "classes", "is_crowd", "masks"):
        assert not np.any(ex[k][n:]), k
    assert np.all(ex["masks"] >= 0) and np.all(ex["masks"] <= 1)


def _unbatch(batch: dict, i: int) -> dict:
    return {k: v[i] for k, v in batch.items()}


def _take(ds, n: int) -> list[dict]:
    it = ds.as_numpy_iterator()
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _grid_sample_crop(masks: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Oracle: torch grid_sample (bilinear, zeros, align_corners=False) at box-frame points."""
    n, h, w = masks.shape
    frac = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    b = torch.as_tensor(boxes, dtype=torch.float64)
    xs = b[:, 0:1] + frac[None] * (b[:, 2:3] - b[:, 0:1])  # [N, S] image x coordinates
    ys = b[:, 1:2] + frac[None] * (b[:, 3:4] - b[:, 1:2])
    gx = xs / w * 2 - 1
    gy = ys / h * 2 - 1
    grid = torch.stack(
        [gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], dim=-1
    )
    src = torch.as_tensor(np.ascontiguousarray(masks), dtype=torch.float64)[:, None]
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0].numpy()


def _blob_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """n random binary blobs (union of two ellipses), each non-empty."""
    yy, xx = np.mgrid[0:h, 0:w]
    masks = np.zeros((n, h, w), np.uint8)
    for i in range(n):
        for _ in range(2):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(2, h / 2), rng.uniform(2, w / 2)
            masks[i] |= (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
        masks[i, int(rng.integers(h)), int(rng.integers(w))] = 1
    return masks


def _record(seed: int = 0, h: int = 30, w: int = 50, n: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    masks = _blob_masks(rng, n, h, w)
    boxes, nonempty = coco_panoptic.boxes_from_masks(masks)
    assert nonempty.all()
    semantic = rng.integers(0, 7, (h, w)).astype(np.uint8)
    semantic[rng.random((h, w)) < 0.2] = 255
    return {
        "image": rng.integers(0, 256, (h, w, 3)).astype(np.uint8),
        "image_id": np.int64(1234),
        "file_name": "x.png",
        "semantic": semantic,
        "boxes": boxes,
        "classes": rng.integers(0, 4, n).astype(np.int32),
        "is_crowd": np.asarray([False, True, False][:n]),
        "masks": masks,
        "segment_ids": np.full(n, -1, np.int32),
        "ann_ids": np.arange(n, dtype=np.int64),
    }


SMALL = pipeline.TransformConfig(
    image_size=(64, 96),
    max_instances=5,
    mask_size=8,
    max_size=90,
    pixel_mean=(10.0, 20.0, 30.0),
    pixel_std=(2.0, 4.0, 8.0),
    channel_order="BGR",
)


# ------------------------------------------------------------------------------- transforms


def test_resize_shape_detectron2_values_and_limits():
    # Hand-computed with detectron2's ResizeShortestEdge rule.
    assert pipeline.resize_shape(480, 640, 800, 1333)[:2] == (800, 1067)  # 1066.67 -> 1067
    assert pipeline.resize_shape(427, 640, 800, 1333)[:2] == (800, 1199)  # 1199.06
    # 360x640 -> 800x1422.2 exceeds 1333 -> x 1333/1422.2 -> 749.8 x 1333.
    assert pipeline.resize_shape(360, 640, 800, 1333)[:2] == (750, 1333)
    assert pipeline.resize_shape(640, 360, 800, 1333)[:2] == (1333, 750)
    h, w, s = pipeline.resize_shape(100, 200, 50, 1000)
    assert (h, w) == (50, 100) and s == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(16, 2000, 2))
        short = int(rng.integers(32, 900))
        max_size = int(rng.integers(short, 1500))
        h, w, s = pipeline.resize_shape(height, width, short, max_size)
        assert max(h, w) <= max_size and min(h, w) <= short
        # Either the short side hits its target or the long side hits max_size.
        assert min(h, w) == short or max(h, w) == max_size
        assert abs(h - height * s) <= 0.5 + 1e-6 and abs(w - width * s) <= 0.5 + 1e-6


def test_nearest_resize_matches_torch_nearest_exact():
    rng = np.random.default_rng(1)
    for (h, w), (nh, nw) in [((30, 50), (40, 67)), ((37, 23), (11, 9)), ((64, 64), (128, 100))]:
        label = rng.integers(0, 256, (h, w)).astype(np.uint8)
        ref = F.interpolate(
            torch.as_tensor(label, dtype=torch.float32)[None, None], (nh, nw), mode="nearest-exact"
        )[0, 0].numpy()
        np.testing.assert_array_equal(pipeline.resize_nearest(label, nh, nw), ref.astype(np.uint8))


@pytest.mark.parametrize("size", [(40, 67), (13, 21)])  # up (plain bilinear), down (antialias)
def test_resize_image_matches_torch_antialiased_bilinear(size):
    image = np.random.default_rng(2).integers(0, 256, (30, 50, 3)).astype(np.uint8)
    ref = F.interpolate(
        torch.as_tensor(image, dtype=torch.float64).permute(2, 0, 1)[None],
        size,
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )[0].permute(1, 2, 0)
    out = pipeline.resize_image(image, *size)
    assert out.shape == (*size, 3) and out.dtype == np.uint8
    # PIL rounds to uint8 with fixed-point weights.
    assert np.abs(out.astype(np.float64) - ref.numpy()).max() <= 1.0


def test_crop_masks_matches_grid_sample():
    rng = np.random.default_rng(3)
    masks = _blob_masks(rng, 6, 37, 53)
    boxes, _ = coco_panoptic.boxes_from_masks(masks)
    # Also fractional boxes, boxes on the image border and partly outside it.
    extra = np.asarray(
        [[0.0, 0.0, 53.0, 37.0], [3.3, 4.7, 20.2, 9.9], [-4.0, 30.0, 10.0, 45.0], [50.5, 1, 60, 7]],
        np.float32,
    )
    boxes = np.concatenate([boxes, extra])
    masks = np.concatenate([masks, masks[:4]])
    for size in (8, 28):
        out = pipeline.crop_masks(masks, boxes, size)
        assert out.shape == (10, size, size) and out.dtype == np.float32
        np.testing.assert_allclose(out, _grid_sample_crop(masks, boxes, size), atol=1e-6)
    assert pipeline.crop_masks(np.zeros((0, 5, 5), np.uint8), np.zeros((0, 4)), 4).shape == (
        0,
        4,
        4,
    )


def test_crop_masks_box_frame_alignment():
    # A mask equal to its box (box >= S pixels per axis) crops to all ones; a mask filling the
    # left half of a box 2S wide crops to exactly the left half.
    masks = np.zeros((2, 40, 60), np.uint8)
    masks[0, 5:21, 10:42] = 1  # 16 x 32 box
    masks[1, 4:20, 20:28] = 1  # left half of the box x in [20, 36)
    boxes = np.asarray([[10, 5, 42, 21], [20, 4, 36, 20]], np.float32)
    out = pipeline.crop_masks(masks, boxes, 8)
    np.testing.assert_array_equal(out[0], np.ones((8, 8)))
    np.testing.assert_array_equal(out[1][:, :4], np.ones((8, 4)))
    np.testing.assert_array_equal(out[1][:, 4:], np.zeros((8, 4)))


def test_transform_record_shapes_padding_and_values():
    rec = _record()
    ex = pipeline.transform_record(rec, SMALL, short_size=40, flip=False)
    _check_keys(ex, SMALL)
    _check_padding(ex)
    # 30x50 -> short side 40 -> 40 x 66.67 -> 40 x 67 (long side 67 <= 90).
    assert ex["image_shape"].tolist() == [40, 67] and ex["orig_shape"].tolist() == [30, 50]
    assert ex["scale"] == pytest.approx(40 / 30)
    assert ex["example_valid"] and not ex["flipped"] and ex["image_id"] == 1234
    assert ex["valid"].tolist() == [True, True, True, False, False]
    np.testing.assert_array_equal(ex["classes"][:3], rec["classes"])
    np.testing.assert_array_equal(ex["is_crowd"][:3], rec["is_crowd"])
    scale = np.asarray([67 / 50, 40 / 30, 67 / 50, 40 / 30])
    np.testing.assert_allclose(ex["boxes"][:3], rec["boxes"] * scale, rtol=1e-6)
    # Semantic: nearest-exact (torch) of the original.
    sem = F.interpolate(
        torch.as_tensor(rec["semantic"], dtype=torch.float32)[None, None],
        (40, 67),
        mode="nearest-exact",
    )[0, 0].numpy()
    np.testing.assert_array_equal(ex["semantic"][:40, :67], sem)
    # Image: torch bilinear resize, RGB -> BGR, (x - mean) / std.
    ref = (
        F.interpolate(
            torch.as_tensor(rec["image"], dtype=torch.float64).permute(2, 0, 1)[None],
            (40, 67),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0]
        .permute(1, 2, 0)
        .numpy()[..., ::-1]
    )
    ref = (ref - np.asarray(SMALL.pixel_mean)) / np.asarray(SMALL.pixel_std)
    err = np.abs(ex["image"][:40, :67] - ref) * np.asarray(SMALL.pixel_std)  # in uint8 levels
    assert err.max() <= 1.0
    # Masks: the grid_sample crop of the full-resolution masks in the original boxes.
    np.testing.assert_allclose(
        ex["masks"][:3], _grid_sample_crop(rec["masks"], rec["boxes"], 8), atol=1e-6
    )


def test_normalisation_channel_order():
    rec = _record(seed=4)
    for order in ("BGR", "RGB"):
        cfg = pipeline.TransformConfig(
            image_size=(32, 64),
            max_instances=4,
            mask_size=4,
            max_size=64,
            pixel_mean=(1.0, 2.0, 3.0),
            pixel_std=(2.0, 3.0, 4.0),
            channel_order=order,
        )
        ex = pipeline.transform_record(rec, cfg, short_size=30, flip=False)  # no resize
        assert ex["image_shape"].tolist() == [30, 50]
        rgb = rec["image"].astype(np.float32)
        x = rgb[..., ::-1] if order == "BGR" else rgb
        expected = (x - np.float32([1, 2, 3])) / np.float32([2, 3, 4])
        np.testing.assert_allclose(ex["image"][:30, :50], expected, rtol=1e-6)
        np.testing.assert_array_equal(ex["semantic"][:30, :50], rec["semantic"])


def test_flip_consistency():
    rec = _record(seed=5)
    plain = pipeline.transform_record(rec, SMALL, short_size=40, flip=False)
    flip = pipeline.transform_record(rec, SMALL, short_size=40, flip=True)
    assert flip["flipped"] and not plain["flipped"]
    h, w = plain["image_shape"]
    np.testing.assert_array_equal(flip["image_shape"], plain["image_shape"])
    np.testing.assert_array_equal(flip["image"][:h, :w], plain["image"][:h, :w][:, ::-1])
    np.testing.assert_array_equal(flip["semantic"][:h, :w], plain["semantic"][:h, :w][:, ::-1])
    _check_padding(flip)
    n = 3
    pb, fb = plain["boxes"][:n], flip["boxes"][:n]
    np.testing.assert_allclose(fb[:, 0], w - pb[:, 2], atol=1e-5)
    np.testing.assert_allclose(fb[:, 2], w - pb[:, 0], atol=1e-5)
    np.testing.assert_array_equal(fb[:, [1, 3]], pb[:, [1, 3]])
    np.testing.assert_array_equal(flip["masks"], plain["masks"][:, :, ::-1])
    # Independently: the crop of the mirrored full-resolution masks in the mirrored boxes.
    width = rec["image"].shape[1]
    ob = rec["boxes"]
    mirrored = np.stack([width - ob[:, 2], ob[:, 1], width - ob[:, 0], ob[:, 3]], axis=1)
    crop = _grid_sample_crop(rec["masks"][:, :, ::-1], mirrored, SMALL.mask_size)
    np.testing.assert_allclose(flip["masks"][:n], crop, atol=1e-6)


def test_transform_errors_and_padding_example():
    rec = _record(n=3)
    cfg = pipeline.TransformConfig(image_size=(64, 96), max_instances=2, mask_size=4, max_size=90)
    with pytest.raises(ValueError, match="1234.*max_instances"):
        pipeline.transform_record(rec, cfg, short_size=40, flip=False)
    with pytest.raises(ValueError, match="larger than image_size"):
        big = pipeline.TransformConfig(
            image_size=(64, 96), max_instances=5, mask_size=4, max_size=200
        )
        pipeline.transform_record(rec, big, short_size=80, flip=False)  # 80 x 133 > 64 x 96
    pad = pipeline.padding_example(SMALL)
    _check_keys(pad, SMALL)
    assert not pad["example_valid"] and pad["image_id"] == -1
    assert np.all(pad["semantic"] == 255) and not np.any(pad["image"]) and not pad["valid"].any()


# ------------------------------------------------------------------------------- order / plan


def test_train_plan_epochs_hosts_and_determinism():
    n, hosts = 11, 2
    plans = [pipeline.TrainPlan(n, 7, h, hosts, (16, 24, 32)) for h in range(hosts)]
    length = plans[0].per_host_epoch
    assert length == 5
    for epoch in range(3):
        per_host = [[p(epoch * length + i)[0] for i in range(length)] for p in plans]
        assert not set(per_host[0]) & set(per_host[1])  # disjoint hosts
        assert len(set(per_host[0] + per_host[1])) == 2 * length  # no repeats in an epoch
        globals_ = [p(epoch * length + i)[3] for p in plans for i in range(length)]
        assert sorted(globals_) == list(range(epoch * 10, epoch * 10 + 10))
    first = [plans[0](i) for i in range(3 * length)]
    assert first == [pipeline.TrainPlan(n, 7, 0, hosts, (16, 24, 32))(i) for i in range(15)]
    other = [pipeline.TrainPlan(n, 8, 0, hosts, (16, 24, 32))(i) for i in range(15)]
    assert first != other
    epochs = [[first[e * length + i][0] for i in range(length)] for e in range(3)]
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # reshuffled per epoch
    flips = [f for _, f, _, _ in first]
    assert any(flips) and not all(flips)
    assert {s for _, _, s, _ in first} <= {16, 24, 32} and len({s for _, _, s, _ in first}) > 1
    no_flip = pipeline.TrainPlan(n, 7, 0, hosts, (16,), random_flip=False)
    assert not any(no_flip(i)[1] for i in range(20))
    with pytest.raises(ValueError):
        pipeline.TrainPlan(1, 0, 0, 2, (16,))


def test_eval_indices_hosts():
    idx = [pipeline.eval_indices(7, h, 3, 2) for h in range(3)]
    assert [len(i) for i in idx] == [4, 4, 4]  # ceil(ceil(7 / 3) / 2) = 2 batches each
    real = [set(i[i >= 0].tolist()) for i in idx]
    assert set().union(*real) == set(range(7)) and sum(len(r) for r in real) == 7
    assert idx[0].tolist() == [0, 3, 6, -1]


# -------------------------------------------------------------------------------- TFDS adapter


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
    rec = pipeline.tfds_features_to_record(features, to_contiguous, isthing)
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
        pipeline.tfds_features_to_record(bad, to_contiguous, isthing)
    bad["panoptic_objects"]["id"] = np.asarray([10, 20, 798], np.int64)
    bad["panoptic_objects"]["label"] = np.asarray([0, 3, 1], np.int64)
    with pytest.raises(ValueError, match="out of range"):
        pipeline.tfds_features_to_record(bad, to_contiguous, isthing)


def test_tfds_label_mapping():
    cats = [
        {"id": 101, "name": "sky", "isthing": 0},
        {"id": 5, "name": "tie", "isthing": 1},
        {"id": 1, "name": "person", "isthing": 1},
    ]
    table = coco_panoptic.CategoryTable.from_categories(cats)  # person, tie, sky
    names = [c["name"] for c in sorted(cats, key=lambda c: c["id"])]  # TFDS: file order
    mapping, isthing = pipeline.tfds_label_mapping(names, table)
    assert mapping.tolist() == [0, 1, 2] and isthing.tolist() == [True, True, False]
    mapping, isthing = pipeline.tfds_label_mapping(["sky", "person", "tie"], table)
    assert mapping.tolist() == [2, 0, 1]
    mapping, isthing = pipeline.tfds_label_mapping(["a", "b", "c"], num_thing_classes=2)
    assert mapping.tolist() == [0, 1, 2] and isthing.tolist() == [True, True, False]
    with pytest.raises(ValueError, match="not in the category table"):
        pipeline.tfds_label_mapping(["sky", "dog"], table)


# ------------------------------------------------------------------------- end to end: COCO


def _coco_config(sample: pathlib.Path, instances: bool = True):
    c = base.get_config()
    d = c.data
    d.root = str(sample)
    d.train.image_dir = d.eval.image_dir = "input_images"
    d.train.panoptic_json = d.eval.panoptic_json = "panoptic_examples.json"
    d.train.panoptic_dir = d.eval.panoptic_dir = "panoptic_examples"
    inst = "panoptic_coco_detection_format.json" if instances else ""
    d.train.instances_json = d.eval.instances_json = inst
    d.min_size_train = (200, 240)
    d.min_size_test = 240
    d.max_size = 320
    d.image_size = (320, 320)
    d.max_instances = 40
    d.mask_size = 16
    d.prefetch = 1
    return c


def test_coco_sample_train_batches_match_transform(coco_sample_dir):
    c = _coco_config(coco_sample_dir)
    cfg = pipeline.TransformConfig.from_config(c.data)
    reader = pipeline.make_reader(c.data, "train")
    assert reader.masks_from_instances and len(reader) == 2
    records = [reader.read(i) for i in range(len(reader))]
    ds = pipeline.build_dataset(
        c, "train", training=True, batch_size=2, seed=3, process_index=0, process_count=1
    )
    batches = _take(ds, 3)  # 3 epochs of the 2 images
    plan = pipeline.TrainPlan(2, 3, 0, 1, (200, 240))
    seen_flip, seen_sizes = set(), set()
    for step, batch in enumerate(batches):
        _check_keys(batch, cfg, batch=2)
        assert sorted(batch["image_id"].tolist()) == sorted(reader.image_ids)  # one epoch
        for i in range(2):
            ex = _unbatch(batch, i)
            index, flip, size, _ = plan(step * 2 + i)
            rec = records[index]
            assert ex["image_id"] == rec["image_id"] and bool(ex["flipped"]) == flip
            _check_padding(ex)
            h, w = (int(v) for v in ex["image_shape"])
            height, width = rec["image"].shape[:2]
            assert ex["orig_shape"].tolist() == [height, width]
            assert min(h, w) == size or max(h, w) == 320  # resize obeys min/max size
            assert max(h, w) <= 320
            n = len(rec["classes"])
            assert int(ex["valid"].sum()) == n
            sx, sy = w / width, h / height
            ob = rec["boxes"].astype(np.float64)
            x1, x2 = ob[:, 0] * sx, ob[:, 2] * sx
            if flip:
                x1, x2 = w - x2, w - x1
            expected = np.stack([x1, ob[:, 1] * sy, x2, ob[:, 3] * sy], axis=1)
            np.testing.assert_allclose(ex["boxes"][:n], expected, rtol=1e-5, atol=1e-4)
            np.testing.assert_array_equal(ex["classes"][:n], rec["classes"])
            # Everything equals the per-example transform of the same record and plan.
            ref = pipeline.transform_record(rec, cfg, short_size=size, flip=flip)
            for k in ref:
                np.testing.assert_array_equal(ex[k], ref[k], err_msg=k)
            seen_flip.add(flip)
            seen_sizes.add(size)
    assert seen_flip == {False, True} and seen_sizes == {200, 240}


def test_coco_sample_eval_padding_and_hosts(coco_sample_dir):
    c = _coco_config(coco_sample_dir)
    cfg = pipeline.TransformConfig.from_config(c.data)
    (batch,) = list(
        pipeline.build_dataset(
            c, "eval", training=False, batch_size=3, seed=0, process_index=0, process_count=1
        ).as_numpy_iterator()
    )
    _check_keys(batch, cfg, batch=3)
    assert batch["example_valid"].tolist() == [True, True, False]
    assert batch["image_id"].tolist() == [142238, 439180, -1]
    assert not batch["flipped"].any()
    for i in range(2):
        ex = _unbatch(batch, i)
        _check_padding(ex)
        height, width = (int(v) for v in ex["orig_shape"])
        # min_size_test 240 would make the long side > 320, so max_size decides.
        assert tuple(ex["image_shape"]) == pipeline.resize_shape(height, width, 240, 320)[:2]
        assert max(ex["image_shape"]) == 320
    pad = _unbatch(batch, 2)
    assert not pad["image"].any() and np.all(pad["semantic"] == 255) and not pad["valid"].any()
    # Two hosts: one image each, the same number of batches.
    per_host = [
        list(
            pipeline.build_dataset(
                c, "eval", training=False, batch_size=1, seed=0, process_index=h, process_count=2
            ).as_numpy_iterator()
        )
        for h in range(2)
    ]
    assert [len(b) for b in per_host] == [1, 1]
    assert [b[0]["image_id"].tolist() for b in per_host] == [[142238], [439180]]


# ---------------------------------------------------------------------- end to end: synthetic


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("synthetic_pipeline")
    synthetic.generate(str(out), num_images=16, num_val_images=3, seed=0, size=(64, 64))
    return out


def _tiny_config(root: pathlib.Path):
    c = tiny.get_config()
    c.data.root = str(root)
    c.data.min_size_train = (48, 56, 64)
    c.data.prefetch = 1
    return c


def test_synthetic_determinism_resume_and_hosts(synthetic_dir):
    c = _tiny_config(synthetic_dir)
    cfg = pipeline.TransformConfig.from_config(c.data)

    def run(start_step=0, seed=0, host=0, hosts=1, steps=4):
        ds = pipeline.build_dataset(
            c,
            "train",
            training=True,
            batch_size=4,
            seed=seed,
            start_step=start_step,
            process_index=host,
            process_count=hosts,
        )
        return _take(ds, steps)

    first = run()
    _check_keys(first[0], cfg, batch=4)
    for b in first:
        for i in range(4):
            _check_padding(_unbatch(b, i))
    _assert_batches_equal(first, run())  # same seed, same stream
    _assert_batches_equal(first[2:], run(start_step=2, steps=2))  # resume = batches 2, 3
    other = run(seed=1)
    assert any(
        not np.array_equal(a["image_id"], b["image_id"]) for a, b in zip(first, other, strict=True)
    )
    # One epoch = 16 images = 4 batches: each image exactly once.
    ids = np.concatenate([b["image_id"] for b in first])
    assert len(set(ids.tolist())) == 16
    # Two hosts: 8 images each per epoch, disjoint, together the whole split.
    h0, h1 = (run(host=h, hosts=2, steps=2) for h in range(2))
    ids0 = set(np.concatenate([b["image_id"] for b in h0]).tolist())
    ids1 = set(np.concatenate([b["image_id"] for b in h1]).tolist())
    assert len(ids0) == len(ids1) == 8 and not ids0 & ids1 and ids0 | ids1 == set(ids.tolist())
    # Overlapping instance masks from instances.json reach the batch.
    reader = pipeline.make_reader(c.data, "train")
    assert reader.masks_from_instances
    assert any(b["valid"].any() for b in first)


def test_synthetic_default_process_and_eval(synthetic_dir):
    c = _tiny_config(synthetic_dir)
    # process_index / process_count default to jax's (one process here).
    ds = pipeline.build_dataset(c, "eval", training=False, batch_size=2, seed=0)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == 2  # 3 val images -> 2 batches, the last one padded
    assert [b["example_valid"].tolist() for b in batches] == [[True, True], [True, False]]
    for b in batches:
        for i in range(2):
            ex = _unbatch(b, i)
            _check_padding(ex)
            if ex["example_valid"]:
                assert ex["image_shape"].tolist() == [64, 64]
    with pytest.raises(ValueError, match="start_step"):
        pipeline.build_dataset(c, "eval", training=False, batch_size=2, seed=0, start_step=1)


_EXIT_SCRIPT = """
import sys
import torch  # before tensorflow
from configs import tiny
from oanet_jax.data import pipeline
c = tiny.get_config()
c.data.root = sys.argv[1]
it = pipeline.build_dataset(
    c, "train", training=True, batch_size=2, seed=0, process_index=0, process_count=1
).as_numpy_iterator()
next(it)
print("batch ok", flush=True)
# Exit with the iterator alive and tf.data still filling its buffers.
"""


def test_interpreter_exits_with_live_iterator(synthetic_dir):
    # Without the pipeline's atexit drain, tf.data threads calling the numpy transform during
    # interpreter finalisation deadlock the exit.
    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT, str(synthetic_dir)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "batch ok" in proc.stdout


# ----------------------------------------------------------------- TFDS end to end (real files)


@pytest.fixture(scope="session")
def tfds_coco_dir(coco_sample_dir, tmp_path_factory) -> pathlib.Path:
    """The COCO sample written as a real TFDS ``coco/2017_panoptic`` dataset (train = validation).

    Uses the registered Coco builder's own features and TFDS's writer, so ``tfds.builder(
    'coco/2017_panoptic', data_dir=...)`` reads it as it reads a user-prepared dataset.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path_factory.mktemp("tfds")
    features = tfds.builder("coco/2017_panoptic", data_dir=str(data_dir)).info.features
    pan = json.loads((coco_sample_dir / "panoptic_examples.json").read_text())
    names = [c["name"] for c in pan["categories"]]  # TFDS: label names in file order
    features["panoptic_objects"]["label"].names = names
    name_of = {c["id"]: c["name"] for c in pan["categories"]}
    images = {img["id"]: img for img in pan["images"]}
    examples = []
    for key, ann in enumerate(pan["annotations"]):
        img = images[ann["image_id"]]
        height, width = img["height"], img["width"]
        objects = []
        for seg in ann["segments_info"]:
            x, y, w, h = seg["bbox"]
            box = tfds.features.BBox(y / height, x / width, (y + h) / height, (x + w) / width)
            objects.append(
                {
                    "id": seg["id"],
                    "area": seg["area"],
                    "bbox": box,
                    "label": name_of[seg["category_id"]],
                    "is_crowd": bool(seg["iscrowd"]),
                }
            )
        example = {
            "image": str(coco_sample_dir / "input_images" / img["file_name"]),
            "image/filename": img["file_name"],
            "image/id": ann["image_id"],
            "panoptic_image": str(coco_sample_dir / "panoptic_examples" / ann["file_name"]),
            "panoptic_image/filename": ann["file_name"],
            "panoptic_objects": objects,
        }
        examples.append((key, example))
    tfds.dataset_builders.store_as_tfds_dataset(
        name="coco",
        version="1.1.0",
        config="2017_panoptic",
        features=features,
        split_datasets={"train": examples, "validation": examples},
        data_dir=str(data_dir),
    )
    return data_dir


def test_tfds_source_equals_reader_source(coco_sample_dir, tfds_coco_dir):
    reader_cfg = _coco_config(coco_sample_dir, instances=False)  # masks from segments, as TFDS
    tfds_cfg = _coco_config(coco_sample_dir, instances=False)
    tfds_cfg.data.source = "tfds"
    tfds_cfg.data.tfds_data_dir = str(tfds_coco_dir)
    cfg = pipeline.TransformConfig.from_config(tfds_cfg.data)

    def eval_batches(c):
        ds = pipeline.build_dataset(
            c, "eval", training=False, batch_size=3, seed=0, process_index=0, process_count=1
        )
        return list(ds.as_numpy_iterator())

    (a,), (b,) = eval_batches(tfds_cfg), eval_batches(reader_cfg)
    _check_keys(a, cfg, batch=3)
    assert a["example_valid"].tolist() == [True, True, False]
    order = np.argsort(a["image_id"][:2])  # TFDS stores examples in its own (hashed) order
    for k in a:
        # Same pixels (both decode the JPEG with PIL), same semantic map, instances and crops.
        np.testing.assert_array_equal(a[k][:2][order], b[k][:2], err_msg=k)
        np.testing.assert_array_equal(a[k][2], b[k][2], err_msg=k)

    # Training: deterministic for a seed, a resume yields the later batches, hosts disjoint.
    def train(start_step=0, steps=3, host=0, hosts=1):
        ds = pipeline.build_dataset(
            tfds_cfg,
            "train",
            training=True,
            batch_size=1,
            seed=5,
            start_step=start_step,
            process_index=host,
            process_count=hosts,
        )
        return _take(ds, steps)

    full = train()
    _check_keys(full[0], cfg, batch=1)
    _assert_batches_equal(full, train())
    _assert_batches_equal(full[1:], train(start_step=1, steps=2))
    ids = [{int(b["image_id"][0]) for b in train(host=h, hosts=2, steps=2)} for h in range(2)]
    assert len(ids[0]) == len(ids[1]) == 1 and ids[0] != ids[1]
