"""tf.data input pipeline: records -> resized, flipped, normalised, padded, batched examples.

Sources (``config.data.source``):

* ``'coco_panoptic'``: any dataset in COCO panoptic format read by
  :class:`oanet_jax.data.coco_panoptic.CocoPanopticReader` (host-side numpy). Record indices flow
  through tf.data and each example is read and transformed in ``tf.numpy_function``.
* ``'tfds'``: TFDS ``coco/2017_panoptic`` prepared by the user under ``config.data.tfds_data_dir``.
  :func:`tfds_features_to_record` maps a TFDS example to the same record dict as the reader, so
  both sources share one transform, :func:`transform_record`.

Per example (all numpy, deterministic, vectorised; see :func:`transform_record`):

1. Resize as detectron2's ``ResizeShortestEdge``: shorter side to ``short_size`` (chosen per
   example from ``min_size_train`` in training, ``min_size_test`` in eval), longer side at most
   ``max_size`` (:func:`resize_shape`). Image: PIL bilinear (antialiased when shrinking, as
   detectron2 does for uint8 images). Semantic map: nearest neighbour, source row
   ``floor((i + 0.5) * H / h)`` (PIL's / torch's ``nearest-exact`` convention). Boxes: scaled per
   axis by ``w / W`` and ``h / H`` (exact resized over original size).
2. Horizontal flip (training, ``random_flip``): image, semantic and crops mirrored, boxes
   ``x1' = w - x2``, ``x2' = w - x1``.
3. Normalise: RGB -> BGR when ``channel_order == 'BGR'``, then ``(x - pixel_mean) / pixel_std``
   with mean/std given in the configured channel order. Pad with 0 at the bottom/right to
   ``image_size``; the semantic map is padded with 255 (void).
4. Ground truth padded to ``max_instances`` rows with a ``valid`` mask; instance masks cropped to
   their boxes at ``mask_size`` (:func:`crop_masks`).

Batch dict (numpy via ``as_numpy_iterator``; B = per-host batch, M = ``max_instances``,
S = ``mask_size``, (Hp, Wp) = ``image_size``):

* ``image`` float32 [B, Hp, Wp, 3]; ``semantic`` uint8 [B, Hp, Wp] (255 = void / padding)
* ``image_shape`` int32 [B, 2] (h, w) of the resized image inside the padding
* ``orig_shape`` int32 [B, 2] (H, W) of the original image
* ``scale`` float32 [B] the nominal resize factor of ``ResizeShortestEdge`` (``h = round(H *
  scale)``, ``w = round(W * scale)``; the exact per-axis factors are ``image_shape / orig_shape``,
  which is what the boxes use)
* ``image_id`` int64 [B]; ``flipped`` bool [B]; ``example_valid`` bool [B] (False only for the
  padding examples that fill the last eval batch, and for bad records kept as padding in eval)
* ``boxes`` float32 [B, M, 4] x1y1x2y2 in the resized (and flipped) frame; ``classes`` int32
  [B, M]; ``is_crowd`` bool [B, M]; ``valid`` bool [B, M]; ``masks`` float32 [B, M, S, S] in
  [0, 1]. Padding rows are 0 / False.

Order and determinism (raw-folder source). Training: epoch ``e`` uses a permutation of the record
indices drawn with numpy from ``(seed, e)``; host ``h`` of ``P`` takes slots ``h, h + P, ...`` of
it (each host gets ``L = n // P`` examples per epoch, the rest of the permutation is dropped);
epochs repeat forever. Flip and scale of an example are drawn from a numpy generator seeded with
``(seed, g)``, ``g = epoch * L * P + slot`` its global position. The stream is a pure function of
``(seed, position)`` (``shuffle_buffer`` is not used: the permutation is global), so
``start_step = k`` starts at per-host position ``k * B`` and yields exactly batches ``k, k + 1,
...`` of a run from step 0. Eval: records in the reader's order, host ``h`` takes ``h::P``, every
host yields the same number of batches (the last ones padded with ``example_valid = False``).

TFDS source: host ``h`` reads a contiguous slice of the split (``n // P`` examples in training,
near-even slices in eval), training shuffles it with a seeded ``shuffle(shuffle_buffer)``
(deterministic for a seed, reshuffled each epoch) and repeats; flip and scale come from
``(seed, q * P + h)``, ``q`` the per-host position; a resume skips ``start_step * B`` encoded
examples before decoding. The parallel maps run with ``deterministic=True``.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import tensorflow as tf

from oanet_jax.data import coco_panoptic

_LOG = logging.getLogger(__name__)

IGNORE_LABEL = 255

# Keys, dtypes and (unbatched) shapes of one example; the shapes are filled in by
# :func:`example_spec`.
_KEYS = (
    "image",
    "semantic",
    "image_shape",
    "orig_shape",
    "scale",
    "image_id",
    "flipped",
    "example_valid",
    "boxes",
    "classes",
    "is_crowd",
    "valid",
    "masks",
)
_DTYPES = {
    "image": np.float32,
    "semantic": np.uint8,
    "image_shape": np.int32,
    "orig_shape": np.int32,
    "scale": np.float32,
    "image_id": np.int64,
    "flipped": np.bool_,
    "example_valid": np.bool_,
    "boxes": np.float32,
    "classes": np.int32,
    "is_crowd": np.bool_,
    "valid": np.bool_,
    "masks": np.float32,
}


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
    """

    image_size: tuple[int, int]
    max_instances: int
    mask_size: int
    max_size: int
    pixel_mean: tuple[float, float, float] = (103.53, 116.28, 123.675)
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_order: str = "BGR"

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
        )


