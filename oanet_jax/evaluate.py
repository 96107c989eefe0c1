"""Evaluation of OANet: jitted inference + panoptic fusion, COCO panoptic files, PQ, AP, mIoU.

`evaluate` runs one pass over the eval split (``config.data.eval``):

1. Device (one jitted call per batch, static shapes, see `make_inference_fn`): the model's
   inference forward pass, then ``merge_panoptic`` once per ordering ('score': detection score,
   the heuristic baseline; 'srm': the spatial ranking module's Eq. 3 score, OANet) on the same
   outputs, plus the stuff-only semantic prediction.
2. Host, per valid example (``example_valid``): each ordering's padded, resized id map is cropped
   and resized back to the original image (nearest neighbour, `io.crop_and_resize_to_original`),
   contiguous categories are mapped to dataset ids (`CategoryTable`) and the PNG is written.
   Host post-processing of batch n overlaps the device computation of batch n + 1.
3. Metrics:

   * Panoptic: per ordering, the COCO panoptic predictions (PNG folder
     ``workdir/eval_<step>/panoptic_<ordering>/`` and the JSON
     ``workdir/eval_<step>/panoptic_<ordering>.json``: panopticapi's convention that the PNG folder
     is the JSON path without '.json', so ``pq_compute(gt_json, pred_json)`` finds it) are scored
     with `oanet_jax.panoptic.pq.pq_compute` (panopticapi's semantics): PQ, SQ, RQ over all
     categories, things (``PQ_th``...) and stuff (``PQ_st``...), and per-class PQ / SQ / RQ.
   * Instances: COCO box and mask AP (pycocotools ``COCOeval``) of the detections (the same for
     both orderings). Boxes are rescaled per axis from the resized frame to the original image
     (``x * W / w``, ``y * H / h``); masks are pasted at the original resolution from the 28 x 28
     box-frame probabilities (`paste_mask`, bilinear ``grid_sample`` semantics as
     ``ops.masks.paste_masks``), thresholded at ``config.eval.mask_threshold`` (``>=``) and
     RLE-encoded. Ground truth: ``config.data.eval.instances_json`` when it is set and the file
     exists (COCO instances; for COCO the full, overlapping instance masks), otherwise a COCO
     instances dataset built from the panoptic ground truth's thing segments
     (`instances_from_panoptic`: visible, non-overlapping masks; crowd segments become crowd
     annotations), written to ``eval_<step>/instances_gt_from_panoptic.json``.
   * Stuff mIoU: the semantic prediction is the argmax over the STUFF channels only of the stuff
     logits, upsampled bilinearly to the padded input (exactly the upsampling of the panoptic
     merge), cropped and resized (nearest) to the original image. It is scored against the ground
     truth semantic map (from the panoptic PNG + JSON, crowd segments included) on the pixels whose
     ground-truth class is a stuff class only (thing and void pixels are ignored). Per stuff class
     ``IoU_c = TP / (TP + FP + FN)`` over those pixels; mIoU is the mean over the stuff classes
     that have ground-truth pixels (detectron2's SemSegEvaluator convention).

All metrics are reported in percent (x 100) as in the papers; COCO AP keeps pycocotools' -1 for an
area range without ground truth. Results go to ``eval_<step>/results.json``, a Markdown table
``eval_<step>/results.md``, and TensorBoard scalars in ``workdir/eval``.

The ground-truth files of ``config.data.eval`` (panoptic JSON + PNG folder) are needed whatever
``config.data.source`` is (with 'tfds' the images come from TFDS, the metrics from these files).
Evaluation is single-process: the whole split is read on this host (``process_count=1``); the
batch is split over the local devices (``gcd(batch, local devices)`` of them). On a multi-host
run, call it from one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io as _io
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from oanet_jax.data import pipeline
from oanet_jax.data.coco_panoptic import CategoryTable
from oanet_jax.panoptic import io as pan_io
from oanet_jax.panoptic import pq as pq_lib
from oanet_jax.panoptic.merge import ORDERINGS, merge_panoptic, order_keys, stuff_labels

__all__ = [
    "PanopticGroundTruth",
    "StuffConfusion",
    "coco_instance_ap",
    "detections_to_coco",
    "evaluate",
    "instances_from_panoptic",
    "load_category_table",
    "load_panoptic_ground_truth",
    "make_inference_fn",
    "paste_mask",
    "predict_images",
    "prediction_to_original",
    "preprocess_image",
    "results_markdown",
    "segments_info_from_arrays",
    "semantic_from_panoptic",
    "stuff_prediction_to_original",
    "summarize_pq",
    "write_tensorboard_scalars",
]

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
PQ_METRICS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")


# ----------------------------------------------------------------------------- ground truth


@dataclasses.dataclass(frozen=True)
class PanopticGroundTruth:
    """The panoptic ground truth of the eval split.

    Attributes:
      json_path: the COCO panoptic JSON.
      folder: its PNG folder.
      dataset: the loaded JSON ('images', 'annotations', 'categories').
      table: contiguous <-> dataset category ids (things first).
      annotations: image id -> panoptic annotation record.
    """

    json_path: str
    folder: str
    dataset: dict[str, Any]
    table: CategoryTable
    annotations: dict[int, dict[str, Any]]


def _data_path(root: str, path: str) -> str:
    """``path`` relative to ``root`` (absolute paths and an empty root are kept)."""
    return os.path.join(root, path) if root else path


def load_panoptic_ground_truth(config_data: Any) -> PanopticGroundTruth:
    """Loads the eval split's panoptic JSON (paths of ``config.data.eval``, under ``data.root``).

    Args:
      config_data: ``config.data``.

    Returns:
      The ground truth.

    Raises:
      FileNotFoundError: the JSON or the PNG folder is missing.
    """
    json_path = _data_path(config_data.root, config_data.eval.panoptic_json)
    folder = _data_path(config_data.root, config_data.eval.panoptic_dir)
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"panoptic ground-truth JSON {json_path} does not exist")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"panoptic ground-truth PNG folder {folder} does not exist")
    with open(json_path) as f:
        dataset = json.load(f)
    table = CategoryTable.from_categories(dataset["categories"])
    annotations = {int(a["image_id"]): a for a in dataset["annotations"]}
    return PanopticGroundTruth(json_path, folder, dataset, table, annotations)


def semantic_from_panoptic(
    id_map: np.ndarray, segments_info: Sequence[Mapping[str, Any]], table: CategoryTable
) -> np.ndarray:
    """Semantic map of a panoptic id map (every segment, crowd included, paints its category).

    Args:
      id_map: [H, W] integer segment ids (0 = void).
      segments_info: segments with 'id' and 'category_id' (DATASET ids).
      table: the category table.

    Returns:
      uint8 [H, W] contiguous category ids, 255 = void (id 0 or an id without a segment).
    """
    id_map = np.asarray(id_map)
    ids = np.asarray([int(s["id"]) for s in segments_info], np.int64)
    cats = np.asarray([table.to_contiguous(s["category_id"]) for s in segments_info], np.int64)
    out = np.full(id_map.shape, 255, np.uint8)
    if ids.size == 0:
        return out
    order = np.argsort(ids, kind="stable")
    ids, cats = ids[order], cats[order]
    pos = np.minimum(np.searchsorted(ids, id_map), ids.size - 1)
    hit = (ids[pos] == id_map) & (id_map != 0)
    out[hit] = cats[pos[hit]].astype(np.uint8)
    return out


def instances_from_panoptic(
    panoptic: Mapping[str, Any], folder: str, image_ids: Sequence[int] | None = None
) -> dict[str, Any]:
    """A COCO instances dataset from the thing segments of a COCO panoptic ground truth.

    As panopticapi's ``converters/panoptic2detection_coco_format.py`` (things only): one annotation
    per thing segment, ``segmentation`` = compressed RLE of the segment's pixels in the PNG,
    ``area``, ``bbox`` and ``iscrowd`` copied from ``segments_info`` (area and tight bbox from the
    pixels when absent), ``id`` = the panoptic segment id (made unique across images by an offset
    when needed). Masks are the visible (non-overlapping) parts.

    Args:
      panoptic: COCO panoptic JSON dict ('images', 'annotations', 'categories').
      folder: its PNG folder.
      image_ids: only these images (default all).

    Returns:
      {'images', 'annotations', 'categories' (thing categories only)}; RLE counts are str.
    """
    from pycocotools import mask as mask_utils

    thing_ids = {int(c["id"]) for c in panoptic["categories"] if c["isthing"]}
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    images = [im for im in panoptic["images"] if wanted is None or int(im["id"]) in wanted]
    annotations = []
    seen_ids: set[int] = set()
    next_id = 1 + max(
        (int(s["id"]) for a in panoptic["annotations"] for s in a["segments_info"]), default=0
    )
    for ann in panoptic["annotations"]:
        if wanted is not None and int(ann["image_id"]) not in wanted:
            continue
        things = [s for s in ann["segments_info"] if int(s["category_id"]) in thing_ids]
        if not things:
            continue
        id_map = pan_io.read_panoptic_png(os.path.join(folder, ann["file_name"]))
        for seg in things:
            mask = np.asfortranarray((id_map == int(seg["id"])).astype(np.uint8))
            rle = mask_utils.encode(mask)
            rle["counts"] = rle["counts"].decode("ascii")
            if "area" in seg and "bbox" in seg:
                area, bbox = int(seg["area"]), [int(v) for v in seg["bbox"]]
            else:
                area = int(mask.sum())
                bbox = [int(v) for v in mask_utils.toBbox(rle)]
            ann_id = int(seg["id"])
            if ann_id in seen_ids:
                ann_id, next_id = next_id, next_id + 1
            seen_ids.add(ann_id)
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": int(ann["image_id"]),
                    "category_id": int(seg["category_id"]),
                    "segmentation": rle,
                    "area": area,
                    "bbox": bbox,
                    "iscrowd": int(seg.get("iscrowd", 0)),
                }
            )
    categories = [dict(c) for c in panoptic["categories"] if c["isthing"]]
    return {"images": images, "annotations": annotations, "categories": categories}


# ----------------------------------------------------------------------------- device side


def _eval_mesh(batch_size: int) -> Mesh:
    """A 1-D 'data' mesh over ``gcd(batch_size, local device count)`` local devices."""
    devices = jax.local_devices()
    n = math.gcd(int(batch_size), len(devices))
    return Mesh(np.asarray(devices[:n]), ("data",))


def make_inference_fn(
    model: Any,
    config: Any,
    orderings: Sequence[str] = ORDERINGS,
    *,
    batch_size: int | None = None,
) -> Callable[[Any, Mapping[str, Any]], dict[str, Any]]:
    """One jitted inference + panoptic merge (every ordering) function, batch split over devices.

    Args:
      model: the OANet module (`build_model(config)`).
      config: full config (``model.num_thing_classes``, ``data.image_size``, ``eval.*``).
      orderings: merge orderings ('score', 'srm'), all merged in the same jitted call.
      batch_size: the batch the function will see (default ``config.eval.batch_size``); the batch
        dimension is sharded over ``gcd(batch_size, local devices)`` devices.

    Returns:
      ``infer(variables, batch) -> dict`` of device arrays (asynchronous; ``jax.device_get`` to
      wait), from ``batch['image']`` [B, Hp, Wp, 3] float32 and ``batch['image_shape']`` [B, 2]
      int32 (other keys are ignored):
        'boxes' [B, D, 4] float32 (resized-image pixels), 'scores' [B, D], 'classes' [B, D] int32
        contiguous thing ids, 'valid' [B, D] bool, 'masks' [B, D, 28, 28] float32 box-frame
        probabilities, 'srm_scores' [B, D];
        'stuff_labels' [B, Hp, Wp] int32: argmax stuff index 0..S-1 (contiguous class T + s) of
        the bilinearly upsampled stuff logits, -1 outside ``image_shape``;
        'panoptic': {ordering: merge_panoptic's dict ('id_map' [B, Hp, Wp] int32, 'segments')}.
    """
    for o in orderings:
        if o not in ORDERINGS:
            raise ValueError(f"unknown merge ordering {o!r}; expected one of {ORDERINGS}")
    orderings = tuple(orderings)
    e = config.eval
    num_things = int(config.model.num_thing_classes)
    image_size = (int(config.data.image_size[0]), int(config.data.image_size[1]))
    merge_kwargs = dict(
        image_size=image_size,
        num_thing_classes=num_things,
        mask_threshold=float(e.mask_threshold),
        overlap_threshold=float(e.overlap_threshold),
        instance_score_thresh=float(e.instance_score_thresh),
    )

    def infer(variables: Any, batch: Mapping[str, jax.Array]) -> dict[str, Any]:
        out = model.apply(
            variables, {"image": batch["image"], "image_shape": batch["image_shape"]}, train=False
        )
        image_shape = batch["image_shape"]
        stuff_logits = out["stuff_logits"]
        stride = image_size[0] // stuff_logits.shape[1]
        panoptic = {}
        for ordering in orderings:
            panoptic[ordering] = merge_panoptic(
                out["masks"],
                out["boxes"],
                out["classes"],
                out["scores"],
                out["valid"],
                order_keys(out["scores"], out["srm_scores"], ordering),
                stuff_logits,
                image_shape,
                stuff_area_limit=int(e.stuff_area_limit),
                stuff_stride=stride,
                **merge_kwargs,
            )
        semantic = stuff_labels(
            stuff_logits,
            image_shape,
            image_size=image_size,
            num_thing_classes=num_things,
            stride=stride,
        )
        return {
            "boxes": out["boxes"],
            "scores": out["scores"],
            "classes": out["classes"],
            "valid": out["valid"],
            "masks": out["masks"],
            "srm_scores": out["srm_scores"],
            "stuff_labels": semantic,
            "panoptic": panoptic,
        }

    mesh = _eval_mesh(int(batch_size or e.batch_size))
    replicated = NamedSharding(mesh, PartitionSpec())
    data = NamedSharding(mesh, PartitionSpec("data"))
    jitted = jax.jit(infer, in_shardings=(replicated, data))

    def run(variables: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
        inputs = {
            "image": np.asarray(batch["image"], np.float32),
            "image_shape": np.asarray(batch["image_shape"], np.int32),
        }
        return jitted(jax.device_put(variables, replicated), jax.device_put(inputs, data))

    run.mesh = mesh  # type: ignore[attr-defined]
    return run


# ----------------------------------------------------------------------------- host side


def segments_info_from_arrays(
    segments: Mapping[str, np.ndarray], table: CategoryTable
) -> list[dict[str, Any]]:
    """The valid rows of one image's merge segment table as COCO segments (dataset ids).

    Args:
      segments: merge_panoptic's per-image 'segments': [D + S] arrays 'id', 'category'
        (contiguous), 'isthing', 'score', 'valid'.
      table: the category table.

    Returns:
      [{'id', 'category_id' (dataset id), 'iscrowd': 0, 'isthing', 'score' (things only)}].
    """
    out = []
    for i in np.flatnonzero(np.asarray(segments["valid"])):
        seg = {
            "id": int(segments["id"][i]),
            "category_id": table.to_dataset(int(segments["category"][i])),
            "iscrowd": 0,
            "isthing": bool(segments["isthing"][i]),
        }
        if seg["isthing"]:
            seg["score"] = float(segments["score"][i])
        out.append(seg)
    return out


def prediction_to_original(
    id_map: np.ndarray,
    segments: Mapping[str, np.ndarray],
    image_shape: Sequence[int],
    orig_shape: Sequence[int],
    table: CategoryTable,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image's merged prediction at the original image size, with dataset category ids.

    Args:
      id_map: [Hp, Wp] int segment ids of the padded, resized input.
      segments: the image's merge segment table (see `segments_info_from_arrays`).
      image_shape: (h, w) of the resized image inside the padding.
      orig_shape: (H, W) of the original image.
      table: the category table.

    Returns:
      (id_map [H, W] int32, segments_info with 'area' and 'bbox' recomputed; segments that vanish
      in the resize are dropped).
    """
    from oanet_jax.data import transforms

    return transforms.crop_and_resize_to_original(
        id_map, image_shape, orig_shape, segments_info_from_arrays(segments, table)
    )


def stuff_prediction_to_original(
    stuff_labels: np.ndarray, image_shape: Sequence[int], orig_shape: Sequence[int]
) -> np.ndarray:
    """Crops the stuff prediction to the resized image and resizes it to the original (nearest).

    Args:
      stuff_labels: [Hp, Wp] int stuff indices.
      image_shape: (h, w).
      orig_shape: (H, W).

    Returns:
      [H, W] int32, the same pixel-centre nearest rule as the panoptic id map.
    """
    h, w = (int(v) for v in image_shape)
    big_h, big_w = (int(v) for v in orig_shape)
    from oanet_jax.ops.resize import nearest_indices

    rows = nearest_indices(h, big_h)
    cols = nearest_indices(w, big_w)
    return np.asarray(stuff_labels)[:h, :w][rows[:, None], cols[None, :]].astype(np.int32)


class StuffConfusion:
    """Stuff-class confusion matrix over ground-truth stuff pixels (see the module docstring)."""

    def __init__(self, num_things: int, num_stuff: int):
        self.num_things = int(num_things)
        self.num_stuff = int(num_stuff)
        # Rows: ground-truth stuff class; columns: predicted stuff class, last = no prediction.
        self.matrix = np.zeros((self.num_stuff, self.num_stuff + 1), np.int64)

    def update(self, pred: np.ndarray, gt_semantic: np.ndarray) -> None:
        """Adds one image.

        Args:
          pred: [H, W] int predicted stuff index 0..S-1 (anything else = no prediction).
          gt_semantic: [H, W] contiguous ground-truth classes (255 = void).
        """
        gt = np.asarray(gt_semantic).astype(np.int64) - self.num_things
        pred = np.asarray(pred).astype(np.int64)
        keep = (gt >= 0) & (gt < self.num_stuff)
        p = pred[keep]
        p = np.where((p >= 0) & (p < self.num_stuff), p, self.num_stuff)
        flat = gt[keep] * (self.num_stuff + 1) + p
        self.matrix += np.bincount(flat, minlength=self.matrix.size).reshape(self.matrix.shape)

    def result(self, table: CategoryTable) -> dict[str, Any]:
        """{'mIoU', 'n' (classes averaged), 'per_class': {name: IoU}} in percent."""
        tp = np.diag(self.matrix[:, : self.num_stuff]).astype(np.float64)
        gt_pixels = self.matrix.sum(axis=1).astype(np.float64)
        pred_pixels = self.matrix[:, : self.num_stuff].sum(axis=0).astype(np.float64)
        union = gt_pixels + pred_pixels - tp
        present = gt_pixels > 0
        iou = np.where(union > 0, tp / np.maximum(union, 1.0), 0.0)
        per_class = {
            table.names[self.num_things + s]: 100.0 * float(iou[s])
            for s in range(self.num_stuff)
            if present[s]
        }
        miou = 100.0 * float(iou[present].mean()) if present.any() else 0.0
        return {"mIoU": miou, "n": int(present.sum()), "per_class": per_class}


def paste_mask(mask: np.ndarray, box: Sequence[float], image_size: Sequence[int]) -> np.ndarray:
    """Pastes one box-frame soft mask into an image (numpy; ``ops.masks.paste_masks`` semantics).

    Pixel (i, j), centred at (j + 0.5, i + 0.5), takes the bilinear sample with zero padding of the
    mask at box-frame position ``u = (x - x1) / (x2 - x1) * Mw - 0.5`` (and likewise in y): the
    separable hat-function weights ``max(0, 1 - |u - k|)``. Only the rows and columns with a
    non-zero weight are computed. A box with non-positive width or height gives zeros.

    Args:
      mask: [Mh, Mw] float mask (e.g. 28 x 28 probabilities).
      box: (x1, y1, x2, y2) in image pixels.
      image_size: (H, W).

    Returns:
      float32 [H, W].
    """
    mask = np.asarray(mask, np.float64)
    height, width = int(image_size[0]), int(image_size[1])
    out = np.zeros((height, width), np.float32)
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x2 > x1 and y2 > y1) or not np.all(np.isfinite([x1, y1, x2, y2])):
        return out

    def weights(lo: float, hi: float, n_out: int, n_mask: int) -> tuple[np.ndarray, int]:
        u = ((np.arange(n_out, dtype=np.float64) + 0.5) - lo) / (hi - lo) * n_mask - 0.5
        inside = np.flatnonzero((u > -1.0) & (u < n_mask))
        if inside.size == 0:
            return np.zeros((0, n_mask)), 0
        start, stop = int(inside[0]), int(inside[-1]) + 1
        w = np.maximum(0.0, 1.0 - np.abs(u[start:stop, None] - np.arange(n_mask)[None, :]))
        return w, start

    wy, y0 = weights(y1, y2, height, mask.shape[0])
    wx, x0 = weights(x1, x2, width, mask.shape[1])
    if wy.shape[0] and wx.shape[0]:
        out[y0 : y0 + wy.shape[0], x0 : x0 + wx.shape[0]] = wy @ mask @ wx.T
    return out


