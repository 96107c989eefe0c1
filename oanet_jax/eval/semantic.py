"""Stuff mIoU of the stuff branch (detectron2 SemSegEvaluator's convention, stuff classes only).

The prediction is the argmax over the STUFF channels only of the stuff logits, upsampled
bilinearly to the padded input (exactly the upsampling of the panoptic merge: the inference's
``stuff_labels``), cropped and resized (nearest) to the original image
(`data.transforms.stuff_prediction_to_original`). It is scored against the ground-truth semantic
map (from the decoded panoptic ground truth, crowd segments included) on the pixels whose
ground-truth class is a stuff class only (thing and void pixels are ignored). Per stuff class
``IoU_c = TP / (TP + FP + FN)`` over those pixels; mIoU is the mean over the stuff classes that
have ground-truth pixels. In percent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from oanet_jax.data import transforms
from oanet_jax.data.coco_panoptic import CategoryTable
from oanet_jax.eval.ground_truth import PanopticGroundTruth

__all__ = ["SemanticEvaluator", "StuffConfusion"]


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


class SemanticEvaluator:
    """Stuff mIoU (detectron2-style ``reset / process / evaluate``).

    Attributes:
      name: 'stuff'.
      output_dir: unused (nothing is written); present for the evaluator interface.
    """

    name = "stuff"

    def __init__(self, ground_truth: PanopticGroundTruth):
        """Creates the evaluator.

        Args:
          ground_truth: the eval split (decoded images are cached on it).
        """
        self.gt = ground_truth
        self.output_dir: str | None = None
        self.files: dict[str, str] = {}
        self.reset()

    def reset(self) -> None:
        """Clears the confusion matrix."""
        self.confusion = StuffConfusion(self.gt.table.num_things, self.gt.table.num_stuff)
        self._count = 0

    def process(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Adds one batch.

        Args:
          inputs: host batch: 'image_id' [B], 'image_shape' [B, 2], 'orig_shape' [B, 2],
            'example_valid' [B] bool.
          outputs: host outputs: 'stuff_labels' [B, Hp, Wp] int32 stuff indices (-1 outside).
        """
        for i in np.flatnonzero(np.asarray(inputs["example_valid"], bool)):
            gt = self.gt.image(int(inputs["image_id"][i]))
            pred = transforms.stuff_prediction_to_original(
                outputs["stuff_labels"][i], inputs["image_shape"][i], inputs["orig_shape"][i]
            )
            self.confusion.update(pred, gt.semantic)
            self._count += 1

    def evaluate(self) -> dict[str, Any]:
        """{'stuff': {'mIoU', 'n', 'per_class'}} in percent.

        Raises:
          ValueError: no image was processed.
        """
        if not self._count:
            raise ValueError(f"no valid example was processed ({self.gt.json_path})")
        return {"stuff": self.confusion.result(self.gt.table)}
