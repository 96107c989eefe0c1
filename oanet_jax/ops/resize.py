"""Resampling conventions, one home each (TF Model Garden's spatial_transform_ops in spirit).

* Nearest neighbour, pixel-centre rule: output index ``dst`` of a length-``out_size`` axis reads
  input index ``floor((dst + 0.5) * in_size / out_size)``, computed exactly in integers as
  ``((2 * dst + 1) * in_size) // (2 * out_size)`` (float formulas and PIL's fixed point can differ
  at exact ties). Used for label maps (data), id maps back to the original image (evaluation,
  prediction) on the host and on device.
* Bilinear upsampling by an integer factor ``f`` with PyTorch ``F.interpolate(...,
  mode='bilinear', align_corners=False)`` semantics (the stuff head, the semantic loss and the
  panoptic merge's stuff argmax). Along one axis, output ``o = f * j + r`` samples source
  position ``j + d_r`` with ``d_r = (r + 0.5) / f - 0.5``: ``(-d_r) * x[j - 1] + (1 + d_r) * x[j]``
  when ``d_r < 0``, else ``(1 - d_r) * x[j] + d_r * x[j + 1]`` (lower index first, as PyTorch),
  with ``x`` edge-replicated at both ends (PyTorch clamps the source index). Only slices, no
  gathers of the full map, so the backward pass is adds and pads. The two spatial axes are
  interpolated columns first, then rows (PyTorch's order of the bilinear sum). Weights are Python
  floats, so the output keeps the input's float dtype (bfloat16 stays bfloat16). Equal to PyTorch
  up to float rounding (exact weights for power-of-two factors).
* Image resize on the device with PIL ``Image.resize(..., BILINEAR)`` weights (detectron2's
  ``ResizeShortestEdge``), as dense per-axis matrices (:func:`resample_matrix`). Along one axis
  from ``in_size`` to ``out_size``, ``scale = in_size / out_size``, output ``o`` is centred at
  input position ``(o + 0.5) * scale`` and input ``x`` has the triangle weight
  ``max(0, 1 - |x + 0.5 - centre| / max(scale, 1))`` (antialiased when shrinking), normalised to
  sum 1 over ``0 <= x < in_size``. In integers, the triangle's argument is ``num / span`` with
  ``num = (2x + 1) * out_size - (2o + 1) * in_size`` and ``span = 2 * max(in_size, out_size)``, so
  the unnormalised weights ``max(0, span - |num|)`` and their row sums are exact and each weight
  is one correctly rounded float32 division (equal sizes give exactly the identity). Sizes may be
  traced (per-image sizes on a static padded canvas): rows ``o >= out_size`` and columns
  ``x >= in_size`` are 0. The image is ``Wy @ image @ Wx^T`` in float32 at ``Precision.HIGHEST``,
  rounded half up to uint8; PIL's two fixed-point passes round to uint8 in between, so the two
  agree to within 1. Label maps take the nearest-neighbour rule above on the same canvas
  (:func:`resize_labels_padded`).

Functions take numpy or jax arrays where stated; shapes are in the docstrings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "nearest_indices",
    "nearest_source_index",
    "resample_matrix",
    "resize_bilinear",
    "resize_image_padded",
    "resize_labels_padded",
    "upsample_bilinear",
    "upsample_bilinear_block",
    "upsample_bilinear_rows",
]


def nearest_source_index(dst: Any, in_size: Any, out_size: Any) -> Any:
    """Input index read by output index `dst` of a nearest-neighbour resize (pixel-centre rule).

    Pure integer arithmetic, so it works on numpy arrays, jax arrays (traced sizes included, for
    per-image sizes inside a jitted function) and Python ints alike.

    Args:
      dst: integer output indices, any shape (0 <= dst < out_size).
      in_size: input length (> 0), scalar or broadcastable to `dst`.
      out_size: output length (> 0), scalar or broadcastable to `dst`.

    Returns:
      Integer input indices in 0..in_size-1, the shape of `dst` broadcast with the sizes.
    """
    return ((2 * dst + 1) * in_size) // (2 * out_size)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of a nearest-neighbour resize from `in_size` to `out_size` (host, numpy).

    Args:
      in_size: input length (> 0).
      out_size: output length (> 0).

    Returns:
      int64 [out_size] indices in 0..in_size-1.
    """
    return nearest_source_index(np.arange(out_size, dtype=np.int64), int(in_size), int(out_size))


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """`value` as a (rows, cols) pair of positive ints; ValueError naming `name` otherwise."""
    pair = (value, value) if isinstance(value, int | np.integer) else tuple(value)
    if len(pair) != 2 or any(int(v) != v or int(v) < 1 for v in pair):
        raise ValueError(f"{name} must be a positive integer or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _edge_pad(x: jax.Array, axis: int) -> jax.Array:
    """Replicates the first and last entry along `axis`: length n -> n + 2."""
    first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
    last = jax.lax.slice_in_dim(x, x.shape[axis] - 1, x.shape[axis], axis=axis)
    return jnp.concatenate([first, x, last], axis=axis)


def _upsample_padded(p: jax.Array, factor: int, axis: int) -> jax.Array:
    """Bilinear x`factor` along `axis` of `p`, which has one extra entry on each side there.

    Args:
      p: float array, length n + 2 along `axis` (entry 0 and n + 1 are the neighbours of the
        first and last sample: edge copies, or real rows of a larger map).
      factor: static integer scale factor (>= 1).
      axis: non-negative axis.

    Returns:
      The dtype of `p`, length ``factor * n`` along `axis` (see the module docstring).
    """
    n = p.shape[axis] - 2
    if factor == 1:
        return jax.lax.slice_in_dim(p, 1, n + 1, axis=axis)
    below, centre, above = (jax.lax.slice_in_dim(p, k, k + n, axis=axis) for k in range(3))
    phases = []
    for r in range(factor):
        d = (r + 0.5) / factor - 0.5
        if d < 0:
            phases.append((-d) * below + (1.0 + d) * centre)
        else:
            phases.append((1.0 - d) * centre + d * above)
    out = jnp.stack(phases, axis=axis + 1)  # [..., n, factor, ...]
    shape = list(p.shape)
    shape[axis] = n * factor
    return out.reshape(shape)


def _upsample_row_padded(
    p: jax.Array, factors: tuple[int, int], row_axis: int, col_axis: int
) -> jax.Array:
    """Both spatial axes of `p`, whose rows carry one extra row on each side: columns, then rows."""
    x = _upsample_padded(_edge_pad(p, col_axis), factors[1], col_axis)
    return _upsample_padded(x, factors[0], row_axis)


def _spatial_axes(x: jax.Array, axes: Sequence[int]) -> tuple[int, int]:
    row_axis, col_axis = (int(a) % x.ndim for a in axes)
    if row_axis == col_axis:
        raise ValueError(f"axes must name two different axes, got {axes}")
    return row_axis, col_axis


def upsample_bilinear(
    x: jax.Array, factor: int | Sequence[int], *, axes: Sequence[int] = (-3, -2)
) -> jax.Array:
    """``F.interpolate(x, scale_factor=factor, mode='bilinear', align_corners=False)``.

    Args:
      x: float array with spatial axes `axes`: [B, h, w, C] or [h, w, C] with the default.
      factor: static integer scale factor, or (rows, cols) factors.
      axes: the (row, column) axes of `x`.

    Returns:
      `x`'s dtype, [B, fh * h, fw * w, C] (the spatial axes scaled, the others unchanged).
    """
    fh, fw = _pair(factor, "factor")
    row_axis, col_axis = _spatial_axes(x, axes)
    x = jnp.asarray(x)
    return _upsample_row_padded(_edge_pad(x, row_axis), (fh, fw), row_axis, col_axis)


def resize_bilinear(
    x: jax.Array, size: Sequence[int], *, axes: Sequence[int] = (-3, -2)
) -> jax.Array:
    """``F.interpolate(x, size=size, mode='bilinear', align_corners=False)`` for integer ratios.

    Args:
      x: float array with spatial axes `axes`: [B, h, w, C] or [h, w, C] with the default.
      size: static (H', W') output size; each must be a multiple of the input's.
      axes: the (row, column) axes of `x`.

    Returns:
      `x`'s dtype, [B, H', W', C] (`x` itself when the size is unchanged).

    Raises:
      ValueError: if a side of `size` is not a positive multiple of the input's.
    """
    row_axis, col_axis = _spatial_axes(x, axes)
    in_size = (x.shape[row_axis], x.shape[col_axis])
    out_size = tuple(int(v) for v in size)
    if len(out_size) != 2 or any(o < i or o % i for o, i in zip(out_size, in_size, strict=True)):
        raise ValueError(
            f"resize_bilinear upsamples by integer factors only: size {tuple(size)} is not a "
            f"multiple of the input size {in_size}"
        )
    if out_size == in_size:
        return x
    factors = (out_size[0] // in_size[0], out_size[1] // in_size[1])
    return upsample_bilinear(x, factors, axes=(row_axis, col_axis))


def upsample_bilinear_rows(
    x: jax.Array,
    start: Any,
    num_rows: int,
    factor: int | Sequence[int],
    *,
    axes: Sequence[int] = (-3, -2),
) -> jax.Array:
    """Output rows ``fh * start ... fh * (start + num_rows) - 1`` of :func:`upsample_bilinear`.

    For memory: a loss or an argmax over a large upsampled map can run over blocks of rows
    (``lax.map``) without the whole map ever existing. The rows are bit-identical to the full
    upsample's. Input rows past the end are edge-replicated, so a last, partial block may run
    over the end (its extra output rows repeat the last ones' source and are meant to be cropped).

    Args:
      x: float array with spatial axes `axes`: [B, h, w, C] or [h, w, C] with the default.
      start: first input row of the block, a Python int or a traced int32 scalar (0 <= start).
      num_rows: static number of input rows of the block.
      factor: static integer scale factor, or (rows, cols) factors.
      axes: the (row, column) axes of `x`.

    Returns:
      `x`'s dtype, [B, fh * num_rows, fw * w, C].
    """
    fh, fw = _pair(factor, "factor")
    row_axis, col_axis = _spatial_axes(x, axes)
    x = jnp.asarray(x)
    height = x.shape[row_axis]
    rows = jnp.clip(start - 1 + jnp.arange(int(num_rows) + 2), 0, height - 1)
    padded = jnp.take(x, rows, axis=row_axis)  # [B, num_rows + 2, w, C]
    return upsample_bilinear_block(padded, (fh, fw), axes=(row_axis, col_axis))


def upsample_bilinear_block(
    block: jax.Array, factor: int | Sequence[int], *, axes: Sequence[int] = (-3, -2)
) -> jax.Array:
    """:func:`upsample_bilinear` of a block of input rows that carries one neighbour row each side.

    ``block`` holds input rows ``start - 1 ... start + n`` of a map (edge copies where they fall
    outside it, as rows ``clip(start - 1 + arange(n + 2), 0, h - 1)``); the result is output rows
    ``fh * start ... fh * (start + n) - 1`` of the whole map's upsample, bit-identical (this is
    what :func:`upsample_bilinear_rows` computes after its gather). Only slices and
    elementwise sums, so its VJP (w.r.t. the block) is cheap: a fused loss can pull a chunk's
    cotangent back onto ``n + 2`` input rows without touching the rest of the map.

    Args:
      block: float array with spatial axes `axes`: [B, n + 2, w, C] with the default.
      factor: static integer scale factor, or (rows, cols) factors.
      axes: the (row, column) axes of `block`.

    Returns:
      `block`'s dtype, [B, fh * n, fw * w, C].
    """
    fh, fw = _pair(factor, "factor")
    row_axis, col_axis = _spatial_axes(block, axes)
    return _upsample_row_padded(jnp.asarray(block), (fh, fw), row_axis, col_axis)


# --- PIL bilinear resize on a padded canvas (on device, traced sizes)


def _flipped(index: jax.Array, size: jax.Array, flip: Any) -> jax.Array:
    """``size - 1 - index`` where `flip` (a Python or traced bool), else `index`."""
    return jnp.where(jnp.asarray(flip, bool), size - 1 - index, index)


def resample_matrix(
    in_size: Any, out_size: Any, in_len: int, out_len: int, *, flip: Any = False
) -> jax.Array:
    """PIL's bilinear resize weights along one axis, as a dense matrix on padded canvases.

    ``resample_matrix(...) @ x`` resizes the valid ``x[:in_size]`` of a length-`in_len` axis to
    ``out_size`` samples in the first entries of a length-`out_len` axis (see the module
    docstring). Integer arithmetic in int32 up to the one (correctly rounded) division per weight,
    so ``2 * in_len * out_size`` and ``2 * out_len * in_size`` must stay below ``2 ** 31``.

    Args:
      in_size: valid input length (1 <= in_size <= in_len), a Python int or a traced int32 scalar.
      out_size: output length (1 <= out_size <= out_len), a Python int or a traced int32 scalar.
      in_len: static input canvas length.
      out_len: static output canvas length.
      flip: mirror the output (a Python or traced bool): row ``o < out_size`` holds the weights
        of output ``out_size - 1 - o``.

    Returns:
      float32 [out_len, in_len]: rows ``o < out_size`` sum to 1 (to float rounding), the other
      rows and the columns ``x >= in_size`` are 0.
    """
    in_size = jnp.asarray(in_size, jnp.int32)
    out_size = jnp.asarray(out_size, jnp.int32)
    o = _flipped(jnp.arange(out_len, dtype=jnp.int32), out_size, flip)[:, None]
    x = jnp.arange(in_len, dtype=jnp.int32)[None, :]
    num = (2 * x + 1) * out_size - (2 * o + 1) * in_size  # [out_len, in_len]
    span = 2 * jnp.maximum(in_size, out_size)
    weight = jnp.where(x < in_size, jnp.maximum(span - jnp.abs(num), 0), 0)  # int32
    total = jnp.maximum(jnp.sum(weight, axis=1, keepdims=True), 1).astype(jnp.float32)
    # XLA rewrites ``a / broadcast(b)`` as ``a * broadcast(1 / b)`` (854 / 854 -> 0.99999994);
    # the barrier keeps a true elementwise division, correctly rounded, so sizes equal -> identity.
    total = jax.lax.optimization_barrier(jnp.broadcast_to(total, weight.shape))
    valid = jnp.arange(out_len, dtype=jnp.int32)[:, None] < out_size
    return jnp.where(valid, weight.astype(jnp.float32) / total, 0.0)


def resize_image_padded(
    image: jax.Array,
    in_hw: Any,
    out_hw: Any,
    out_shape: tuple[int, int],
    *,
    flip: Any = False,
    round_to_uint8: bool = True,
) -> jax.Array:
    """PIL bilinear resize of the valid region of a padded image, onto a padded canvas.

    ``Wy @ image @ Wx^T`` with the :func:`resample_matrix` weights of each axis (columns first,
    as PIL), float32 at ``Precision.HIGHEST`` (no TF32 on GPUs). Traced sizes and flip are fine,
    so one compiled program serves every image size; vmap it over a batch.

    Args:
      image: uint8 or float [Hs, Ws, C]; the image is ``image[:in_h, :in_w]``, the rest is padding
        (ignored).
      in_hw: (in_h, in_w) valid input size, Python ints or traced int32 (a pair or an int [2]).
      out_hw: (out_h, out_w) output size (at most `out_shape`), as `in_hw`.
      out_shape: static (Hp, Wp) output canvas.
      flip: mirror the output horizontally within ``[:out_h, :out_w]`` (Python or traced bool).
      round_to_uint8: round half up and clip to [0, 255], returning uint8 (what PIL gives);
        else return the float32 values.

    Returns:
      uint8 (or float32) [Hp, Wp, C]: the resized image in ``[:out_h, :out_w]``, 0 elsewhere.
    """
    hs, ws = image.shape[0], image.shape[1]
    hp, wp = (int(v) for v in out_shape)
    wy = resample_matrix(in_hw[0], out_hw[0], hs, hp)  # [Hp, Hs]
    wx = resample_matrix(in_hw[1], out_hw[1], ws, wp, flip=flip)  # [Wp, Ws]
    highest = jax.lax.Precision.HIGHEST
    x = jnp.asarray(image).astype(jnp.float32)
    x = jnp.einsum("pw,hwc->hpc", wx, x, precision=highest, preferred_element_type=jnp.float32)
    x = jnp.einsum("oh,hpc->opc", wy, x, precision=highest, preferred_element_type=jnp.float32)
    if not round_to_uint8:
        return x
    return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0).astype(jnp.uint8)


def resize_labels_padded(
    labels: jax.Array,
    in_hw: Any,
    out_hw: Any,
    out_shape: tuple[int, int],
    *,
    flip: Any = False,
    fill: int = 255,
) -> jax.Array:
    """Nearest-neighbour resize (pixel-centre rule) of a padded label map, onto a padded canvas.

    Row and column gathers of :func:`nearest_source_index`; traced sizes and flip are fine, and
    it vmaps over a batch.

    Args:
      labels: integer [Hs, Ws]; the map is ``labels[:in_h, :in_w]``, the rest is padding.
      in_hw: (in_h, in_w) valid input size, Python ints or traced int32 (a pair or an int [2]).
      out_hw: (out_h, out_w) output size (at most `out_shape`), as `in_hw`.
      out_shape: static (Hp, Wp) output canvas.
      flip: mirror the output horizontally within ``[:out_h, :out_w]`` (Python or traced bool).
      fill: value outside ``[:out_h, :out_w]`` (must fit `labels`' dtype).

    Returns:
      `labels`' dtype [Hp, Wp].
    """
    labels = jnp.asarray(labels)
    hp, wp = (int(v) for v in out_shape)
    in_h, in_w = (jnp.asarray(v, jnp.int32) for v in (in_hw[0], in_hw[1]))
    out_h, out_w = (jnp.asarray(v, jnp.int32) for v in (out_hw[0], out_hw[1]))
    rows_out = jnp.arange(hp, dtype=jnp.int32)
    cols_out = jnp.arange(wp, dtype=jnp.int32)
    rows = jnp.clip(nearest_source_index(rows_out, in_h, out_h), 0, in_h - 1)
    cols = nearest_source_index(_flipped(cols_out, out_w, flip), in_w, out_w)
    cols = jnp.clip(cols, 0, in_w - 1)
    out = jnp.take(jnp.take(labels, rows, axis=0, mode="clip"), cols, axis=1, mode="clip")
    valid = (rows_out[:, None] < out_h) & (cols_out[None, :] < out_w)
    return jnp.where(valid, out, jnp.asarray(fill, labels.dtype))
