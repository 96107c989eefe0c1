"""The per-example transform, its inverse and the on-device image normalisation.

The transform and its inverse are host-side numpy (deterministic, vectorised): the reference.
The training and eval pipelines split the same transform in two: decoding and the segment lookup
on the host (TF ops, :mod:`oanet_jax.data.tf_transforms`; or :func:`wire_from_record` for the
TFDS source), shipping the wire format of :mod:`oanet_jax.data.spec` (source-size canvases), and
the resize, flip, padding, boxes and mask crops on the device inside jit
(:mod:`oanet_jax.data.device_transform`), equal to :func:`transform_record` up to one grey level
of the image and float rounding of the crops (tests/data/test_device_transform.py).

torchvision's ``GeneralizedRCNNTransform`` in spirit: what maps an image and its annotations into
the model's padded frame (forward) and what maps the model's outputs back to the image (inverse)
live here together, so the two stay each other's inverse.

Forward (:func:`transform_record`): a reader record -> one fixed-shape example of the batch spec
(:mod:`oanet_jax.data.spec`):

1. Resize as detectron2's ``ResizeShortestEdge``: shorter side to ``short_size`` (chosen per
   example from ``min_size_train`` in training, ``min_size_test`` in eval), longer side at most
   ``max_size`` (:func:`resize_shape`). Image: PIL bilinear (antialiased when shrinking, as
   detectron2 does for uint8 images). Semantic map: nearest neighbour with the pixel-centre rule
   of :func:`oanet_jax.ops.resize.nearest_indices` (source row ``floor((i + 0.5) * H / h)``,
   PIL's / torch's ``nearest-exact``). Boxes: scaled per axis by ``w / W`` and ``h / H`` (exact
   resized over original size).
2. Horizontal flip (training, ``random_flip``): image, semantic and crops mirrored, boxes
   ``x1' = w - x2``, ``x2' = w - x1``.
3. Pad the uint8 RGB image with 0 at the bottom/right to ``image_size``; the semantic map is
   padded with 255 (void). The image stays uint8 (a quarter of float32's host-to-device bytes):
   it is normalised on the device by :func:`normalize_image`, which the model's trunk applies
   (RGB -> BGR when ``channel_order == 'BGR'``, ``(x - pixel_mean) / pixel_std``, 0 outside
   ``image_shape``), so training, evaluation, prediction and export share one normalisation.
4. Ground truth padded to ``max_instances`` rows with a ``valid`` mask; instance masks cropped to
   their boxes at ``mask_size`` (:func:`oanet_jax.ops.masks.crop_and_resize_masks_np`, the host
   twin of the on-device crop).

Inverse (``# --- inverse`` below): boxes, box-frame masks, label maps and panoptic id maps from the
padded model frame back to the original image size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from oanet_jax.data import spec
from oanet_jax.ops.masks import crop_and_resize_masks_np
from oanet_jax.ops.resize import nearest_indices
from oanet_jax.panoptic.io import check_segments

if TYPE_CHECKING:
    from oanet_jax.data.coco_panoptic import CategoryTable

# --- forward


@dataclasses.dataclass(frozen=True)
class TransformConfig:
    """The per-example transform's hyperparameters (a subset of ``config.data``).

    Attributes:
        image_size: (Hp, Wp) padded image size.
        max_instances: M, ground-truth rows per example.
        mask_size: S, side of the box-cropped instance masks.
        max_size: longer side limit of the resize.
        pixel_mean: per-channel mean, in ``channel_order``.
        pixel_std: per-channel std, in ``channel_order``.
        channel_order: 'BGR' (flip the RGB image before normalising) or 'RGB'.
        source_size: (Hs, Ws), the static canvas the pipeline ships images and label maps on
            before the device resizes them (the wire format of :mod:`oanet_jax.data.spec`);
            (0, 0) until resolved from the data (:func:`resolve_source_size`).
        max_mask_runs: R, run lengths per example for instance masks shipped as runs.
    """

    image_size: tuple[int, int]
    max_instances: int
    mask_size: int
    max_size: int
    pixel_mean: tuple[float, float, float] = (103.53, 116.28, 123.675)
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_order: str = "BGR"
    source_size: tuple[int, int] = (0, 0)
    max_mask_runs: int = 4096

    def __post_init__(self):
        if self.channel_order not in ("BGR", "RGB"):
            raise ValueError(f"channel_order must be 'BGR' or 'RGB', got {self.channel_order!r}")

    @classmethod
    def from_config(cls, config_data: Any) -> TransformConfig:
        """Builds the transform config from ``config.data``."""
        return cls(
            image_size=(int(config_data.image_size[0]), int(config_data.image_size[1])),
            max_instances=int(config_data.max_instances),
            mask_size=int(config_data.mask_size),
            max_size=int(config_data.max_size),
            pixel_mean=tuple(float(v) for v in config_data.pixel_mean),
            pixel_std=tuple(float(v) for v in config_data.pixel_std),
            channel_order=str(config_data.channel_order),
            source_size=(int(config_data.source_size[0]), int(config_data.source_size[1])),
            max_mask_runs=int(config_data.max_mask_runs),
        )

    def with_source_size(self, largest: tuple[int, int]) -> TransformConfig:
        """This config with ``source_size`` resolved (see :func:`resolve_source_size`)."""
        return dataclasses.replace(self, source_size=resolve_source_size(self.source_size, largest))


def resolve_source_size(configured: Sequence[int], largest: Sequence[int]) -> tuple[int, int]:
    """The static source canvas (Hs, Ws) of the wire format.

    Args:
        configured: ``data.source_size``; (0, 0) = automatic.
        largest: (max H, max W) over the split's images (from its JSON).

    Returns:
        ``configured`` when set, else ``largest`` rounded up to multiples of 32 (COCO: 640 x 640).
    """
    hs, ws = (int(v) for v in configured)
    if hs > 0 and ws > 0:
        return hs, ws
    return tuple(max(32, -(-int(v) // 32) * 32) for v in largest)


def resize_shape(height: int, width: int, short_size: int, max_size: int) -> tuple[int, int, float]:
    """Output size of detectron2's ``ResizeShortestEdge`` for one image.

    The shorter side goes to ``short_size``; if the longer side then exceeds ``max_size`` both are
    scaled down so that it equals ``max_size``; sides are rounded with ``int(x + 0.5)``.

    Args:
        height: H, original height (> 0).
        width: W, original width (> 0).
        short_size: target of the shorter side.
        max_size: limit of the longer side (<= 0 disables the limit).

    Returns:
        (h, w, scale): the resized size and the nominal scale factor (``h ~= H * scale``).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = float(short_size) / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max_size > 0 and max(new_h, new_w) > max_size:
        shrink = float(max_size) / max(new_h, new_w)
        new_h, new_w, scale = new_h * shrink, new_w * shrink, scale * shrink
    return int(new_h + 0.5), int(new_w + 0.5), scale


