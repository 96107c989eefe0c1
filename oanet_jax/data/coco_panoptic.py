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
import io
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
# The example does not fit the wire format's static shapes (data.source_size, max_mask_runs).
WIRE_LIMIT = "wire_limit"
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
        WIRE_LIMIT,
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


class AllRecordsSkippedError(ValueError):
    """``skip_bad_records`` dropped every record of a full pass: training would wait forever.

    The message reads ``all N records of split S were skipped; first reasons: ...`` (the count
    of each reason and the first skipped record's message of each).
    """


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


def _jpeg_complete(data: bytes) -> bool:
    """Whether a JPEG file ends with its EOI marker (trailing zero padding allowed)."""
    return data.rstrip(b"\x00").endswith(b"\xff\xd9")


def _png_complete(data: bytes) -> bool:
    """Whether a PNG file ends with its IEND chunk."""
    return data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"


def rle_string_to_counts(counts: bytes | str) -> np.ndarray:
    """Run lengths of one COCO compressed RLE string (see :func:`rle_strings_to_counts`)."""
    return rle_strings_to_counts([counts])[0]


def rle_strings_to_counts(strings: Sequence[bytes | str]) -> list[np.ndarray]:
    """Run lengths of COCO compressed RLE strings (the ``counts`` of compressed RLEs), all in one
    vectorised pass (a per-string loop costs tens of microseconds of numpy calls per instance).

    The format of the COCO API: each run length is written in 5-bit groups, least significant
    first, as characters ``48 + group`` with bit 0x20 marking a continuation and bit 0x10 of the
    last group the sign; from the fourth run on, a length is stored as its difference to the
    length two runs earlier.

    Args:
      strings: the compressed strings (ASCII bytes or str).

    Returns:
      Per string, int64 [R] run lengths, the first one of zeros, alternating, column-major.

    Raises:
      ValueError: a string that does not end a value (naming its position in `strings`).
    """
    raw = [v.encode("ascii") if isinstance(v, str) else bytes(v) for v in strings]
    lengths = np.array([len(v) for v in raw], np.int64)
    c = np.frombuffer(b"".join(raw), np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return [np.zeros(0, np.int64) for _ in raw]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    more = (c & 0x20) != 0
    nonempty = np.flatnonzero(lengths > 0)
    bad = nonempty[more[offsets[nonempty + 1] - 1]]
    if bad.size:
        raise ValueError(f"compressed RLE string {int(bad[0])} ends inside a value")
    ends = np.flatnonzero(~more)  # last character of each value; values never span strings
    starts = np.concatenate([[0], ends[:-1] + 1])
    group = np.repeat(np.arange(len(ends)), ends - starts + 1)
    shift = 5 * (np.arange(len(c)) - starts[group])
    x = np.add.reduceat((c & 0x1F) << shift, starts)
    negative = (c[ends] & 0x10) != 0
    x[negative] |= -1 << (shift[ends][negative] + 5)
    # Lengths from the 4th run of a string on are deltas to two runs earlier: a cumulative sum
    # over each string's odd runs and over its even runs from the third on.
    string = np.searchsorted(offsets[1:], ends, side="right")
    per_string = np.bincount(string, minlength=len(raw))
    k = np.arange(len(x)) - np.concatenate([[0], np.cumsum(per_string)[:-1]])[string]
    key = 3 * string + np.where(k == 0, 0, np.where(k % 2 == 1, 1, 2))
    order = np.argsort(key, kind="stable")
    xs, ks = x[order], key[order]
    total = np.cumsum(xs)
    first = np.flatnonzero(np.concatenate([[True], ks[1:] != ks[:-1]]))
    before = np.repeat(total[first] - xs[first], np.diff(np.concatenate([first, [len(xs)]])))
    out = np.empty_like(x)
    out[order] = total - before
    return np.split(out, np.cumsum(per_string)[:-1])


def runs_to_box(counts: np.ndarray, height: int) -> tuple[float, float, float, float] | None:
    """Tight x1y1x2y2 box of one column-major run-length mask (see :func:`runs_to_boxes`);
    None for an empty mask."""
    boxes, nonempty = runs_to_boxes([counts], height)
    return tuple(float(v) for v in boxes[0]) if nonempty[0] else None  # type: ignore[return-value]


def runs_to_boxes(counts: Sequence[np.ndarray], height: int) -> tuple[np.ndarray, np.ndarray]:
    """Tight x1y1x2y2 boxes of column-major run-length masks (:func:`boxes_from_masks`' rule), in
    one vectorised pass.

    Args:
      counts: N arrays of run lengths, each the first of zeros, alternating.
      height: H of the masks.

    Returns:
      (float64 [N, 4] boxes with x2 = max column + 1, y2 = max row + 1, zeros for an empty mask;
      bool [N] whether each mask has a pixel).
    """
    n = len(counts)
    boxes = np.zeros((n, 4), np.float64)
    lens = np.array([len(v) for v in counts], np.int64)
    if n == 0 or lens.sum() == 0:
        return boxes, np.zeros(n, bool)
    runs = np.concatenate([np.asarray(v, np.int64) for v in counts])
    mask = np.repeat(np.arange(n), lens)
    k = np.arange(runs.size) - np.repeat(np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    total = np.cumsum(runs)
    sums = np.bincount(mask, weights=runs, minlength=n).astype(np.int64)
    ends = total - np.repeat(np.concatenate([[0], np.cumsum(sums)[:-1]]), lens)
    ones = np.flatnonzero((k % 2 == 1) & (runs > 0))
    if ones.size == 0:
        return boxes, np.zeros(n, bool)
    owner = mask[ones]  # non-decreasing
    last = ends[ones] - 1
    first = last - runs[ones] + 1
    x0, y0 = first // height, first % height
    x1, y1 = last // height, last % height
    multi = x1 > x0  # a run over a column boundary covers the last and the first row
    top = np.where(multi, 0, y0)
    bottom = np.where(multi, height - 1, y1)
    seg = np.flatnonzero(np.concatenate([[True], owner[1:] != owner[:-1]]))
    who = owner[seg]
    boxes[who, 0] = np.minimum.reduceat(x0, seg)
    boxes[who, 1] = np.minimum.reduceat(top, seg)
    boxes[who, 2] = np.maximum.reduceat(x1, seg) + 1
    boxes[who, 3] = np.maximum.reduceat(bottom, seg) + 1
    nonempty = np.zeros(n, bool)
    nonempty[who] = True
    return boxes, nonempty


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
        run_cache_size: int = 1_000_000,
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
          run_cache_size: instances-JSON annotations whose run lengths :meth:`read_meta` keeps
            after decoding them once (a few hundred bytes each; 0 disables the cache).
        """
        self.image_dir = pathlib.Path(image_dir)
        self.panoptic_json = pathlib.Path(panoptic_json)
        self.panoptic_dir = pathlib.Path(panoptic_dir)
        self.instances_json = None if instances_json is None else pathlib.Path(instances_json)
        self.skip_bad_records = bool(skip_bad_records)
        self.keep_empty_images = bool(keep_empty_images)
        self.max_instances = None if max_instances is None else int(max_instances)
        self.summary: collections.Counter[str] = collections.Counter()
        # The message of the first skipped record of each reason (for error reports).
        self.first_skips: dict[str, str] = {}
        self._counted: dict[str, set[int]] = collections.defaultdict(set)
        self._lock = threading.Lock()
        # Instances JSON: each annotation's run lengths and box, decoded once (read_meta).
        self.run_cache_size = int(run_cache_size)
        self._run_cache: dict[tuple[int, int], tuple] = {}

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

    def skipped_by_reason(self) -> dict[str, int]:
        """Records skipped so far per reason (``SKIP_REASONS`` keys of ``summary``), sorted."""
        with self._lock:
            return {k: v for k, v in sorted(self.summary.items()) if k in SKIP_REASONS}

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

    def largest_image_shape(self) -> tuple[int, int]:
        """(max height, max width) over the split's images, from the JSON's ``height`` /
        ``width`` (each image's file is checked against them when read): the automatic source
        canvas of the wire format. Images without a size in the JSON are not counted (one
        larger than the canvas is a bad record naming its file when read).
        """
        heights = [int(self._images[i].get("height") or 0) for i in self.image_ids]
        widths = [int(self._images[i].get("width") or 0) for i in self.image_ids]
        return max(heights, default=1) or 1, max(widths, default=1) or 1

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
        return self._skip_bad(self.read, index)

    def _skip_bad(self, read: Any, index: int) -> dict | None:
        """``read(index)``; a DataError goes to `skip_or_raise` (counted skip: None)."""
        try:
            return read(index)
        except DataError as e:
            self.skip_or_raise(e, index)
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
        image_id, img_rec, segments, image_path, png_path = self._check_record(index)
        image = self._read_image(image_path, image_id)
        h, w = image.shape[:2]
        self._check_image_size(img_rec, image_path, image_id, h, w)
        ids = self._read_png(png_path, image_id)
        self._check_png_size(png_path, image_id, img_rec, ids.shape, h, w)

        # Unique ids of the map, then per pixel the index of its id among them (searchsorted
        # against the few unique ids is much faster than np.unique's return_inverse).
        uniq = np.unique(ids)
        inverse = np.searchsorted(uniq, ids)
        seg_ids = np.array([s for s, _, _ in segments], np.int64)
        in_png = uniq[uniq != 0]
        extra = np.setdiff1d(in_png, seg_ids)
        missing = np.setdiff1d(seg_ids, in_png)
        if extra.size or missing.size:
            raise self.segment_mismatch_error(image_id, png_path, extra, missing)
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

    # ---------------------------------------------------------- metadata (for the TF graph)

    def _check_record(self, index: int) -> tuple[int, dict, list[tuple], pathlib.Path, Any]:
        """The JSON checks of record ``index`` (no file is read).

        Returns:
          (image id, JSON image record, [(segment id, contiguous class, iscrowd)], image path,
          panoptic PNG path).

        Raises:
          DataError: missing annotation, bad segments, unknown category, too many instances.
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
        png_name = ann.get("file_name") or pathlib.Path(img_rec["file_name"]).stem + ".png"
        return (
            image_id,
            img_rec,
            segments,
            self.image_dir / img_rec["file_name"],
            self.panoptic_dir / png_name,
        )

    @staticmethod
    def _check_image_size(img_rec: dict, path: pathlib.Path, image_id: int, h: int, w: int):
        jh, jw = img_rec.get("height"), img_rec.get("width")
        if (jh is not None and int(jh) != h) or (jw is not None and int(jw) != w):
            raise DataError(
                f"image is {h}x{w} (HxW) but its JSON record says {jh}x{jw}",
                reason=SIZE_MISMATCH,
                path=path,
                image_id=image_id,
            )

    @staticmethod
    def _check_png_size(path, image_id, img_rec, png_hw: Sequence[int], h: int, w: int) -> None:
        if tuple(png_hw) != (h, w):
            raise DataError(
                f"panoptic PNG is {png_hw[0]}x{png_hw[1]} (HxW) but image "
                f"{img_rec['file_name']} is {h}x{w}",
                reason=SIZE_MISMATCH,
                path=path,
                image_id=image_id,
            )

    def segment_mismatch_error(
        self, image_id: int, png_path: PathLike, extra: Sequence[int], missing: Sequence[int]
    ) -> DataError:
        """The error of a PNG whose segment ids disagree with the JSON ``segments_info``.

        Args:
          image_id: the record's image id.
          png_path: the panoptic PNG.
          extra: sorted ids in the PNG but not in the JSON.
          missing: sorted ids in the JSON but not in the PNG.

        Returns:
          The DataError (reason ``segment_mismatch``) naming both sides and the first bad id.
        """
        extra, missing = list(map(int, extra)), list(map(int, missing))
        parts = []
        if extra:
            parts.append(f"segment ids {extra} are in the PNG but not in the JSON")
        if missing:
            parts.append(f"segment ids {missing} are in the JSON but not in the PNG")
        return DataError(
            "; ".join(parts) + f" (JSON {self.panoptic_json.name})",
            reason=SEGMENT_MISMATCH,
            path=png_path,
            image_id=image_id,
            segment_id=extra[0] if extra else missing[0],
        )

    def skip_or_raise(self, err: DataError, index: int) -> None:
        """A bad record found outside :meth:`read`: counted (skip mode) or raised.

        Raises:
          DataError: ``err`` when ``skip_bad_records`` is False.
        """
        if not self.skip_bad_records:
            raise err
        iid = self.image_ids[index]
        if iid not in self._counted[err.reason]:
            logger.warning("Skipping bad record: %s", err)
        with self._lock:
            self.first_skips.setdefault(err.reason, str(err))
        self._count(err.reason, iid)

    def maybe_read_meta(self, index: int) -> dict | None:
        """``read_meta(index)``, or None for a bad record when ``skip_bad_records`` (counted)."""
        return self._skip_bad(self.read_meta, index)

    def read_meta(self, index: int) -> dict[str, Any]:
        """Record ``index`` for the TF transform: checked metadata and the undecoded files.

        Everything of :meth:`read` that needs no pixel: the JSON checks, the file headers (format,
        mode, size; a PNG's chunk CRCs; a JPEG's end marker), the segment table and, with an
        instances JSON, the instance masks as run lengths (polygons rasterised by pycocotools,
        compressed RLE expanded) with their tight boxes. Decoding, the segment lookup, the PNG's
        consistency with the JSON (``segment_mismatch``, reported through
        :meth:`segment_mismatch_error`) and the mask crops run as TF ops
        (:mod:`oanet_jax.data.tf_transforms`). An image TF might not decode as PIL does (a mode
        other than RGB / L / RGBA / LA, a format other than JPEG / PNG, or a file that looks
        incomplete, where PIL names the file if it is bad) is decoded here with PIL, as
        :meth:`read` does, and shipped raw.

        Returns:
          dict: ``image_id`` int, ``file_name`` str, ``height`` / ``width`` ints, ``image_data``
          bytes (the encoded file, or raw RGB ``height * width * 3`` bytes), ``image_format``
          int (0 raw, 1 JPEG, 2 PNG), ``png_data`` bytes (encoded RGB PNG), ``png_path`` str;
          ``table_ids`` int32 [K + 1] (0 = void, then the JSON segment ids sorted ascending),
          ``table_classes`` uint8 [K + 1] (255, then their contiguous classes); per instance
          (N, order of :meth:`read`): ``classes`` int32, ``is_crowd`` bool, ``segment_ids``
          int32, ``ann_ids`` int64, ``table_pos`` int32 (masks from the PNG: the instance's
          position in the table, else -1), ``boxes`` float32 [N, 4] (instances JSON: from the
          runs, the JSON bbox for an empty mask; from the PNG: zeros, made in TF),
          ``run_lengths`` int32 [R] (column-major runs, each instance's starting with zeros, all
          instances concatenated), ``run_counts`` int32 [N] (runs per instance).

        Raises:
          DataError: naming the file and the record, for any bad record :meth:`read` would
            reject except a segment mismatch (checked on the decoded PNG in TF).
        """
        image_id, img_rec, segments, image_path, png_path = self._check_record(index)
        image_data, image_format, (h, w) = self._probe_image(image_path, image_id)
        self._check_image_size(img_rec, image_path, image_id, h, w)
        png_data, png_hw = self._probe_png(png_path, image_id)
        self._check_png_size(png_path, image_id, img_rec, png_hw, h, w)

        order = sorted(range(len(segments)), key=lambda k: segments[k][0])
        table_ids = np.array([0] + [segments[k][0] for k in order], np.int32)
        table_classes = np.array([VOID] + [segments[k][1] for k in order], np.uint8)
        position = {segments[k][0]: p + 1 for p, k in enumerate(order)}
        if self.instances_json is not None:
            runs, run_counts, classes, is_crowd, ann_ids, boxes = self._instance_runs(
                image_id, h, w
            )
            segment_ids = np.full(len(classes), -1, np.int32)
            table_pos = np.full(len(classes), -1, np.int32)
        else:
            thing = [seg for seg in segments if self.categories.isthing[seg[1]]]
            classes = np.array([c for _, c, _ in thing], np.int32)
            is_crowd = np.array([crowd for _, _, crowd in thing], bool)
            segment_ids = np.array([sid for sid, _, _ in thing], np.int32)
            ann_ids = np.full(len(thing), -1, np.int64)
            table_pos = np.array([position[sid] for sid, _, _ in thing], np.int32)
            boxes = np.zeros((len(thing), 4), np.float32)
            runs = np.zeros(0, np.int32)
            run_counts = np.zeros(len(thing), np.int32)
        return {
            "image_id": int(image_id),
            "file_name": str(img_rec["file_name"]),
            "height": int(h),
            "width": int(w),
            "image_data": image_data,
            "image_format": int(image_format),
            "png_data": png_data,
            "png_path": str(png_path),
            "table_ids": table_ids,
            "table_classes": table_classes,
            "classes": classes.reshape(-1),
            "is_crowd": is_crowd.reshape(-1),
            "segment_ids": segment_ids.reshape(-1),
            "ann_ids": ann_ids.reshape(-1),
            "table_pos": table_pos.reshape(-1),
            "boxes": boxes.reshape(-1, 4),
            "run_lengths": runs.reshape(-1),
            "run_counts": run_counts.reshape(-1),
        }

    def _probe_image(self, path: pathlib.Path, image_id: int) -> tuple[bytes, int, tuple]:
        """(bytes, format, (h, w)): the encoded file for TF (1 JPEG, 2 PNG), or PIL-decoded raw
        RGB bytes (0)."""
        if not path.is_file():
            raise DataError(
                "image file not found", reason=MISSING_IMAGE, path=path, image_id=image_id
            )
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt, mode, (w, h) = im.format, im.mode, im.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(
                f"cannot decode image: {e}", reason=BAD_IMAGE, path=path, image_id=image_id
            ) from e
        if fmt == "JPEG" and mode in ("RGB", "L") and _jpeg_complete(data):
            image_format = 1
        elif fmt == "PNG" and mode in ("RGB", "L", "RGBA", "LA") and _png_complete(data):
            image_format = 2
        else:
            image_format = 0
        if image_format == 0 or h == 0 or w == 0:  # PIL decides (and names a bad file)
            image = self._read_image(path, image_id)
            return image.tobytes(), 0, image.shape[:2]
        if mode != "RGB":
            self._count(_conversion_key(mode), image_id)
        return data, image_format, (h, w)

    def panoptic_png(self, index: int) -> pathlib.Path:
        """The panoptic PNG of record ``index`` (checks the record's JSON like :meth:`read`)."""
        return self._check_record(index)[4]

    def _probe_png(self, path: pathlib.Path, image_id: int) -> tuple[bytes, tuple[int, int]]:
        """(bytes, (h, w)) of a panoptic PNG whose header and chunk CRCs are intact."""
        if not path.is_file():
            raise DataError(
                "panoptic PNG not found", reason=MISSING_PNG, path=path, image_id=image_id
            )
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.format != "PNG" or im.mode != "RGB":
                    raise ValueError(f"panoptic PNG must be an RGB PNG, got {im.format} {im.mode}")
                w, h = im.size
                im.verify()  # chunk structure and CRCs, without decompressing
            if not _png_complete(data):
                raise ValueError("no IEND chunk at the end of the file (truncated?)")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(
                f"cannot decode panoptic PNG: {e}", reason=BAD_PNG, path=path, image_id=image_id
            ) from e
        return data, (h, w)

    def _instance_runs(self, image_id: int, h: int, w: int) -> tuple[np.ndarray, ...]:
        """The instances-JSON annotations of one image as column-major run lengths.

        Returns:
          (run lengths int32 [R], runs per instance int32 [N], classes int32 [N], is_crowd bool
          [N], ann_ids int64 [N], boxes float32 [N, 4]); the masks are those of
          :meth:`_instances_from_json`.
        """
        self._check_instances_size(image_id, h, w)
        runs, run_counts, classes, crowd, ann_ids, boxes = [], [], [], [], [], []
        empty = False
        anns = self._inst_anns.get(image_id, [])
        for ann, (counts, box) in zip(
            anns, self._annotation_runs(anns, image_id, h, w), strict=True
        ):
            aid = ann.get("id", -1)
            if box is None:
                x, y, bw, bh = (float(v) for v in ann.get("bbox", (0, 0, 0, 0)))
                box = (x, y, x + bw, y + bh)
                empty = True
            runs.append(counts)
            run_counts.append(len(counts))
            classes.append(int(self._lookup[int(ann["category_id"])]))
            crowd.append(bool(ann.get("iscrowd", 0)))
            ann_ids.append(int(aid))
            boxes.append(box)
        if empty:
            self._count(EMPTY_INSTANCE_MASK, image_id)
        return (
            np.concatenate(runs) if runs else np.zeros(0, np.int32),
            np.array(run_counts, np.int32),
            np.array(classes, np.int32),
            np.array(crowd, bool),
            np.array(ann_ids, np.int64),
            np.array(boxes, np.float32).reshape(-1, 4),
        )

    def _annotation_runs(
        self, anns: list[dict], image_id: int, h: int, w: int
    ) -> list[tuple[np.ndarray, tuple[float, float, float, float] | None]]:
        """Each annotation's column-major run lengths (int32) and tight box (None: empty), from
        the run cache or decoded: the compressed RLE strings of an image in one vectorised pass.
        """
        out = [self._run_cache.get((image_id, j)) for j in range(len(anns))]
        todo = [j for j, value in enumerate(out) if value is None]
        if not todo:
            return out  # type: ignore[return-value]
        rles = [self._annotation_rle(anns[j], image_id, h, w) for j in todo]
        strings = [i for i, rle in enumerate(rles) if not isinstance(rle["counts"], list)]
        counts: list[np.ndarray | None] = [None] * len(todo)
        try:
            decoded = rle_strings_to_counts([rles[i]["counts"] for i in strings])
            for i, c in zip(strings, decoded, strict=True):
                counts[i] = c
        except ValueError:
            pass  # a bad string: decoded one by one below, where its annotation is named
        checked = [
            self._checked_runs(anns[j], image_id, h, w, rle, c)
            for j, rle, c in zip(todo, rles, counts, strict=True)
        ]
        boxes, nonempty = runs_to_boxes(checked, h)
        for i, j in enumerate(todo):
            box = tuple(float(v) for v in boxes[i]) if nonempty[i] else None
            out[j] = (checked[i].astype(np.int32), box)
            if len(self._run_cache) < self.run_cache_size:
                self._run_cache[(image_id, j)] = out[j]
        return out  # type: ignore[return-value]

    def _checked_runs(
        self, ann: dict, image_id: int, h: int, w: int, rle: dict, counts: np.ndarray | None
    ) -> np.ndarray:
        """One annotation's run lengths (decoded here when `counts` is None), checked: 1-D, not
        negative, summing to H * W (DataError naming the annotation otherwise)."""
        try:
            if counts is None:
                if isinstance(rle["counts"], list):
                    counts = np.asarray(rle["counts"], np.int64)
                else:
                    counts = rle_string_to_counts(rle["counts"])
            if counts.ndim != 1 or (counts < 0).any() or int(counts.sum()) != h * w:
                raise ValueError(f"run lengths sum to {int(counts.sum())}, not {h * w}")
        except (ValueError, TypeError, OverflowError) as e:
            raise DataError(
                f"cannot decode RLE: {e}",
                reason=BAD_INSTANCE_ANNOTATION,
                path=self.instances_json,
                image_id=image_id,
                ann_id=ann.get("id"),
            ) from e
        return counts

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

    def _check_instances_size(self, image_id: int, h: int, w: int) -> None:
        rec = self._inst_images[image_id]
        jh, jw = rec.get("height"), rec.get("width")
        if (jh is not None and int(jh) != h) or (jw is not None and int(jw) != w):
            raise DataError(
                f"instances JSON says {jh}x{jw} (HxW) but the image is {h}x{w}",
                reason=SIZE_MISMATCH,
                path=self.instances_json,
                image_id=image_id,
            )

    def _annotation_rle(self, ann: dict, image_id: int, h: int, w: int) -> dict:
        """One annotation's segmentation as an RLE dict: polygons merged by pycocotools
        (compressed ``counts`` bytes), compressed RLE as bytes, uncompressed RLE as its list."""
        from pycocotools import mask as mask_utils

        aid = ann.get("id", -1)
        seg = ann.get("segmentation")
        try:
            if isinstance(seg, list):  # polygons
                return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            if isinstance(seg, dict) and "counts" in seg and "size" in seg:
                size = [int(v) for v in seg["size"]]
                if size != [h, w]:
                    raise DataError(
                        f"RLE size {size} but the image is {[h, w]}",
                        reason=SIZE_MISMATCH,
                        path=self.instances_json,
                        image_id=image_id,
                        ann_id=aid,
                    )
                counts = seg["counts"]
                if isinstance(counts, list):  # uncompressed (crowd) RLE
                    return {"size": size, "counts": [int(c) for c in counts]}
                if isinstance(counts, str):
                    counts = counts.encode("ascii")
                return {"size": size, "counts": counts}
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

    def _instances_from_json(
        self, image_id: int, h: int, w: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Decodes the thing annotations of one image (polygons, RLE, crowd RLE)."""
        from pycocotools import mask as mask_utils

        self._check_instances_size(image_id, h, w)
        anns = self._inst_anns.get(image_id, [])
        rles, classes, crowd, ann_ids, json_boxes = [], [], [], [], []
        for ann in anns:
            aid = ann.get("id", -1)
            rle = self._annotation_rle(ann, image_id, h, w)
            if isinstance(rle["counts"], list):  # uncompressed (crowd) RLE
                rle = mask_utils.frPyObjects(rle, h, w)
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
