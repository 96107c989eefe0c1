"""The one batch spec: keys, dtypes and static shapes of the input pipeline's examples.

Every consumer derives the batch layout from here: the tf.data pipeline (its padding example and
its ``tf.TensorSpec`` signature), the train loop (the keys the train step consumes, the zero batch
that initialises the state), benchmarks and tests.

Keys, dtypes and shapes of one batch (B = batch size, M = ``max_instances``, S = ``mask_size``,
(Hp, Wp) = ``image_size``; an unbatched example drops the leading B):

* ``image`` uint8 [B, Hp, Wp, 3]: RGB, resized, 0 in the padding at the bottom/right. It reaches
  the device as uint8 and is normalised there, inside the jitted step
  (:func:`oanet_jax.data.transforms.normalize_image`, applied by the model's trunk).
* ``semantic`` uint8 [B, Hp, Wp]: contiguous class ids, ``IGNORE_LABEL`` (255) = void / padding.
* ``image_shape`` int32 [B, 2]: (h, w) of the resized image inside the padding.
* ``orig_shape`` int32 [B, 2]: (H, W) of the original image.
* ``scale`` float32 [B]: the nominal resize factor of ``ResizeShortestEdge`` (``h = round(H *
  scale)``, ``w = round(W * scale)``; the exact per-axis factors, which the boxes use, are
  ``image_shape / orig_shape``).
* ``image_id`` int64 [B]; ``flipped`` bool [B]; ``example_valid`` bool [B] (False only for the
  padding examples that fill the last eval batch, and for bad records kept as padding).
* ``boxes`` float32 [B, M, 4]: x1y1x2y2 in the resized (and flipped) frame.
* ``classes`` int32 [B, M]; ``is_crowd`` bool [B, M]; ``valid`` bool [B, M].
* ``masks`` float32 [B, M, S, S]: instance masks cropped to their boxes, in [0, 1].

Ground-truth rows past the valid ones are 0 / False. The train step consumes :data:`TRAIN_KEYS`;
the bookkeeping keys (``orig_shape``, ``scale``, ``image_id``, ``flipped``, ``example_valid``)
stay on the host.

Functions take ``cfg``: any object with ``image_size`` (Hp, Wp), ``max_instances`` and
``mask_size`` attributes, i.e. ``config.data`` or a
:class:`oanet_jax.data.transforms.TransformConfig`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import jax
    import tensorflow as tf

__all__ = [
    "DTYPES",
    "WIRE_DEVICE_KEYS",
    "WIRE_DTYPES",
    "WIRE_KEYS",
    "is_wire",
    "wire_padding_example",
    "wire_shapes",
    "wire_signature",
    "IGNORE_LABEL",
    "KEYS",
    "TRAIN_KEYS",
    "batch_spec",
    "example_shapes",
    "padding_example",
    "tensor_signature",
    "validate",
    "zeros_batch",
]

IGNORE_LABEL = 255

# Every key of an example, in the order the pipeline's numpy function returns them.
KEYS = (
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

# The keys the train step consumes (the rest is host-side bookkeeping).
TRAIN_KEYS = (
    "image",
    "image_shape",
    "boxes",
    "classes",
    "is_crowd",
    "valid",
    "masks",
    "semantic",
)

DTYPES: dict[str, np.dtype] = {
    "image": np.dtype(np.uint8),
    "semantic": np.dtype(np.uint8),
    "image_shape": np.dtype(np.int32),
    "orig_shape": np.dtype(np.int32),
    "scale": np.dtype(np.float32),
    "image_id": np.dtype(np.int64),
    "flipped": np.dtype(np.bool_),
    "example_valid": np.dtype(np.bool_),
    "boxes": np.dtype(np.float32),
    "classes": np.dtype(np.int32),
    "is_crowd": np.dtype(np.bool_),
    "valid": np.dtype(np.bool_),
    "masks": np.dtype(np.float32),
}


# --- the wire format: what the input pipeline ships; the device finishes it into a batch
#
# The pipeline's host work stops after decoding: images and label maps leave it at their source
# size, padded at the bottom / right to a static source canvas (Hs, Ws) (``cfg.source_size``),
# and the resize, flip, padding to ``image_size``, box scaling and the instance-mask crops run on
# the device inside jit (:func:`oanet_jax.data.device_transform.finish_batch`), which turns a
# wire batch into the batch above. Per example (R = ``cfg.max_mask_runs``):
#
# * ``image`` uint8 [Hs, Ws, 3]: RGB at the source size, 0 outside ``orig_shape``.
# * ``semantic`` uint8 [Hs, Ws]: contiguous class ids at the source size, 255 = void / padding.
# * ``instance_map`` uint8 [Hs, Ws]: ``i + 1`` where instance i (a panoptic segment) is, else 0;
#   the masks of instances whose ``run_start`` is -1 (non-overlapping masks).
# * ``image_shape`` int32 [2]: (h, w) the image is resized to; ``orig_shape``, ``scale``,
#   ``image_id``, ``flipped`` (flip to apply), ``example_valid`` as in the batch.
# * ``boxes`` float32 [M, 4]: x1y1x2y2 in the ORIGINAL frame, unflipped; when
#   ``boxes_from_map`` (bool []) they are made on the device from ``instance_map`` instead.
# * ``classes``, ``is_crowd``, ``valid`` [M] as in the batch.
# * ``run_ends`` int32 [R]: the instances' masks as run lengths (column-major over the original
#   H x W, each instance's runs starting with a run of zeros), all instances concatenated and
#   accumulated: instance i's runs tile [i * H * W, (i + 1) * H * W); padded with 2**31 - 1.
# * ``run_start`` int32 [M]: index in ``run_ends`` of instance i's first run, or -1 when its mask
#   is ``instance_map == i + 1``.

WIRE_KEYS = (
    "image",
    "semantic",
    "instance_map",
    "image_shape",
    "orig_shape",
    "scale",
    "image_id",
    "flipped",
    "example_valid",
    "boxes",
    "boxes_from_map",
    "classes",
    "is_crowd",
    "valid",
    "run_ends",
    "run_start",
)

# What the device needs of a wire batch to finish its train keys (the rest is host bookkeeping).
WIRE_DEVICE_KEYS = (
    "image",
    "semantic",
    "instance_map",
    "image_shape",
    "orig_shape",
    "flipped",
    "boxes",
    "boxes_from_map",
    "classes",
    "is_crowd",
    "valid",
    "run_ends",
    "run_start",
)

WIRE_DTYPES: dict[str, np.dtype] = {
    **{k: v for k, v in DTYPES.items() if k not in ("masks",)},
    "instance_map": np.dtype(np.uint8),
    "boxes_from_map": np.dtype(np.bool_),
    "run_ends": np.dtype(np.int32),
    "run_start": np.dtype(np.int32),
}

RUN_END_PAD = np.iinfo(np.int32).max


def is_wire(batch: Any) -> bool:
    """Whether a batch (or example) dict is in the wire format (else the batch spec's)."""
    return "run_ends" in batch


def wire_shapes(cfg: Any, batch_size: int | None = None) -> dict[str, tuple[int, ...]]:
    """Static shape of every wire key (see the wire format above).

    Args:
        cfg: a TransformConfig whose ``source_size`` is resolved (positive) and
            ``max_mask_runs`` set.
        batch_size: B; None for one unbatched example.

    Returns:
        Dict key -> shape tuple, keys in :data:`WIRE_KEYS` order.
    """
    hs, ws = (int(v) for v in cfg.source_size)
    if hs <= 0 or ws <= 0:
        raise ValueError(f"source_size must be resolved to a positive size, got {hs}x{ws}")
    m, r = int(cfg.max_instances), int(cfg.max_mask_runs)
    base = example_shapes(cfg)
    shapes = {
        "image": (hs, ws, 3),
        "semantic": (hs, ws),
        "instance_map": (hs, ws),
        "boxes_from_map": (),
        "run_ends": (r,),
        "run_start": (m,),
    }
    out = {k: shapes.get(k, base.get(k)) for k in WIRE_KEYS}
    if batch_size is not None:
        out = {k: (int(batch_size), *v) for k, v in out.items()}
    return out


def wire_padding_example(cfg: Any) -> dict[str, np.ndarray]:
    """An all-padding wire example (``example_valid = False``, no instance, no image).

    Image 0, semantic 255, instance map 0, ``image_id`` -1, run ends padded, run starts -1.

    Args:
        cfg: as :func:`wire_shapes`.

    Returns:
        Unbatched wire example dict (fresh, writable arrays).
    """
    shapes = wire_shapes(cfg)
    fill = {"semantic": IGNORE_LABEL, "image_id": -1, "run_ends": RUN_END_PAD, "run_start": -1}
    return {k: np.full(shapes[k], fill.get(k, 0), WIRE_DTYPES[k]) for k in WIRE_KEYS}


def wire_signature(cfg: Any) -> dict[str, tf.TensorSpec]:
    """``tf.TensorSpec`` of every wire key of one unbatched example.

    Args:
        cfg: as :func:`wire_shapes`.

    Returns:
        Dict key -> TensorSpec, keys in :data:`WIRE_KEYS` order.
    """
    import tensorflow as tf

    shapes = wire_shapes(cfg)
    return {k: tf.TensorSpec(shapes[k], tf.as_dtype(WIRE_DTYPES[k]), name=k) for k in WIRE_KEYS}


def _sizes(cfg: Any) -> tuple[int, int, int, int]:
    """(Hp, Wp, M, S) of ``cfg`` (``config.data`` or a TransformConfig)."""
    hp, wp = (int(v) for v in cfg.image_size)
    return hp, wp, int(cfg.max_instances), int(cfg.mask_size)


def example_shapes(cfg: Any, batch_size: int | None = None) -> dict[str, tuple[int, ...]]:
    """Static shape of every key (see the module docstring).

    Args:
        cfg: ``config.data`` or a TransformConfig.
        batch_size: B; None for one unbatched example.

    Returns:
        Dict key -> shape tuple, keys in :data:`KEYS` order.
    """
    hp, wp, m, s = _sizes(cfg)
    shapes = {
        "image": (hp, wp, 3),
        "semantic": (hp, wp),
        "image_shape": (2,),
        "orig_shape": (2,),
        "scale": (),
        "image_id": (),
        "flipped": (),
        "example_valid": (),
        "boxes": (m, 4),
        "classes": (m,),
        "is_crowd": (m,),
        "valid": (m,),
        "masks": (m, s, s),
    }
    if batch_size is not None:
        shapes = {k: (int(batch_size), *v) for k, v in shapes.items()}
    return shapes


def batch_spec(
    cfg: Any, batch_size: int | None = None, *, train: bool
) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch schema as ``jax.ShapeDtypeStruct`` per key.

    Args:
        cfg: ``config.data`` or a TransformConfig.
        batch_size: B; None for one unbatched example.
        train: only :data:`TRAIN_KEYS` (what the train step consumes), else every key of
            :data:`KEYS` (what the pipeline yields, in training and in eval alike).

    Returns:
        Dict key -> ShapeDtypeStruct.
    """
    import jax

    shapes = example_shapes(cfg, batch_size)
    keys = TRAIN_KEYS if train else KEYS
    return {k: jax.ShapeDtypeStruct(shapes[k], DTYPES[k]) for k in keys}


def padding_example(cfg: Any) -> dict[str, np.ndarray]:
    """An all-padding example (``example_valid = False``) with the shapes of a real one.

    Image 0, semantic ``IGNORE_LABEL``, ``image_id`` -1, shapes and scale 0, no valid instances.
    Fresh, writable arrays (the transform fills one in place).

    Args:
        cfg: ``config.data`` or a TransformConfig.

    Returns:
        Unbatched example dict with every key of :data:`KEYS`.
    """
    shapes = example_shapes(cfg)
    fill = {"semantic": IGNORE_LABEL, "image_id": -1}
    return {k: np.full(shapes[k], fill.get(k, 0), DTYPES[k]) for k in KEYS}


def zeros_batch(cfg: Any, batch_size: int, *, train: bool = True) -> dict[str, np.ndarray]:
    """A batch of empty full-size images, for state initialisation, benchmarks and tests.

    The values of :func:`padding_example` except ``image_shape`` = (Hp, Wp) (an empty image
    filling the padded size, so a model traced on it sees no degenerate image size).

    Args:
        cfg: ``config.data`` or a TransformConfig.
        batch_size: B.
        train: only :data:`TRAIN_KEYS`, else every key.

    Returns:
        Dict of numpy arrays with the shapes and dtypes of :func:`batch_spec`.
    """
    hp, wp, _, _ = _sizes(cfg)
    pad = padding_example(cfg)
    pad["image_shape"][:] = (hp, wp)
    keys = TRAIN_KEYS if train else KEYS
    b = int(batch_size)
    return {k: np.tile(pad[k][None], (b,) + (1,) * pad[k].ndim) for k in keys}


def validate(arrays: Any, cfg: Any, batch_size: int | None = None, *, train: bool) -> None:
    """Checks that a batch (or example) has exactly the keys, shapes and dtypes of the spec.

    Args:
        arrays: mapping key -> array (numpy, jax or anything with ``shape`` and ``dtype``).
        cfg: ``config.data`` or a TransformConfig.
        batch_size: B; None for one unbatched example.
        train: compare with the :data:`TRAIN_KEYS` spec, else with every key.

    Raises:
        ValueError: listing every missing or extra key and every shape / dtype mismatch.
    """
    want = batch_spec(cfg, batch_size, train=train)
    problems = [f"missing key {k!r}" for k in want if k not in arrays]
    problems += [f"unexpected key {k!r}" for k in arrays if k not in want]
    for k, s in want.items():
        if k in arrays:
            got = arrays[k]
            if tuple(got.shape) != s.shape or np.dtype(got.dtype) != s.dtype:
                problems.append(f"{k}: {got.dtype}{list(got.shape)}, spec {s.dtype}{list(s.shape)}")
    if problems:
        raise ValueError("batch does not match the batch spec: " + "; ".join(problems))


def tensor_signature(cfg: Any) -> dict[str, tf.TensorSpec]:
    """``tf.TensorSpec`` of every key of one unbatched example (the tf.data element spec).

    Args:
        cfg: ``config.data`` or a TransformConfig.

    Returns:
        Dict key -> TensorSpec (named after the key), keys in :data:`KEYS` order.
    """
    import tensorflow as tf

    shapes = example_shapes(cfg)
    return {k: tf.TensorSpec(shapes[k], tf.as_dtype(DTYPES[k]), name=k) for k in KEYS}
