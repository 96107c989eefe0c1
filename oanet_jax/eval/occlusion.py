"""Occlusion order: how often each instance ordering puts the true occluder on top.

The question the spatial ranking module answers (paper section 3.2): where two instances of
different thing classes overlap, which one is in front? For every pair of ground-truth instances
of different thing classes whose FULL (amodal) masks overlap (the instances JSON), the true
occluder is the one whose visible panoptic segment holds more of the overlap's pixels (pairs whose
overlap is hidden by a third instance are counted as undetermined). When both instances are
detected (a kept detection of the same class with mask IoU >= ``iou_threshold`` against the full
mask, matched greedily in detection-score order), the pair is "detected", and an ordering is wrong
on it when it does not rank the occluder strictly above the other: the detection score for
'score', the SRM ranking score (Eq. 3) for 'srm'.

The kept detections are those the merge pastes: valid and scoring at least
``model.test.instance_score_thresh``; their 28 x 28 box-frame masks are pasted at the original
resolution (`ops.masks.paste_mask_np`) and thresholded at ``mask_threshold`` (``>=``), as in the
instances evaluator. Needs the eval split's instances JSON (full masks); without one it reports
no pair.

The evaluator also keeps examples of detected pairs where the two orderings disagree (the study's
figure like the paper's Fig. 7/8): the image, both instances' boxes at the original resolution,
classes, detection scores and ranking scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from oanet_jax.data import transforms
from oanet_jax.eval.ground_truth import PanopticGroundTruth
from oanet_jax.ops.masks import paste_mask_np

__all__ = ["OcclusionOrderEvaluator", "annotation_mask", "occlusion_pairs"]


def annotation_mask(ann: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """bool [H, W] mask of a COCO instance annotation (RLE, uncompressed RLE or polygons)."""
    from pycocotools import mask as mask_utils

    seg = ann["segmentation"]
    if isinstance(seg, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = {"size": seg["size"], "counts": seg["counts"]}
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    mask = mask_utils.decode(rle).astype(bool)
    if mask.shape != (height, width):
        raise ValueError(
            f"instance annotation {ann.get('id')} of image {ann.get('image_id')}: mask of shape "
            f"{mask.shape}, the image is {(height, width)}"
        )
    return mask


def occlusion_pairs(
    full_masks: np.ndarray, categories: np.ndarray, visible: np.ndarray, min_overlap: int = 1
) -> list[tuple[int, int, int]]:
    """Overlapping pairs of instances of different classes and their true occluder.

    Args:
      full_masks: bool [N, H, W] full (amodal) instance masks.
      categories: int [N] category ids.
      visible: bool [N, H, W] each instance's visible segment (all False when it has none).
      min_overlap: pixels two full masks must share to make a pair.

    Returns:
      [(a, b, top)] for a < b: top is a or b (more visible pixels in the overlap), or -1 when
      neither shows in it (hidden by a third instance) or both show equally.
    """
    n = full_masks.shape[0]
    pairs = []
    flat = full_masks.reshape(n, -1)
    for a in range(n):
        for b in range(a + 1, n):
            if categories[a] == categories[b]:
                continue
            overlap = flat[a] & flat[b]
            if int(overlap.sum()) < min_overlap:
                continue
            va = int((visible[a].reshape(-1) & overlap).sum())
            vb = int((visible[b].reshape(-1) & overlap).sum())
            top = a if va > vb else b if vb > va else -1
            pairs.append((a, b, top))
    return pairs


def _match(
    det_masks: np.ndarray,
    det_classes: np.ndarray,
    gt_masks: np.ndarray,
    gt_classes: np.ndarray,
    iou_threshold: float,
) -> np.ndarray:
    """int [N] detection matched to each ground-truth instance (-1: none); the detections are in
    descending score order and each takes its best unmatched instance of its class."""
    n, d = gt_masks.shape[0], det_masks.shape[0]
    match = np.full((n,), -1, np.int64)
    if n == 0 or d == 0:
        return match
    g = gt_masks.reshape(n, -1).astype(np.float32)
    p = det_masks.reshape(d, -1).astype(np.float32)
    inter = p @ g.T
    union = p.sum(1)[:, None] + g.sum(1)[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1.0), 0.0)
    iou[det_classes[:, None] != gt_classes[None, :]] = -1.0
    for k in range(d):
        row = np.where(match[None, :] >= 0, -1.0, iou[k : k + 1])[0]
        best = int(np.argmax(row))
        if row[best] >= iou_threshold:
            match[best] = k
    return match


class OcclusionOrderEvaluator:
    """detectron2-style evaluator of the occlusion order (see the module docstring).

    Attributes:
      name: 'occlusion'.
      output_dir: unused (the results go into the evaluation's report).
      files: {} (nothing written).
    """

    name = "occlusion"

    def __init__(
        self,
        ground_truth: PanopticGroundTruth,
        instances_json: tuple[dict[str, Any] | None, str],
        *,
        score_thresh: float = 0.5,
        mask_threshold: float = 0.5,
        iou_threshold: float = 0.5,
        min_overlap: int = 1,
        max_examples: int = 32,
    ):
        """Creates the evaluator.

        Args:
          ground_truth: the eval split (visible segments).
          instances_json: (COCO instances dataset with full masks, its path), e.g. from
            `ground_truth.load_instances_json`; (None, '') reports no pair.
          score_thresh: detections scoring below this are not kept (the merge's
            ``instance_score_thresh``).
          mask_threshold: pasted mask threshold (``>=``).
          iou_threshold: mask IoU of a detection with a full mask to count it as detected.
          min_overlap: pixels two full masks must share to make a pair.
          max_examples: disagreement examples kept (in image order).
        """
        self.gt = ground_truth
        self.instances_gt, self.instances_gt_path = instances_json
        self.score_thresh = float(score_thresh)
        self.mask_threshold = float(mask_threshold)
        self.iou_threshold = float(iou_threshold)
        self.min_overlap = int(min_overlap)
        self.max_examples = int(max_examples)
        self.output_dir: str | None = None
        self.files: dict[str, str] = {}
        self._anns: dict[int, list[dict[str, Any]]] = {}
        for ann in (self.instances_gt or {}).get("annotations", []):
            if not ann.get("iscrowd", 0):
                self._anns.setdefault(int(ann["image_id"]), []).append(ann)
        self.reset()

    def reset(self) -> None:
        """Forgets every processed image."""
        self._counts = dict.fromkeys(
            ("images", "pairs", "undetermined", "detected", "score_wrong", "srm_wrong"), 0
        )
        self._counts.update(srm_fixes=0, srm_breaks=0)
        self._examples: list[dict[str, Any]] = []

    def _visible(self, image_id: int, anns: list[dict[str, Any]], full: np.ndarray) -> np.ndarray:
        """bool [N, H, W] the visible segment of each annotation: the panoptic segment with its id
        (the synthetic data), else the segment of its class that overlaps its full mask most (COCO,
        whose panoptic and instance ids differ); all False when there is none."""
        gt = self.gt.image(image_id)
        by_source = {int(s["source_id"]): s for s in gt.segments_info}
        out = np.zeros((len(anns), *gt.shape), bool)
        for i, ann in enumerate(anns):
            seg = by_source.get(int(ann["id"]))
            if seg is None or int(seg["category_id"]) != int(ann["category_id"]):
                same = [s for s in gt.segments_info if s["category_id"] == ann["category_id"]]
                hits = [int((gt.index_map[full[i]] == s["id"]).sum()) for s in same]
                seg = same[int(np.argmax(hits))] if hits and max(hits) > 0 else None
            if seg is not None:
                out[i] = gt.index_map == seg["id"]
        return out

    def process(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Adds one batch.

        Args:
          inputs: host batch: 'image_id' [B], 'image_shape' [B, 2], 'orig_shape' [B, 2],
            'example_valid' [B] bool.
          outputs: host outputs: 'boxes' [B, D, 4], 'scores' [B, D], 'srm_scores' [B, D],
            'classes' [B, D], 'valid' [B, D], 'masks' [B, D, M, M].
        """
        for i in np.flatnonzero(np.asarray(inputs["example_valid"], bool)):
            self._process_image(int(inputs["image_id"][i]), inputs, outputs, i)

    def _process_image(
        self, image_id: int, inputs: Mapping[str, Any], outputs: Mapping[str, Any], i: int
    ) -> None:
        self._counts["images"] += 1
        anns = self._anns.get(image_id, [])
        if len(anns) < 2:
            return
        h, w = (int(v) for v in inputs["orig_shape"][i])
        full = np.stack([annotation_mask(a, h, w) for a in anns])
        gt_classes = np.asarray([int(a["category_id"]) for a in anns])
        visible = self._visible(image_id, anns, full)
        pairs = occlusion_pairs(full, gt_classes, visible, self.min_overlap)
        if not pairs:
            return
        scores = np.asarray(outputs["scores"][i], np.float64)
        keep = np.flatnonzero(np.asarray(outputs["valid"][i], bool) & (scores >= self.score_thresh))
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        boxes = transforms.boxes_to_original(
            np.asarray(outputs["boxes"][i])[keep], inputs["image_shape"][i], (h, w)
        )
        det_masks = np.stack(
            [
                paste_mask_np(outputs["masks"][i][d], box, (h, w)) >= self.mask_threshold
                for d, box in zip(keep, boxes, strict=True)
            ]
        ) if len(keep) else np.zeros((0, h, w), bool)  # fmt: skip
        det_classes = np.asarray(
            [self.gt.table.to_dataset(int(outputs["classes"][i][d])) for d in keep], np.int64
        )
        match = _match(det_masks, det_classes, full, gt_classes, self.iou_threshold)
        srm = np.asarray(outputs["srm_scores"][i], np.float64)
        for a, b, top in pairs:
            self._counts["pairs"] += 1
            if top < 0:
                self._counts["undetermined"] += 1
                continue
            if match[a] < 0 or match[b] < 0:
                continue
            under = b if top == a else a
            dt, du = keep[match[top]], keep[match[under]]
            score_wrong = not scores[dt] > scores[du]
            srm_wrong = not srm[dt] > srm[du]
            self._counts["detected"] += 1
            self._counts["score_wrong"] += int(score_wrong)
            self._counts["srm_wrong"] += int(srm_wrong)
            self._counts["srm_fixes"] += int(score_wrong and not srm_wrong)
            self._counts["srm_breaks"] += int(srm_wrong and not score_wrong)
            if score_wrong != srm_wrong and len(self._examples) < self.max_examples:
                self._examples.append(
                    {
                        "image_id": image_id,
                        "srm_right": bool(score_wrong),
                        "instances": [
                            {
                                "role": role,
                                "category_id": int(gt_classes[g]),
                                "box": [float(v) for v in boxes[match[g]]],
                                "score": float(scores[d]),
                                "srm_score": float(srm[d]),
                            }
                            for role, g, d in (("top", top, dt), ("under", under, du))
                        ],
                    }
                )

    def evaluate(self) -> dict[str, Any]:
        """{'occlusion': counts, 'score_wrong_pct' and 'srm_wrong_pct' (of the detected pairs;
        NaN without one) and 'examples'}."""
        c = dict(self._counts)
        n = c["detected"]
        c["score_wrong_pct"] = 100.0 * c["score_wrong"] / n if n else float("nan")
        c["srm_wrong_pct"] = 100.0 * c["srm_wrong"] / n if n else float("nan")
        c["examples"] = list(self._examples)
        return {"occlusion": c}