def resize_image(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Bilinear resize of an RGB image with PIL (antialiased when shrinking), as detectron2.

    Args:
        image: uint8 [H, W, 3].
        new_h: output height.
        new_w: output width.

    Returns:
        uint8 [new_h, new_w, 3].
    """
    if image.shape[0] == new_h and image.shape[1] == new_w:
        return np.ascontiguousarray(image)
    pil = PIL.Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize((new_w, new_h), PIL.Image.Resampling.BILINEAR))


def resize_nearest(label: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map (the pixel-centre rule of ``ops.resize``).

    Args:
        label: [H, W] any dtype.
        new_h: output height.
        new_w: output width.

    Returns:
        [new_h, new_w], same dtype.
    """
    rows = nearest_indices(label.shape[0], new_h)
    cols = nearest_indices(label.shape[1], new_w)
    return label[rows[:, None], cols[None, :]]


def normalize_image(
    image: jax.Array,
    image_shape: jax.Array,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    channel_order: str,
) -> jax.Array:
    """The model input from the batch's uint8 image (traced inside the jitted step).

    RGB -> BGR when ``channel_order == 'BGR'``, then ``(x - pixel_mean) / pixel_std`` in float32
    (mean and std in the configured channel order), and 0 outside ``image_shape`` (the bottom /
    right padding), exactly the values the host transform used to ship as float32.

    A floating ``image`` is taken as already normalised and returned unchanged (callers that
    feed the bare network, e.g. the converted-weights parity tests and the model benchmark).

    Args:
        image: uint8 [B, Hp, Wp, 3] RGB, as :mod:`oanet_jax.data.spec` declares it.
        image_shape: int [B, 2], (h, w) of the image inside the padding.
        pixel_mean: per-channel mean, in ``channel_order``.
        pixel_std: per-channel std, in ``channel_order``.
        channel_order: 'BGR' or 'RGB'.

    Returns:
        float32 [B, Hp, Wp, 3] (a floating input: itself).
    """
    if jnp.issubdtype(image.dtype, jnp.floating):
        return image
    if channel_order not in ("BGR", "RGB"):
        raise ValueError(f"channel_order must be 'BGR' or 'RGB', got {channel_order!r}")
    x = image.astype(jnp.float32)
    if channel_order == "BGR":
        x = x[..., ::-1]
    x = (x - jnp.asarray(pixel_mean, jnp.float32)) / jnp.asarray(pixel_std, jnp.float32)
    hp, wp = image.shape[1], image.shape[2]
    shape = jnp.asarray(image_shape, jnp.int32)
    rows = jnp.arange(hp, dtype=jnp.int32)[None, :, None] < shape[:, 0, None, None]
    cols = jnp.arange(wp, dtype=jnp.int32)[None, None, :] < shape[:, 1, None, None]
    return jnp.where((rows & cols)[..., None], x, jnp.float32(0.0))


def checked_resize_shape(
    cfg: TransformConfig,
    image_id: int,
    file_name: str,
    num_instances: int,
    height: int,
    width: int,
    short_size: int,
) -> tuple[int, int, float]:
    """`resize_shape`, after checking that the example fits the padded batch.

    Returns:
        (new_h, new_w, scale).

    Raises:
        ValueError: more instances than ``max_instances``, or a resized image larger than
            ``image_size`` (the message names the image id and file).
    """
    hp, wp = cfg.image_size
    if num_instances > cfg.max_instances:
        raise ValueError(
            f"image id {image_id} ({file_name}): {num_instances} instances exceed "
            f"max_instances={cfg.max_instances}"
        )
    new_h, new_w, scale = resize_shape(height, width, short_size, cfg.max_size)
    if new_h > hp or new_w > wp:
        raise ValueError(
            f"image id {image_id}: resized to {new_h}x{new_w} (from {height}x{width}, short side "
            f"{short_size}, max_size {cfg.max_size}), larger than image_size {hp}x{wp}"
        )
    return new_h, new_w, scale


def transform_record(
    record: dict[str, Any], cfg: TransformConfig, *, short_size: int, flip: bool
) -> dict[str, np.ndarray]:
    """Resizes, flips and pads one record into a fixed-shape example (image stays uint8).

    See the module docstring for the exact conventions. Instance masks are cropped from the
    full-resolution masks in the original frame with the original boxes
    (:func:`crop_and_resize_masks_np`); because the crop lives in the box frame, it is also the
    crop of the resized mask in the resized box, and mirroring it along its last axis gives the
    crop of the flipped mask in the flipped box.

    Args:
        record: reader record: ``image`` uint8 [H, W, 3] RGB, ``image_id`` int, ``semantic``
            uint8 [H, W], ``boxes`` float32 [N, 4], ``classes`` int32 [N], ``is_crowd`` bool [N],
            ``masks`` uint8 [N, H, W] (0/1).
        cfg: transform config.
        short_size: target of the shorter side.
        flip: mirror horizontally.

    Returns:
        Unbatched example with every key of :data:`oanet_jax.data.spec.KEYS`, shapes and dtypes
        of ``spec.batch_spec(cfg, train=False)``.

    Raises:
        ValueError: more instances than ``max_instances``, or a resized image larger than
            ``image_size`` (message names the image id).
    """
    image = np.asarray(record["image"])
    height, width = int(image.shape[0]), int(image.shape[1])
    image_id = int(record["image_id"])
    boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
    n = boxes.shape[0]
    new_h, new_w, scale = checked_resize_shape(
        cfg, image_id, record.get("file_name", "?"), n, height, width, short_size
    )

    resized = resize_image(image, new_h, new_w)
    semantic = resize_nearest(np.asarray(record["semantic"], np.uint8), new_h, new_w)
    sx, sy = new_w / width, new_h / height
    out_boxes = boxes * np.asarray([sx, sy, sx, sy], np.float32)
    full_masks = np.asarray(record["masks"]).reshape(n, height, width)
    crops = crop_and_resize_masks_np(full_masks, boxes, cfg.mask_size)
    if flip:
        resized = resized[:, ::-1]
        semantic = semantic[:, ::-1]
        out_boxes = np.stack(
            [new_w - out_boxes[:, 2], out_boxes[:, 1], new_w - out_boxes[:, 0], out_boxes[:, 3]],
            axis=1,
        )
        crops = crops[:, :, ::-1]

    ex = spec.padding_example(cfg)
    ex["image"][:new_h, :new_w] = resized
    ex["semantic"][:new_h, :new_w] = semantic
    ex["image_shape"][:] = (new_h, new_w)
    ex["orig_shape"][:] = (height, width)
    ex["scale"] = np.asarray(scale, np.float32)
    ex["image_id"] = np.asarray(image_id, np.int64)
    ex["flipped"] = np.asarray(bool(flip))
    ex["example_valid"] = np.asarray(True)
    ex["boxes"][:n] = out_boxes
    ex["classes"][:n] = np.asarray(record["classes"], np.int32).reshape(n)
    ex["is_crowd"][:n] = np.asarray(record["is_crowd"], np.bool_).reshape(n)
    ex["valid"][:n] = True
    ex["masks"][:n] = crops
    return ex


def check_wire_limits(
    cfg: TransformConfig,
    image_id: int,
    file_name: str,
    height: int,
    width: int,
    num_runs: int,
) -> None:
    """Checks that an example fits the wire format's static shapes (:mod:`oanet_jax.data.spec`).

    Args:
        cfg: transform config with ``source_size`` resolved.
        image_id: for the message; file_name: the image file, for the message.
        height: H; width: W of the original image.
        num_runs: run lengths of its instance masks (0 when they come from the panoptic PNG).

    Raises:
        DataError (reason ``wire_limit``): an image larger than ``source_size`` or more runs
            than ``max_mask_runs``; the message names the file and the setting to change.
    """
    from oanet_jax.data.coco_panoptic import WIRE_LIMIT, DataError

    hs, ws = cfg.source_size
    if height > hs or width > ws:
        raise DataError(
            f"image is {height}x{width} (HxW), larger than data.source_size {hs}x{ws}, the "
            "static canvas images travel on (set data.source_size, or (0, 0) for the split's "
            "largest image)",
            reason=WIRE_LIMIT,
            path=file_name,
            image_id=image_id,
        )
    if num_runs > cfg.max_mask_runs:
        raise DataError(
            f"its instance masks take {num_runs} run lengths, more than data.max_mask_runs="
            f"{cfg.max_mask_runs} (raise it, or skip such images with data.skip_bad_records)",
            reason=WIRE_LIMIT,
            path=file_name,
            image_id=image_id,
        )


def mask_run_lengths(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column-major run lengths of binary masks, each instance's starting with zeros.

    The coding of COCO's uncompressed RLE (and of the wire format's ``run_ends`` once
    accumulated): runs alternate 0 and 1 along the column-major pixel order.

    Args:
        masks: [N, H, W] binary (0 / 1 or bool).

    Returns:
        (lengths int32 [R] of all instances concatenated, runs per instance int32 [N]); each
        instance's lengths sum to H * W.
    """
    n = masks.shape[0]
    lengths, counts = [], []
    for i in range(n):
        flat = np.asarray(masks[i], bool).T.reshape(-1)
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        bounds = np.concatenate([[0], change, [flat.size]])
        runs = np.diff(bounds)
        if flat.size and flat[0]:
            runs = np.concatenate([[0], runs])
        lengths.append(runs.astype(np.int32))
        counts.append(runs.size)
    if not lengths:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(lengths), np.asarray(counts, np.int32)


def wire_from_record(
    record: dict[str, Any], cfg: TransformConfig, *, short_size: int, flip: bool
) -> dict[str, np.ndarray]:
    """One padded wire example from a reader record (host numpy; the TFDS source's transform).

    The host half of :func:`transform_record` (the device does the rest,
    :mod:`oanet_jax.data.device_transform`): the image and semantic map on the source canvas,
    the instance masks as the instance map when they do not overlap (panoptic segments), else as
    run lengths, boxes in the original frame.

    Args:
        record: reader record (see :func:`transform_record`).
        cfg: transform config with ``source_size`` resolved.
        short_size: target of the shorter side.
        flip: mirror horizontally (done on the device).

    Returns:
        Unbatched wire example with every key of :data:`oanet_jax.data.spec.WIRE_KEYS`.

    Raises:
        ValueError: as :func:`transform_record`; DataError: as :func:`check_wire_limits`.
    """
    image = np.asarray(record["image"])
    height, width = int(image.shape[0]), int(image.shape[1])
    image_id = int(record["image_id"])
    file_name = record.get("file_name", "?")
    boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
    n = boxes.shape[0]
    new_h, new_w, scale = checked_resize_shape(
        cfg, image_id, file_name, n, height, width, short_size
    )
    masks = np.asarray(record["masks"]).reshape(n, height, width).astype(bool)
    overlapping = n > 0 and int(masks.sum(axis=0, dtype=np.int32).max()) > 1
    lengths, counts = mask_run_lengths(masks) if overlapping else (np.zeros(0, np.int32), None)
    check_wire_limits(cfg, image_id, file_name, height, width, lengths.size)

    ex = spec.wire_padding_example(cfg)
    ex["image"][:height, :width] = image
    ex["semantic"][:height, :width] = np.asarray(record["semantic"], np.uint8)
    if n and not overlapping:
        index = np.arange(1, n + 1, dtype=np.uint8)[:, None, None]
        ex["instance_map"][:height, :width] = (masks * index).sum(axis=0, dtype=np.uint8)
    if overlapping:
        ex["run_ends"][: lengths.size] = np.cumsum(lengths, dtype=np.int64)
        ex["run_start"][:n] = np.cumsum(counts) - counts
    ex["image_shape"][:] = (new_h, new_w)
    ex["orig_shape"][:] = (height, width)
    ex["scale"] = np.asarray(scale, np.float32)
    ex["image_id"] = np.asarray(image_id, np.int64)
    ex["flipped"] = np.asarray(bool(flip))
    ex["example_valid"] = np.asarray(True)
    ex["boxes"][:n] = boxes
    ex["boxes_from_map"] = np.asarray(False)
    ex["classes"][:n] = np.asarray(record["classes"], np.int32).reshape(n)
    ex["is_crowd"][:n] = np.asarray(record["is_crowd"], np.bool_).reshape(n)
    ex["valid"][:n] = True
    return ex


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
      [H, W] of `label_map`'s dtype: pixel (y, x) reads ``label_map[nearest(y), nearest(x)]`` of
      the (h, w) crop.

    Raises:
      ValueError: `label_map` is not 2-D, or the shapes do not fit.
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"label map must be [Hp, Wp], got shape {label_map.shape}")
    h, w, big_h, big_w = _shapes(image_shape, orig_shape, label_map.shape)
    rows = nearest_indices(h, big_h)
    cols = nearest_indices(w, big_w)
    return label_map[:h, :w][rows[:, None], cols[None, :]]


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
      (id_map [H, W] of `id_map`'s dtype, segments_info): the surviving segments, in input order,
      as new dicts
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
      (id_map [H, W] of `id_map`'s dtype, segments_info with 'area' and 'bbox' recomputed;
      segments that vanish in the resize are dropped).
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
    return label_map_to_original(stuff_labels, image_shape, orig_shape).astype(np.int32)


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
