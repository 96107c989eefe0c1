"""Panoptic quality per merge ordering, accumulated in memory (no PNG round trip).

`PanopticEvaluator.process` maps each valid example's merged id map back to the original image
(`data.transforms.prediction_to_original`), pairs it with the decoded ground truth
(`ground_truth.PanopticGroundTruth.image`, decoded once and cached) and folds the image's matches
into a `pq.PQStat` per ordering (`pq.pair_counts` + `pq.match_image`: panopticapi's rules, so
the result equals `pq.pq_compute` on the written files). PQ, SQ, RQ are reported in percent over
all categories, things (``PQ_th``...) and stuff (``PQ_st``...), plus per-class PQ / SQ / RQ.

Device path (``config.eval.pq_backend = 'device'``, `DevicePQ`): the ground truth of each batch
travels with it as padded index maps and segment tables (`pq_device.ground_truth_to_device`), the
jitted inference maps each ordering's id map back to the original size and matches it on the
accelerator (`pq_device.resize_to_original` + `pq_device.pq_stats`, in `make_inference_fn`'s
``postprocess``), and `process` folds the small integer statistics (``outputs['pq_stats']``) into a
`pq_device.DevicePQAccumulator` per ordering instead of matching on the host. Both paths give
`pq.pq_compute`'s numbers (to 1e-9, tested).

With ``write_predictions``, the COCO panoptic PNGs and predictions JSON are also written
(``<output_dir>/panoptic_<ordering>/`` and ``panoptic_<ordering>.json``: panopticapi's convention,
so ``pq_compute(gt_json, pred_json)`` finds the folder), for submissions or external tools.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from oanet_jax.common.files import write_json
from oanet_jax.data import transforms
from oanet_jax.data.coco_panoptic import CategoryTable
from oanet_jax.eval.ground_truth import GroundTruthImage, PanopticGroundTruth
from oanet_jax.panoptic import io as pan_io
from oanet_jax.panoptic import pq as pq_lib
from oanet_jax.panoptic import pq_device

__all__ = ["PQ_METRICS", "DevicePQ", "PanopticEvaluator", "summarize_pq"]

PQ_METRICS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")


def summarize_pq(result: Mapping[str, Any], table: CategoryTable) -> dict[str, Any]:
    """pq_compute's result as flat percentages plus per-class PQ keyed by category name.

    Args:
      result: `pq.pq_compute` / `pq.evaluate_id_maps` / `PQStat.summarize` result.
      table: the category table.

    Returns:
      {'PQ', 'SQ', 'RQ', 'PQ_th', ..., 'RQ_st' (percent), 'n', 'n_th', 'n_st', 'per_class':
      {name: {'category_id', 'isthing', 'PQ', 'SQ', 'RQ', 'TP', 'FP', 'FN'}}}. A category with
      TP + FP + FN = 0 (in neither the ground truth nor the predictions) has PQ = SQ = RQ = 0.0,
      as in panopticapi, and is left out of the averages; the counts tell it from a PQ of 0. A
      `result` without counts (e.g. panopticapi's own) gives no 'TP', 'FP', 'FN'.
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
            **{m.upper(): int(values[m]) for m in ("tp", "fp", "fn") if m in values},
        }
    out["per_class"] = per_class
    return out


def _per_example(tree: Any, i: int) -> Any:
    """Example i of a (nested) dict of batched arrays."""
    if isinstance(tree, Mapping):
        return {k: _per_example(v, i) for k, v in tree.items()}
    return tree[i]


