"""OcclusionOrderEvaluator on hand-made ground truth with known occluders and detections."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from oanet_jax.eval.ground_truth import load_panoptic_ground_truth
from oanet_jax.eval.occlusion import OcclusionOrderEvaluator, annotation_mask, occlusion_pairs
from oanet_jax.panoptic.io import id_map_to_rgb

PERSON, CAR, BALL, TIE, SKY = 1, 2, 3, 5, 101
CATS = [
    {"id": PERSON, "name": "person", "isthing": 1},
    {"id": CAR, "name": "car", "isthing": 1},
    {"id": BALL, "name": "ball", "isthing": 1},
    {"id": TIE, "name": "tie", "isthing": 1},
    {"id": SKY, "name": "sky", "isthing": 0},
]
CONTIGUOUS = {PERSON: 0, CAR: 1, BALL: 2, TIE: 3}
H = W = 16


def _rect(y0, y1, x0, x1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


# (annotation id, category, full mask) in painter's order (later = on top).
IMAGES = {
    1: [
        (1, PERSON, _rect(2, 10, 2, 10)),
        (2, TIE, _rect(6, 14, 6, 14)),  # on top of the person in [6:10, 6:10]
        (3, CAR, _rect(0, 4, 12, 16)),  # overlaps nothing
        (4, PERSON, _rect(8, 12, 0, 4)),  # overlaps person 1: same class, not a pair
    ],
    2: [
        (5, PERSON, _rect(2, 10, 2, 10)),
        (6, CAR, _rect(2, 10, 6, 14)),
        (7, BALL, _rect(2, 10, 6, 10)),  # covers the person/car overlap: undetermined
    ],
}


def _write(tmp_path):
    images, pan_anns, inst_anns = [], [], []
    for image_id, instances in IMAGES.items():
        ids = np.zeros((H, W), np.int64)
        for ann_id, _, mask in instances:
            ids[mask] = ann_id
        ids[ids == 0] = 100 + image_id  # sky
        name = f"{image_id:03d}.png"
        Image.fromarray(id_map_to_rgb(ids)).save(tmp_path / "pan" / name)
        images.append({"id": image_id, "file_name": name, "height": H, "width": W})
        segs = [
            {"id": int(i), "category_id": c, "iscrowd": 0, "area": int((ids == i).sum()),
             "bbox": [0, 0, 1, 1]}
            for i, c, _ in instances if (ids == i).any()
        ] + [{"id": 100 + image_id, "category_id": SKY, "iscrowd": 0, "area": 1,
              "bbox": [0, 0, 1, 1]}]  # fmt: skip
        pan_anns.append({"image_id": image_id, "file_name": name, "segments_info": segs})
        for ann_id, cat, mask in instances:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            inst_anns.append(
                {"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                 "segmentation": {"size": [H, W], "counts": rle["counts"].decode()},
                 "area": int(mask.sum()), "bbox": [0, 0, 1, 1]}
            )  # fmt: skip
    pan = {"images": images, "annotations": pan_anns, "categories": CATS}
    (tmp_path / "pan.json").write_text(json.dumps(pan))
    inst = {"images": images, "annotations": inst_anns, "categories": CATS[:4]}
    return inst


def _box(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def _outputs(dets_per_image):
    """dets: [(annotation id, score, srm score)] -> host outputs with box-filling masks."""
    d = 6
    out = {
        "boxes": np.zeros((2, d, 4), np.float32),
        "scores": np.zeros((2, d), np.float32),
        "srm_scores": np.zeros((2, d), np.float32),
        "classes": np.zeros((2, d), np.int32),
        "valid": np.zeros((2, d), bool),
        "masks": np.ones((2, d, 4, 4), np.float32),
    }
    for b, dets in enumerate(dets_per_image):
        by_id = {i: (c, m) for i, c, m in IMAGES[b + 1]}
        for k, (ann_id, score, srm) in enumerate(dets):
            cat, mask = by_id[ann_id]
            out["boxes"][b, k] = _box(mask)
            out["scores"][b, k], out["srm_scores"][b, k] = score, srm
            out["classes"][b, k] = CONTIGUOUS[cat]
            out["valid"][b, k] = True
    return out


def test_occlusion_pairs_by_hand():
    full = np.stack([m for _, _, m in IMAGES[2]])
    cats = np.asarray([c for _, c, _ in IMAGES[2]])
    owner = np.full((H, W), -1)
    for k, m in enumerate(full):
        owner[m] = k
    visible = np.stack([owner == k for k in range(3)])
    assert occlusion_pairs(full, cats, visible) == [(0, 1, -1), (0, 2, 2), (1, 2, 2)]
    # Same class: no pair.
    assert occlusion_pairs(full[:2], np.asarray([1, 1]), visible[:2]) == []


def test_evaluator_counts_and_examples(tmp_path):
    (tmp_path / "pan").mkdir()
    inst = _write(tmp_path)
    data = ml_collections.ConfigDict(
        {"root": str(tmp_path), "eval": {"panoptic_json": "pan.json", "panoptic_dir": "pan"}}
    )
    gt = load_panoptic_ground_truth(data)
    ev = OcclusionOrderEvaluator(gt, (inst, "inst.json"), score_thresh=0.5)
    inputs = {
        "image_id": np.asarray([1, 2]),
        "image_shape": np.asarray([[H, W], [H, W]]),
        "orig_shape": np.asarray([[H, W], [H, W]]),
        "example_valid": np.asarray([True, True]),
    }
    # Image 1: the person scores above the tie on top of it (score order wrong), the SRM ranks
    # the tie first (right); a low-scoring detection is not kept. Image 2: person and car only.
    outputs = _outputs(
        [
            [(1, 0.9, 0.2), (2, 0.6, 0.8), (3, 0.7, 0.5), (4, 0.3, 0.9)],
            [(5, 0.9, 0.1), (6, 0.8, 0.9)],
        ]
    )
    ev.process(inputs, outputs)
    r = ev.evaluate()["occlusion"]
    assert r["images"] == 2
    assert r["pairs"] == 4 and r["undetermined"] == 1  # (1,2); (5,6) undetermined, (5,7), (6,7)
    assert r["detected"] == 1  # the ball is not detected; person 4's detection is not kept
    assert (r["score_wrong"], r["srm_wrong"], r["srm_fixes"], r["srm_breaks"]) == (1, 0, 1, 0)
    assert r["score_wrong_pct"] == 100.0 and r["srm_wrong_pct"] == 0.0
    (ex,) = r["examples"]
    assert ex["image_id"] == 1 and ex["srm_right"]
    top, under = ex["instances"]
    assert (top["role"], top["category_id"]) == ("top", TIE)
    assert top["score"] == float(np.float32(0.6)) and top["srm_score"] == float(np.float32(0.8))
    assert (under["role"], under["category_id"]) == ("under", PERSON)
    assert under["score"] == float(np.float32(0.9))
    assert top["box"] == [6.0, 6.0, 14.0, 14.0]
    # A detection that misses the mask (IoU < 0.5) does not count; reset forgets everything.
    ev.reset()
    outputs["boxes"][0, 1] = [0, 0, 4, 4]
    ev.process(inputs, outputs)
    assert ev.evaluate()["occlusion"]["detected"] == 0


def test_annotation_mask_formats():
    m = _rect(3, 7, 2, 9)
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    ann = {"segmentation": {"size": [H, W], "counts": rle["counts"].decode()}}
    np.testing.assert_array_equal(annotation_mask(ann, H, W), m)
    poly = {"segmentation": [[2, 3, 9, 3, 9, 7, 2, 7]]}
    assert annotation_mask(poly, H, W)[4:6, 3:8].all()
