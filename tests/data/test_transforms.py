"""Tests for oanet_jax.data.transforms (the forward per-example transform).

Checked on hand-made records against independent references: torch's grid_sample (mask crops),
antialiased bilinear (image) and nearest-exact (label map) interpolation, hand-computed
detectron2 sizes.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # oracle; imported before tensorflow (conftest too)
import torch.nn.functional as F  # noqa: E402
from oracles import grid_sample_crop  # noqa: E402

from oanet_jax.data import coco_panoptic, spec, transforms  # noqa: E402

# ------------------------------------------------------------------------------------ helpers


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


SMALL = transforms.TransformConfig(
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
    assert transforms.resize_shape(480, 640, 800, 1333)[:2] == (800, 1067)  # 1066.67 -> 1067
    assert transforms.resize_shape(427, 640, 800, 1333)[:2] == (800, 1199)  # 1199.06
    # 360x640 -> 800x1422.2 exceeds 1333 -> x 1333/1422.2 -> 749.8 x 1333.
    assert transforms.resize_shape(360, 640, 800, 1333)[:2] == (750, 1333)
    assert transforms.resize_shape(640, 360, 800, 1333)[:2] == (1333, 750)
    h, w, s = transforms.resize_shape(100, 200, 50, 1000)
    assert (h, w) == (50, 100) and s == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(16, 2000, 2))
        short = int(rng.integers(32, 900))
        max_size = int(rng.integers(short, 1500))
        h, w, s = transforms.resize_shape(height, width, short, max_size)
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
        np.testing.assert_array_equal(
            transforms.resize_nearest(label, nh, nw), ref.astype(np.uint8)
        )


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
    out = transforms.resize_image(image, *size)
    assert out.shape == (*size, 3) and out.dtype == np.uint8
    # PIL rounds to uint8 with fixed-point weights.
    assert np.abs(out.astype(np.float64) - ref.numpy()).max() <= 1.0


def test_transform_record_shapes_padding_and_values(check_padding):
    rec = _record()
    ex = transforms.transform_record(rec, SMALL, short_size=40, flip=False)
    spec.validate(ex, SMALL, train=False)
    check_padding(ex)
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
    # Image: uint8 RGB, torch bilinear resize (normalisation happens on device).
    ref = (
        F.interpolate(
            torch.as_tensor(rec["image"], dtype=torch.float64).permute(2, 0, 1)[None],
            (40, 67),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    assert ex["image"].dtype == np.uint8
    err = np.abs(ex["image"][:40, :67] - ref)  # in uint8 levels
    assert err.max() <= 1.0
    # Masks: the grid_sample crop of the full-resolution masks in the original boxes.
    np.testing.assert_allclose(
        ex["masks"][:3], grid_sample_crop(rec["masks"], rec["boxes"], 8), atol=1e-6
    )


def test_normalize_image_channel_order_and_padding():
    """On-device normalisation: the float32 values the host transform used to ship."""
    rec = _record(seed=4)
    for order in ("BGR", "RGB"):
        cfg = transforms.TransformConfig(
            image_size=(32, 64),
            max_instances=4,
            mask_size=4,
            max_size=64,
            pixel_mean=(1.0, 2.0, 3.0),
            pixel_std=(2.0, 3.0, 4.0),
            channel_order=order,
        )
        ex = transforms.transform_record(rec, cfg, short_size=30, flip=False)  # no resize
        assert ex["image_shape"].tolist() == [30, 50]
        np.testing.assert_array_equal(ex["image"][:30, :50], rec["image"])
        out = np.asarray(
            transforms.normalize_image(
                ex["image"][None], ex["image_shape"][None], cfg.pixel_mean, cfg.pixel_std, order
            )
        )[0]
        assert out.dtype == np.float32 and out.shape == (32, 64, 3)
        rgb = rec["image"].astype(np.float32)
        x = rgb[..., ::-1] if order == "BGR" else rgb
        expected = (x - np.float32([1, 2, 3])) / np.float32([2, 3, 4])
        np.testing.assert_allclose(out[:30, :50], expected, rtol=1e-6)
        assert not out[30:].any() and not out[:, 50:].any()  # padding exactly 0, as before
        np.testing.assert_array_equal(ex["semantic"][:30, :50], rec["semantic"])
    floats = np.ones((1, 4, 4, 3), np.float32)  # already normalised: unchanged
    assert transforms.normalize_image(floats, np.array([[2, 2]]), (0, 0, 0), (1, 1, 1), "BGR") is (
        floats
    )


def test_flip_consistency(check_padding):
    rec = _record(seed=5)
    plain = transforms.transform_record(rec, SMALL, short_size=40, flip=False)
    flip = transforms.transform_record(rec, SMALL, short_size=40, flip=True)
    assert flip["flipped"] and not plain["flipped"]
    h, w = plain["image_shape"]
    np.testing.assert_array_equal(flip["image_shape"], plain["image_shape"])
    np.testing.assert_array_equal(flip["image"][:h, :w], plain["image"][:h, :w][:, ::-1])
    np.testing.assert_array_equal(flip["semantic"][:h, :w], plain["semantic"][:h, :w][:, ::-1])
    check_padding(flip)
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
    crop = grid_sample_crop(rec["masks"][:, :, ::-1], mirrored, SMALL.mask_size)
    np.testing.assert_allclose(flip["masks"][:n], crop, atol=1e-6)


def test_transform_errors_and_padding_example():
    rec = _record(n=3)
    cfg = transforms.TransformConfig(image_size=(64, 96), max_instances=2, mask_size=4, max_size=90)
    with pytest.raises(ValueError, match="1234.*max_instances"):
        transforms.transform_record(rec, cfg, short_size=40, flip=False)
    with pytest.raises(ValueError, match="larger than image_size"):
        big = transforms.TransformConfig(
            image_size=(64, 96), max_instances=5, mask_size=4, max_size=200
        )
        transforms.transform_record(rec, big, short_size=80, flip=False)  # 80 x 133 > 64 x 96
    pad = spec.padding_example(SMALL)
    spec.validate(pad, SMALL, train=False)
    assert not pad["example_valid"] and pad["image_id"] == -1
    assert np.all(pad["semantic"] == 255) and not np.any(pad["image"]) and not pad["valid"].any()