# ------------------------------------------------------------------------------ transforms


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


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of a nearest-neighbour resize: ``min(floor((i + 0.5) * in / out), in - 1)``.

    Args:
        in_size: input length.
        out_size: output length.

    Returns:
        int64 [out_size].
    """
    pos = (np.arange(out_size, dtype=np.float64) + 0.5) * (float(in_size) / out_size)
    return np.minimum(np.floor(pos).astype(np.int64), in_size - 1)


def resize_nearest(label: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map (pixel-centre convention of :func:`nearest_indices`).

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


def crop_masks(masks: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Crops full-resolution binary masks to their boxes at a fixed size (bilinear point samples).

    Output cell ``(i, j)`` of mask n is the bilinear interpolation of mask n at the image point
    ``(x1 + (j + 0.5) * (x2 - x1) / S, y1 + (i + 0.5) * (y2 - y1) / S)``, i.e. at box-frame
    point ``((j + 0.5) / S, (i + 0.5) / S)``, with image pixel ``(r, c)`` centred at
    ``(c + 0.5, r + 0.5)`` and pixels outside the image treated as 0 (zero padding). This is
    ``torch.nn.functional.grid_sample(mask, grid, mode='bilinear', padding_mode='zeros',
    align_corners=False)`` at those points, and the convention of
    ``oanet_jax.ops.masks.crop_and_resize_masks`` / ``resample_masks``. One point sample per cell
    (no area averaging). Positions are computed in float64; the result is float32.

    Vectorised over instances and cells: four corner gathers of [N, S, S].

    Args:
        masks: [N, H, W] uint8 / bool / float masks (binary: 0/1; uint8 values are taken as-is,
            so pass 0/1 masks, not 0/255).
        boxes: [N, 4] float x1y1x2y2 in the masks' pixel frame.
        size: S.

    Returns:
        float32 [N, S, S] in [0, 1] for binary masks.
    """
    n, height, width = masks.shape
    if n == 0:
        return np.zeros((0, size, size), np.float32)
    boxes = np.asarray(boxes, np.float64)
    frac = (np.arange(size, dtype=np.float64) + 0.5) / size
    vy = boxes[:, 1:2] + frac[None, :] * (boxes[:, 3:4] - boxes[:, 1:2]) - 0.5  # [N, S]
    vx = boxes[:, 0:1] + frac[None, :] * (boxes[:, 2:3] - boxes[:, 0:1]) - 0.5
    y0 = np.floor(vy)
    x0 = np.floor(vx)
    fy = (vy - y0).astype(np.float32)
    fx = (vx - x0).astype(np.float32)
    y0 = y0.astype(np.int64)
    x0 = x0.astype(np.int64)

    def taps(i0, f, limit):
        out = []
        for idx, w in ((i0, 1.0 - f), (i0 + 1, f)):
            inside = (idx >= 0) & (idx < limit)
            out.append((np.clip(idx, 0, limit - 1), np.where(inside, w, np.float32(0.0))))
        return out

    batch = np.arange(n)[:, None, None]
    result = np.zeros((n, size, size), np.float32)
    for yi, wy in taps(y0, fy, height):
        for xi, wx in taps(x0, fx, width):
            vals = masks[batch, yi[:, :, None], xi[:, None, :]].astype(np.float32)
            result += vals * (wy[:, :, None] * wx[:, None, :])
    return result


def _normalise_into(image: np.ndarray, out: np.ndarray, cfg: TransformConfig) -> None:
    """Writes ``(x - mean) / std`` of a uint8 RGB [h, w, 3] image into float32 ``out`` [h, w, 3].

    The channels are reversed first when ``cfg.channel_order == 'BGR'``; mean and std are in
    the configured channel order. Computed in float32, in place (no temporaries).
    """
    x = image[..., ::-1] if cfg.channel_order == "BGR" else image
    np.subtract(x, np.asarray(cfg.pixel_mean, np.float32), out=out, dtype=np.float32)
    np.divide(out, np.asarray(cfg.pixel_std, np.float32), out=out)


