"""Box geometry and the box <-> delta coder, as pure jnp functions.

Boxes are ``(x1, y1, x2, y2)`` in absolute pixels (DESIGN.md). Widths and heights are ``x2 - x1``
and ``y2 - y1`` with no ``+1``, as in detectron2 and torchvision. All math is float32; integer or
bfloat16 inputs are cast. Every function works for arbitrary leading batch dimensions, so it can
be used unbatched, on ``[B, N, 4]`` arrays directly, or under ``jax.vmap``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp

Array = jnp.ndarray

# detectron2's default clamp for dw/dh before exp: boxes at most 1000/16 times their anchor.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _f32(x: Array) -> Array:
    return jnp.asarray(x, dtype=jnp.float32)


def area(boxes: Array) -> Array:
    """Area of boxes: ``(x2 - x1) * (y2 - y1)``.

    Inverted boxes (x2 < x1 or y2 < y1) give a negative or zero product exactly as torchvision's
    ``box_area``; callers that need a non-negative area should clip first.

    Args:
      boxes: [..., 4] float (x1, y1, x2, y2).

    Returns:
      [...] float32 areas.
    """
    b = _f32(boxes)
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def _intersection(a: Array, b: Array) -> Array:
    """Pairwise intersection areas: a [..., N, 4], b [..., M, 4] -> [..., N, M] float32."""
    a = _f32(a)[..., :, None, :]
    b = _f32(b)[..., None, :, :]
    lt = jnp.maximum(a[..., :2], b[..., :2])
    rb = jnp.minimum(a[..., 2:], b[..., 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    return wh[..., 0] * wh[..., 1]


def _safe_divide(num: Array, den: Array) -> Array:
    """num / den where den > 0, else 0 (no NaN, and no NaN gradient either)."""
    pos = den > 0
    return jnp.where(pos, num / jnp.where(pos, den, 1.0), 0.0)


def iou(a: Array, b: Array) -> Array:
    """Pairwise intersection over union.

    Equals ``torchvision.ops.box_iou`` for boxes with positive area. When the union is zero (two
    zero-area boxes) the IoU is 0 instead of NaN.

    Args:
      a: [..., N, 4] float boxes (x1, y1, x2, y2).
      b: [..., M, 4] float boxes; leading dims broadcast against those of ``a``.

    Returns:
      [..., N, M] float32 IoU in [0, 1].
    """
    inter = _intersection(a, b)
    union = area(a)[..., :, None] + area(b)[..., None, :] - inter
    return _safe_divide(inter, union)


def ioa(a: Array, b: Array) -> Array:
    """Pairwise intersection over the area of ``a`` (e.g. anchors vs. crowd regions).

    Args:
      a: [..., N, 4] float boxes whose area is the denominator.
      b: [..., M, 4] float boxes.

    Returns:
      [..., N, M] float32 ``|a_i ∩ b_j| / |a_i|``; 0 where ``a_i`` has zero area.
    """
    inter = _intersection(a, b)
    return _safe_divide(inter, area(a)[..., :, None])


def clip(boxes: Array, image_shape: Sequence[int] | Array) -> Array:
    """Clip boxes to the image: x to [0, w], y to [0, h] (detectron2 ``Boxes.clip``).

    Args:
      boxes: [..., 4] float boxes (x1, y1, x2, y2).
      image_shape: ``(h, w)``: Python numbers or an array of shape [2]; or [..., 2] whose leading
        dims broadcast against ``boxes.shape[:-1]`` (e.g. [B, 1, 2] per-image sizes for boxes
        [B, N, 4]; under ``jax.vmap`` simply pass the per-image [2]).

    Returns:
      [..., 4] float32 clipped boxes.
    """
    b = _f32(boxes)
    hw = _f32(image_shape)
    h = hw[..., 0, None]
    w = hw[..., 1, None]
    upper = jnp.concatenate([w, h, w, h], axis=-1)
    return jnp.clip(b, 0.0, upper)


def _center_size(boxes: Array) -> tuple[Array, Array, Array, Array]:
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    cx = boxes[..., 0] + 0.5 * w
    cy = boxes[..., 1] + 0.5 * h
    return cx, cy, w, h


def encode(
    boxes: Array,
    anchors: Array,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> Array:
    """Regression targets that turn ``anchors`` into ``boxes`` (detectron2 ``get_deltas``).

    With ``w = x2 - x1``, ``cx = x1 + 0.5 w`` (and likewise for y), and weights
    ``(wx, wy, ww, wh)``::

      dx = wx (cx_box - cx_anchor) / w_anchor      dw = ww log(w_box / w_anchor)
      dy = wy (cy_box - cy_anchor) / h_anchor      dh = wh log(h_box / h_anchor)

    No guard is applied: anchors need positive size, and a zero-size target box gives -inf in
    dw/dh; mask such rows (e.g. unmatched or padded) with ``jnp.where`` before using them.

    Args:
      boxes: [..., 4] float target boxes (x1, y1, x2, y2).
      anchors: [..., 4] float reference boxes; broadcasts against ``boxes``.
      weights: (wx, wy, ww, wh), e.g. (1, 1, 1, 1) for the RPN and (10, 10, 5, 5) for RoI heads.

    Returns:
      [..., 4] float32 deltas (dx, dy, dw, dh).
    """
    wx, wy, ww, wh = (float(v) for v in weights)
    tx, ty, tw, th = _center_size(_f32(boxes))
    ax, ay, aw, ah = _center_size(_f32(anchors))
    dx = wx * (tx - ax) / aw
    dy = wy * (ty - ay) / ah
    dw = ww * jnp.log(tw / aw)
    dh = wh * jnp.log(th / ah)
    return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode(
    deltas: Array,
    anchors: Array,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clamp: float = DEFAULT_SCALE_CLAMP,
) -> Array:
    """Apply deltas to anchors (detectron2 ``apply_deltas``); the inverse of :func:`encode`.

    ``dw/weight`` and ``dh/weight`` are clamped from above at ``clamp`` before ``exp`` (so a
    predicted box is at most ``exp(clamp)`` times its anchor); dx/dy are not clamped. The result
    is ``(cx - w/2, cy - h/2, cx + w/2, cy + h/2)``, not clipped to the image.

    Args:
      deltas: [..., 4] float (dx, dy, dw, dh); computed in float32 whatever the input dtype.
      anchors: [..., 4] float reference boxes; broadcasts against ``deltas`` (for class-specific
        deltas [N, K, 4] pass anchors[:, None, :]).
      weights: (wx, wy, ww, wh), the same as used by :func:`encode`.
      clamp: upper bound for dw/dh after dividing by their weights.

    Returns:
      [..., 4] float32 boxes (x1, y1, x2, y2).
    """
    wx, wy, ww, wh = (float(v) for v in weights)
    d = _f32(deltas)
    ax, ay, aw, ah = _center_size(_f32(anchors))
    dx = d[..., 0] / wx
    dy = d[..., 1] / wy
    dw = jnp.minimum(d[..., 2] / ww, clamp)
    dh = jnp.minimum(d[..., 3] / wh, clamp)
    cx = dx * aw + ax
    cy = dy * ah + ay
    w = jnp.exp(dw) * aw
    h = jnp.exp(dh) * ah
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
