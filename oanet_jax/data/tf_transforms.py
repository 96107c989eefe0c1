"""The per-example transform as TF ops: decoding, lookup, resize, flip, pad and mask crops.

The tf.data pipeline's training and eval transform of the raw-folder source. The host does only
per-record metadata in Python (:meth:`oanet_jax.data.coco_panoptic.CocoPanopticReader.read_meta`:
JSON checks, file headers, segment table, instance run lengths); every pixel is handled here by
TF kernels, which run outside the GIL on tf.data's threads, so the pipeline scales with host
cores. The output is one example of the batch spec (:mod:`oanet_jax.data.spec`) with the
conventions of :func:`oanet_jax.data.transforms.transform_record`, the host reference:

* Decoding: ``tf.io.decode_jpeg`` with the accurate integer IDCT and ``tf.io.decode_png``: the
  same pixels as PIL's decoders (checked on the COCO sample). An image the reader decoded with
  PIL (``image_raw``: other formats and modes, incomplete-looking files) arrives as raw bytes.
* Semantic map: the PNG's ids (``R + 256 G + 256**2 B``) looked up in the record's sorted segment
  table (``searchsorted`` + ``gather``); ids missing from the table and segments absent from the
  PNG are reported to the host, which raises or counts a ``segment_mismatch``
  (``segment_check``). Resized with the pixel-centre nearest rule (indices from the host).
* Image: bilinear with half-pixel centres, rounded to uint8 (``ResizeBilinear`` when enlarging,
  an antialiased triangle filter, PIL's rule, when shrinking). Differs from PIL's fixed-point
  bilinear by at most one level in a minority of pixels.
* Instances: boxes from the masks (PNG: min / max row and column per segment; instances JSON: from
  the run lengths, on the host); crops sampled at S x S points per box exactly as
  :func:`oanet_jax.ops.masks.crop_and_resize_masks_np` (positions in float64, weights and sums
  in float32, the same order), from the PNG's segment map or from masks expanded from the runs.
* Flip, boxes scaled per axis, padding: as the host transform.
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
    "rows": (tf.int32, (None,)),
    "cols": (tf.int32, (None,)),
    "table_ids": (tf.int32, (None,)),
    "table_classes": (tf.uint8, (None,)),
    "classes": (tf.int32, (None,)),
    "is_crowd": (tf.bool, (None,)),
    "table_pos": (tf.int32, (None,)),
    "boxes": (tf.float32, (None, 4)),
    "run_lengths": (tf.int32, (None,)),
    "run_counts": (tf.int32, (None,)),
    "from_runs": (tf.bool, ()),
}
META_KEYS = tuple(META_SIGNATURE)


def empty_meta() -> dict[str, np.ndarray]:
    """Metadata of no record (``ok = False``): the transform returns the padding example."""
    out = {}
    for k, (dtype, shape) in META_SIGNATURE.items():
        if dtype == tf.string:
            out[k] = np.array(b"", dtype=object)
        else:
            out[k] = np.zeros([0 if d is None else d for d in shape], dtype.as_numpy_dtype)
    return out


def _crop_points(boxes: tf.Tensor, size: int) -> tuple[list, list]:
    """Bilinear taps of S x S points per box (``crop_and_resize_masks_np``'s arithmetic).

    Args:
        boxes: float64 [N, 4] x1y1x2y2 in the mask frame.
        size: S.

    Returns:
        (y taps, x taps): two lists of two (index int32 [N, S], weight float32 [N, S], inside
        bool [N, S]) entries each.
    """
    frac = (tf.range(size, dtype=tf.float64) + 0.5) / size
    vy = boxes[:, 1:2] + frac[None, :] * (boxes[:, 3:4] - boxes[:, 1:2]) - 0.5
    vx = boxes[:, 0:1] + frac[None, :] * (boxes[:, 2:3] - boxes[:, 0:1]) - 0.5

    def taps(v):
        i0 = tf.floor(v)
        f = tf.cast(v - i0, tf.float32)
        i0 = tf.cast(i0, tf.int32)
        return [(i0, 1.0 - f), (i0 + 1, f)]

    return taps(vy), taps(vx)


def crop_masks(
    lookup: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    boxes: tf.Tensor,
    height: tf.Tensor,
    width: tf.Tensor,
    size: int,
) -> tf.Tensor:
    """S x S crops of N binary masks in their boxes (the graph twin of the numpy crop).

    Args:
        lookup: ``(rows int32 [N, S, S], cols int32 [N, S, S]) -> float32 [N, S, S]``, the mask
            values (0 / 1) of each instance at in-range pixels.
        boxes: float32 [N, 4] x1y1x2y2 in the original frame.
        height: H.
        width: W.
        size: S.

    Returns:
        float32 [N, S, S] in [0, 1].
    """
    ys, xs = _crop_points(tf.cast(boxes, tf.float64), size)
    n = tf.shape(boxes)[0]
    result = tf.zeros([n, size, size], tf.float32)
    for yi, wy in ys:
        y_in = (yi >= 0) & (yi < height)
        wy = tf.where(y_in, wy, 0.0)
        yi = tf.clip_by_value(yi, 0, height - 1)
        for xi, wx in xs:
            x_in = (xi >= 0) & (xi < width)
            wx = tf.where(x_in, wx, 0.0)
            xi = tf.clip_by_value(xi, 0, width - 1)
            rows = tf.broadcast_to(yi[:, :, None], [n, size, size])
            cols = tf.broadcast_to(xi[:, None, :], [n, size, size])
            result += lookup(rows, cols) * (wy[:, :, None] * wx[:, None, :])
    return result


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


def _resize_image(image: tf.Tensor, new_h: tf.Tensor, new_w: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, 3] -> uint8 [new_h, new_w, 3], bilinear (antialiased when shrinking)."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    size = tf.stack([new_h, new_w])

    def enlarge():
        out = tf.raw_ops.ResizeBilinear(images=image[None], size=size, half_pixel_centers=True)
        return tf.cast(out[0] + 0.5, tf.uint8)

    def shrink():
        out = tf.image.resize(image, size, method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(out + 0.5, 0.0, 255.0), tf.uint8)

    def same():
        return image

    out = tf.case(
        [((new_h == h) & (new_w == w), same), ((new_h >= h) & (new_w >= w), enlarge)],
        default=shrink,
    )
    out.set_shape([None, None, 3])
    return out


def padded_shapes(cfg: Any) -> dict[str, list[int]]:
    """Batch padding of each key (``padded_batch``): the spec's static shapes."""
    return {k: list(v) for k, v in spec.example_shapes(cfg).items()}


def padding_values(cfg: Any) -> dict[str, tf.Tensor]:
    """Fill value of each key where an example is padded (:func:`spec.padding_example`'s)."""
    pad = spec.padding_example(cfg)
    signature = spec.tensor_signature(cfg)
    return {k: tf.constant(pad[k].flat[0], signature[k].dtype) for k in spec.KEYS}


def _empty_example(cfg: Any) -> dict[str, tf.Tensor]:
    """No record (``example_valid`` False): zero-size arrays that batch padding fills."""
    pad = spec.padding_example(cfg)
    signature = spec.tensor_signature(cfg)
    out = {}
    for k in spec.KEYS:
        shape = list(pad[k].shape)
        if k in ("image", "semantic"):
            shape[:2] = [0, 0]
        elif k in ("boxes", "classes", "is_crowd", "valid", "masks"):
            shape[0] = 0
        out[k] = tf.constant(np.zeros(shape, pad[k].dtype) + pad[k].flat[0], signature[k].dtype)
    return out


def transform_example(
    m: dict[str, tf.Tensor],
    cfg: Any,
    segment_check: Callable[..., Any],
) -> dict[str, tf.Tensor]:
    """One example from a record's metadata, not yet padded (see the module docstring).

    Args:
        m: tensors of :data:`META_SIGNATURE` (one record; ``ok = False``: no record).
        cfg: a :class:`oanet_jax.data.transforms.TransformConfig`.
        segment_check: ``fn(index, extra_ids, missing_ids) -> ok`` (numpy; raises the
            ``segment_mismatch`` DataError, or counts it and returns False when skipping).

    Returns:
        Dict of every key of :data:`oanet_jax.data.spec.KEYS` with the spec's dtypes; the
        spec's shapes except ``image`` [h, w, 3], ``semantic`` [h, w] and the N valid rows of
        ``boxes``, ``classes``, ``is_crowd``, ``valid`` and ``masks`` (N = 0 and h = w = 0 for
        no record): ``padded_batch`` with :func:`padded_shapes` / :func:`padding_values` pads
        them to the spec (image 0, semantic 255, rows 0 / False).
    """
    s = int(cfg.mask_size)
    signature = spec.tensor_signature(cfg)

    def build():
        image = _decode_image(m)
        height, width = m["orig_shape"][0], m["orig_shape"][1]
        # The PNG's ids: RGBA bytes (libpng fills alpha with 255) read as one little-endian
        # int32 per pixel, alpha masked off: R + 256 G + 256**2 B.
        png = tf.io.decode_png(m["png_data"], channels=4)
        ids = tf.reshape(tf.bitwise.bitwise_and(tf.bitcast(png, tf.int32), 0xFFFFFF), [-1])
        table = m["table_ids"]  # [K1] sorted, table[0] = 0 (void)
        k1 = tf.shape(table)[0]
        pos = tf.minimum(tf.searchsorted(table, ids, side="left", out_type=tf.int32), k1 - 1)
        # One gather gives both the id found (to check) and the class: id * 256 + class.
        combo = tf.cast(table, tf.uint32) * 256 + tf.cast(m["table_classes"], tf.uint32)
        found = tf.gather(combo, pos)
        hit = tf.bitwise.right_shift(found, 8) == tf.cast(ids, tf.uint32)
        pos2d = tf.reshape(pos, [height, width])
        # Per row, which table entries occur: [H, K1] (also gives the segments' rows).
        row_key = pos2d + k1 * tf.range(height)[:, None]
        rows_present = tf.reshape(
            tf.math.bincount(row_key, minlength=height * k1, maxlength=height * k1) > 0,
            [height, k1],
        )
        present = tf.reduce_any(rows_present, axis=0)
        missing = tf.gather(table, tf.where(tf.logical_not(present[1:]))[:, 0] + 1)
        problem = tf.logical_not(tf.reduce_all(hit)) | (tf.size(missing) > 0)

        def check():
            extra = tf.unique(tf.boolean_mask(ids, tf.logical_not(hit)))[0]
            ok = tf.numpy_function(
                segment_check, [m["index"], extra, missing], tf.bool, stateful=False
            )
            ok.set_shape([])
            return ok

        consistent = tf.cond(problem, check, lambda: tf.constant(True))

        def example():
            new_h, new_w = m["new_shape"][0], m["new_shape"][1]
            flip = m["flip"]
            n = tf.shape(m["classes"])[0]
            # Semantic: class per pixel at the original size, then one gather resizes (nearest,
            # indices from the host) and flips (the columns read right to left).
            semantic = tf.cast(tf.bitwise.bitwise_and(found, 255), tf.uint8)
            cols = tf.cond(flip, lambda: tf.reverse(m["cols"], [0]), lambda: m["cols"])
            semantic = tf.gather(semantic, m["rows"][:, None] * width + cols[None, :])
            resized = _resize_image(image, new_h, new_w)
            resized = tf.cond(flip, lambda: tf.reverse(resized, [1]), lambda: resized)

            def boxes_from_png():
                col_key = pos2d + k1 * tf.range(width)[None, :]
                cols_present = tf.reshape(
                    tf.math.bincount(col_key, minlength=width * k1, maxlength=width * k1) > 0,
                    [width, k1],
                )
                tp = tf.maximum(m["table_pos"], 0)
                ry = tf.cast(tf.gather(rows_present, tp, axis=1), tf.int32)  # [H, N]
                cx = tf.cast(tf.gather(cols_present, tp, axis=1), tf.int32)  # [W, N]
                y1 = tf.argmax(ry, axis=0, output_type=tf.int32)
                y2 = height - tf.argmax(ry[::-1], axis=0, output_type=tf.int32)
                x1 = tf.argmax(cx, axis=0, output_type=tf.int32)
                x2 = width - tf.argmax(cx[::-1], axis=0, output_type=tf.int32)
                return tf.cast(tf.stack([x1, y1, x2, y2], axis=1), tf.float32)

            boxes = tf.cond(m["from_runs"], lambda: m["boxes"], boxes_from_png)
            boxes = tf.reshape(boxes, [n, 4])

            def crops_png():
                def lookup(r, c):  # every pixel is in the table here (consistent)
                    value = tf.gather(pos, r * width + c)
                    return tf.cast(value == m["table_pos"][:, None, None], tf.float32)

                return crop_masks(lookup, boxes, height, width, s)

            def crops_runs():
                # The runs of all instances tile [0, N * H * W) (each instance's sum to H * W);
                # odd runs are ones: scatter them into column-major [N, W, H] masks.
                lengths = tf.cast(m["run_lengths"], tf.int64)
                ends = tf.cumsum(lengths)
                odd = tf.math.floormod(tf.ragged.range(m["run_counts"]).flat_values, 2) == 1
                starts = tf.boolean_mask(ends - lengths, odd)
                ones = tf.ragged.range(starts, tf.boolean_mask(ends, odd)).flat_values
                hw = tf.cast(height, tf.int64) * tf.cast(width, tf.int64)
                masks = tf.scatter_nd(
                    ones[:, None], tf.ones_like(ones, tf.uint8), [tf.cast(n, tf.int64) * hw]
                )
                base = tf.range(tf.cast(n, tf.int64))[:, None, None] * hw

                def lookup(r, c):
                    index = base + tf.cast(c, tf.int64) * tf.cast(height, tf.int64)
                    return tf.cast(tf.gather(masks, index + tf.cast(r, tf.int64)), tf.float32)

                return crop_masks(lookup, boxes, height, width, s)

            crops = tf.cond(m["from_runs"], crops_runs, crops_png)
            sx = tf.cast(new_w, tf.float64) / tf.cast(width, tf.float64)
            sy = tf.cast(new_h, tf.float64) / tf.cast(height, tf.float64)
            factors = tf.cast(tf.stack([sx, sy, sx, sy]), tf.float32)
            out_boxes = boxes * factors[None, :]
            nw = tf.cast(new_w, tf.float32)

            def flip_boxes():
                return tf.stack(
                    [nw - out_boxes[:, 2], out_boxes[:, 1], nw - out_boxes[:, 0], out_boxes[:, 3]],
                    axis=1,
                )

            out_boxes = tf.cond(flip, flip_boxes, lambda: out_boxes)
            crops = tf.cond(flip, lambda: tf.reverse(crops, [2]), lambda: crops)
            ex = {
                "image": resized,
                "semantic": semantic,
                "image_shape": m["new_shape"],
                "orig_shape": m["orig_shape"],
                "scale": m["scale"],
                "image_id": m["image_id"],
                "flipped": flip,
                "example_valid": tf.constant(True),
                "boxes": out_boxes,
                "classes": m["classes"],
                "is_crowd": m["is_crowd"],
                "valid": tf.ones([n], tf.bool),
                "masks": crops,
            }
            return {k: tf.cast(ex[k], signature[k].dtype) for k in spec.KEYS}

        return tf.cond(consistent, example, lambda: _empty_example(cfg))

    out = tf.cond(m["ok"], build, lambda: _empty_example(cfg))
    shapes = spec.example_shapes(cfg)
    for k in spec.KEYS:
        shape = list(shapes[k])
        if k in ("image", "semantic"):
            shape[:2] = [None, None]
        elif k in ("boxes", "classes", "is_crowd", "valid", "masks"):
            shape[0] = None
        out[k].set_shape(shape)
    return out