def padding_example(cfg: TransformConfig) -> dict[str, np.ndarray]:
    """An all-padding example (``example_valid = False``) with the shapes of a real one.

    Image 0, semantic 255, ``image_id`` -1, shapes and scale 0, no valid instances.

    Args:
        cfg: transform config.

    Returns:
        Unbatched example dict (see the module docstring for keys, shapes and dtypes).
    """
    hp, wp = cfg.image_size
    m, s = cfg.max_instances, cfg.mask_size
    return {
        "image": np.zeros((hp, wp, 3), np.float32),
        "semantic": np.full((hp, wp), IGNORE_LABEL, np.uint8),
        "image_shape": np.zeros((2,), np.int32),
        "orig_shape": np.zeros((2,), np.int32),
        "scale": np.zeros((), np.float32),
        "image_id": np.full((), -1, np.int64),
        "flipped": np.zeros((), np.bool_),
        "example_valid": np.zeros((), np.bool_),
        "boxes": np.zeros((m, 4), np.float32),
        "classes": np.zeros((m,), np.int32),
        "is_crowd": np.zeros((m,), np.bool_),
        "valid": np.zeros((m,), np.bool_),
        "masks": np.zeros((m, s, s), np.float32),
    }


def transform_record(
    record: dict[str, Any], cfg: TransformConfig, *, short_size: int, flip: bool
) -> dict[str, np.ndarray]:
    """Resizes, flips, normalises and pads one record into a fixed-shape example.

    See the module docstring for the exact conventions. Instance masks are cropped from the
    full-resolution masks in the original frame with the original boxes (:func:`crop_masks`);
    because the crop lives in the box frame, it is also the crop of the resized mask in the
    resized box, and mirroring it along its last axis gives the crop of the flipped mask in the
    flipped box.

    Args:
        record: reader record: ``image`` uint8 [H, W, 3] RGB, ``image_id`` int, ``semantic``
            uint8 [H, W], ``boxes`` float32 [N, 4], ``classes`` int32 [N], ``is_crowd`` bool [N],
            ``masks`` uint8 [N, H, W] (0/1).
        cfg: transform config.
        short_size: target of the shorter side.
        flip: mirror horizontally.

    Returns:
        Unbatched example: ``image`` float32 [Hp, Wp, 3], ``semantic`` uint8 [Hp, Wp],
        ``image_shape`` / ``orig_shape`` int32 [2], ``scale`` float32 [], ``image_id`` int64 [],
        ``flipped`` / ``example_valid`` bool [], ``boxes`` float32 [M, 4], ``classes`` int32 [M],
        ``is_crowd`` / ``valid`` bool [M], ``masks`` float32 [M, S, S].

    Raises:
        ValueError: more instances than ``max_instances``, or a resized image larger than
            ``image_size`` (message names the image id).
    """
    image = np.asarray(record["image"])
    height, width = int(image.shape[0]), int(image.shape[1])
    image_id = int(record["image_id"])
    boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
    n = boxes.shape[0]
    hp, wp = cfg.image_size
    m, s = cfg.max_instances, cfg.mask_size
    if n > m:
        raise ValueError(
            f"image id {image_id} ({record.get('file_name', '?')}): {n} instances exceed "
            f"max_instances={m}"
        )
    new_h, new_w, scale = resize_shape(height, width, short_size, cfg.max_size)
    if new_h > hp or new_w > wp:
        raise ValueError(
            f"image id {image_id}: resized to {new_h}x{new_w} (from {height}x{width}, short side "
            f"{short_size}, max_size {cfg.max_size}), larger than image_size {hp}x{wp}"
        )

    resized = resize_image(image, new_h, new_w)
    semantic = resize_nearest(np.asarray(record["semantic"], np.uint8), new_h, new_w)
    sx, sy = new_w / width, new_h / height
    out_boxes = boxes * np.asarray([sx, sy, sx, sy], np.float32)
    crops = crop_masks(np.asarray(record["masks"]).reshape(n, height, width), boxes, s)
    if flip:
        resized = resized[:, ::-1]
        semantic = semantic[:, ::-1]
        out_boxes = np.stack(
            [new_w - out_boxes[:, 2], out_boxes[:, 1], new_w - out_boxes[:, 0], out_boxes[:, 3]],
            axis=1,
        )
        crops = crops[:, :, ::-1]

    ex = padding_example(cfg)
    _normalise_into(resized, ex["image"][:new_h, :new_w], cfg)
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


# ------------------------------------------------------------------------------ TFDS adapter