def detections_to_coco(
    image_id: int,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    valid: np.ndarray,
    masks: np.ndarray,
    image_shape: Sequence[int],
    orig_shape: Sequence[int],
    table: CategoryTable,
    mask_threshold: float = 0.5,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One image's detections as COCO results at the original resolution.

    Args:
      image_id: the image id.
      boxes: [D, 4] float x1y1x2y2 in the resized image (inside the padding).
      scores: [D] float detection scores.
      classes: [D] int contiguous thing ids.
      valid: [D] bool.
      masks: [D, M, M] float box-frame mask probabilities.
      image_shape: (h, w) of the resized image.
      orig_shape: (H, W) of the original image.
      table: the category table.
      mask_threshold: a pasted pixel is in the mask where its probability is >= this.

    Returns:
      (bbox results [{'image_id', 'category_id', 'bbox' [x, y, w, h], 'score'}], segm results
      [{'image_id', 'category_id', 'segmentation' (RLE, str counts), 'score'}]).
    """
    from pycocotools import mask as mask_utils

    h, w = (float(v) for v in image_shape)
    big_h, big_w = (int(v) for v in orig_shape)
    scale = np.asarray([big_w / w, big_h / h, big_w / w, big_h / h], np.float64)
    bbox_results, segm_results = [], []
    for d in np.flatnonzero(np.asarray(valid)):
        box = np.asarray(boxes[d], np.float64) * scale
        box = np.clip(box, 0.0, [big_w, big_h, big_w, big_h])
        category = table.to_dataset(int(classes[d]))
        score = float(scores[d])
        bbox_results.append(
            {
                "image_id": int(image_id),
                "category_id": category,
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                "score": score,
            }
        )
        binary = paste_mask(masks[d], box, (big_h, big_w)) >= mask_threshold
        rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        segm_results.append(
            {
                "image_id": int(image_id),
                "category_id": category,
                "segmentation": rle,
                "score": score,
            }
        )
    return bbox_results, segm_results


def coco_instance_ap(
    gt_dataset: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    iou_type: str,
) -> dict[str, float]:
    """COCO AP of instance results with pycocotools (its printout is captured, not shown).

    Args:
      gt_dataset: COCO instances dict ('images', 'annotations', 'categories').
      results: COCO results ('bbox' or 'segmentation' per iou_type, 'score').
      image_ids: the images evaluated (``COCOeval.params.imgIds``).
      iou_type: 'bbox' or 'segm'.

    Returns:
      {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'} in percent; -1.0 where pycocotools gives -1
      (no ground truth in that area range); all 0.0 when there is no result at all.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return dict.fromkeys(COCO_METRICS, 0.0)
    with contextlib.redirect_stdout(_io.StringIO()):
        gt = COCO()
        gt.dataset = dict(gt_dataset)
        gt.createIndex()
        dt = gt.loadRes([dict(r) for r in results])
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {
        name: (100.0 * float(v) if v >= 0 else -1.0)
        for name, v in zip(COCO_METRICS, ev.stats[:6], strict=True)
    }


def summarize_pq(result: Mapping[str, Any], table: CategoryTable) -> dict[str, Any]:
    """pq_compute's result as flat percentages plus per-class PQ keyed by category name.

    Args:
      result: `pq.pq_compute` / `pq.evaluate_id_maps` result.
      table: the category table.

    Returns:
      {'PQ', 'SQ', 'RQ', 'PQ_th', ..., 'RQ_st' (percent), 'n', 'n_th', 'n_st', 'per_class':
      {name: {'category_id', 'isthing', 'PQ', 'SQ', 'RQ'}}}.
    """
    out: dict[str, Any] = {}
    for suffix, key in (("", "All"), ("_th", "Things"), ("_st", "Stuff")):
        for m in ("pq", "sq", "rq"):
            out[f"{m.upper()}{suffix}"] = 100.0 * float(result[key][m])
        out[f"n{suffix}"] = int(result[key]["n"])
    per_class = {}
    for c, dataset_id in enumerate(table.dataset_ids):
        values = result["per_class"].get(dataset_id, {"pq": 0.0, "sq": 0.0, "rq": 0.0})
        per_class[table.names[c]] = {
            "category_id": int(dataset_id),
            "isthing": bool(table.isthing[c]),
            **{m.upper(): 100.0 * float(values[m]) for m in ("pq", "sq", "rq")},
        }
    out["per_class"] = per_class
    return out


def results_markdown(results: Mapping[str, Any]) -> str:
    """A Markdown report of `evaluate`'s results (panoptic per ordering, AP, mIoU, per class)."""
    lines = [f"# Evaluation at step {results['step']} ({results['num_images']} images)", ""]
    lines += ["| ordering | " + " | ".join(PQ_METRICS) + " |"]
    lines += ["|---" * (len(PQ_METRICS) + 1) + "|"]
    for ordering, r in results["panoptic"].items():
        lines.append(f"| {ordering} | " + " | ".join(f"{r[m]:.1f}" for m in PQ_METRICS) + " |")
    lines += ["", "| instances | " + " | ".join(COCO_METRICS) + " |"]
    lines += ["|---" * (len(COCO_METRICS) + 1) + "|"]
    for kind in ("bbox", "segm"):
        r = results[kind]
        lines.append(f"| {kind} | " + " | ".join(f"{r[m]:.1f}" for m in COCO_METRICS) + " |")
    s = results["stuff"]
    lines += ["", f"Stuff mIoU: {s['mIoU']:.1f} (over {s['n']} stuff classes with ground truth)"]
    orderings = list(results["panoptic"])
    lines += ["", "| category | thing | " + " | ".join(f"PQ ({o})" for o in orderings) + " |"]
    lines += ["|---" * (len(orderings) + 2) + "|"]
    first = results["panoptic"][orderings[0]]["per_class"] if orderings else {}
    for name, info in first.items():
        cells = [f"{results['panoptic'][o]['per_class'][name]['PQ']:.1f}" for o in orderings]
        lines.append(
            f"| {name} | {'yes' if info['isthing'] else 'no'} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def write_tensorboard_scalars(scalars: Mapping[str, float], logdir: str, step: int) -> None:
    """Writes scalars as TensorBoard event files (scalar-plugin summaries).

    Uses ``tf.summary.write`` with the scalar plugin's metadata, so it works with tensorflow alone
    (``tf.summary.scalar`` needs the ``tensorboard`` package, which is not a dependency).

    Args:
      scalars: {tag: value}.
      logdir: event file folder.
      step: the step of every value.
    """
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        data_class=summary_pb2.DATA_CLASS_SCALAR,
    )
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for tag, value in scalars.items():
            tf.summary.write(
                tag, tf.constant(float(value), tf.float32), step=step, metadata=metadata
            )
    writer.flush()
    writer.close()


def _result_scalars(results: Mapping[str, Any]) -> dict[str, float]:
    """The TensorBoard tags of `evaluate`'s results."""
    scalars = {}
    for ordering, r in results["panoptic"].items():
        for m in PQ_METRICS:
            scalars[f"panoptic_{ordering}/{m}"] = r[m]
    for kind in ("bbox", "segm"):
        for m in COCO_METRICS:
            scalars[f"{kind}/{m}"] = results[kind][m]
    scalars["stuff/mIoU"] = results["stuff"]["mIoU"]
    return scalars


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _instances_ground_truth(
    config_data: Any, gt: PanopticGroundTruth, image_ids: Sequence[int], eval_dir: str
) -> tuple[dict[str, Any], str]:
    """The COCO instances ground truth (configured JSON, else built from the panoptic one)."""
    path = str(config_data.eval.get("instances_json", "") or "")
    if path:
        path = _data_path(config_data.root, path)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f), path
        logging.warning(
            "instances JSON %s not found; building the box/mask AP ground truth from "
            "the panoptic thing segments instead",
            path,
        )
    dataset = instances_from_panoptic(gt.dataset, gt.folder, image_ids)
    out = os.path.join(eval_dir, "instances_gt_from_panoptic.json")
    _write_json(out, dataset)
    return dataset, out


# ----------------------------------------------------------------------------- main loop


def _per_example(tree: Any, i: int) -> Any:
    return jax.tree.map(lambda x: x[i], tree)


def evaluate(
    config: Any,
    model: Any,
    variables: Any,
    workdir: str,
    *,
    orderings: Sequence[str] = ("score", "srm"),
    max_batches: int | None = None,
    step: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluates a model on the eval split (see the module docstring for every definition).

    Args:
      config: full config (``data``, ``model``, ``eval``).
      model: the OANet module (`build_model(config)`).
      variables: {'params', 'batch_stats'} (e.g. from `train.checkpoint.restore_variables`).
      workdir: outputs go to ``workdir/eval_<step>/`` and TensorBoard to ``workdir/eval``.
      orderings: merge orderings to evaluate.
      max_batches: stop after this many batches (default: the whole split).
      step: the checkpoint step (names the output folder and the TensorBoard step).
      progress: show a progress bar.

    Returns:
      {'step', 'num_images', 'seconds', 'images_per_second', 'panoptic': {ordering:
      `summarize_pq` dict}, 'bbox': {AP...}, 'segm': {AP...}, 'stuff': {'mIoU', 'n',
      'per_class'}, 'files': {name: path}}; metrics in percent.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    gt = load_panoptic_ground_truth(config.data)
    table = gt.table
    if table.num_things != int(config.model.num_thing_classes) or table.num_stuff != int(
        config.model.num_stuff_classes
    ):
        raise ValueError(
            f"the ground truth has {table.num_things} thing / {table.num_stuff} stuff categories, "
            f"the model {config.model.num_thing_classes} / {config.model.num_stuff_classes}"
        )
    eval_dir = os.path.join(workdir, f"eval_{int(step)}")
    os.makedirs(eval_dir, exist_ok=True)
    pred_folders = {o: os.path.join(eval_dir, f"panoptic_{o}") for o in orderings}

    batch_size = int(config.eval.batch_size)
    dataset = pipeline.build_dataset(
        config,
        "eval",
        training=False,
        batch_size=batch_size,
        seed=int(config.seed),
        process_index=0,
        process_count=1,
    )
    num_batches = -(-len(gt.annotations) // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, int(max_batches))
    infer = make_inference_fn(model, config, orderings, batch_size=batch_size)
    variables = jax.device_put(variables, NamedSharding(infer.mesh, PartitionSpec()))

    annotations: dict[str, list[dict[str, Any]]] = {o: [] for o in orderings}
    bbox_results: list[dict[str, Any]] = []
    segm_results: list[dict[str, Any]] = []
    stuff = StuffConfusion(table.num_things, table.num_stuff)
    image_ids: list[int] = []
    mask_threshold = float(config.eval.mask_threshold)

    def consume(meta: Mapping[str, np.ndarray], out: Any) -> None:
        out = jax.device_get(out)
        for i in np.flatnonzero(meta["example_valid"]):
            image_id = int(meta["image_id"][i])
            image_shape, orig_shape = meta["image_shape"][i], meta["orig_shape"][i]
            if image_id not in gt.annotations:
                raise KeyError(f"image {image_id} has no annotation in {gt.json_path}")
            gt_ann = gt.annotations[image_id]
            file_name = gt_ann["file_name"]
            ex = _per_example(out, i)
            for o in orderings:
                id_map, segs = prediction_to_original(
                    ex["panoptic"][o]["id_map"],
                    ex["panoptic"][o]["segments"],
                    image_shape,
                    orig_shape,
                    table,
                )
                segs = pan_io.write_prediction(pred_folders[o], file_name, id_map, segs)
                annotations[o].append(
                    {"image_id": image_id, "file_name": file_name, "segments_info": segs}
                )
            boxes, segms = detections_to_coco(
                image_id,
                ex["boxes"],
                ex["scores"],
                ex["classes"],
                ex["valid"],
                ex["masks"],
                image_shape,
                orig_shape,
                table,
                mask_threshold,
            )
            bbox_results.extend(boxes)
            segm_results.extend(segms)
            gt_map = pan_io.read_panoptic_png(os.path.join(gt.folder, file_name))
            stuff.update(
                stuff_prediction_to_original(ex["stuff_labels"], image_shape, orig_shape),
                semantic_from_panoptic(gt_map, gt_ann["segments_info"], table),
            )
            image_ids.append(image_id)

    pending = None
    bar = tqdm(total=num_batches, desc=f"eval step {step}", unit="batch", disable=not progress)
    for index, batch in enumerate(dataset.as_numpy_iterator()):
        if index >= num_batches:
            break
        out = infer(variables, batch)  # asynchronous: the host work below overlaps it
        if pending is not None:
            consume(*pending)
            bar.update(1)
        meta = {k: batch[k] for k in ("image_id", "image_shape", "orig_shape", "example_valid")}
        pending = (meta, out)
    if pending is not None:
        consume(*pending)
        bar.update(1)
    bar.close()
    if not image_ids:
        raise ValueError(f"no valid example in the eval split ({gt.json_path})")

    # Ground truth restricted to the evaluated images (all of them unless max_batches).
    evaluated = set(image_ids)
    gt_json = gt.json_path
    if evaluated != set(gt.annotations):
        subset = dict(gt.dataset)
        subset["annotations"] = [a for a in gt.dataset["annotations"] if a["image_id"] in evaluated]
        subset["images"] = [im for im in gt.dataset.get("images", []) if im["id"] in evaluated]
        gt_json = os.path.join(eval_dir, "panoptic_gt_subset.json")
        _write_json(gt_json, subset)

    files: dict[str, str] = {"panoptic_gt_json": gt_json}
    results: dict[str, Any] = {"step": int(step), "num_images": len(image_ids), "panoptic": {}}
    for o in orderings:
        pred_json = pred_folders[o] + ".json"
        pan_io.write_predictions_json(pred_json, annotations[o], gt.dataset["categories"])
        pq_result = pq_lib.pq_compute(gt_json, pred_json, gt.folder, pred_folders[o])
        results["panoptic"][o] = summarize_pq(pq_result, table)
        files[f"panoptic_{o}_json"] = pred_json
        files[f"panoptic_{o}_folder"] = pred_folders[o]

    instances_gt, files["instances_gt_json"] = _instances_ground_truth(
        config.data, gt, image_ids, eval_dir
    )
    files["instances_results_json"] = os.path.join(eval_dir, "instances_results.json")
    _write_json(files["instances_results_json"], {"bbox": bbox_results, "segm": segm_results})
    results["bbox"] = coco_instance_ap(instances_gt, bbox_results, image_ids, "bbox")
    results["segm"] = coco_instance_ap(instances_gt, segm_results, image_ids, "segm")
    results["stuff"] = stuff.result(table)

    seconds = time.perf_counter() - start
    results["seconds"] = seconds
    results["images_per_second"] = len(image_ids) / seconds
    files["results_json"] = os.path.join(eval_dir, "results.json")
    files["results_md"] = os.path.join(eval_dir, "results.md")
    results["files"] = files
    _write_json(files["results_json"], results)
    with open(files["results_md"], "w") as f:
        f.write(results_markdown(results))
    write_tensorboard_scalars(_result_scalars(results), os.path.join(workdir, "eval"), int(step))
    for o in orderings:
        r = results["panoptic"][o]
        logging.info(
            "eval step %d, %s ordering: PQ %.1f (things %.1f, stuff %.1f)",
            step,
            o,
            r["PQ"],
            r["PQ_th"],
            r["PQ_st"],
        )
    logging.info(
        "eval step %d: box AP %.1f, mask AP %.1f, stuff mIoU %.1f; %d images in %.1f s",
        step,
        results["bbox"]["AP"],
        results["segm"]["AP"],
        results["stuff"]["mIoU"],
        len(image_ids),
        seconds,
    )
    return results


# ----------------------------------------------------------------------------- prediction


def preprocess_image(image: np.ndarray, config: Any, image_id: int = 0) -> dict[str, np.ndarray]:
    """One RGB image as a batch of 1, with the eval transform of the input pipeline.

    Args:
      image: uint8 [H, W, 3] RGB.
      config: full config (``config.data``: resize, normalisation, padding).
      image_id: id carried in the batch.

    Returns:
      The pipeline's batch dict with leading dimension 1 ('image' [1, Hp, Wp, 3] float32,
      'image_shape' [1, 2], 'orig_shape' [1, 2], ...; no ground truth).
    """
    image = np.asarray(image, np.uint8)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3] RGB uint8, got shape {image.shape}")
    h, w = image.shape[:2]
    record = {
        "image": image,
        "image_id": int(image_id),
        "semantic": np.full((h, w), 255, np.uint8),
        "boxes": np.zeros((0, 4), np.float32),
        "classes": np.zeros((0,), np.int32),
        "is_crowd": np.zeros((0,), bool),
        "masks": np.zeros((0, h, w), np.uint8),
    }
    cfg = pipeline.TransformConfig.from_config(config.data)
    example = pipeline.transform_record(
        record, cfg, short_size=int(config.data.min_size_test), flip=False
    )
    return {k: np.asarray(v)[None] for k, v in example.items()}


def predict_images(
    config: Any,
    model: Any,
    variables: Any,
    image_paths: Sequence[str],
    out_dir: str,
    *,
    table: CategoryTable,
    orderings: Sequence[str] = ("score", "srm"),
    min_display_side: int = 384,
) -> list[str]:
    """Panoptic predictions of image files, drawn side by side per ordering (plus a diff panel).

    For each image, writes ``<out_dir>/<stem>_panoptic.png``: one panel per ordering (category
    colours, instance outlines, "name score" labels; an instance keeps its colour across panels)
    and, with two orderings, a panel of the pixels whose segment differs between them; and
    ``<out_dir>/<stem>_segments.json`` with each ordering's segments_info (dataset category ids).

    Args:
      config: full config.
      model: the OANet module.
      variables: its variables.
      image_paths: image files (any PIL-readable format; converted to RGB).
      out_dir: output folder (created).
      table: the category table (names, colours, dataset ids).
      orderings: merge orderings, one panel each.
      min_display_side: small images are upscaled (integer factor) to this shorter side.

    Returns:
      The written PNG paths.
    """
    from PIL import Image

    from oanet_jax.panoptic import visualize

    os.makedirs(out_dir, exist_ok=True)
    infer = make_inference_fn(model, config, orderings, batch_size=1)
    variables = jax.device_put(variables, NamedSharding(infer.mesh, PartitionSpec()))
    titles = {"score": "score order (heuristic)", "srm": "SRM order (OANet)"}
    written = []
    for index, path in enumerate(image_paths):
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
        batch = preprocess_image(image, config, image_id=index)
        out = jax.device_get(infer(variables, batch))
        ex = _per_example(out, 0)
        maps, segments = {}, {}
        for o in orderings:
            maps[o], segments[o] = prediction_to_original(
                ex["panoptic"][o]["id_map"],
                ex["panoptic"][o]["segments"],
                batch["image_shape"][0],
                batch["orig_shape"][0],
                table,
            )
        colors = visualize.segment_colors([s for o in orderings for s in segments[o]], table)
        scale = visualize.display_scale(image.shape, min_display_side)
        panels = [
            visualize.render_panoptic(
                image,
                maps[o],
                segments[o],
                table,
                colors=colors,
                scale=scale,
                title=f"{titles.get(o, o)}: {len(segments[o])} segments",
            )
            for o in orderings
        ]
        if len(orderings) == 2:
            a, b = orderings
            changed = int(np.sum(maps[a] != maps[b]))
            panels.append(
                visualize.difference_panel(
                    image,
                    maps[a],
                    maps[b],
                    scale=scale,
                    title=f"changed: {changed} px ({100.0 * changed / maps[a].size:.1f}%)",
                )
            )
        stem = os.path.splitext(os.path.basename(path))[0]
        png = os.path.join(out_dir, f"{stem}_panoptic.png")
        Image.fromarray(visualize.side_by_side(panels)).save(png)
        _write_json(os.path.join(out_dir, f"{stem}_segments.json"), segments)
        written.append(png)
        logging.info("wrote %s", png)
    return written


def load_category_table(config_data: Any, categories_json: str | None = None) -> CategoryTable:
    """The category table for prediction without ground truth.

    Args:
      config_data: ``config.data``.
      categories_json: a JSON file with a list of COCO panoptic category dicts, or a dict with a
        'categories' list (a panoptic JSON). Default: the first existing file among the eval and
        train panoptic JSONs of the config and ``<data.root>/categories.json``.

    Returns:
      The table.

    Raises:
      FileNotFoundError: no candidate file exists.
    """
    if categories_json:
        candidates = [categories_json]
    else:
        candidates = [
            _data_path(config_data.root, config_data.eval.panoptic_json),
            _data_path(config_data.root, config_data.train.panoptic_json),
            _data_path(config_data.root, "categories.json"),
        ]
    for path in candidates:
        if path and os.path.isfile(path):
            with open(path) as f:
                loaded = json.load(f)
            cats = loaded["categories"] if isinstance(loaded, dict) else loaded
            return CategoryTable.from_categories(cats)
    raise FileNotFoundError(f"no category file found among {candidates}")
