"""The host half of the input transform as TF ops: decoding, segment lookup and check.

The tf.data pipeline's training and eval transform of the raw-folder source. The host does only
per-record metadata in Python (:meth:`oanet_jax.data.coco_panoptic.CocoPanopticReader.read_meta`:
JSON checks, file headers, segment table, instance run lengths) and the pixel work that needs the
files, as TF kernels outside the GIL on tf.data's threads; everything that follows decoding
(resize, flip, padding to the image size, boxes, mask crops) runs on the device
(:mod:`oanet_jax.data.device_transform`). The output is one example of the wire format
(:mod:`oanet_jax.data.spec`):

* Decoding: ``tf.io.decode_jpeg`` with the accurate integer IDCT and ``tf.io.decode_png``: the
  same pixels as PIL's decoders (checked on the COCO sample). An image the reader decoded with
  PIL (``image_raw``: other formats and modes, incomplete-looking files) arrives as raw bytes.
* Semantic map: the PNG's ids (``R + 256 G + 256**2 B``) looked up in the record's sorted segment
  table (``searchsorted`` + ``gather``), at the source size; ids missing from the table and
  segments absent from the PNG are reported to the host, which raises or counts a
  ``segment_mismatch`` (``segment_check``).
* Instances: masks from the PNG become the instance map (table position -> instance index + 1,
  one gather; boxes made on the device); masks from an instances JSON travel as their
  accumulated run lengths with the boxes the reader computed from them.
* Padding to the source canvas and to ``max_instances`` / ``max_mask_runs``: ``padded_batch``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from oanet_jax.data import spec

# The per-record inputs of :func:`transform_example`: name -> (dtype, shape), None = dynamic.
META_SIGNATURE: dict[str, tuple[tf.DType, tuple]] = {
    "ok": (tf.bool, ()),
    "index": (tf.int64, ()),
    "image_id": (tf.int64, ()),
    "orig_shape": (tf.int32, (2,)),
    "new_shape": (tf.int32, (2,)),
    "scale": (tf.float32, ()),
    "flip": (tf.bool, ()),
    "image_data": (tf.string, ()),
    "image_format": (tf.int32, ()),
    "png_data": (tf.string, ()),
    "table_ids": (tf.int32, (None,)),
    "table_classes": (tf.uint8, (None,)),
    "classes": (tf.int32, (None,)),
    "is_crowd": (tf.bool, (None,)),
    "table_pos": (tf.int32, (None,)),
    "hash_multiplier": (tf.int64, ()),
    "hash_shift": (tf.int64, ()),
    "slot_ids": (tf.int32, (None,)),
    "slot_classes": (tf.uint8, (None,)),
    "slot_instances": (tf.uint8, (None,)),
    "table_slots": (tf.int32, (None,)),
    "boxes": (tf.float32, (None, 4)),
    "run_lengths": (tf.int32, (None,)),
    "run_counts": (tf.int32, (None,)),
    "from_runs": (tf.bool, ()),
    "verified": (tf.bool, ()),
}
META_KEYS = tuple(META_SIGNATURE)


# Multiplicative hashing of segment ids (Knuth): slot = (id * a mod 2**32) >> (32 - bits). Per
# record the host picks the smallest table (2**bits slots) and the first multiplier of this fixed
# list for which the record's ids land in distinct slots, so the per-pixel lookup is a multiply,
# a shift and gathers from a small table instead of a binary search.
_MULTIPLIERS = tuple(
    int(v) | 1 for v in np.random.default_rng(20261201).integers(1 << 31, 1 << 32, size=64)
)
_SLOT_BITS = (10, 12, 14, 16, 18, 20)


def slot_tables(
    table_ids: np.ndarray, table_classes: np.ndarray, table_pos: np.ndarray
) -> dict[str, np.ndarray]:
    """The collision-free hash tables of one record's segment table (see ``_MULTIPLIERS``).

    Args:
        table_ids: int32 [K1] segment ids, table_ids[0] = 0 (void), the rest distinct.
        table_classes: uint8 [K1] contiguous class per entry (255 for void).
        table_pos: int32 [N] table position of each instance's segment (masks from the PNG), or
            -1 entries (masks from an instances JSON: no instance map).

    Returns:
        ``hash_multiplier`` / ``hash_shift`` (int), and per slot ``slot_ids`` int32 [T] (the id
        stored there, -1 when empty: no 24-bit id equals it), ``slot_classes`` uint8 [T] (255
        when empty), ``slot_instances`` uint8 [T] (instance index + 1, 0 for none);
        ``table_slots`` int32 [K1] (each entry's slot).
    """
    ids = np.asarray(table_ids, np.uint64)
    for bits in _SLOT_BITS:
        for a in _MULTIPLIERS:
            slots = ((ids * np.uint64(a)) & np.uint64(0xFFFFFFFF)) >> np.uint64(32 - bits)
            if np.unique(slots).size == ids.size:
                break
        else:
            continue
        break
    else:  # pragma: no cover - 2**20 slots hold any table of a few hundred ids
        raise ValueError(f"no collision-free hash for {ids.size} segment ids")
    slots = slots.astype(np.int64)
    size = 1 << bits
    slot_ids = np.full(size, -1, np.int32)
    slot_ids[slots] = np.asarray(table_ids, np.int32)
    slot_classes = np.full(size, 255, np.uint8)
    slot_classes[slots] = np.asarray(table_classes, np.uint8)
    slot_instances = np.zeros(size, np.uint8)
    pos = np.asarray(table_pos, np.int64)
    if pos.size and pos[0] >= 0:
        slot_instances[slots[pos]] = np.arange(1, pos.size + 1, dtype=np.uint8)
    return {
        "hash_multiplier": a,
        "hash_shift": 32 - bits,
        "slot_ids": slot_ids,
        "slot_classes": slot_classes,
        "slot_instances": slot_instances,
        "table_slots": slots.astype(np.int32),
    }


def empty_meta() -> dict[str, np.ndarray]:
    """Metadata of no record (``ok = False``): the transform returns the padding example."""
    out = {}
    for k, (dtype, shape) in META_SIGNATURE.items():
        if dtype == tf.string:
            out[k] = np.array(b"", dtype=object)
        else:
            out[k] = np.zeros([0 if d is None else d for d in shape], dtype.as_numpy_dtype)
    return out


def _decode_image(m: dict[str, tf.Tensor]) -> tf.Tensor:
    """uint8 [H, W, 3] RGB from ``image_data`` (``image_format``: 0 raw, 1 JPEG, 2 PNG)."""
    h, w = m["orig_shape"][0], m["orig_shape"][1]
    data = m["image_data"]

    def raw():
        return tf.reshape(tf.io.decode_raw(data, tf.uint8), [h, w, 3])

    def jpeg():  # the accurate integer IDCT: PIL's (libjpeg's default) pixels, bit for bit
        return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")

    def png():
        return tf.io.decode_png(data, channels=3)

    image = tf.switch_case(m["image_format"], [raw, jpeg, png])
    image.set_shape([None, None, 3])
    return image


def padded_shapes(cfg: Any) -> dict[str, list[int]]:
    """Batch padding of each wire key (``padded_batch``): the wire spec's static shapes."""
    return {k: list(v) for k, v in spec.wire_shapes(cfg).items()}


def padding_values(cfg: Any) -> dict[str, tf.Tensor]:
    """Fill value of each wire key where an example is padded (the wire padding example's)."""
    pad = spec.wire_padding_example(cfg)
    signature = spec.wire_signature(cfg)
    return {k: tf.constant(pad[k].flat[0], signature[k].dtype) for k in spec.WIRE_KEYS}


# Keys whose leading dimension(s) ``padded_batch`` fills: the canvases and the instance rows.
_CANVAS_KEYS = ("image", "semantic", "instance_map")
_ROW_KEYS = ("boxes", "classes", "is_crowd", "valid", "run_start", "run_ends")


def _unpadded_shape(cfg: Any, key: str) -> list[int | None]:
    shape = list(spec.wire_shapes(cfg)[key])
    if key in _CANVAS_KEYS:
        shape[:2] = [None, None]
    elif key in _ROW_KEYS:
        shape[0] = None
    return shape


def _empty_example(cfg: Any) -> dict[str, tf.Tensor]:
    """No record (``example_valid`` False): zero-size arrays that batch padding fills."""
    pad = spec.wire_padding_example(cfg)
    signature = spec.wire_signature(cfg)
    out = {}
    for k in spec.WIRE_KEYS:
        shape = [0 if d is None else d for d in _unpadded_shape(cfg, k)]
        out[k] = tf.constant(np.zeros(shape, pad[k].dtype) + pad[k].flat[0], signature[k].dtype)
    return out


def transform_example(
    m: dict[str, tf.Tensor],
    cfg: Any,
    segment_check: Callable[..., Any],
    mark_verified: Callable[..., Any],
) -> dict[str, tf.Tensor]:
    """One wire example from a record's metadata, not yet padded (see the module docstring).

    Args:
        m: tensors of :data:`META_SIGNATURE` (one record; ``ok = False``: no record).
        cfg: a :class:`oanet_jax.data.transforms.TransformConfig` with ``source_size`` resolved.
        segment_check: ``fn(index, extra_ids, missing_ids) -> ok`` (numpy; raises the
            ``segment_mismatch`` DataError, or counts it and returns False when skipping).
        mark_verified: ``fn(index) -> True`` (numpy): record ``index`` passed the check; its
            later metadata says ``verified`` and the check is skipped.

    Returns:
        Dict of every key of :data:`oanet_jax.data.spec.WIRE_KEYS` with the wire dtypes; the wire
        shapes except ``image`` [H, W, 3], ``semantic`` and ``instance_map`` [H, W] (the
        instance map [0, 0] when the masks come as runs), the N rows of ``boxes``, ``classes``,
        ``is_crowd``, ``valid``, ``run_start`` and the runs' ``run_ends`` (everything empty for no
        record): ``padded_batch`` with :func:`padded_shapes` / :func:`padding_values` pads them.
    """
    signature = spec.wire_signature(cfg)

    def build():
        image = _decode_image(m)
        height, width = m["orig_shape"][0], m["orig_shape"][1]
        # The PNG's ids: RGBA bytes (libpng fills alpha with 255) read as one little-endian
        # int32 per pixel, alpha masked off: R + 256 G + 256**2 B.
        png = tf.io.decode_png(m["png_data"], channels=4)
        ids = tf.reshape(tf.bitwise.bitwise_and(tf.bitcast(png, tf.int32), 0xFFFFFF), [-1])
        table = m["table_ids"]  # [K1] sorted, table[0] = 0 (void)
        # Hashed lookup (``slot_tables``): the slot of each pixel's id, then small gathers.
        hashed = tf.cast(ids, tf.uint32) * tf.cast(m["hash_multiplier"], tf.uint32)
        slot = tf.cast(
            tf.bitwise.right_shift(hashed, tf.cast(m["hash_shift"], tf.uint32)), tf.int32
        )

        def verify():  # PNG vs JSON: ids missing from the table, segments absent from the PNG
            hit = tf.gather(m["slot_ids"], slot) == ids
            size = tf.shape(m["slot_ids"])[0]
            counts = tf.math.bincount(slot, minlength=size, maxlength=size)
            present = tf.gather(counts, m["table_slots"]) > 0
            missing = tf.gather(table, tf.where(tf.logical_not(present[1:]))[:, 0] + 1)
            problem = tf.logical_not(tf.reduce_all(hit)) | (tf.size(missing) > 0)

            def check():
                extra = tf.unique(tf.boolean_mask(ids, tf.logical_not(hit)))[0]
                ok = tf.numpy_function(
                    segment_check, [m["index"], extra, missing], tf.bool, stateful=False
                )
                ok.set_shape([])
                return ok

            def passed():
                ok = tf.numpy_function(mark_verified, [m["index"]], tf.bool, stateful=True)
                ok.set_shape([])
                return ok

            return tf.cond(problem, check, passed)

        # A record whose PNG passed once is not checked again (its files do not change).
        consistent = tf.cond(m["verified"], lambda: tf.constant(True), verify)

        def example():
            n = tf.shape(m["classes"])[0]
            semantic = tf.reshape(tf.gather(m["slot_classes"], slot), [height, width])
            from_runs = m["from_runs"]

            def instance_map():  # instance index + 1 (0: stuff / void)
                return tf.reshape(tf.gather(m["slot_instances"], slot), [height, width])

            inst = tf.cond(from_runs, lambda: tf.zeros([0, 0], tf.uint8), instance_map)
            run_ends = tf.cumsum(m["run_lengths"])
            first = tf.cumsum(m["run_counts"], exclusive=True)
            run_start = tf.where(from_runs, first, -tf.ones_like(first))
            ex = {
                "image": image,
                "semantic": semantic,
                "instance_map": inst,
                "image_shape": m["new_shape"],
                "orig_shape": m["orig_shape"],
                "scale": m["scale"],
                "image_id": m["image_id"],
                "flipped": m["flip"],
                "example_valid": tf.constant(True),
                "boxes": tf.reshape(m["boxes"], [n, 4]),
                "boxes_from_map": tf.logical_not(from_runs),
                "classes": m["classes"],
                "is_crowd": m["is_crowd"],
                "valid": tf.ones([n], tf.bool),
                "run_ends": run_ends,
                "run_start": run_start,
            }
            return {k: tf.cast(ex[k], signature[k].dtype) for k in spec.WIRE_KEYS}

        return tf.cond(consistent, example, lambda: _empty_example(cfg))

    out = tf.cond(m["ok"], build, lambda: _empty_example(cfg))
    for k in spec.WIRE_KEYS:
        out[k].set_shape(_unpadded_shape(cfg, k))
    return out
