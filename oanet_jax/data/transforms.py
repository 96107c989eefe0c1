"""Image transforms: forward (into the padded model frame) and inverse (back to the image)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from oanet_jax.ops.resize import nearest_indices
from oanet_jax.panoptic.io import check_segments

if TYPE_CHECKING:
    from oanet_jax.data.coco_panoptic import CategoryTable

# --- inverse
# Model outputs back to the original image, on the host with numpy (torchvision's
# GeneralizedRCNNTransform.postprocess). The model sees the image resized to (h, w) =
# `image_shape` and padded at the bottom/right to (Hp, Wp); the original image is (H, W) =
# `orig_shape`. Boxes scale per axis (x * W / w, y * H / h); label and id maps are cropped to the
# top-left (h, w) window and resized with nearest neighbour (`ops.resize.nearest_indices`, the
# pixel-centre rule); box-frame masks are pasted at the original resolution
# (`ops.masks.paste_mask_np`, called by the caller with the boxes from `boxes_to_original`).


def _shapes(
    image_shape: Sequence[int], orig_shape: Sequence[int], padded: Sequence[int]
) -> tuple[int, int, int, int]:
    """(h, w, H, W) as ints, checked: (h, w) positive and inside `padded`, (H, W) positive."""
    h, w = (int(v) for v in image_shape)
    big_h, big_w = (int(v) for v in orig_shape)
    if not (0 < h <= padded[0] and 0 < w <= padded[1]):
        raise ValueError(f"image_shape {(h, w)} must be positive and fit in {tuple(padded)}")
    if big_h <= 0 or big_w <= 0:
        raise ValueError(f"orig_shape must be positive, got {(big_h, big_w)}")
    return h, w, big_h, big_w


def label_map_to_original(
    label_map: np.ndarray, image_shape: Sequence[int], orig_shape: Sequence[int]
) -> np.ndarray:
    """Crops a padded, resized label (or id) map to the image and resizes it back (nearest).

    Args:
      label_map: [Hp, Wp] integer map in the padded model frame.
      image_shape: (h, w) of the resized image inside the padding (h <= Hp, w <= Wp).
      orig_shape: (H, W) of the original image.

    Returns:
      int32 [H, W]: pixel (y, x) reads ``label_map[nearest(y), nearest(x)]`` of the (h, w) crop.

    Raises:
      ValueError: `label_map` is not 2-D, or the shapes do not fit.
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"label map must be [Hp, Wp], got shape {label_map.shape}")
    h, w, big_h, big_w = _shapes(image_shape, orig_shape, label_map.shape)
    rows = nearest_indices(h, big_h)
    cols = nearest_indices(w, big_w)
    return label_map[:h, :w][rows[:, None], cols[None, :]].astype(np.int32)


def crop_and_resize_to_original(
    id_map: np.ndarray,
    image_shape: Sequence[int],
    orig_shape: Sequence[int],
    segments_info: Sequence[Mapping[str, Any]],
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Maps a padded, resized panoptic id map back to the original image and cleans its segments.

    Crops and resizes with `label_map_to_original`, recomputes each segment's ``area`` and
    ``bbox`` from the final map and drops the segments that no longer have any pixel.

    Args:
      id_map: [Hp, Wp] integer segment ids (0 = void), Hp >= h, Wp >= w.
      image_shape: (h, w) of the resized image inside the padding.
      orig_shape: (H, W) of the original image.
      segments_info: segment dicts (``id``, ``category_id``, ...) of `id_map`; every non-zero id of
        the cropped map must have an entry.

    Returns:
      (id_map [H, W] int32, segments_info): the surviving segments, in input order, as new dicts
      with ``area`` and ``bbox`` [x, y, w, h] recomputed.

    Raises:
      ValueError: bad shapes. PanopticFormatError: ids without an entry, duplicate ids, id 0.
    """
    out = label_map_to_original(id_map, image_shape, orig_shape)
    present = check_segments(out, segments_info, "crop_and_resize_to_original")
    cleaned = []
    for seg in segments_info:
        sid = int(seg["id"])
        if sid in present:
            area, box = present[sid]
            cleaned.append({**seg, "area": area, "bbox": box})
    return out, cleaned


def segments_info_from_arrays(
    segments: Mapping[str, np.ndarray], table: CategoryTable
) -> list[dict[str, Any]]:
    """The valid rows of one image's merge segment table as COCO segments (dataset ids).

    Args:
      segments: `panoptic.merge.merge_panoptic`'s per-image 'segments': [D + S] arrays 'id',
        'category' (contiguous), 'isthing', 'score', 'valid'.
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
    """One image's merged panoptic prediction at the original size, with dataset category ids.

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
    return crop_and_resize_to_original(
        id_map, image_shape, orig_shape, segments_info_from_arrays(segments, table)
    )


def stuff_prediction_to_original(
    stuff_labels: np.ndarray, image_shape: Sequence[int], orig_shape: Sequence[int]
) -> np.ndarray:
    """The stuff prediction (`merge.stuff_labels`) of one image at the original size.

    Args:
      stuff_labels: [Hp, Wp] int stuff indices (-1 outside the image).
      image_shape: (h, w).
      orig_shape: (H, W).

    Returns:
      [H, W] int32, the same pixel-centre nearest rule as the panoptic id map.
    """
    return label_map_to_original(stuff_labels, image_shape, orig_shape)


def boxes_to_original(
    boxes: np.ndarray, image_shape: Sequence[int], orig_shape: Sequence[int]
) -> np.ndarray:
    """Boxes of the resized image rescaled per axis to the original image and clipped to it.

    Args:
      boxes: [N, 4] float (x1, y1, x2, y2) in resized-image pixels.
      image_shape: (h, w) of the resized image.
      orig_shape: (H, W) of the original image.

    Returns:
      float64 [N, 4] ``(x1 * W / w, y1 * H / h, x2 * W / w, y2 * H / h)`` clipped to [0, W] x
      [0, H].
    """
    h, w = (float(v) for v in image_shape)
    big_h, big_w = (float(v) for v in orig_shape)
    scale = np.asarray([big_w / w, big_h / h, big_w / w, big_h / h], np.float64)
    out = np.asarray(boxes, np.float64).reshape(-1, 4) * scale
    return np.clip(out, 0.0, [big_w, big_h, big_w, big_h])
