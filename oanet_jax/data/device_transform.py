"""The input pipeline's last stage, on the device: wire batch -> batch (inside jit).

The host pipeline (:mod:`oanet_jax.data.pipeline`) stops after decoding: it ships each image, its
semantic map and its instance map at the source size on a static canvas, with the instance masks
of an instances JSON as run lengths (the wire format of :mod:`oanet_jax.data.spec`). This module
does the rest of :func:`oanet_jax.data.transforms.transform_record` (the host reference) with jnp,
per example under ``vmap``, static shapes throughout:

* image: PIL's bilinear resize (antialiased when shrinking) as two resampling matrices, the flip
  folded into the column matrix, padded with 0 to ``image_size`` and rounded to uint8
  (:func:`oanet_jax.ops.resize.resize_image_padded`); within one level of PIL's pixels;
* semantic map: the pixel-centre nearest rule, flipped, padded with 255
  (:func:`oanet_jax.ops.resize.resize_labels_padded`): equal to the host's;
* boxes: the instance map's tight boxes where the wire says so
  (:func:`oanet_jax.ops.masks.boxes_from_label_map`), scaled per axis by ``h / H`` and ``w / W``
  and mirrored when flipped;
* instance masks: cropped to their boxes at ``mask_size`` in the original frame
  (:func:`oanet_jax.ops.masks.crop_masks_by_lookup`, the convention of ``crop_and_resize_masks``)
  reading either the instance map or the run lengths, then mirrored when flipped (a box-frame crop
  is resize-invariant).

The bookkeeping keys (``orig_shape``, ``scale``, ``image_id``, ``flipped``, ``example_valid``)
stay on the host: :func:`finish_numpy` copies them from the wire batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oanet_jax.data import spec
from oanet_jax.ops import masks as mask_ops
from oanet_jax.ops import resize as resize_ops

# The batch keys made on the device (with TRAIN_KEYS' passthrough ones).
FINISHED_KEYS = spec.TRAIN_KEYS


def finish_example(wire: Mapping[str, jax.Array], cfg: Any) -> dict[str, jax.Array]:
    """One wire example -> the device keys of one batch example (see the module docstring).

    Args:
        wire: the :data:`spec.WIRE_DEVICE_KEYS` of one unbatched wire example.
        cfg: a :class:`oanet_jax.data.transforms.TransformConfig` (``image_size``,
            ``max_instances``, ``mask_size``).

    Returns:
        Dict of :data:`spec.TRAIN_KEYS` with the batch spec's shapes and dtypes (unbatched).
    """
    hp, wp = (int(v) for v in cfg.image_size)
    m, s = int(cfg.max_instances), int(cfg.mask_size)
    orig = wire["orig_shape"].astype(jnp.int32)
    new = wire["image_shape"].astype(jnp.int32)
    flip = wire["flipped"].astype(bool)
    # A padding example has zero sizes: resample from / to one pixel, then blank it.
    real = jnp.all(orig > 0) & jnp.all(new > 0)
    safe_orig = jnp.maximum(orig, 1)
    safe_new = jnp.where(real, new, 1)
    image = resize_ops.resize_image_padded(
        wire["image"], safe_orig, safe_new, (hp, wp), flip=flip, round_to_uint8=True
    )
    image = jnp.where(real, image, jnp.zeros_like(image))
    semantic = resize_ops.resize_labels_padded(
        wire["semantic"], safe_orig, safe_new, (hp, wp), flip=flip, fill=spec.IGNORE_LABEL
    )
    semantic = jnp.where(real, semantic, jnp.full_like(semantic, spec.IGNORE_LABEL))

    height, width = safe_orig[0], safe_orig[1]
    instance_map = wire["instance_map"]
    map_boxes = mask_ops.boxes_from_label_map(instance_map, m, height, width)
    boxes = jnp.where(wire["boxes_from_map"], map_boxes, wire["boxes"].astype(jnp.float32))
    run_start = wire["run_start"].astype(jnp.int32)
    from_runs = run_start >= 0  # [M]
    labels = jnp.arange(1, m + 1, dtype=jnp.int32)

    def lookup(rows: jax.Array, cols: jax.Array) -> jax.Array:
        in_map = instance_map[rows, cols].astype(jnp.int32) == labels[:, None, None]
        in_runs = mask_ops.mask_value_from_runs(
            wire["run_ends"], run_start, rows, cols, height, width
        )
        return jnp.where(from_runs[:, None, None], in_runs, in_map)

    crops = mask_ops.crop_masks_by_lookup(lookup, boxes, height, width, s)
    valid = wire["valid"].astype(bool) & real
    sy = safe_new[0].astype(jnp.float32) / height.astype(jnp.float32)
    sx = safe_new[1].astype(jnp.float32) / width.astype(jnp.float32)
    boxes = boxes * jnp.stack([sx, sy, sx, sy])[None, :]
    nw = safe_new[1].astype(jnp.float32)
    flipped_boxes = jnp.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], 1)
    boxes = jnp.where(flip, flipped_boxes, boxes)
    crops = jnp.where(flip, crops[:, :, ::-1], crops)
    return {
        "image": image,
        "image_shape": jnp.where(real, new, 0),
        "boxes": jnp.where(valid[:, None], boxes, 0.0),
        "classes": jnp.where(valid, wire["classes"].astype(jnp.int32), 0),
        "is_crowd": valid & wire["is_crowd"].astype(bool),
        "valid": valid,
        "masks": jnp.where(valid[:, None, None], crops, 0.0),
        "semantic": semantic,
    }


def finish_batch(wire: Mapping[str, jax.Array], cfg: Any) -> dict[str, jax.Array]:
    """:func:`finish_example` over a wire batch (``vmap``); traceable inside any jit.

    Args:
        wire: the :data:`spec.WIRE_DEVICE_KEYS` of a wire batch [B, ...] (other keys ignored).
        cfg: a TransformConfig.

    Returns:
        Dict of :data:`spec.TRAIN_KEYS`, [B, ...] with the batch spec's shapes and dtypes.
    """
    device = {k: wire[k] for k in spec.WIRE_DEVICE_KEYS}
    return jax.vmap(lambda w: finish_example(w, cfg))(device)


def make_finisher(
    cfg: Any, sharding: Any = None, keys: tuple[str, ...] | None = None
) -> Callable[[Mapping[str, Any]], dict]:
    """The jitted :func:`finish_batch` of one config.

    Args:
        cfg: a TransformConfig.
        sharding: the batch sharding of the inputs and outputs (e.g. split over 'data'); None
            lets jit place them (one device).
        keys: the batch keys wanted (default all of :data:`spec.TRAIN_KEYS`); XLA drops the work
            of the others (evaluation asks for the image only).

    Returns:
        ``finish(wire) -> batch``: wire dicts (numpy or jax arrays; only
        :data:`spec.WIRE_DEVICE_KEYS` are used) -> dict of ``keys`` device arrays.
    """
    wanted = tuple(keys or spec.TRAIN_KEYS)
    kwargs = {} if sharding is None else {"in_shardings": sharding, "out_shardings": sharding}

    def run(wire: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        out = finish_batch(wire, cfg)
        return {k: out[k] for k in wanted}

    jitted = jax.jit(run, **kwargs)

    def finish(wire: Mapping[str, Any]) -> dict[str, jax.Array]:
        return jitted({k: wire[k] for k in spec.WIRE_DEVICE_KEYS})

    return finish


def finish_numpy(
    wire: Mapping[str, np.ndarray], cfg: Any, finish: Callable | None = None
) -> dict[str, np.ndarray]:
    """A whole batch of the batch spec from a wire batch, as numpy (every key of ``spec.KEYS``).

    The device keys are finished by ``finish`` (default: a fresh :func:`make_finisher`) and
    fetched; the bookkeeping keys are the wire's.

    Args:
        wire: a wire batch (numpy).
        cfg: a TransformConfig.
        finish: a :func:`make_finisher` result to reuse.

    Returns:
        Dict of numpy arrays with the shapes and dtypes of ``spec.batch_spec(cfg, B,
        train=False)``.
    """
    finish = finish or make_finisher(cfg)
    out = {k: np.asarray(v) for k, v in jax.device_get(finish(wire)).items()}
    for k in spec.KEYS:
        if k not in out:
            out[k] = np.asarray(wire[k], spec.DTYPES[k])
        else:
            out[k] = out[k].astype(spec.DTYPES[k], copy=False)
    return {k: out[k] for k in spec.KEYS}
