"""The inverse transforms of oanet_jax.data.transforms (model outputs back to the original image):
id maps against an exact-fraction loop and PIL, segment areas/bboxes against loops, boxes by hand,
the stuff map on the same nearest rule as the id map."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from oracles import blocky_ids, loop_areas_boxes
from PIL import Image

from oanet_jax.data import transforms
from oanet_jax.data.coco_panoptic import CategoryTable
from oanet_jax.panoptic import io as pio


@pytest.mark.parametrize(
    "orig_shape, image_shape, pad_shape",
    [
        ((37, 53), (63, 90), (64, 96)),
        ((100, 75), (40, 30), (48, 32)),
        ((20, 20), (20, 20), (20, 24)),
    ],
)
def test_crop_and_resize_to_original(orig_shape, image_shape, pad_shape):
    rng = np.random.default_rng(sum(orig_shape))
    h, w = image_shape
    resized = blocky_ids(rng, image_shape, 12, block=3)
    resized[h // 2, w // 2] = 4242  # single pixel: may vanish when downscaling
    padded = np.full(pad_shape, 777, np.int64)  # padding holds ids without segments
    padded[:h, :w] = resized
    segs = [{"id": int(i), "category_id": 3, "area": -1} for i in np.unique(resized) if i]
    segs.append({"id": 777, "category_id": 3})
    out, cleaned = transforms.crop_and_resize_to_original(padded, image_shape, orig_shape, segs)
    assert out.dtype == padded.dtype and out.shape == orig_shape  # the input's dtype is kept
    # Reference: exact-fraction nearest rule, src = floor((dst + 1/2) * in / out), by loops.
    ref = np.zeros(orig_shape, np.int64)
    for y in range(orig_shape[0]):
        sy = math.floor(Fraction(2 * y + 1, 2) * Fraction(h, orig_shape[0]))
        for x in range(orig_shape[1]):
            ref[y, x] = resized[sy, math.floor(Fraction(2 * x + 1, 2) * Fraction(w, orig_shape[1]))]
    np.testing.assert_array_equal(out, ref)
    # PIL (fixed-point arithmetic) agrees except at a few exact ties.
    pil = Image.fromarray(resized.astype(np.int32), "I").resize(
        (orig_shape[1], orig_shape[0]), Image.Resampling.NEAREST
    )
    assert np.mean(out != np.array(pil)) < 0.1
    expected = loop_areas_boxes(out)
    assert [s["id"] for s in cleaned] == [s["id"] for s in segs if s["id"] in expected]
    assert len(cleaned) == len(expected)
    for s in cleaned:
        assert (s["area"], s["bbox"]) == expected[s["id"]]
    if orig_shape[0] > image_shape[0]:
        assert 4242 in expected  # upscaling keeps every pixel
    with pytest.raises(pio.PanopticFormatError, match="not in segments_info"):
        transforms.crop_and_resize_to_original(padded, image_shape, orig_shape, segs[1:])
    with pytest.raises(ValueError, match="fit"):
        transforms.crop_and_resize_to_original(padded, (pad_shape[0] + 1, w), orig_shape, segs)


def test_stuff_map_uses_the_id_map_rule():
    rng = np.random.default_rng(4)
    labels = rng.integers(-1, 5, (48, 64))
    ids = labels + 2  # positive ids, same layout
    segs = [{"id": int(i), "category_id": 1} for i in np.unique(ids)]
    back, _ = transforms.crop_and_resize_to_original(ids, (40, 57), (71, 103), segs)
    stuff = transforms.stuff_prediction_to_original(labels, (40, 57), (71, 103))
    assert stuff.dtype == np.int32
    np.testing.assert_array_equal(stuff + 2, back)


def test_prediction_to_original_maps_categories_and_drops_invalid_rows():
    table = CategoryTable.from_categories(
        [{"id": 7, "isthing": 1, "name": "a"}, {"id": 9, "isthing": 0, "name": "b"}]
    )
    id_map = np.zeros((8, 8), np.int32)
    id_map[:4, :4] = 1
    id_map[4:6] = 3
    segments = {
        "id": np.asarray([1, 2, 3], np.int32),
        "category": np.asarray([0, 0, 1], np.int32),
        "isthing": np.asarray([True, True, False]),
        "score": np.asarray([0.75, 0.5, 0.0], np.float32),
        "valid": np.asarray([True, False, True]),
    }
    out, segs = transforms.prediction_to_original(id_map, segments, (6, 6), (12, 12), table)
    assert out.shape == (12, 12)
    assert [(s["id"], s["category_id"], s["isthing"]) for s in segs] == [
        (1, 7, True),
        (3, 9, False),
    ]
    assert segs[0]["score"] == 0.75 and "score" not in segs[1]
    assert segs[0]["area"] == 64 and segs[0]["bbox"] == [0, 0, 8, 8]


def test_boxes_to_original_scales_per_axis_and_clips():
    boxes = np.asarray([[10, 5, 30, 25], [-2, 0, 60, 51]], np.float32)
    out = transforms.boxes_to_original(boxes, (50, 100), (100, 200))
    np.testing.assert_allclose(out, [[20, 10, 60, 50], [0, 0, 120, 100]])
    assert transforms.boxes_to_original(np.zeros((0, 4)), (5, 5), (9, 9)).shape == (0, 4)
