"""Static-shape, tiled greedy non-maximum suppression in pure JAX.

The result agrees with ``torchvision.ops.nms`` / ``torchvision.ops.batched_nms``: boxes are visited
in descending score order and a box is dropped when its IoU with an already kept, higher-scored box
is strictly greater than ``iou_threshold``. IoU uses width ``x2 - x1`` and height ``y2 - y1`` (no
``+1``) and is evaluated in float32 with the same formula as torchvision's CPU kernel,
``inter / (area_kept + area_other - inter)``, so a zero-area pair (0 / 0 = NaN) never suppresses.

Algorithm (memory O(N x T) rather than O(N^2)): the boxes are sorted by score and cut into tiles of
``T = tile_size`` boxes. A ``lax.while_loop`` visits the tiles in order. Each tile is first
suppressed against the compacted buffer of boxes kept so far, one T x T IoU block at a time (an
inner ``while_loop`` that stops as soon as every box of the tile is suppressed), then suppression
inside the tile is resolved exactly by iterating the greedy rule on the T x T block to its unique
fixed point (at most T passes, in practice a handful). The tile's survivors are appended to the
buffer in order. The outer loop stops once ``max_output`` boxes are kept or the valid boxes are
exhausted, so a small ``max_output`` touches only the first few tiles.

Conventions shared by both functions:

* Output: ``indices [max_output] int32`` into the ORIGINAL (unsorted) box array, in descending score
  order, and ``valid [max_output] bool``. Padding entries have ``valid=False`` and index 0 (safe to
  gather with; always mask with ``valid``).
* Invalid boxes (``valid`` input False, score ``-inf`` or NaN) are never kept and never suppress.
* Ties in score are broken stably by original index (lower index first). ``torch.sort`` does not
  promise any tie order, so exact score ties may order differently from torchvision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["batched_nms", "nms"]


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _suppression_block(
    a_boxes: jax.Array,
    a_area: jax.Array,
    b_boxes: jax.Array,
    b_area: jax.Array,
    iou_threshold: jax.Array,
) -> jax.Array:
    """IoU(a_i, b_j) > threshold for every pair.

    Args:
      a_boxes: [A, 4] float32, the higher-scored (suppressing) boxes.
      a_area: [A] float32, their areas.
      b_boxes: [B, 4] float32, the candidate boxes.
      b_area: [B] float32, their areas.
      iou_threshold: scalar float32.

    Returns:
      [A, B] bool.
    """
    xx1 = jnp.maximum(a_boxes[:, None, 0], b_boxes[None, :, 0])
    yy1 = jnp.maximum(a_boxes[:, None, 1], b_boxes[None, :, 1])
    xx2 = jnp.minimum(a_boxes[:, None, 2], b_boxes[None, :, 2])
    yy2 = jnp.minimum(a_boxes[:, None, 3], b_boxes[None, :, 3])
    inter = jnp.maximum(xx2 - xx1, 0.0) * jnp.maximum(yy2 - yy1, 0.0)
    iou = inter / (a_area[:, None] + b_area[None, :] - inter)
    return iou > iou_threshold


def _nms_core(
    boxes: jax.Array,
    scores: jax.Array,
    valid: jax.Array | None,
    classes: jax.Array | None,
    iou_threshold: jax.Array | float,
    max_output: int,
    tile_size: int,
) -> tuple[jax.Array, jax.Array]:
    """Shared implementation of `nms` and `batched_nms` (classes=None: class-agnostic)."""
    n = boxes.shape[0]
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4], got {boxes.shape}")
    if scores.shape != (n,):
        raise ValueError(f"scores must be [{n}], got {scores.shape}")
    if max_output < 1:
        raise ValueError(f"max_output must be >= 1, got {max_output}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    if n == 0:
        return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)

    boxes = boxes.astype(jnp.float32)
    scores = scores.astype(jnp.float32)
    thr = jnp.asarray(iou_threshold, jnp.float32)
    is_valid = scores > -jnp.inf  # False for -inf and NaN
    if valid is not None:
        is_valid = is_valid & valid.astype(bool)

    # Descending score, stable by index; invalid boxes go last.
    key = jnp.where(is_valid, -scores, jnp.inf)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    n_valid = jnp.sum(is_valid, dtype=jnp.int32)

    tile = min(tile_size, _round_up(n, 8))
    n_pad = _round_up(n, tile)
    k_pad = _round_up(min(max_output, n), tile)
    pad = n_pad - n

    s_boxes = jnp.pad(boxes[order], ((0, pad), (0, 0)))
    s_area = (s_boxes[:, 2] - s_boxes[:, 0]) * (s_boxes[:, 3] - s_boxes[:, 1])
    s_index = jnp.pad(order, (0, pad))
    use_cls = classes is not None
    if use_cls:
        s_cls = jnp.pad(classes.astype(jnp.int32)[order], (0, pad))
    else:
        s_cls = jnp.zeros((n_pad,), jnp.int32)  # unused: cheap placeholder in the loop carry

    n_tiles = (n_valid + tile - 1) // tile
    iota = jnp.arange(tile, dtype=jnp.int32)
    upper = iota[:, None] < iota[None, :]  # row j suppresses column i only when j < i

    def block(a_b, a_a, a_c, b_b, b_a, b_c):
        sup = _suppression_block(a_b, a_a, b_b, b_a, thr)
        if use_cls:
            sup = sup & (a_c[:, None] == b_c[None, :])
        return sup

    def outer_cond(state):
        t, count = state[0], state[1]
        return (t < n_tiles) & (count < max_output)

    def outer_body(state):
        t, count, k_boxes, k_area, k_cls, k_index = state
        start = t * tile
        t_boxes = lax.dynamic_slice_in_dim(s_boxes, start, tile)
        t_area = lax.dynamic_slice_in_dim(s_area, start, tile)
        t_cls = lax.dynamic_slice_in_dim(s_cls, start, tile)
        t_index = lax.dynamic_slice_in_dim(s_index, start, tile)
        supp = (start + iota) >= n_valid

        # 1) Suppression by boxes kept in earlier tiles, one T x T block at a time.
        def cross_cond(carry):
            c, sup = carry
            return (c * tile < count) & ~jnp.all(sup)

        def cross_body(carry):
            c, sup = carry
            kstart = c * tile
            kb = lax.dynamic_slice_in_dim(k_boxes, kstart, tile)
            ka = lax.dynamic_slice_in_dim(k_area, kstart, tile)
            kc = lax.dynamic_slice_in_dim(k_cls, kstart, tile)
            live = (kstart + iota) < count
            hit = block(kb, ka, kc, t_boxes, t_area, t_cls) & live[:, None]
            return c + 1, sup | jnp.any(hit, axis=0)

        _, supp = lax.while_loop(cross_cond, cross_body, (jnp.int32(0), supp))

        # 2) Exact greedy inside the tile: iterate keep = ~supp & ~any_j<i(keep_j & M_ji) to its
        # fixed point. After k passes the first k entries are final, so it always terminates.
        m = block(t_boxes, t_area, t_cls, t_boxes, t_area, t_cls) & upper
        m = m & ~supp[:, None]
        m_f = m.astype(jnp.float32)

        def fix_step(keep):
            hit = jnp.dot(keep.astype(jnp.float32), m_f, precision=lax.Precision.HIGHEST) > 0.5
            return ~supp & ~hit

        def fix_cond(carry):
            return carry[1]

        def fix_body(carry):
            keep, _ = carry
            new = fix_step(keep)
            return new, jnp.any(new != keep)

        keep, _ = lax.while_loop(fix_cond, fix_body, (~supp, jnp.bool_(True)))

        # 3) Append survivors (in score order) to the kept buffer; drop any beyond max_output.
        pos = count + jnp.cumsum(keep, dtype=jnp.int32) - 1
        pos = jnp.where(keep & (pos < max_output), pos, k_pad)
        k_boxes = k_boxes.at[pos].set(t_boxes, mode="drop")
        k_area = k_area.at[pos].set(t_area, mode="drop")
        k_cls = k_cls.at[pos].set(t_cls, mode="drop")
        k_index = k_index.at[pos].set(t_index, mode="drop")
        count = jnp.minimum(count + jnp.sum(keep, dtype=jnp.int32), max_output)
        return t + 1, count, k_boxes, k_area, k_cls, k_index

    init = (
        jnp.int32(0),
        jnp.int32(0),
        jnp.zeros((k_pad, 4), jnp.float32),
        jnp.zeros((k_pad,), jnp.float32),
        jnp.zeros((k_pad,), jnp.int32),
        jnp.zeros((k_pad,), jnp.int32),
    )
    _, count, _, _, _, k_index = lax.while_loop(outer_cond, outer_body, init)

    out_valid = jnp.arange(max_output) < count
    k_index = k_index[: min(max_output, k_pad)]
    if max_output > k_pad:
        k_index = jnp.pad(k_index, (0, max_output - k_pad))
    out_index = jnp.where(out_valid, k_index, 0).astype(jnp.int32)
    return out_index, out_valid


@functools.partial(jax.jit, static_argnames=("max_output", "tile_size"))
def nms(
    boxes: jax.Array,
    scores: jax.Array,
    iou_threshold: jax.Array | float,
    max_output: int,
    valid: jax.Array | None = None,
    tile_size: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """Greedy NMS with static shapes, equal to ``torchvision.ops.nms`` truncated to max_output.

    Jit-able (``max_output`` and ``tile_size`` are static; ``iou_threshold`` may be traced) and
    vmap-able over a leading batch axis of every array argument. Memory is O(N * tile_size).

    Args:
      boxes: [N, 4] float, (x1, y1, x2, y2) absolute pixels.
      scores: [N] float. Boxes with score -inf or NaN are treated as padding.
      iou_threshold: scalar; a box is suppressed when IoU > iou_threshold with a kept box.
      max_output: static int, the output length.
      valid: optional [N] bool; False marks padding boxes (never kept, never suppress).
      tile_size: static int, boxes per tile (256 is a good CPU default).

    Returns:
      indices: [max_output] int32, kept boxes as indices into the input, descending score
        (ties: lower index first); padding entries are 0.
      valid: [max_output] bool, True for the first ``min(max_output, num_kept)`` entries.
    """
    return _nms_core(boxes, scores, valid, None, iou_threshold, max_output, tile_size)


@functools.partial(jax.jit, static_argnames=("max_output", "tile_size"))
def batched_nms(
    boxes: jax.Array,
    scores: jax.Array,
    classes: jax.Array,
    iou_threshold: jax.Array | float,
    max_output: int,
    valid: jax.Array | None = None,
    tile_size: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """Class-aware NMS, equal to ``torchvision.ops.batched_nms`` truncated to max_output.

    Boxes of different classes never suppress each other. This is done with a class-equality mask
    inside every IoU block instead of torchvision's coordinate-offset trick, so IoUs are computed
    on the original coordinates and the result equals torchvision's per-class ("vanilla") path
    exactly, whatever the coordinate magnitude. Output is merged over classes in descending score.

    Args:
      boxes: [N, 4] float, (x1, y1, x2, y2) absolute pixels.
      scores: [N] float. Boxes with score -inf or NaN are treated as padding.
      classes: [N] int, class id of each box.
      iou_threshold: scalar; suppression when IoU > iou_threshold within a class.
      max_output: static int, the output length.
      valid: optional [N] bool; False marks padding boxes.
      tile_size: static int, boxes per tile.

    Returns:
      indices: [max_output] int32 into the input, descending score; padding entries are 0.
      valid: [max_output] bool.
    """
    if classes.shape != scores.shape:
        raise ValueError(f"classes must be {scores.shape}, got {classes.shape}")
    return _nms_core(boxes, scores, valid, classes, iou_threshold, max_output, tile_size)
