"""The eval split's ground truth: the panoptic JSON, and every PNG decoded once for all metrics.

`PanopticGroundTruth` loads ``config.data.eval``'s COCO panoptic JSON and decodes each image's
PNG on first use (`PanopticGroundTruth.image`) into a compact `GroundTruthImage`: a segment
index map (uint8 / uint16: 0 = void, k = the k-th segment of the annotation, `UNKNOWN` for ids
the JSON does not list) from which the panoptic (PQ), semantic (stuff mIoU) and instance (AP)
ground truths are all derived, so the PNG is read once however many metrics and evaluations use
it. Decoded images stay cached on the object up to ``cache_bytes`` (repeated evaluations during
training decode nothing); past the budget they are decoded on demand.

Duplicate segment ids in one annotation follow panopticapi: the last entry wins (its category,
area and crowd flag), at the position of the first.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from oanet_jax.data.coco_panoptic import CategoryTable
from oanet_jax.panoptic import io as pan_io

__all__ = [
    "GroundTruthImage",
    "PanopticGroundTruth",
    "data_path",
    "decode_image",
    "instances_from_panoptic",
    "load_instances_json",
    "load_panoptic_ground_truth",
    "semantic_from_panoptic",
]

VOID_INDEX = 0
DEFAULT_CACHE_BYTES = 2 << 30  # 2 GiB of index maps (~7,000 COCO images at uint8)


def data_path(root: str, path: str) -> str:
    """``path`` relative to ``root`` (absolute paths and an empty root are kept)."""
    return os.path.join(root, path) if root else path


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


def _thing_annotations(
    image_id: int,
    id_map: np.ndarray,
    things: Iterable[Mapping[str, Any]],
    seen_ids: set[int],
    next_id: int,
) -> tuple[list[dict[str, Any]], int]:
    """COCO instance annotations of one image's thing segments (see `instances_from_panoptic`).

    Args:
      image_id: the image.
      id_map: [H, W] ids that the segments' 'id' refer to.
      things: thing segments ('id', 'category_id', optional 'iscrowd', 'area', 'bbox').
      seen_ids: annotation ids used so far (updated).
      next_id: the next free annotation id for a duplicate.

    Returns:
      (annotations, next_id).
    """
    from pycocotools import mask as mask_utils

    out = []
    for seg in things:
        mask = np.asfortranarray((id_map == int(seg["id"])).astype(np.uint8))
        rle = mask_utils.encode(mask)
        rle["counts"] = rle["counts"].decode("ascii")
        if "area" in seg and "bbox" in seg:
            area, bbox = int(seg["area"]), [int(v) for v in seg["bbox"]]
        else:
            area = int(mask.sum())
            bbox = [int(v) for v in mask_utils.toBbox(rle)]
        ann_id = int(seg.get("source_id", seg["id"]))
        if ann_id in seen_ids:
            ann_id, next_id = next_id, next_id + 1
        seen_ids.add(ann_id)
        out.append(
            {
                "id": ann_id,
                "image_id": int(image_id),
                "category_id": int(seg["category_id"]),
                "segmentation": rle,
                "area": area,
                "bbox": bbox,
                "iscrowd": int(seg.get("iscrowd", 0)),
            }
        )
    return out, next_id


def _max_segment_id(panoptic: Mapping[str, Any]) -> int:
    """The largest segment id of a COCO panoptic dataset (0 if none)."""
    ids = (int(s["id"]) for a in panoptic["annotations"] for s in a["segments_info"])
    return max(ids, default=0)


def instances_from_panoptic(
    panoptic: Mapping[str, Any], folder: str, image_ids: Sequence[int] | None = None
) -> dict[str, Any]:
    """A COCO instances dataset from the thing segments of a COCO panoptic ground truth (files).

    As panopticapi's ``converters/panoptic2detection_coco_format.py`` (things only): one annotation
    per thing segment, ``segmentation`` = compressed RLE of the segment's pixels in the PNG,
    ``area``, ``bbox`` and ``iscrowd`` copied from ``segments_info`` (area and tight bbox from the
    pixels when absent), ``id`` = the panoptic segment id (made unique across images by an offset
    when needed). Masks are the visible (non-overlapping) parts. `PanopticGroundTruth.
    instance_annotations` gives the same annotations from the decoded cache.

    Args:
      panoptic: COCO panoptic JSON dict ('images', 'annotations', 'categories').
      folder: its PNG folder.
      image_ids: only these images (default all).

    Returns:
      {'images', 'annotations', 'categories' (thing categories only)}; RLE counts are str.
    """
    thing_ids = {int(c["id"]) for c in panoptic["categories"] if c["isthing"]}
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    images = [im for im in panoptic["images"] if wanted is None or int(im["id"]) in wanted]
    annotations: list[dict[str, Any]] = []
    seen_ids: set[int] = set()
    next_id = 1 + _max_segment_id(panoptic)
    for ann in panoptic["annotations"]:
        if wanted is not None and int(ann["image_id"]) not in wanted:
            continue
        things = [s for s in ann["segments_info"] if int(s["category_id"]) in thing_ids]
        if not things:
            continue
        id_map = pan_io.read_panoptic_png(os.path.join(folder, ann["file_name"]))
        out, next_id = _thing_annotations(ann["image_id"], id_map, things, seen_ids, next_id)
        annotations.extend(out)
    categories = [dict(c) for c in panoptic["categories"] if c["isthing"]]
    return {"images": images, "annotations": annotations, "categories": categories}


@dataclasses.dataclass(frozen=True)
class GroundTruthImage:
    """One decoded ground-truth image.

    Attributes:
      image_id: the image id.
      file_name: its PNG file name.
      index_map: [H, W] uint8 / uint16 / uint32 (`pan_io.smallest_id_dtype`): 0 = void, k in
        1..n = ``segments_info[k - 1]``, n + 1 = ids of the PNG that the JSON does not list
        (neither void nor a segment, ignored by PQ as panopticapi ignores them).
      segments_info: the n distinct segments (panopticapi's last-duplicate-wins), each a copy of
        the JSON entry with ``id`` = its index k and ``source_id`` = the id of the PNG.
      semantic_lut: uint8 [n + 2] contiguous category of each index (255 for void/unknown).
    """

    image_id: int
    file_name: str
    index_map: np.ndarray
    segments_info: list[dict[str, Any]]
    semantic_lut: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W)."""
        return tuple(self.index_map.shape)  # type: ignore[return-value]

    @property
    def semantic(self) -> np.ndarray:
        """uint8 [H, W] contiguous category ids, 255 = void (`semantic_from_panoptic`)."""
        return self.semantic_lut[self.index_map]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached index map."""
        return int(self.index_map.nbytes)


def decode_image(
    annotation: Mapping[str, Any], folder: str, table: CategoryTable
) -> GroundTruthImage:
    """Reads one annotation's PNG into a `GroundTruthImage`.

    Args:
      annotation: the COCO panoptic annotation ('image_id', 'file_name', 'segments_info').
      folder: the PNG folder.
      table: the category table (for the semantic map).

    Returns:
      The decoded image.

    Raises:
      FileNotFoundError: the PNG is missing. KeyError: a segment has an unknown category.
    """
    path = os.path.join(folder, annotation["file_name"])
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"ground-truth PNG {path} (image {annotation['image_id']}) does not exist"
        )
    id_map = pan_io.read_panoptic_png(path)
    by_id = {int(s["id"]): s for s in annotation["segments_info"]}
    ids = np.fromiter(by_id, np.int64, len(by_id))
    n = ids.size
    index = np.full(id_map.shape, n + 1, pan_io.smallest_id_dtype(n + 1))
    index[id_map == 0] = VOID_INDEX
    if n:
        order = np.argsort(ids)
        pos = np.minimum(np.searchsorted(ids[order], id_map), n - 1)
        hit = ids[order][pos] == id_map
        index[hit] = (order[pos[hit]] + 1).astype(index.dtype)
    lut = np.full(n + 2, 255, np.uint8)
    segments = []
    for k, (sid, seg) in enumerate(by_id.items(), start=1):
        try:
            lut[k] = table.to_contiguous(seg["category_id"])
        except KeyError as e:
            raise KeyError(
                f"{path}: segment {sid} of image {annotation['image_id']} has unknown category "
                f"{seg.get('category_id')}"
            ) from e
        segments.append({**seg, "id": k, "source_id": sid})
    return GroundTruthImage(
        int(annotation["image_id"]), str(annotation["file_name"]), index, segments, lut
    )


@dataclasses.dataclass(frozen=True)
class PanopticGroundTruth:
    """The panoptic ground truth of the eval split, with a cache of decoded images.

    Attributes:
      json_path: the COCO panoptic JSON.
      folder: its PNG folder.
      dataset: the loaded JSON ('images', 'annotations', 'categories').
      table: contiguous <-> dataset category ids (things first).
      annotations: image id -> panoptic annotation record.
      cache_bytes: decoded index maps kept up to this many bytes.
      decode_count: number of PNG decodes so far (tests and logs; a cached image is decoded once).
    """

    json_path: str
    folder: str
    dataset: dict[str, Any]
    table: CategoryTable
    annotations: dict[int, dict[str, Any]]
    cache_bytes: int = DEFAULT_CACHE_BYTES
    _cache: dict[int, GroundTruthImage] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _stats: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"decodes": 0, "bytes": 0}, init=False, repr=False, compare=False
    )

    @property
    def decode_count(self) -> int:
        """PNG decodes so far (each cached image is decoded once)."""
        return self._stats["decodes"]

    @property
    def categories(self) -> dict[int, dict[str, Any]]:
        """{dataset category id: category dict}."""
        return {int(c["id"]): c for c in self.dataset["categories"]}

    def image(self, image_id: int) -> GroundTruthImage:
        """The decoded image (cached).

        Raises:
          KeyError: the image has no annotation in the JSON.
        """
        image_id = int(image_id)
        cached = self._cache.get(image_id)
        if cached is not None:
            return cached
        if image_id not in self.annotations:
            raise KeyError(f"image {image_id} has no annotation in {self.json_path}")
        decoded = decode_image(self.annotations[image_id], self.folder, self.table)
        self._stats["decodes"] += 1
        if self._stats["bytes"] + decoded.nbytes <= self.cache_bytes:
            self._cache[image_id] = decoded
            self._stats["bytes"] += decoded.nbytes
        elif self._stats["bytes"] <= self.cache_bytes:
            logging.warning(
                "ground-truth cache full (%d MB): later images are decoded at every evaluation",
                self.cache_bytes >> 20,
            )
            self._stats["bytes"] = self.cache_bytes + 1  # warn once
        return decoded

    def instance_annotations(
        self, image_id: int, seen_ids: set[int], next_id: int | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """COCO instance annotations of one image's thing segments (`instances_from_panoptic`).

        Args:
          image_id: the image.
          seen_ids: annotation ids used so far in the dataset being built (updated).
          next_id: next free id for duplicates (default: above every segment id of the JSON).

        Returns:
          (annotations, next_id).
        """
        gt = self.image(image_id)
        if next_id is None:
            next_id = 1 + _max_segment_id(self.dataset)
        things = [s for s in gt.segments_info if self.table.isthing[gt.semantic_lut[s["id"]]]]
        return _thing_annotations(image_id, gt.index_map, things, seen_ids, next_id)


def load_panoptic_ground_truth(
    config_data: Any, *, cache_bytes: int = DEFAULT_CACHE_BYTES
) -> PanopticGroundTruth:
    """Loads the eval split's panoptic JSON (paths of ``config.data.eval``, under ``data.root``).

    Args:
      config_data: ``config.data``.
      cache_bytes: budget of the decoded-image cache.

    Returns:
      The ground truth (nothing decoded yet).

    Raises:
      FileNotFoundError: the JSON or the PNG folder is missing.
    """
    json_path = data_path(config_data.root, config_data.eval.panoptic_json)
    folder = data_path(config_data.root, config_data.eval.panoptic_dir)
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"panoptic ground-truth JSON {json_path} does not exist")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"panoptic ground-truth PNG folder {folder} does not exist")
    with open(json_path) as f:
        dataset = json.load(f)
    table = CategoryTable.from_categories(dataset["categories"])
    annotations = {int(a["image_id"]): a for a in dataset["annotations"]}
    return PanopticGroundTruth(json_path, folder, dataset, table, annotations, int(cache_bytes))


def load_instances_json(config_data: Any) -> tuple[dict[str, Any] | None, str]:
    """The configured COCO instances ground truth (``config.data.eval.instances_json``).

    Returns:
      (dataset, path), or (None, '') when none is configured or the file is missing (then the
      AP ground truth is built from the panoptic thing segments; a missing file is logged).
    """
    path = str(config_data.eval.get("instances_json", "") or "")
    if not path:
        return None, ""
    path = data_path(config_data.root, path)
    if not os.path.isfile(path):
        logging.warning(
            "instances JSON %s not found; building the box/mask AP ground truth from "
            "the panoptic thing segments instead",
            path,
        )
        return None, ""
    with open(path) as f:
        return json.load(f), path
