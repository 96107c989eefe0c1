"""COCO panoptic prediction files: PNG id maps, segments_info, the predictions JSON.

COCO panoptic format: a PNG per image whose pixels encode a segment id as
``id = R + 256 * G + 256**2 * B`` (0 = void / unlabelled), plus one JSON with an annotation per
image (``image_id``, ``file_name`` of the PNG, ``segments_info``: one dict per segment with ``id``,
``category_id``, ``iscrowd``, ``bbox`` = [x, y, w, h] and ``area`` in pixels).

Category ids written here are DATASET ids (e.g. COCO ids); mapping the model's contiguous ids to
dataset ids (``CategoryTable.to_dataset``) is the caller's job.

Functions here run on the host with numpy (no JAX). Mapping the model's padded, resized id map
back to the original image is `oanet_jax.data.transforms.crop_and_resize_to_original`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from oanet_jax.common.files import write_json

__all__ = [
    "MAX_SEGMENT_ID",
    "PanopticFormatError",
    "check_segments",
    "id_map_to_rgb",
    "read_panoptic_png",
    "rgb_to_id",
    "segment_areas_and_boxes",
    "segments_to_coco_annotation",
    "smallest_id_dtype",
    "write_prediction",
    "write_predictions_json",
]

MAX_SEGMENT_ID = (1 << 24) - 1  # ids must fit in the 24 bits of an RGB pixel
_ID_MASK = np.uint32(0xFFFFFF)


class PanopticFormatError(ValueError):
    """A panoptic annotation or prediction breaks the COCO panoptic format.

    The message names the image (id and/or file) and the offending segment ids.
    """


# ----------------------------------------------------------------------------- id <-> RGB


def smallest_id_dtype(max_id: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds ids 0..max_id (uint8, uint16 or uint32).

    Id maps are kept and shipped in it (the merge's maps leave the device in it; cached
    ground-truth index maps are stored in it): a quarter of the bytes of int32 for COCO.
    """
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_id <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"ids up to {max_id} do not fit in 32 bits")


