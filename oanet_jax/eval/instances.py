"""COCO box and mask AP of the detections (pycocotools ``COCOeval``); the same for every ordering.

Boxes are rescaled per axis from the resized frame to the original image
(`data.transforms.boxes_to_original`); masks are pasted at the original resolution from the
28 x 28 box-frame probabilities (`ops.masks.paste_mask_np`, the host twin of
``ops.masks.paste_masks``), thresholded at ``mask_threshold`` (``>=``) and RLE-encoded.

Ground truth: ``config.data.eval.instances_json`` when it is set and the file exists (COCO
instances; for COCO the full, overlapping instance masks), otherwise a COCO instances dataset
built from the panoptic ground truth's thing segments (`ground_truth.instances_from_panoptic`
semantics: visible, non-overlapping masks; crowd segments become crowd annotations), made from
the decoded ground truth as images are processed (no extra PNG read).

AP is in percent; pycocotools' -1 (an area range without ground truth) is kept.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from oanet_jax.common.files import write_json
from oanet_jax.data import transforms
from oanet_jax.data.coco_panoptic import CategoryTable
from oanet_jax.eval.ground_truth import PanopticGroundTruth
from oanet_jax.ops.masks import paste_mask_np

__all__ = ["COCO_METRICS", "InstancesEvaluator", "coco_instance_ap", "detections_to_coco"]

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


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

    big_h, big_w = (int(v) for v in orig_shape)
    keep = np.flatnonzero(np.asarray(valid))
    boxes = transforms.boxes_to_original(np.asarray(boxes)[keep], image_shape, orig_shape)
    bbox_results, segm_results = [], []
    for box, d in zip(boxes, keep, strict=True):
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
        binary = paste_mask_np(masks[d], box, (big_h, big_w)) >= mask_threshold
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
    with contextlib.redirect_stdout(io.StringIO()):
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


class InstancesEvaluator:
    """COCO box and mask AP (detectron2-style ``reset / process / evaluate``).

    Attributes:
      name: 'instances'.
      output_dir: where `write_files` puts the results and ground-truth JSONs (set before
        `reset`); None: nothing written.
      files: {name: path} written by the last `evaluate`.
    """

    name = "instances"

    def __init__(
        self,
        ground_truth: PanopticGroundTruth,
        *,
        instances_json: tuple[dict[str, Any] | None, str] = (None, ""),
        mask_threshold: float = 0.5,
        write_files: bool = False,
        output_dir: str | None = None,
    ):
        """Creates the evaluator.

        Args:
          ground_truth: the eval split (its decoded images give the panoptic-derived AP ground
            truth when there is no instances JSON).
          instances_json: (COCO instances dataset, its path) from
            `ground_truth.load_instances_json`, or (None, '') to build it from the panoptic one.
          mask_threshold: pasted mask threshold (``>=``).
          write_files: write ``instances_results.json`` (and the panoptic-derived ground truth
            ``instances_gt_from_panoptic.json``) to `output_dir`.
          output_dir: output folder for `write_files`.
        """
        self.gt = ground_truth
        self.instances_gt, self.instances_gt_path = instances_json
        self.mask_threshold = float(mask_threshold)
        self.write_files = bool(write_files)
        self.output_dir = output_dir
        self.files: dict[str, str] = {}
        # Panoptic-derived ground-truth annotations per image, kept across evaluations.
        self._derived: dict[int, list[dict[str, Any]]] = {}
        self._derived_ids: set[int] = set()
        self._next_id: int | None = None
        self.reset()

    def reset(self) -> None:
        """Forgets every processed image (derived ground truth is kept)."""
        self._bbox: list[dict[str, Any]] = []
        self._segm: list[dict[str, Any]] = []
        self._image_ids: list[int] = []
        self.files = {}

    def process(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Adds one batch.

        Args:
          inputs: host batch: 'image_id' [B], 'image_shape' [B, 2], 'orig_shape' [B, 2],
            'example_valid' [B] bool.
          outputs: host outputs: 'boxes' [B, D, 4], 'scores' [B, D], 'classes' [B, D], 'valid'
            [B, D], 'masks' [B, D, M, M].
        """
        for i in np.flatnonzero(np.asarray(inputs["example_valid"], bool)):
            image_id = int(inputs["image_id"][i])
            boxes, segms = detections_to_coco(
                image_id,
                outputs["boxes"][i],
                outputs["scores"][i],
                outputs["classes"][i],
                outputs["valid"][i],
                outputs["masks"][i],
                inputs["image_shape"][i],
                inputs["orig_shape"][i],
                self.gt.table,
                self.mask_threshold,
            )
            self._bbox.extend(boxes)
            self._segm.extend(segms)
            self._image_ids.append(image_id)
            if self.instances_gt is None and image_id not in self._derived:
                self._derived[image_id], self._next_id = self.gt.instance_annotations(
                    image_id, self._derived_ids, self._next_id
                )

    @property
    def image_ids(self) -> list[int]:
        """The images processed since `reset`, in order."""
        return list(self._image_ids)

    def _ground_truth(self) -> dict[str, Any]:
        """The COCO instances ground truth of the processed images."""
        if self.instances_gt is not None:
            return self.instances_gt
        wanted = set(self._image_ids)
        panoptic = self.gt.dataset
        return {
            "images": [im for im in panoptic["images"] if int(im["id"]) in wanted],
            "annotations": [
                a
                for ann in panoptic["annotations"]
                if int(ann["image_id"]) in wanted
                for a in self._derived.get(int(ann["image_id"]), [])
            ],
            "categories": [dict(c) for c in panoptic["categories"] if c["isthing"]],
        }

    def evaluate(self) -> dict[str, Any]:
        """{'bbox': {AP...}, 'segm': {AP...}} in percent; writes the files if asked.

        Raises:
          ValueError: no image was processed.
        """
        if not self._image_ids:
            raise ValueError(f"no valid example was processed ({self.gt.json_path})")
        gt = self._ground_truth()
        if self.write_files and self.output_dir is not None:
            if self.instances_gt is None:
                path = os.path.join(self.output_dir, "instances_gt_from_panoptic.json")
                write_json(path, gt, indent=1)
                self.files["instances_gt_json"] = path
            else:
                self.files["instances_gt_json"] = self.instances_gt_path
            path = os.path.join(self.output_dir, "instances_results.json")
            write_json(path, {"bbox": self._bbox, "segm": self._segm}, indent=1)
            self.files["instances_results_json"] = path
        return {
            "bbox": coco_instance_ap(gt, self._bbox, self._image_ids, "bbox"),
            "segm": coco_instance_ap(gt, self._segm, self._image_ids, "segm"),
        }
