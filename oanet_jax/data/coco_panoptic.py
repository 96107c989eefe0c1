"""Reader for datasets in COCO panoptic format (host side, numpy).

A split is an image folder, a COCO panoptic JSON (``images``, ``annotations`` with
``segments_info``, ``categories``) with its folder of panoptic PNGs, and optionally a COCO
instances JSON (polygons, compressed or uncompressed RLE, crowd RLE). Any dataset in this format
works, custom ones included.

Category ids. The contiguous ids used everywhere in the model are fixed here, once, by
:class:`CategoryTable`: THINGS FIRST. Contiguous ids ``0..T-1`` are the thing categories sorted by
dataset id, ``T..T+S-1`` the stuff categories sorted by dataset id.

Records. :meth:`CocoPanopticReader.read` returns, at full image resolution (not resized, not
padded):

- ``image``: uint8 [H, W, 3] RGB. Images stored in another mode are converted with PIL's
  ``convert("RGB")``: grayscale (``L``) is replicated to three channels, RGBA drops its alpha
  channel, palette/CMYK/... are mapped to RGB. Each conversion is counted in ``reader.summary``
  (``converted_grayscale``, ``converted_rgba``, ``converted_<mode>``). EXIF orientation is NOT
  applied (the raw pixel grid is what the annotations refer to; as tf.io.decode_jpeg and TFDS).
- ``image_id``: int64 scalar; ``file_name``: str (the image file name from the JSON).
- ``semantic``: uint8 [H, W], contiguous class ids, 255 = void (id 0 in the PNG). Every segment,
  crowd segments included, paints its category (as detectron2's and panopticapi's
  panoptic -> semantic conversions do).
- ``boxes``: float32 [N, 4] x1y1x2y2 absolute pixels from the masks (x2 = max column + 1,
  y2 = max row + 1). An empty mask from the instances JSON keeps its JSON ``bbox``.
- ``classes``: int32 [N] contiguous thing ids (0..T-1); ``is_crowd``: bool [N].
- ``masks``: uint8 [N, H, W] binary (0/1) instance masks. With an instances JSON they come from it
  (in its annotation order; they may overlap; annotations of stuff categories are ignored, and
  the reader logs how many; as detectron2, polygons with fewer than 3 points are removed and an
  annotation left without polygon is dropped, counted and logged); otherwise from the thing
  segments of the panoptic PNG (in ``segments_info`` order), and the reader logs that once.
- ``segment_ids``: int32 [N] panoptic segment id per instance when the masks come from the PNG,
  else -1. ``ann_ids``: int64 [N] annotation id from the instances JSON, else -1.

The panoptic PNG holds segment id ``R + 256 * G + 256**2 * B``.

Bad records raise :class:`DataError` (a ``ValueError``) whose message names the file and the
record (image id, and segment / annotation id where one is at fault): unreadable or missing image
or PNG, PNG segment ids that disagree with the JSON, unknown category id, more instances than
``max_instances``, an image without annotation record, sizes that disagree between image, PNG and
JSON records. With ``skip_bad_records=True``, :meth:`CocoPanopticReader.maybe_read` and iteration
skip such records and count them by reason in ``reader.summary`` (and log one line per skipped
record). Nothing is dropped silently.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pathlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from oanet_jax.panoptic.io import rgb_to_id

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

VOID = 255
"""Semantic label of unlabelled pixels (segment id 0 in the panoptic PNG)."""

# Reasons a record is bad (keys of ``reader.summary`` when records are skipped).
MISSING_ANNOTATION = "missing_annotation"
MISSING_IMAGE = "missing_image"
BAD_IMAGE = "bad_image"
MISSING_PNG = "missing_png"
BAD_PNG = "bad_png"
SEGMENT_MISMATCH = "segment_mismatch"
UNKNOWN_CATEGORY = "unknown_category"
TOO_MANY_INSTANCES = "too_many_instances"
SIZE_MISMATCH = "size_mismatch"
MISSING_INSTANCES_RECORD = "missing_instances_record"
BAD_INSTANCE_ANNOTATION = "bad_instance_annotation"
ANNOTATION_WITHOUT_IMAGE = "annotation_without_image"
SKIP_REASONS = frozenset(
    {
        MISSING_ANNOTATION,
        MISSING_IMAGE,
        BAD_IMAGE,
        MISSING_PNG,
        BAD_PNG,
        SEGMENT_MISMATCH,
        UNKNOWN_CATEGORY,
        TOO_MANY_INSTANCES,
        SIZE_MISMATCH,
        MISSING_INSTANCES_RECORD,
        BAD_INSTANCE_ANNOTATION,
        ANNOTATION_WITHOUT_IMAGE,
    }
)
# Notes (not errors; the record is kept or, for empty images, dropped on request).
EMPTY_IMAGE_DROPPED = "empty_image_dropped"
EMPTY_INSTANCE_MASK = "empty_instance_mask"  # kept, box taken from the JSON bbox
# Instances-JSON annotations without any polygon of >= 3 points (counted per annotation).
INVALID_POLYGON_DROPPED = "invalid_polygon_dropped"
CONVERTED_PREFIX = "converted_"


class DataError(ValueError):
    """A bad record. The message names the file and the record (image id, segment id).

    Attributes:
      reason: one of the reason constants of this module (e.g. ``"missing_png"``).
      path: the file at fault (or the JSON holding the record).
      image_id: the image id of the record, or None.
      segment_id: the panoptic segment id at fault, or None.
      ann_id: the instances-JSON annotation id at fault, or None.
      detail: the bare description, without file and record.
    """

    def __init__(
        self,
        detail: str,
        *,
        reason: str,
        path: PathLike | None = None,
        image_id: int | None = None,
        segment_id: int | None = None,
        ann_id: int | None = None,
    ):
        self.detail = detail
        self.reason = reason
        self.path = None if path is None else str(path)
        self.image_id = image_id
        self.segment_id = segment_id
        self.ann_id = ann_id
        record = []
        if image_id is not None:
            record.append(f"image_id={image_id}")
        if segment_id is not None:
            record.append(f"segment_id={segment_id}")
        if ann_id is not None:
            record.append(f"ann_id={ann_id}")
        where = self.path or "<unknown file>"
        if record:
            where += f" [{', '.join(record)}]"
        super().__init__(f"{where}: {detail} ({reason})")

    def __reduce__(self):
        kwargs = dict(
            reason=self.reason,
            path=self.path,
            image_id=self.image_id,
            segment_id=self.segment_id,
            ann_id=self.ann_id,
        )
        return (_rebuild_data_error, (self.detail, kwargs))


def _rebuild_data_error(detail: str, kwargs: dict) -> DataError:
    return DataError(detail, **kwargs)


# --------------------------------------------------------------------------------- categories


@dataclasses.dataclass(frozen=True)
class CategoryTable:
    """Contiguous <-> dataset category ids. THINGS FIRST, each group sorted by dataset id.

    Attributes:
      dataset_ids: contiguous id -> dataset (COCO) category id.
      names: contiguous id -> category name.
      colors: contiguous id -> (r, g, b) color.
      isthing: contiguous id -> True for thing categories.
    """

    dataset_ids: tuple[int, ...]
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    isthing: tuple[bool, ...]

    def __post_init__(self):
        n = len(self.dataset_ids)
        if not (len(self.names) == len(self.colors) == len(self.isthing) == n):
            raise ValueError("CategoryTable fields must all have one entry per category")
        if len(set(self.dataset_ids)) != n:
            raise ValueError(f"duplicate dataset category ids in {self.dataset_ids}")
        if any(i < 0 for i in self.dataset_ids):
            raise ValueError(f"negative dataset category id in {self.dataset_ids}")
        t = self.num_things
        if not all(self.isthing[:t]) or any(self.isthing[t:]):
            raise ValueError("CategoryTable must list thing categories first")
        object.__setattr__(self, "_to_contiguous", {d: c for c, d in enumerate(self.dataset_ids)})

    @classmethod
    def from_categories(cls, categories: Sequence[dict[str, Any]]) -> CategoryTable:
        """Builds the table from COCO panoptic category dicts (things first, sorted by id).

        Args:
          categories: dicts with ``id`` and ``isthing`` (0/1); ``name`` and ``color`` optional.

        Returns:
          The table.
        """
        cats = []
        for cat in categories:
            if "id" not in cat or "isthing" not in cat:
                raise ValueError(f"category needs 'id' and 'isthing': {cat}")
            cats.append(cat)
        cats.sort(key=lambda c: (not bool(c["isthing"]), int(c["id"])))
        return cls(
            dataset_ids=tuple(int(c["id"]) for c in cats),
            names=tuple(str(c.get("name", c["id"])) for c in cats),
            colors=tuple(tuple(int(v) for v in c.get("color", (0, 0, 0))) for c in cats),
            isthing=tuple(bool(c["isthing"]) for c in cats),
        )

    @property
    def num_classes(self) -> int:
        """Number of categories (things + stuff)."""
        return len(self.dataset_ids)

    @property
    def num_things(self) -> int:
        """Number of thing categories (contiguous ids 0..num_things-1)."""
        return sum(self.isthing)

    @property
    def num_stuff(self) -> int:
        """Number of stuff categories (contiguous ids num_things..num_classes-1)."""
        return self.num_classes - self.num_things

    def to_contiguous(self, dataset_id: int) -> int:
        """Maps a dataset category id to its contiguous id; KeyError if unknown."""
        try:
            return self._to_contiguous[int(dataset_id)]
        except KeyError:
            raise KeyError(
                f"unknown dataset category id {dataset_id}; known ids: {sorted(self.dataset_ids)}"
            ) from None

    def to_dataset(self, contiguous_id: int) -> int:
        """Maps a contiguous id back to the dataset category id; IndexError if out of range."""
        c = int(contiguous_id)
        if not 0 <= c < self.num_classes:
            raise IndexError(f"contiguous id {c} out of range [0, {self.num_classes})")
        return self.dataset_ids[c]

    def lookup_array(self) -> np.ndarray:
        """Dataset id -> contiguous id table.

        Returns:
          int32 [max_dataset_id + 1]; -1 for ids that are not categories.
        """
        table = np.full(max(self.dataset_ids, default=-1) + 1, -1, np.int32)
        table[list(self.dataset_ids)] = np.arange(self.num_classes, dtype=np.int32)
        return table


# ------------------------------------------------------------------------------------ helpers


def _load_json(path: PathLike) -> dict | list:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"cannot parse JSON: {e}", reason="bad_json", path=path) from e


def join_root(root: str, path: str) -> str | None:
    """``path`` relative to the dataset ``root`` (absolute paths kept; empty path -> None)."""
    if not path:
        return None
    return os.path.join(root, path) if root else path


def boxes_from_masks(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tight x1y1x2y2 boxes of binary masks (x2 = max column + 1, y2 = max row + 1).

    Args:
      masks: [N, H, W] (nonzero = inside).

    Returns:
      boxes: float32 [N, 4]; zeros for empty masks.
      nonempty: bool [N].
    """
    n, h, w = masks.shape
    rows = masks.any(axis=2)  # [N, H]
    cols = masks.any(axis=1)  # [N, W]
    nonempty = rows.any(axis=1)
    y1 = rows.argmax(axis=1)
    y2 = h - rows[:, ::-1].argmax(axis=1)
    x1 = cols.argmax(axis=1)
    x2 = w - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    boxes[~nonempty] = 0.0
    return boxes.reshape(n, 4), nonempty


