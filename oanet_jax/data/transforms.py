"""The per-example transform and its inverse (host-side numpy, deterministic, vectorised).

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
3. Normalise: RGB -> BGR when ``channel_order == 'BGR'``, then ``(x - pixel_mean) / pixel_std``
   with mean/std given in the configured channel order. Pad with 0 at the bottom/right to
   ``image_size``; the semantic map is padded with 255 (void).
4. Ground truth padded to ``max_instances`` rows with a ``valid`` mask; instance masks cropped to
   their boxes at ``mask_size`` (:func:`oanet_jax.ops.masks.crop_and_resize_masks_np`, the host
   twin of the on-device crop).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import PIL.Image

from oanet_jax.data import spec
from oanet_jax.ops.masks import crop_and_resize_masks_np
from oanet_jax.ops.resize import nearest_indices

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


def _normalise_into(image: np.ndarray, out: np.ndarray, cfg: TransformConfig) -> None:
    """Writes ``(x - mean) / std`` of a uint8 RGB [h, w, 3] image into float32 ``out`` [h, w, 3].

    The channels are reversed first when ``cfg.channel_order == 'BGR'``; mean and std are in
    the configured channel order. Computed in float32, in place (no temporaries).
    """
    x = image[..., ::-1] if cfg.channel_order == "BGR" else image
    np.subtract(x, np.asarray(cfg.pixel_mean, np.float32), out=out, dtype=np.float32)
    np.divide(out, np.asarray(cfg.pixel_std, np.float32), out=out)


def transform_record(
    record: dict[str, Any], cfg: TransformConfig, *, short_size: int, flip: bool
) -> dict[str, np.ndarray]:
    """Resizes, flips, normalises and pads one record into a fixed-shape example.

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
    full_masks = np.asarray(record["masks"]).reshape(n, height, width)
    crops = crop_and_resize_masks_np(full_masks, boxes, s)
    if flip:
        resized = resized[:, ::-1]
        semantic = semantic[:, ::-1]
        out_boxes = np.stack(
            [new_w - out_boxes[:, 2], out_boxes[:, 1], new_w - out_boxes[:, 0], out_boxes[:, 3]],
            axis=1,
        )
        crops = crops[:, :, ::-1]

    ex = spec.padding_example(cfg)
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