class PanopticEvaluator:
    """PQ per merge ordering (detectron2-style ``reset / process / evaluate``).

    Attributes:
      name: 'panoptic'.
      output_dir: where `write_predictions` files go (set before `reset`); None: not written.
      files: {name: path} written by the last `evaluate`.
    """

    name = "panoptic"

    def __init__(
        self,
        ground_truth: PanopticGroundTruth,
        orderings: Sequence[str] = ("score", "srm"),
        *,
        write_predictions: bool = False,
        output_dir: str | None = None,
        device_accumulator: Callable[[], pq_device.DevicePQAccumulator] | None = None,
    ):
        """Creates the evaluator.

        Args:
          ground_truth: the eval split (decoded images are cached on it).
          orderings: the merge orderings of the outputs ('score', 'srm').
          write_predictions: also write COCO panoptic PNGs + predictions JSON to `output_dir`.
          output_dir: output folder for `write_predictions`.
          device_accumulator: factory of the host accumulator of the device PQ statistics
            (used for an ordering when the outputs carry ``pq_stats[ordering]``).
        """
        self.gt = ground_truth
        self.orderings = tuple(orderings)
        self.write_predictions = bool(write_predictions)
        self.output_dir = output_dir
        self.device_accumulator = device_accumulator
        self._categories = ground_truth.categories
        self.files: dict[str, str] = {}
        self.reset()

    def reset(self) -> None:
        """Forgets every processed image (the ground-truth cache is kept)."""
        self._stats = {o: pq_lib.PQStat() for o in self.orderings}
        self._device: dict[str, pq_device.DevicePQAccumulator] = {}
        self._annotations: dict[str, list[dict[str, Any]]] = {o: [] for o in self.orderings}
        self._image_ids: list[int] = []
        self.files = {}

    def _folder(self, ordering: str) -> str:
        if self.output_dir is None:
            raise ValueError("write_predictions needs an output_dir")
        return os.path.join(self.output_dir, f"panoptic_{ordering}")

    def process(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Adds one batch.

        Args:
          inputs: host batch: 'image_id' [B], 'image_shape' [B, 2], 'orig_shape' [B, 2],
            'example_valid' [B] bool (padding examples are skipped).
          outputs: host outputs of `make_inference_fn` ('panoptic': {ordering: {'id_map'
            [B, Hp, Wp], 'segments'}}; optionally 'pq_stats': {ordering: device statistics}).

        Raises:
          KeyError: an image without ground truth. PanopticFormatError: a malformed prediction
            (names the image).
        """
        valid = np.asarray(inputs["example_valid"], bool)
        device_stats = outputs.get("pq_stats") or {}
        on_device = set()
        for o in self.orderings:
            if o in device_stats and self.device_accumulator is not None:
                if o not in self._device:
                    self._device[o] = self.device_accumulator()
                self._device[o].add(device_stats[o], valid)
                on_device.add(o)
        host = [o for o in self.orderings if o not in on_device or self.write_predictions]
        for i in np.flatnonzero(valid):
            image_id = int(inputs["image_id"][i])
            gt = self.gt.image(image_id)
            self._image_ids.append(image_id)
            for o in host:
                pan = _per_example(outputs["panoptic"][o], i)
                id_map, segs = transforms.prediction_to_original(
                    pan["id_map"],
                    pan["segments"],
                    inputs["image_shape"][i],
                    inputs["orig_shape"][i],
                    self.gt.table,
                )
                if id_map.shape != gt.shape:
                    raise pq_lib.PanopticFormatError(
                        f"image {image_id} ({gt.file_name}): prediction at the original size is "
                        f"{id_map.shape}, the ground-truth PNG {gt.shape} (orig_shape mismatch)"
                    )
                if o not in on_device:
                    pairs = pq_lib.pair_counts(
                        gt.index_map, id_map, pred_candidates=pq_lib.segment_ids(segs)
                    )
                    name = f"image {image_id} ({gt.file_name}), ordering {o}"
                    self._stats[o].add(
                        pq_lib.match_image(
                            *pairs, gt.segments_info, segs, self._categories, image=name
                        )
                    )
                if self.write_predictions:
                    segs = pan_io.write_prediction(self._folder(o), gt.file_name, id_map, segs)
                    self._annotations[o].append(
                        {"image_id": image_id, "file_name": gt.file_name, "segments_info": segs}
                    )

    @property
    def image_ids(self) -> list[int]:
        """The images processed since `reset`, in order."""
        return list(self._image_ids)

    def evaluate(self) -> dict[str, Any]:
        """{'panoptic': {ordering: `summarize_pq` dict}} (percent); writes the files if asked.

        Raises:
          ValueError: no image was processed.
        """
        if not self._image_ids:
            raise ValueError(f"no valid example was processed ({self.gt.json_path})")
        results = {}
        for o in self.orderings:
            if o in self._device:
                raw = self._device[o].summarize(self._categories)
            else:
                raw = self._stats[o].summarize(self._categories)
            results[o] = summarize_pq(raw, self.gt.table)
        if self.write_predictions:
            self._write_files()
        return {"panoptic": results}

    def _write_files(self) -> None:
        """The predictions JSON per ordering, and the ground truth of the evaluated subset."""
        gt_json = self.gt.json_path
        evaluated = set(self._image_ids)
        if evaluated != set(self.gt.annotations):
            subset = dict(self.gt.dataset)
            subset["annotations"] = [
                a for a in self.gt.dataset["annotations"] if a["image_id"] in evaluated
            ]
            subset["images"] = [
                im for im in self.gt.dataset.get("images", []) if im["id"] in evaluated
            ]
            gt_json = os.path.join(str(self.output_dir), "panoptic_gt_subset.json")
            write_json(gt_json, subset, indent=1)
        self.files["panoptic_gt_json"] = gt_json
        for o in self.orderings:
            folder = self._folder(o)
            pan_io.write_predictions_json(
                folder + ".json", self._annotations[o], self.gt.dataset["categories"]
            )
            self.files[f"panoptic_{o}_json"] = folder + ".json"
            self.files[f"panoptic_{o}_folder"] = folder


class DevicePQ:
    """Host side of the on-device PQ (``config.eval.pq_backend = 'device'``).

    Static sizes come from the eval split: the canvas (Hmax, Wmax) is the largest original image
    of the panoptic JSON's ``images`` (height, width), G the most segments of one annotation, so
    one compilation serves every batch. Per batch, `batch_arrays` packs each example's decoded
    ground truth (`PanopticGroundTruth.image`, cached) into `pq_device.ground_truth_to_device`'s
    padded form; `postprocess` runs inside the jitted inference; `accumulator` makes the host sums.

    Attributes:
      keys: the batch entries `postprocess` reads (sent to the device with the batch).
      canvas: (Hmax, Wmax).
      max_segments: G.
    """

    keys = ("gt_index_map", "gt_category", "gt_iscrowd", "gt_area", "gt_valid", "orig_shape")

    def __init__(self, ground_truth: PanopticGroundTruth, orderings: Sequence[str]):
        """Sizes the device inputs from the split.

        Raises:
          ValueError: the panoptic JSON's ``images`` lack a height or width.
        """
        self.gt = ground_truth
        self.orderings = tuple(orderings)
        try:
            sizes = [(int(im["height"]), int(im["width"])) for im in ground_truth.dataset["images"]]
        except KeyError as e:
            raise ValueError(
                f"{ground_truth.json_path}: pq_backend 'device' needs the height and width of "
                f"every entry of 'images' (missing {e}); use pq_backend 'host'"
            ) from e
        self.canvas = (max(h for h, _ in sizes), max(w for _, w in sizes))
        self.max_segments = max(
            1,
            max(
                len({int(s["id"]) for s in a["segments_info"]})
                for a in ground_truth.annotations.values()
            ),
        )
        table = ground_truth.table
        self._to_contiguous = {int(d): c for c, d in enumerate(table.dataset_ids)}
        self._num_classes = len(table.dataset_ids)
        self._tables: dict[int, dict[str, np.ndarray]] = {}

    def _table(self, image: GroundTruthImage) -> dict[str, np.ndarray]:
        """The padded segment table of one image ('category', 'iscrowd', 'area', 'valid' [G]),
        computed on first use (`pq_device.ground_truth_to_device`) and cached: a few bytes per
        image, so later evaluations only copy index maps."""
        table = self._tables.get(image.image_id)
        if table is None:
            arrays = pq_device.ground_truth_to_device(
                image.index_map,
                image.segments_info,
                self._to_contiguous,
                self.max_segments,
                image=f"image {image.image_id} ({image.file_name})",
            )
            table = {k: arrays[k] for k in ("category", "iscrowd", "area", "valid")}
            self._tables[image.image_id] = table
        return table

    def batch_arrays(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The ground-truth entries of `keys` for one host batch (padding examples: all void).

        Args:
          batch: the eval batch ('image_id' [B], 'example_valid' [B], 'orig_shape' [B, 2]).

        Returns:
          'gt_index_map' int32 [B, Hmax, Wmax], 'gt_category' int32 [B, G], 'gt_iscrowd' bool
          [B, G], 'gt_area' int32 [B, G], 'gt_valid' bool [B, G], 'orig_shape' int32 [B, 2].
        """
        b = len(batch["image_id"])
        g = self.max_segments
        out = {
            "gt_index_map": np.zeros((b, *self.canvas), np.int32),
            "gt_category": np.zeros((b, g), np.int32),
            "gt_iscrowd": np.zeros((b, g), bool),
            "gt_area": np.zeros((b, g), np.int32),
            "gt_valid": np.zeros((b, g), bool),
            "orig_shape": np.asarray(batch["orig_shape"], np.int32),
        }
        for i in np.flatnonzero(np.asarray(batch["example_valid"], bool)):
            image = self.gt.image(int(batch["image_id"][i]))
            for key, value in self._table(image).items():
                out[f"gt_{key}"][i] = value
            # The cached index map already numbers segments 1..n (unlisted PNG ids n + 1): only
            # the unlisted value moves to G + 1, the device's convention.
            h, w = image.shape
            if h > self.canvas[0] or w > self.canvas[1]:
                raise pq_lib.PanopticFormatError(
                    f"image {image.image_id} ({image.file_name}): ground-truth PNG {h}x{w} is "
                    f"larger than the JSON's largest image {self.canvas[0]}x{self.canvas[1]}"
                )
            window = out["gt_index_map"][i, :h, :w]
            window[...] = image.index_map
            window[image.index_map == len(image.segments_info) + 1] = g + 1
        return out

    def postprocess(
        self, outputs: Mapping[str, Any], batch: Mapping[str, jax.Array]
    ) -> dict[str, Any]:
        """Traced inside the jitted inference: {'pq_stats': {ordering: `pq_device.pq_stats`}}."""
        stats = {}
        for o in self.orderings:
            pan = outputs["panoptic"][o]
            pred = pq_device.resize_to_original(
                pan["id_map"], batch["image_shape"], batch["orig_shape"], canvas_size=self.canvas
            )
            stats[o] = pq_device.pq_stats(
                batch["gt_index_map"],
                batch["gt_category"],
                batch["gt_iscrowd"],
                batch["gt_area"],
                batch["gt_valid"],
                pred,
                pan["segments"]["category"],
                pan["segments"]["valid"],
                num_classes=self._num_classes,
            )
        return {"pq_stats": stats}

    def accumulator(self) -> pq_device.DevicePQAccumulator:
        """A fresh host accumulator (dataset category ids)."""
        return pq_device.DevicePQAccumulator(self.gt.table.dataset_ids)