def id_map_to_rgb(id_map: np.ndarray) -> np.ndarray:
    """Encodes segment ids as RGB colours (id = R + 256 G + 256^2 B).

    Args:
      id_map: [H, W] integer array of segment ids in 0..2^24-1 (0 = void).

    Returns:
      uint8 [H, W, 3] RGB array.

    Raises:
      ValueError: if the array is not integer or an id is out of range.
    """
    id_map = np.asarray(id_map)
    if not np.issubdtype(id_map.dtype, np.integer):
        raise ValueError(f"id_map must be an integer array, got dtype {id_map.dtype}")
    if id_map.size and (int(id_map.min()) < 0 or int(id_map.max()) > MAX_SEGMENT_ID):
        raise ValueError(
            f"segment ids must be in [0, {MAX_SEGMENT_ID}] to fit in an RGB PNG, got range "
            f"[{int(id_map.min())}, {int(id_map.max())}]"
        )
    ids = id_map.astype(np.uint32)
    rgb = np.empty((*ids.shape, 3), np.uint8)
    rgb[..., 0] = ids & 0xFF
    rgb[..., 1] = (ids >> 8) & 0xFF
    rgb[..., 2] = (ids >> 16) & 0xFF
    return rgb


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """Decodes RGB colours to segment ids (id = R + 256 G + 256^2 B).

    Args:
      rgb: [..., 3] (or [..., 4]: the 4th channel is ignored, as panopticapi does) integer array
        with values in 0..255, usually uint8.

    Returns:
      int32 [...] segment ids.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim < 1 or rgb.shape[-1] not in (3, 4):
        raise ValueError(f"rgb must have 3 (or 4) channels last, got shape {rgb.shape}")
    c = rgb[..., :3].astype(np.int32)
    return c[..., 0] + 256 * c[..., 1] + 65536 * c[..., 2]


# ----------------------------------------------------------------------------- PNG reading


def read_id_words(path: str | os.PathLike) -> tuple[np.ndarray, tuple[int, int]]:
    """Reads a panoptic PNG as raw little-endian 32-bit words, fast (no per-channel arithmetic).

    Word ``w`` of pixel p is ``R + 256 G + 256^2 B + 256^3 X`` where X is a filler byte (or the
    alpha channel of an RGBA PNG, ignored as panopticapi ignores it): ``w & 0xFFFFFF`` is the
    segment id. Palette and grayscale PNGs are converted to RGB first.

    Args:
      path: PNG file.

    Returns:
      (words, (H, W)): words is a read-only uint32 [H * W] array.

    Raises:
      PanopticFormatError: the PNG mode cannot hold RGB-encoded ids (e.g. 16-bit grayscale).
    """
    with Image.open(path) as im:
        mode = im.mode
        if mode == "RGB":
            data = im.tobytes("raw", "RGBX")
        elif mode == "RGBA":
            data = im.tobytes("raw", "RGBA")
        elif mode in ("P", "PA", "L", "LA"):
            data = im.convert("RGB").tobytes("raw", "RGBX")
        else:
            raise PanopticFormatError(
                f"{os.fspath(path)}: PNG mode {mode!r} cannot hold RGB-encoded segment ids "
                "(expected RGB, RGBA or palette)"
            )
        width, height = im.size
    return np.frombuffer(data, dtype="<u4"), (height, width)


def read_panoptic_png(path: str | os.PathLike) -> np.ndarray:
    """Reads a COCO panoptic PNG into a segment id map.

    Args:
      path: PNG file (RGB; RGBA alpha ignored; palette/grayscale converted to RGB).

    Returns:
      int32 [H, W] segment ids (0 = void).
    """
    words, shape = read_id_words(path)
    return (words & _ID_MASK).astype(np.int32).reshape(shape)


# ----------------------------------------------------------------------------- segments


def segment_areas_and_boxes(id_map: np.ndarray) -> dict[int, tuple[int, list[int]]]:
    """Area and COCO bbox of every non-zero id in an id map (vectorised, one pass per axis).

    Args:
      id_map: [H, W] integer segment ids (0 = void).

    Returns:
      {segment id: (area in pixels, [x, y, w, h])}, bbox tight: w = max col - min col + 1.
    """
    id_map = np.asarray(id_map)
    if id_map.ndim != 2:
        raise ValueError(f"id_map must be [H, W], got shape {id_map.shape}")
    height, width = id_map.shape
    ids, inverse, counts = np.unique(id_map, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(height, width)
    k = ids.size
    rows = np.zeros((k, height), bool)
    cols = np.zeros((k, width), bool)
    rows[inverse, np.arange(height)[:, None]] = True
    cols[inverse, np.arange(width)[None, :]] = True
    y0 = rows.argmax(axis=1)
    y1 = height - 1 - rows[:, ::-1].argmax(axis=1)
    x0 = cols.argmax(axis=1)
    x1 = width - 1 - cols[:, ::-1].argmax(axis=1)
    out = {}
    for j in range(k):
        if ids[j] == 0:
            continue
        box = [int(x0[j]), int(y0[j]), int(x1[j] - x0[j] + 1), int(y1[j] - y0[j] + 1)]
        out[int(ids[j])] = (int(counts[j]), box)
    return out


def check_segments(
    id_map: np.ndarray, segments_info: Sequence[Mapping[str, Any]], where: str
) -> dict[int, tuple[int, list[int]]]:
    """Validates segments_info against an id map.

    Args:
      id_map: [H, W] integer segment ids (0 = void).
      segments_info: segment dicts with ``id``.
      where: the file or image named in errors.

    Returns:
      `segment_areas_and_boxes(id_map)`.

    Raises:
      PanopticFormatError: a duplicate id, id 0, or an id of the map without an entry.
    """
    present = segment_areas_and_boxes(id_map)
    seen: set[int] = set()
    for seg in segments_info:
        sid = int(seg["id"])
        if sid in seen:
            raise PanopticFormatError(f"{where}: duplicate segment id {sid} in segments_info")
        if sid == 0:
            raise PanopticFormatError(f"{where}: segment id 0 is reserved for void")
        seen.add(sid)
    missing = sorted(set(present) - seen)
    if missing:
        raise PanopticFormatError(
            f"{where}: segment ids {missing} are in the id map but not in segments_info"
        )
    return present


def segments_to_coco_annotation(
    image_id: int, file_name: str, segments_info: Iterable[Mapping[str, Any]]
) -> dict[str, Any]:
    """A COCO panoptic annotation record with plain-Python (JSON-serialisable) values.

    Args:
      image_id: the image id.
      file_name: PNG file name of the prediction (relative to the prediction folder).
      segments_info: dicts with ``id``, ``category_id`` (DATASET id) and optionally ``iscrowd``
        (default 0), ``area``, ``bbox`` [x, y, w, h] and ``score``; other keys are dropped.

    Returns:
      {'image_id', 'file_name', 'segments_info': [{'id', 'category_id', 'iscrowd', ['area'],
      ['bbox'], ['score']}]}.
    """
    segments = []
    for seg in segments_info:
        out: dict[str, Any] = {
            "id": int(seg["id"]),
            "category_id": int(seg["category_id"]),
            "iscrowd": int(seg.get("iscrowd", 0)),
        }
        if "area" in seg:
            out["area"] = int(seg["area"])
        if "bbox" in seg:
            out["bbox"] = [int(v) for v in seg["bbox"]]
        if "score" in seg:
            out["score"] = float(seg["score"])
        segments.append(out)
    return {"image_id": int(image_id), "file_name": str(file_name), "segments_info": segments}


# ----------------------------------------------------------------------------- writing


def write_prediction(
    out_folder: str | os.PathLike,
    file_name: str,
    id_map: np.ndarray,
    segments_info: Sequence[Mapping[str, Any]],
    compress_level: int = 1,
) -> list[dict[str, Any]]:
    """Writes one prediction PNG after checking it against its segments_info.

    Args:
      out_folder: prediction folder (created if needed).
      file_name: PNG file name inside `out_folder`.
      id_map: [H, W] integer segment ids in 0..2^24-1 (0 = void), at the original image size.
      segments_info: one dict per segment (``id``, ``category_id``, ...). Every non-zero id of the
        map must have exactly one entry; entries whose id is not in the map are dropped.
      compress_level: zlib level of the PNG (1 = fast, files are still small).

    Returns:
      The segments that are in the map, as new dicts with ``area`` and ``bbox`` recomputed from
      `id_map` (other keys copied).

    Raises:
      PanopticFormatError: an id of the map has no entry, or an id is duplicated or 0.
    """
    id_map = np.asarray(id_map)
    where = os.path.join(os.fspath(out_folder), file_name)
    present = check_segments(id_map, segments_info, where)
    rgb = id_map_to_rgb(id_map)
    os.makedirs(out_folder, exist_ok=True)
    Image.fromarray(rgb, "RGB").save(where, format="PNG", compress_level=compress_level)
    out = []
    for seg in segments_info:
        sid = int(seg["id"])
        if sid in present:
            area, box = present[sid]
            out.append({**seg, "area": area, "bbox": box})
    return out


def write_predictions_json(
    path: str | os.PathLike,
    annotations: Sequence[Mapping[str, Any]],
    categories: Sequence[Mapping[str, Any]],
) -> None:
    """Writes the COCO panoptic predictions JSON (atomically: temp file then rename).

    Args:
      path: output JSON file; by panopticapi's convention the PNGs live in the folder of the same
        name without '.json'.
      annotations: per-image records (see `segments_to_coco_annotation`); numpy scalars are
        converted to Python numbers.
      categories: the dataset's category dicts (DATASET ids), copied into the file.

    Raises:
      PanopticFormatError: two annotations for the same image id.
    """
    records = []
    seen: set[int] = set()
    for ann in annotations:
        rec = segments_to_coco_annotation(ann["image_id"], ann["file_name"], ann["segments_info"])
        if rec["image_id"] in seen:
            raise PanopticFormatError(
                f"{os.fspath(path)}: two annotations for image id {rec['image_id']}"
            )
        seen.add(rec["image_id"])
        records.append(rec)
    payload = {"annotations": records, "categories": [dict(c) for c in categories]}
    write_json(path, payload)