def tfds_label_mapping(
    label_names: Sequence[str],
    categories: coco_panoptic.CategoryTable | None = None,
    num_thing_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Maps TFDS ``ClassLabel`` indices of ``coco/2017_panoptic`` to contiguous ids.

    TFDS names its 133 labels after the categories of the panoptic JSON in file order (sorted by
    COCO id). With a :class:`CategoryTable`, labels are matched to it by name. Without one, label
    k is contiguous id k and the first ``num_thing_classes`` labels are things: true for COCO,
    whose thing ids (1..90) all precede its stuff ids (92..200), so "sorted by id" is "things
    first, each group sorted by id", the contiguous order of ``CategoryTable``.

    Args:
        label_names: TFDS label names, index = TFDS label.
        categories: optional category table to match names against.
        num_thing_classes: T, used when ``categories`` is None.

    Returns:
        (label_to_contiguous int32 [L], isthing bool [C]) with C the number of contiguous classes.
    """
    if categories is not None:
        index = {name: i for i, name in enumerate(categories.names)}
        missing = [name for name in label_names if name not in index]
        if missing:
            raise ValueError(f"TFDS labels not in the category table: {missing[:10]}")
        mapping = np.asarray([index[name] for name in label_names], np.int32)
        return mapping, np.asarray(categories.isthing, np.bool_)
    if num_thing_classes is None:
        raise ValueError("pass either a CategoryTable or num_thing_classes")
    num = len(label_names)
    return np.arange(num, dtype=np.int32), np.arange(num) < int(num_thing_classes)


def tfds_features_to_record(
    features: dict[str, Any], label_to_contiguous: np.ndarray, isthing: np.ndarray
) -> dict[str, Any]:
    """Maps one decoded TFDS ``coco/2017_panoptic`` example to a reader record.

    The semantic map and the instances come from the panoptic PNG (segment id
    ``R + 256 G + 256^2 B``, 0 = void), exactly as the reader does without an instances JSON:
    every segment paints its contiguous class into ``semantic`` (crowd included), every thing
    segment (crowd included, ``is_crowd`` set) becomes an instance with its binary mask and its
    tight box (``x2 = max col + 1``). TFDS's normalised ``bbox`` and ``area`` are not used.

    Args:
        features: numpy dict shaped like TFDS's: ``image`` uint8 [H, W, 3], ``panoptic_image``
            uint8 [H, W, 3], ``image/id`` int64 [], optional ``image/filename`` bytes/str,
            ``panoptic_objects``: {``id`` int64 [K], ``label`` int64 [K], ``is_crowd`` bool [K],
            ``bbox`` float32 [K, 4], ``area`` int64 [K]}.
        label_to_contiguous: int32 [L] TFDS label -> contiguous class id.
        isthing: bool [C] per contiguous class.

    Returns:
        Record dict with ``image``, ``image_id``, ``file_name``, ``semantic``, ``boxes``,
        ``classes``, ``is_crowd``, ``masks`` uint8 [N, H, W], ``segment_ids`` int32 [N],
        ``ann_ids`` int64 [N] (-1: no instances JSON).

    Raises:
        ValueError: a label outside the table, a segment id absent from the PNG, or PNG pixels
            whose id has no segment (message names the image id).
    """
    image = np.asarray(features["image"], np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = image[:, :, :3]
    image_id = int(np.asarray(features["image/id"]))
    file_name = features.get("image/filename", "")
    if isinstance(file_name, (bytes, np.bytes_)):
        file_name = file_name.decode()
    file_name = str(file_name)
    pan = np.asarray(features["panoptic_image"], np.int64)
    if pan.shape[:2] != image.shape[:2]:
        raise ValueError(
            f"image id {image_id}: panoptic image {pan.shape[:2]} != image {image.shape[:2]}"
        )
    pan_ids = pan[:, :, 0] + 256 * pan[:, :, 1] + 65536 * pan[:, :, 2]
    objects = features["panoptic_objects"]
    seg_ids = np.asarray(objects["id"], np.int64).reshape(-1)
    labels = np.asarray(objects["label"], np.int64).reshape(-1)
    crowd = np.asarray(objects["is_crowd"], np.bool_).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= len(label_to_contiguous)):
        raise ValueError(f"image id {image_id}: TFDS label out of range: {labels.tolist()}")
    classes = np.asarray(label_to_contiguous, np.int64)[labels]

    # id -> segment slot via a sorted search (vectorised over pixels).
    order = np.argsort(seg_ids, kind="stable")
    sorted_ids = seg_ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, pan_ids), 0, max(len(sorted_ids) - 1, 0))
    found = (sorted_ids[pos] == pan_ids) if len(sorted_ids) else np.zeros_like(pan_ids, bool)
    stray = (~found) & (pan_ids != 0)
    if stray.any():
        raise ValueError(
            f"image id {image_id}: panoptic PNG has segment ids without annotation: "
            f"{np.unique(pan_ids[stray])[:10].tolist()}"
        )
    slot = np.where(found, order[pos] if len(order) else 0, -1)  # [H, W] segment index or -1
    lut = np.append(classes, IGNORE_LABEL).astype(np.uint8)
    semantic = lut[slot]  # slot -1 -> last entry (void)

    thing = np.asarray(isthing, np.bool_)[classes] if classes.size else np.zeros(0, bool)
    inst = np.nonzero(thing)[0]
    masks = (slot[None, :, :] == inst[:, None, None]).astype(np.uint8)  # [N, H, W]
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    if len(inst) and not rows.any(axis=1).all():
        empty = seg_ids[inst[~rows.any(axis=1)]].tolist()
        raise ValueError(f"image id {image_id}: thing segments {empty} have no pixels")
    height, width = image.shape[:2]
    y1 = rows.argmax(axis=1)
    y2 = height - rows[:, ::-1].argmax(axis=1)
    x1 = cols.argmax(axis=1)
    x2 = width - cols[:, ::-1].argmax(axis=1)
    return {
        "image": image,
        "image_id": np.int64(image_id),
        "file_name": file_name,
        "semantic": semantic,
        "boxes": np.stack([x1, y1, x2, y2], axis=1).astype(np.float32).reshape(-1, 4),
        "classes": classes[inst].astype(np.int32),
        "is_crowd": crowd[inst],
        "masks": masks,
        "segment_ids": seg_ids[inst].astype(np.int32),
        "ann_ids": np.full((len(inst),), -1, np.int64),
    }


# ------------------------------------------------------------------------------ order / plan


def _seeded_rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


@functools.lru_cache(maxsize=8)
def epoch_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
    """The permutation of record indices of one training epoch (numpy, from (seed, epoch)).

    Args:
        seed: data seed.
        epoch: epoch number.
        num_records: n.

    Returns:
        int64 [n], read-only.
    """
    perm = _seeded_rng(seed, 0, epoch).permutation(num_records)
    perm.flags.writeable = False
    return perm


def augmentation(
    seed: int, global_position: int, num_sizes: int, random_flip: bool
) -> tuple[bool, int]:
    """Flip and scale choice of the example at ``global_position`` (stateless in the position).

    Args:
        seed: data seed.
        global_position: position of the example in the global (all-host) stream.
        num_sizes: number of ``min_size_train`` choices.
        random_flip: whether flipping is enabled.

    Returns:
        (flip: bool, size_index: int).
    """
    rng = _seeded_rng(seed, 1, global_position)
    flip = bool(rng.random() < 0.5)
    size_index = int(rng.integers(num_sizes))
    return (flip and random_flip), size_index


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """The training stream of one host: position -> (record index, flip, short side).

    Attributes:
        num_records: n.
        seed: data seed.
        process_index: h.
        process_count: P.
        sizes: ``min_size_train`` choices.
        random_flip: whether flipping is enabled.
    """

    num_records: int
    seed: int
    process_index: int
    process_count: int
    sizes: tuple[int, ...]
    random_flip: bool = True

    def __post_init__(self):
        if self.num_records < self.process_count:
            raise ValueError(
                f"{self.num_records} records cannot be split over {self.process_count} hosts"
            )
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")

    @property
    def per_host_epoch(self) -> int:
        """L = n // P examples per host and epoch."""
        return self.num_records // self.process_count

    def __call__(self, position: int) -> tuple[int, bool, int, int]:
        """Plans the example at per-host position ``position``.

        Returns:
            (record index, flip, short side, global position).
        """
        length = self.per_host_epoch
        epoch, slot = divmod(int(position), length)
        global_slot = slot * self.process_count + self.process_index
        perm = epoch_permutation(self.seed, epoch, self.num_records)
        global_position = epoch * length * self.process_count + global_slot
        flip, size_index = augmentation(
            self.seed, global_position, len(self.sizes), self.random_flip
        )
        return int(perm[global_slot]), flip, int(self.sizes[size_index]), global_position


def eval_indices(
    num_records: int, process_index: int, process_count: int, batch_size: int
) -> np.ndarray:
    """Record indices of one host in eval, padded with -1 to a whole number of batches.

    Host h takes ``h::P``; every host gets ``ceil(ceil(n / P) / B)`` batches (at least one).

    Args:
        num_records: n.
        process_index: h.
        process_count: P.
        batch_size: per-host batch B.

    Returns:
        int64 [num_batches * B].
    """
    per_host = -(-num_records // process_count)
    num_batches = max(1, -(-per_host // batch_size))
    own = np.arange(process_index, num_records, process_count, dtype=np.int64)
    out = np.full((num_batches * batch_size,), -1, np.int64)
    out[: len(own)] = own
    return out


# ------------------------------------------------------------------------------ tf.data


def example_signature(cfg: TransformConfig) -> dict[str, tf.TensorSpec]:
    """tf.TensorSpec of every key of one (unbatched) example."""
    ex = padding_example(cfg)
    return {k: tf.TensorSpec(ex[k].shape, tf.as_dtype(_DTYPES[k]), name=k) for k in _KEYS}


class _ExitGuard:
    """Lets the interpreter exit while a pipeline iterator is still alive.

    tf.data keeps calling the Python transform from its own threads to fill its buffers. If the
    interpreter starts finalising while such a call is in flight (or about to start), that
    thread can no longer take the GIL and the iterator's destructor waits for it forever: a
    script that ends without deleting its iterator hangs at exit. At exit (``atexit``, while
    Python is fully alive) new calls return a padding example at once (nobody consumes it), and
    we wait until no call is in flight and none started for a short quiet period (the buffers
    are full, so tf.data stops calling), bounded by ``timeout`` seconds.
    """

    def __init__(self, quiet: float = 0.1, timeout: float = 10.0):
        self._lock = threading.Lock()
        self._active = 0
        self._last = 0.0
        self._stopping = False
        self._quiet = quiet
        self._timeout = timeout

    def enter(self) -> bool:
        """Registers a call; False (not registered) once the interpreter is exiting."""
        with self._lock:
            self._last = time.monotonic()
            if self._stopping:
                return False
            self._active += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._active -= 1
            self._last = time.monotonic()

    def drain(self) -> None:
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            with self._lock:
                idle = self._active == 0 and time.monotonic() - self._last > self._quiet
            if idle:
                return
            time.sleep(0.01)


_EXIT_GUARD = _ExitGuard()
atexit.register(_EXIT_GUARD.drain)


def _numpy_map(fn: Callable[..., dict], inputs: list[tf.Tensor], cfg: TransformConfig):
    """Wraps ``fn(*numpy_inputs) -> example dict`` as a tf.numpy_function with static shapes."""
    spec = example_signature(cfg)
    stopped = []  # the padding example returned once the interpreter is exiting

    def flat(*args):
        if not _EXIT_GUARD.enter():
            if not stopped:
                pad = padding_example(cfg)
                stopped.append([np.asarray(pad[k], _DTYPES[k]) for k in _KEYS])
            return stopped[0]
        try:
            ex = fn(*args)
            return [np.asarray(ex[k], _DTYPES[k]) for k in _KEYS]
        finally:
            _EXIT_GUARD.leave()

    outs = tf.numpy_function(flat, inputs, [spec[k].dtype for k in _KEYS], stateful=False)
    result = {}
    for k, t in zip(_KEYS, outs, strict=True):
        t.set_shape(spec[k].shape)
        result[k] = t
    return result


class _SkipCounter:
    """Thread-safe count of records dropped by ``skip_bad_records``."""

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0

    def add(self, message: str) -> None:
        with self._lock:
            self.count += 1
            count = self.count
        _LOG.warning("skipping bad record (%d so far): %s", count, message)


def _finish(ds: tf.data.Dataset, batch_size: int, prefetch: int, drop_bad: bool) -> tf.data.Dataset:
    if drop_bad:
        ds = ds.filter(lambda ex: ex["example_valid"])
    ds = ds.batch(batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    return ds.prefetch(prefetch if prefetch > 0 else tf.data.AUTOTUNE)


def dataset_from_reader(
    reader: coco_panoptic.CocoPanopticReader,
    cfg: TransformConfig,
    *,
    training: bool,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    train_sizes: Sequence[int] = (800,),
    test_size: int = 800,
    random_flip: bool = True,
    skip_bad_records: bool = False,
    prefetch: int = 2,
) -> tf.data.Dataset:
    """Batched tf.data.Dataset over a reader (see the module docstring for order and keys).

    Args:
        reader: a :class:`CocoPanopticReader` (or any object with ``__len__``, ``read(index)``
            and ``maybe_read(index)`` returning a record dict).
        cfg: transform config.
        training: infinite shuffled stream with random scale/flip, else one ordered, padded pass.
        batch_size: per-host batch B.
        seed: data seed.
        start_step: training batches to skip (resume); must be 0 in eval.
        process_index: h.
        process_count: P.
        train_sizes: ``min_size_train``.
        test_size: ``min_size_test``.
        random_flip: flip in training.
        skip_bad_records: a bad record (``DataError``) is dropped (training) or becomes a padding
            example with ``example_valid = False`` (eval); the reader logs and counts it in
            ``reader.summary``. Otherwise the DataError (naming file and record) stops the
            pipeline. In training, a resume at step k restarts at stream position
            ``k * B``; if records were dropped before it, the resumed batches are shifted by that
            many examples relative to the uninterrupted run.
        prefetch: batches to prefetch (<= 0: autotune).

    Returns:
        tf.data.Dataset of batch dicts.
    """

    def load(index: int) -> dict[str, Any] | None:
        if skip_bad_records:
            return reader.maybe_read(index)  # None for a bad record (counted by the reader)
        return reader.read(index)

    if training:
        plan = TrainPlan(
            len(reader),
            int(seed),
            int(process_index),
            int(process_count),
            tuple(int(v) for v in train_sizes),
            bool(random_flip),
        )

        def make(position):
            index, flip, size, _ = plan(int(position))
            record = load(index)
            if record is None:
                return padding_example(cfg)
            return transform_record(record, cfg, short_size=size, flip=flip)

        ds = tf.data.Dataset.counter(start=int(start_step) * int(batch_size), dtype=tf.int64)
    else:
        if start_step:
            raise ValueError("start_step is only meaningful in training")

        def make(index):
            index = int(index)
            record = load(index) if index >= 0 else None
            if record is None:
                return padding_example(cfg)
            return transform_record(record, cfg, short_size=int(test_size), flip=False)

        indices = eval_indices(len(reader), process_index, process_count, batch_size)
        ds = tf.data.Dataset.from_tensor_slices(indices)
    ds = ds.map(
        lambda q: _numpy_map(make, [q], cfg),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return _finish(ds, batch_size, prefetch, drop_bad=training and skip_bad_records)


def dataset_from_tfds_features(
    features_ds: tf.data.Dataset,
    cfg: TransformConfig,
    label_to_contiguous: np.ndarray,
    isthing: np.ndarray,
    *,
    training: bool,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    num_examples: int | None = None,
    num_eval_batches: int | None = None,
    train_sizes: Sequence[int] = (800,),
    test_size: int = 800,
    random_flip: bool = True,
    shuffle_buffer: int = 1024,
    skip_bad_records: bool = False,
    prefetch: int = 2,
) -> tf.data.Dataset:
    """Batched dataset from this host's TFDS ``coco/2017_panoptic`` examples.

    ``features_ds`` yields TFDS feature dicts whose ``image`` and ``panoptic_image`` are either
    decoded uint8 tensors or encoded bytes (``tfds.decode.SkipDecoding``; then decoded here with
    PIL, as the reader does, after the resume skip, so skipping is cheap and both sources give
    identical pixels). Training: ``shuffle(shuffle_buffer, seed)`` (reshuffled
    every epoch, deterministic for a seed), repeat, per-host position q; flip/scale from
    ``(seed, q * P + h)``; ``start_step`` skips ``start_step * B`` elements before decoding.
    Eval: in order, padded to ``num_eval_batches`` batches with ``example_valid = False``.

    Args:
        features_ds: this host's examples (already sharded).
        cfg: transform config.
        label_to_contiguous: int32 [L], from :func:`tfds_label_mapping`.
        isthing: bool [C].
        training: see :func:`dataset_from_reader`.
        batch_size: per-host batch B.
        seed: data seed.
        start_step: training batches to skip.
        process_index: h (for the augmentation position).
        process_count: P.
        num_examples: this host's example count (eval: for padding when ``num_eval_batches`` is
            None).
        num_eval_batches: batches every host yields in eval.
        train_sizes: ``min_size_train``.
        test_size: ``min_size_test``.
        random_flip: flip in training.
        shuffle_buffer: tf.data shuffle buffer (training).
        skip_bad_records: a bad example is dropped (training) / padded (eval) instead of failing.
        prefetch: batches to prefetch.

    Returns:
        tf.data.Dataset of batch dicts.
    """
    label_to_contiguous = np.asarray(label_to_contiguous, np.int32)
    isthing = np.asarray(isthing, np.bool_)
    sizes = tuple(int(v) for v in train_sizes)
    counter = _SkipCounter()

    def decode(value: Any) -> np.ndarray:
        if isinstance(value, (bytes, np.bytes_)) or (
            isinstance(value, np.ndarray) and value.dtype.kind in "SO"
        ):
            # Encoded (SkipDecoding): PIL, the reader's decoder, so both sources give the same
            # pixels (TF's and PIL's JPEG decoders differ by a few levels).
            with PIL.Image.open(io.BytesIO(bytes(np.asarray(value).item()))) as im:
                return np.asarray(im.convert("RGB"))
        return np.asarray(value, np.uint8)

    def make(q, image, pan, image_id, seg_ids, labels, crowd):
        features = {
            "image": decode(image),
            "panoptic_image": decode(pan),
            "image/id": image_id,
            "panoptic_objects": {"id": seg_ids, "label": labels, "is_crowd": crowd},
        }
        if training:
            flip, size_index = augmentation(
                seed, int(q) * process_count + process_index, len(sizes), random_flip
            )
            size = sizes[size_index]
        else:
            flip, size = False, int(test_size)
        try:
            record = tfds_features_to_record(features, label_to_contiguous, isthing)
            return transform_record(record, cfg, short_size=size, flip=flip)
        except ValueError as err:
            if not skip_bad_records:
                raise
            counter.add(str(err))
            return padding_example(cfg)

    def mapper(q, f):
        objects = f["panoptic_objects"]
        inputs = [
            q,
            f["image"],
            f["panoptic_image"],
            tf.cast(f["image/id"], tf.int64),
            tf.cast(objects["id"], tf.int64),
            tf.cast(objects["label"], tf.int64),
            tf.cast(objects["is_crowd"], tf.bool),
        ]
        return _numpy_map(make, inputs, cfg)

    ds = features_ds
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
        ds = ds.enumerate().skip(int(start_step) * int(batch_size))
    else:
        if start_step:
            raise ValueError("start_step is only meaningful in training")
        ds = ds.enumerate()
    ds = ds.map(mapper, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if not training:
        if num_eval_batches is None:
            if num_examples is None:
                raise ValueError("eval needs num_examples or num_eval_batches")
            num_eval_batches = max(1, -(-int(num_examples) // batch_size))
        pad = {k: tf.constant(v) for k, v in padding_example(cfg).items()}
        ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
        ds = ds.take(int(num_eval_batches) * batch_size)
    return _finish(ds, batch_size, prefetch, drop_bad=training and skip_bad_records)


def _host_ranges(total: int, process_count: int, training: bool) -> list[tuple[int, int]]:
    """[start, end) example ranges of each host: n // P each in training, near-even in eval."""
    if training:
        length = total // process_count
        return [(h * length, (h + 1) * length) for h in range(process_count)]
    base, rem = divmod(total, process_count)
    ranges, start = [], 0
    for h in range(process_count):
        end = start + base + (1 if h < rem else 0)
        ranges.append((start, end))
        start = end
    return ranges


def _tfds_categories(config_data: Any) -> coco_panoptic.CategoryTable | None:
    """A category table for TFDS if the config names a panoptic JSON that exists, else None."""
    try:
        path = _join(config_data.root, config_data.eval.panoptic_json)
    except AttributeError:
        return None
    if path and os.path.isfile(path):
        import json

        with open(path) as f:
            return coco_panoptic.CategoryTable.from_categories(json.load(f)["categories"])
    return None


def _tfds_dataset(
    config: Any,
    split: str,
    *,
    training: bool,
    batch_size: int,
    seed: int,
    start_step: int,
    process_index: int,
    process_count: int,
) -> tf.data.Dataset:
    import tensorflow_datasets as tfds

    d = config.data
    tfds_split = {"train": "train", "eval": "validation"}[split]
    builder = tfds.builder(d.tfds_name, data_dir=d.tfds_data_dir or None)
    total = builder.info.splits[tfds_split].num_examples
    if total < process_count:
        raise ValueError(f"{total} TFDS examples cannot be split over {process_count} hosts")
    ranges = _host_ranges(total, process_count, training)
    start, end = ranges[process_index]
    features_ds = builder.as_dataset(
        split=f"{tfds_split}[{start}:{end}]",
        shuffle_files=False,
        decoders={
            "image": tfds.decode.SkipDecoding(),
            "panoptic_image": tfds.decode.SkipDecoding(),
        },
    )
    label_names = builder.info.features["panoptic_objects"]["label"].names
    mapping, isthing = tfds_label_mapping(
        label_names, _tfds_categories(d), int(config.model.num_thing_classes)
    )
    per_host = max(e - s for s, e in ranges)
    return dataset_from_tfds_features(
        features_ds,
        TransformConfig.from_config(d),
        mapping,
        isthing,
        training=training,
        batch_size=batch_size,
        seed=seed,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
        num_eval_batches=max(1, -(-per_host // batch_size)),
        train_sizes=tuple(d.min_size_train),
        test_size=int(d.min_size_test),
        random_flip=bool(d.random_flip),
        shuffle_buffer=int(d.shuffle_buffer),
        skip_bad_records=bool(d.skip_bad_records),
        prefetch=int(d.prefetch),
    )


def _join(root: str, path: str) -> str | None:
    if not path:
        return None
    return os.path.join(root, path) if root else path


def make_reader(config_data: Any, split: str) -> coco_panoptic.CocoPanopticReader:
    """The reader of one split of a COCO-panoptic-format dataset described by ``config.data``.

    Paths in ``config.data.{train,eval}`` are relative to ``config.data.root`` (absolute paths are
    kept); an empty ``instances_json`` means masks from the panoptic segments.

    Args:
        config_data: ``config.data``.
        split: 'train' or 'eval'.

    Returns:
        A :class:`CocoPanopticReader` with ``max_instances``, ``skip_bad_records`` and
        ``keep_empty_images`` from the config.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    s = config_data[split]
    root = config_data.root
    return coco_panoptic.CocoPanopticReader(
        _join(root, s.image_dir),
        _join(root, s.panoptic_json),
        _join(root, s.panoptic_dir),
        instances_json=_join(root, s.instances_json),
        skip_bad_records=bool(config_data.skip_bad_records),
        keep_empty_images=bool(config_data.keep_empty_images),
        max_instances=int(config_data.max_instances),
    )


def build_dataset(
    config: Any,
    split: str,
    *,
    training: bool,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    reader: Any | None = None,
) -> tf.data.Dataset:
    """The input pipeline of one host (see the module docstring for keys, order, determinism).

    Args:
        config: full config (uses ``config.data``; ``config.model.num_thing_classes`` for TFDS).
        split: 'train' or 'eval' (TFDS: 'train' / 'validation').
        training: infinite shuffled, augmented stream (drop_remainder) vs one ordered pass with
            the last batch padded (``example_valid``).
        batch_size: per-host batch B (global batch / process_count).
        seed: data seed.
        start_step: training steps already taken: the stream starts at batch ``start_step``.
        process_index: this host, default ``jax.process_index()``.
        process_count: hosts, default ``jax.process_count()``.
        reader: an already constructed reader to use instead of :func:`make_reader` (raw source).

    Returns:
        tf.data.Dataset yielding batch dicts of static shape.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    d = config.data
    if d.source == "tfds":
        return _tfds_dataset(
            config,
            split,
            training=training,
            batch_size=batch_size,
            seed=seed,
            start_step=start_step,
            process_index=int(process_index),
            process_count=int(process_count),
        )
    if d.source != "coco_panoptic":
        raise ValueError(f"unknown data.source {d.source!r} (coco_panoptic | tfds)")
    if reader is None:
        reader = make_reader(d, split)
    return dataset_from_reader(
        reader,
        TransformConfig.from_config(d),
        training=training,
        batch_size=batch_size,
        seed=seed,
        start_step=start_step,
        process_index=int(process_index),
        process_count=int(process_count),
        train_sizes=tuple(d.min_size_train),
        test_size=int(d.min_size_test),
        random_flip=bool(d.random_flip),
        skip_bad_records=bool(d.skip_bad_records),
        prefetch=int(d.prefetch),
    )