def _conversion_key(mode: str) -> str:
    if mode in ("L", "1", "I", "F") or mode.startswith("I;16"):
        return CONVERTED_PREFIX + "grayscale"
    return CONVERTED_PREFIX + mode.lower().replace(";", "_")


# ------------------------------------------------------------------------------------- reader


class CocoPanopticReader:
    """Reads one split of a COCO-panoptic-format dataset into numpy records (module docstring).

    Attributes:
      categories: the :class:`CategoryTable` (things first).
      image_ids: the image ids of the split, sorted ascending (records are ``read(i)`` for
        ``image_ids[i]``). Images whose annotation has no segment are left out when
        ``keep_empty_images=False`` (counted as ``empty_image_dropped``).
      summary: ``collections.Counter``: skipped records by reason (each image counted once, see
        ``SKIP_REASONS``), image conversions (``converted_*``, per image) and notes:
        ``empty_image_dropped`` and ``empty_instance_mask`` (per image),
        ``invalid_polygon_dropped`` (per instances-JSON annotation, counted at construction).
      masks_from_instances: True when instance masks come from the instances JSON.
    """

    def __init__(
        self,
        image_dir: PathLike,
        panoptic_json: PathLike,
        panoptic_dir: PathLike,
        instances_json: PathLike | None = None,
        categories: Sequence[dict[str, Any]] | CategoryTable | PathLike | None = None,
        skip_bad_records: bool = False,
        keep_empty_images: bool = True,
        max_instances: int | None = None,
    ):
        """Loads the JSON files and indexes the records (images are read lazily).

        Args:
          image_dir: folder of the images (``file_name`` of the JSON image records).
          panoptic_json: COCO panoptic JSON.
          panoptic_dir: folder of the panoptic PNGs (``file_name`` of the annotations).
          instances_json: optional COCO instances JSON; when given, instance masks come from it.
          categories: category dicts, a CategoryTable, or a JSON file of category dicts;
            default: the ``categories`` of ``panoptic_json``.
          skip_bad_records: skip and count bad records when iterating / in ``maybe_read``
            (``read`` always raises).
          keep_empty_images: keep images whose annotation has no segment.
          max_instances: a record with more instances is bad (``too_many_instances``).
        """
        self.image_dir = pathlib.Path(image_dir)
        self.panoptic_json = pathlib.Path(panoptic_json)
        self.panoptic_dir = pathlib.Path(panoptic_dir)
        self.instances_json = None if instances_json is None else pathlib.Path(instances_json)
        self.skip_bad_records = bool(skip_bad_records)
        self.keep_empty_images = bool(keep_empty_images)
        self.max_instances = None if max_instances is None else int(max_instances)
        self.summary: collections.Counter[str] = collections.Counter()
        self._counted: dict[str, set[int]] = collections.defaultdict(set)
        self._lock = threading.Lock()

        pan = _load_json(self.panoptic_json)
        if not isinstance(pan, dict) or "images" not in pan or "annotations" not in pan:
            raise DataError(
                "not a COCO panoptic JSON (needs 'images' and 'annotations')",
                reason="bad_json",
                path=self.panoptic_json,
            )

        # Categories.
        if categories is None:
            if "categories" not in pan:
                raise DataError(
                    "no 'categories' in the panoptic JSON and none given",
                    reason="bad_json",
                    path=self.panoptic_json,
                )
            categories = pan["categories"]
        elif isinstance(categories, str | os.PathLike):
            loaded = _load_json(categories)
            categories = loaded["categories"] if isinstance(loaded, dict) else loaded
        self.categories = (
            categories
            if isinstance(categories, CategoryTable)
            else CategoryTable.from_categories(categories)
        )
        if self.categories.num_classes > VOID:
            raise ValueError(
                f"{self.categories.num_classes} categories do not fit a uint8 semantic map "
                f"with {VOID} as void"
            )
        self._lookup = self.categories.lookup_array()

        # Images and panoptic annotations.
        self._images: dict[int, dict] = {}
        for img in pan["images"]:
            iid = int(img["id"])
            if iid in self._images:
                raise DataError(
                    "image id listed twice in 'images'",
                    reason="bad_json",
                    path=self.panoptic_json,
                    image_id=iid,
                )
            self._images[iid] = img
        self._annotations: dict[int, dict] = {}
        orphans = []
        for ann in pan["annotations"]:
            iid = int(ann["image_id"])
            if iid in self._annotations:
                raise DataError(
                    "two annotation records for one image",
                    reason="bad_json",
                    path=self.panoptic_json,
                    image_id=iid,
                )
            self._annotations[iid] = ann
            if iid not in self._images:
                orphans.append(iid)
        if orphans:
            err = DataError(
                f"{len(orphans)} annotation record(s) for image ids not in 'images' "
                f"(first: {orphans[:5]})",
                reason=ANNOTATION_WITHOUT_IMAGE,
                path=self.panoptic_json,
                image_id=orphans[0],
            )
            if not self.skip_bad_records:
                raise err
            logger.warning("Skipping: %s", err)
            for iid in orphans:
                self._count(ANNOTATION_WITHOUT_IMAGE, iid)

        ids = sorted(self._images)
        if not self.keep_empty_images:
            empty = [
                i
                for i in ids
                if i in self._annotations and not self._annotations[i].get("segments_info")
            ]
            if empty:
                logger.warning(
                    "%s: dropping %d image(s) whose annotation has no segment "
                    "(keep_empty_images=False)",
                    self.panoptic_json,
                    len(empty),
                )
                for iid in empty:
                    self._count(EMPTY_IMAGE_DROPPED, iid)
                empty_set = set(empty)
                ids = [i for i in ids if i not in empty_set]
        self.image_ids: list[int] = ids

        # Instances.
        self._inst_images: dict[int, dict] = {}
        self._inst_anns: dict[int, list[dict]] = collections.defaultdict(list)
        self.masks_from_instances = self.instances_json is not None
        if self.instances_json is None:
            logger.warning(
                "%s: no instances JSON given; instance masks come from the non-overlapping "
                "panoptic segments",
                self.panoptic_json,
            )
        else:
            self._load_instances()

    def _load_instances(self) -> None:
        inst = _load_json(self.instances_json)
        if not isinstance(inst, dict) or "annotations" not in inst or "images" not in inst:
            raise DataError(
                "not a COCO instances JSON (needs 'images' and 'annotations')",
                reason="bad_json",
                path=self.instances_json,
            )
        for img in inst["images"]:
            self._inst_images[int(img["id"])] = img
        n_stuff = n_other = n_bad_poly = 0
        for ann in inst["annotations"]:
            iid = int(ann["image_id"])
            if iid not in self._images:
                n_other += 1
                continue
            cid = int(ann["category_id"])
            c = self._lookup[cid] if 0 <= cid < len(self._lookup) else -1
            if c >= 0 and not self.categories.isthing[c]:
                n_stuff += 1  # stuff annotations (panopticapi's detection format) are unused
                continue
            seg = ann.get("segmentation")
            if isinstance(seg, list):
                # As detectron2: polygons with fewer than 3 points (a known quirk of a few COCO
                # annotations) are removed; an annotation left without polygon is dropped,
                # counted (INVALID_POLYGON_DROPPED) and logged.
                polys = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
                if not polys:
                    n_bad_poly += 1
                    continue
                if len(polys) != len(seg):
                    ann = dict(ann, segmentation=polys)
            self._inst_anns[iid].append(ann)  # unknown categories are reported at read time
        if n_bad_poly:
            self.summary[INVALID_POLYGON_DROPPED] += n_bad_poly
            logger.warning(
                "%s: dropped %d annotation(s) without a valid polygon (fewer than 3 points)",
                self.instances_json,
                n_bad_poly,
            )
        if n_stuff:
            logger.warning(
                "%s: ignoring %d annotation(s) of stuff categories (instances are things only)",
                self.instances_json,
                n_stuff,
            )
        if n_other:
            logger.warning(
                "%s: ignoring %d annotation(s) of images not in %s",
                self.instances_json,
                n_other,
                self.panoptic_json,
            )

    # ------------------------------------------------------------------------- bookkeeping

    def _count(self, key: str, image_id: int) -> None:
        with self._lock:
            if image_id not in self._counted[key]:
                self._counted[key].add(image_id)
                self.summary[key] += 1

    @property
    def num_skipped(self) -> int:
        """Number of records skipped so far (all reasons)."""
        return sum(v for k, v in self.summary.items() if k in SKIP_REASONS)

    def summary_line(self) -> str:
        """One line: images listed, records skipped by reason, conversions and notes."""
        skipped = {k: v for k, v in sorted(self.summary.items()) if k in SKIP_REASONS}
        converted = {
            k[len(CONVERTED_PREFIX) :]: v
            for k, v in sorted(self.summary.items())
            if k.startswith(CONVERTED_PREFIX)
        }
        notes = {
            k: v
            for k, v in sorted(self.summary.items())
            if k not in SKIP_REASONS and not k.startswith(CONVERTED_PREFIX)
        }

        def fmt(d: dict) -> str:
            return ", ".join(f"{k}={v}" for k, v in d.items()) or "none"

        return (
            f"{self.panoptic_json.name}: {len(self.image_ids)} images; "
            f"skipped {sum(skipped.values())} ({fmt(skipped)}); "
            f"converted {sum(converted.values())} ({fmt(converted)}); notes: {fmt(notes)}"
        )

    # ------------------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self.image_ids)

    def __iter__(self) -> Iterator[dict]:
        """Yields the good records in ``image_ids`` order; bad ones raise or are skipped."""
        for i in range(len(self)):
            record = self.maybe_read(i)
            if record is not None:
                yield record

    def maybe_read(self, index: int) -> dict | None:
        """``read(index)``, or None for a bad record when ``skip_bad_records`` (counted).

        Raises:
          DataError: for a bad record when ``skip_bad_records`` is False.
        """
        try:
            return self.read(index)
        except DataError as e:
            if not self.skip_bad_records:
                raise
            iid = self.image_ids[index]
            if iid not in self._counted[e.reason]:
                logger.warning("Skipping bad record: %s", e)
            self._count(e.reason, iid)
            return None

    def read(self, index: int) -> dict[str, Any]:
        """Reads record ``index`` (image id ``image_ids[index]``).

        Returns:
          dict with ``image`` uint8 [H, W, 3], ``image_id`` int64 [], ``file_name`` str,
          ``semantic`` uint8 [H, W], ``boxes`` float32 [N, 4], ``classes`` int32 [N],
          ``is_crowd`` bool [N], ``masks`` uint8 [N, H, W], ``segment_ids`` int32 [N],
          ``ann_ids`` int64 [N].

        Raises:
          DataError: naming the file and the record, for any bad record.
        """
        image_id = self.image_ids[index]
        img_rec = self._images[image_id]
        ann = self._annotations.get(image_id)
        if ann is None:
            raise DataError(
                "image has no annotation record",
                reason=MISSING_ANNOTATION,
                path=self.panoptic_json,
                image_id=image_id,
            )
        segments = self._check_segments(image_id, ann.get("segments_info", []))
        if self.instances_json is not None:
            n_inst = self._check_instance_annotations(image_id)
        else:
            n_inst = sum(self.categories.isthing[c] for _, c, _ in segments)
        if self.max_instances is not None and n_inst > self.max_instances:
            raise DataError(
                f"{n_inst} instances, more than max_instances={self.max_instances}",
                reason=TOO_MANY_INSTANCES,
                path=self.instances_json or self.panoptic_json,
                image_id=image_id,
            )

        image_path = self.image_dir / img_rec["file_name"]
        image = self._read_image(image_path, image_id)
        h, w = image.shape[:2]
        jh, jw = img_rec.get("height"), img_rec.get("width")
        if (jh is not None and int(jh) != h) or (jw is not None and int(jw) != w):
            raise DataError(
                f"image is {h}x{w} (HxW) but its JSON record says {jh}x{jw}",
                reason=SIZE_MISMATCH,
                path=image_path,
                image_id=image_id,
            )

        png_name = ann.get("file_name") or pathlib.Path(img_rec["file_name"]).stem + ".png"
        png_path = self.panoptic_dir / png_name
        ids = self._read_png(png_path, image_id)
        if ids.shape != (h, w):
            raise DataError(
                f"panoptic PNG is {ids.shape[0]}x{ids.shape[1]} (HxW) but image "
                f"{img_rec['file_name']} is {h}x{w}",
                reason=SIZE_MISMATCH,
                path=png_path,
                image_id=image_id,
            )

        # Unique ids of the map, then per pixel the index of its id among them (searchsorted
        # against the few unique ids is much faster than np.unique's return_inverse).
        uniq = np.unique(ids)
        inverse = np.searchsorted(uniq, ids)
        seg_ids = np.array([s for s, _, _ in segments], np.int64)
        in_png = uniq[uniq != 0]
        extra = np.setdiff1d(in_png, seg_ids)
        missing = np.setdiff1d(seg_ids, in_png)
        if extra.size or missing.size:
            parts = []
            if extra.size:
                parts.append(f"segment ids {extra.tolist()} are in the PNG but not in the JSON")
            if missing.size:
                parts.append(f"segment ids {missing.tolist()} are in the JSON but not in the PNG")
            bad = int(extra[0]) if extra.size else int(missing[0])
            raise DataError(
                "; ".join(parts) + f" (JSON {self.panoptic_json.name})",
                reason=SEGMENT_MISMATCH,
                path=png_path,
                image_id=image_id,
                segment_id=bad,
            )
        # uniq is sorted: position of each JSON segment among the unique ids.
        pos = np.searchsorted(uniq, seg_ids)
        lut = np.full(uniq.shape[0], VOID, np.uint8)
        if segments:
            lut[pos] = np.array([c for _, c, _ in segments], np.uint8)
        semantic = lut[inverse]

        if self.instances_json is not None:
            masks, classes, is_crowd, ann_ids, json_boxes = self._instances_from_json(
                image_id, h, w
            )
            segment_ids = np.full(len(classes), -1, np.int32)
        else:
            thing = [k for k, (_, c, _) in enumerate(segments) if self.categories.isthing[c]]
            thing_pos = pos[thing] if thing else np.zeros(0, np.int64)
            masks = (inverse[None] == thing_pos[:, None, None]).astype(np.uint8)
            classes = np.array([segments[k][1] for k in thing], np.int32)
            is_crowd = np.array([segments[k][2] for k in thing], bool)
            segment_ids = np.array([segments[k][0] for k in thing], np.int32)
            ann_ids = np.full(len(thing), -1, np.int64)
            json_boxes = None
        boxes, nonempty = boxes_from_masks(masks)
        if json_boxes is not None and not nonempty.all():
            boxes[~nonempty] = json_boxes[~nonempty]
            self._count(EMPTY_INSTANCE_MASK, image_id)

        return {
            "image": image,
            "image_id": np.int64(image_id),
            "file_name": str(img_rec["file_name"]),
            "semantic": semantic,
            "boxes": boxes.reshape(-1, 4),
            "classes": classes.reshape(-1),
            "is_crowd": is_crowd.reshape(-1),
            "masks": masks.reshape(-1, h, w),
            "segment_ids": segment_ids.reshape(-1),
            "ann_ids": ann_ids.reshape(-1),
        }

    # ----------------------------------------------------------------------------- parsing

    def _check_segments(self, image_id: int, segments_info: list[dict]) -> list[tuple]:
        """Returns [(segment id, contiguous class, iscrowd)] after checking the JSON record."""
        out = []
        seen = set()
        for seg in segments_info:
            sid = int(seg["id"])
            if sid <= 0 or sid >= 256**3:
                raise DataError(
                    "segment id must be in [1, 256**3) (0 is void)",
                    reason=SEGMENT_MISMATCH,
                    path=self.panoptic_json,
                    image_id=image_id,
                    segment_id=sid,
                )
            if sid in seen:
                raise DataError(
                    "segment id listed twice in segments_info",
                    reason=SEGMENT_MISMATCH,
                    path=self.panoptic_json,
                    image_id=image_id,
                    segment_id=sid,
                )
            seen.add(sid)
            cid = int(seg["category_id"])
            c = int(self._lookup[cid]) if 0 <= cid < len(self._lookup) else -1
            if c < 0:
                raise DataError(
                    f"unknown category id {cid}",
                    reason=UNKNOWN_CATEGORY,
                    path=self.panoptic_json,
                    image_id=image_id,
                    segment_id=sid,
                )
            out.append((sid, c, bool(seg.get("iscrowd", 0))))
        return out

    def _check_instance_annotations(self, image_id: int) -> int:
        """Checks the instances-JSON records of one image; returns the number of instances."""
        if image_id not in self._inst_images:
            raise DataError(
                "image is not listed in the instances JSON",
                reason=MISSING_INSTANCES_RECORD,
                path=self.instances_json,
                image_id=image_id,
            )
        anns = self._inst_anns.get(image_id, [])
        for ann in anns:
            cid = int(ann["category_id"])
            c = int(self._lookup[cid]) if 0 <= cid < len(self._lookup) else -1
            if c < 0:
                raise DataError(
                    f"unknown category id {cid}",
                    reason=UNKNOWN_CATEGORY,
                    path=self.instances_json,
                    image_id=image_id,
                    ann_id=ann.get("id"),
                )
        return len(anns)

    def _read_image(self, path: pathlib.Path, image_id: int) -> np.ndarray:
        if not path.is_file():
            raise DataError(
                "image file not found", reason=MISSING_IMAGE, path=path, image_id=image_id
            )
        try:
            with Image.open(path) as im:
                im.load()
                mode = im.mode
                if mode != "RGB":
                    if mode.startswith("I;16"):  # 16-bit grayscale: scale to 8 bits first
                        arr = np.asarray(im, dtype=np.float64) / 257.0
                        im = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
                    im = im.convert("RGB")
                image = np.asarray(im, dtype=np.uint8).copy()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(
                f"cannot decode image: {e}", reason=BAD_IMAGE, path=path, image_id=image_id
            ) from e
        if mode != "RGB":
            self._count(_conversion_key(mode), image_id)
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise DataError(
                f"decoded image has shape {image.shape}",
                reason=BAD_IMAGE,
                path=path,
                image_id=image_id,
            )
        return image

    def _read_png(self, path: pathlib.Path, image_id: int) -> np.ndarray:
        if not path.is_file():
            raise DataError(
                "panoptic PNG not found", reason=MISSING_PNG, path=path, image_id=image_id
            )
        try:
            with Image.open(path) as im:
                im.load()
                if im.mode != "RGB":
                    raise ValueError(f"panoptic PNG must be RGB, got mode {im.mode}")
                rgb = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(
                f"cannot decode panoptic PNG: {e}", reason=BAD_PNG, path=path, image_id=image_id
            ) from e
        return rgb_to_id(rgb)

    def _instances_from_json(
        self, image_id: int, h: int, w: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Decodes the thing annotations of one image (polygons, RLE, crowd RLE)."""
        from pycocotools import mask as mask_utils

        rec = self._inst_images[image_id]
        jh, jw = rec.get("height"), rec.get("width")
        if (jh is not None and int(jh) != h) or (jw is not None and int(jw) != w):
            raise DataError(
                f"instances JSON says {jh}x{jw} (HxW) but the image is {h}x{w}",
                reason=SIZE_MISMATCH,
                path=self.instances_json,
                image_id=image_id,
            )
        anns = self._inst_anns.get(image_id, [])
        rles, classes, crowd, ann_ids, json_boxes = [], [], [], [], []
        for ann in anns:
            aid = ann.get("id", -1)
            seg = ann.get("segmentation")
            try:
                if isinstance(seg, list):  # polygons
                    rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
                elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
                    size = [int(v) for v in seg["size"]]
                    if size != [h, w]:
                        raise DataError(
                            f"RLE size {size} but the image is {[h, w]}",
                            reason=SIZE_MISMATCH,
                            path=self.instances_json,
                            image_id=image_id,
                            ann_id=aid,
                        )
                    if isinstance(seg["counts"], list):  # uncompressed (crowd) RLE
                        rle = mask_utils.frPyObjects(seg, h, w)
                    else:
                        counts = seg["counts"]
                        if isinstance(counts, str):
                            counts = counts.encode("ascii")
                        rle = {"size": size, "counts": counts}
                else:
                    raise ValueError(f"unsupported segmentation {type(seg).__name__}")
            except DataError:
                raise
            except (ValueError, TypeError, KeyError, IndexError, OverflowError) as e:
                raise DataError(
                    f"cannot decode segmentation: {e}",
                    reason=BAD_INSTANCE_ANNOTATION,
                    path=self.instances_json,
                    image_id=image_id,
                    ann_id=aid,
                ) from e
            rles.append(rle)
            classes.append(int(self._lookup[int(ann["category_id"])]))
            crowd.append(bool(ann.get("iscrowd", 0)))
            ann_ids.append(int(aid))
            x, y, bw, bh = (float(v) for v in ann.get("bbox", (0, 0, 0, 0)))
            json_boxes.append((x, y, x + bw, y + bh))
        if rles:
            try:
                masks = mask_utils.decode(rles)  # [H, W, N] Fortran order
            except Exception as e:  # pycocotools raises plain Exceptions on bad RLE
                raise DataError(
                    f"cannot decode RLE: {e}",
                    reason=BAD_INSTANCE_ANNOTATION,
                    path=self.instances_json,
                    image_id=image_id,
                ) from e
            masks = np.ascontiguousarray(masks.transpose(2, 0, 1), dtype=np.uint8)
        else:
            masks = np.zeros((0, h, w), np.uint8)
        return (
            masks,
            np.array(classes, np.int32),
            np.array(crowd, bool),
            np.array(ann_ids, np.int64),
            np.array(json_boxes, np.float32).reshape(-1, 4),
        )
