"""Instance-mask resampling ops: paste, resample, crop-and-resize (from arrays, label maps or
run lengths), masks-to-boxes.

One sampling convention is used throughout, that of ``torch.nn.functional.grid_sample`` with
``align_corners=False``, bilinear interpolation and zero padding (the convention of detectron2's
``paste_masks_in_image``):

* A mask of size ``M x M`` "in a box frame" stores the values at the box-frame points
  ``((j + 0.5) / M, (i + 0.5) / M)`` for cell ``(i, j)``, i.e. at image coordinates
  ``x = x1 + (j + 0.5) * (x2 - x1) / M`` and ``y = y1 + (i + 0.5) * (y2 - y1) / M``.
* An image-space mask of size ``H x W`` stores pixel ``(r, c)`` at its centre
  ``(c + 0.5, r + 0.5)``.
* Sampling a grid of values at a continuous position ``u`` (in cell units, cell ``m`` at ``u = m``)
  uses the triangle (bilinear) kernel ``max(0, 1 - |u - m|)`` and treats cells outside the grid as
  zero, which is exactly bilinear interpolation with zero padding.

Because every mapping between a box frame and the image (or another box frame) is axis-aligned,
2D bilinear interpolation factorises into a row-weight matrix and a column-weight matrix per
mask: ``out = Wy @ mask @ Wx^T``. This is exact, not an approximation, and cheap because the
matrices are per box over the small box-frame mask (28x28 or 112x112), never over a feature map.
Matrix products use ``Precision.HIGHEST`` so that TF32 on GPUs does not cost accuracy.

All functions are pure, shape-static (sizes are Python ints, static arguments of the ``jax.jit``
that wraps each public function, so eager calls compile once per shape) and work under ``jit`` and
``vmap``; batch over images with ``jax.vmap``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def _triangle_weights(u: jax.Array, size: int) -> jax.Array:
    """Bilinear (triangle-kernel) weights with zero padding.

    Args:
        u: [..., P] float32 continuous positions in cell units (cell m is centred at u = m).
        size: number of cells of the sampled grid.

    Returns:
        [..., P, size] float32, ``max(0, 1 - |u - m|)`` for m in ``0..size-1``. Row p holds the
        (at most two) interpolation weights of position p; cells outside ``[0, size)`` are zero
        padding and so simply absent.
    """
    m = jnp.arange(size, dtype=jnp.float32)
    return jnp.maximum(0.0, 1.0 - jnp.abs(u[..., None] - m))


def _box_frame_positions(offsets: jax.Array, box_size: jax.Array, cells: int) -> jax.Array:
    """Positions of sample points in a box frame, in that frame's cell units.

    Args:
        offsets: [N, P] float32 offsets of the sample points from the box's low edge (image
            units). Passing the offset rather than the absolute coordinate keeps float32 error
            relative to the box size instead of to the image size.
        box_size: [N] float32 box extent along the axis (must be > 0 where it matters).
        cells: number of cells of the box-frame grid.

    Returns:
        [N, P] float32 positions ``u = offset / box_size * cells - 0.5``.
    """
    scale = cells / jnp.maximum(box_size, 1e-12)
    return offsets * scale[:, None] - 0.5


def paste_masks(
    masks: jax.Array,
    boxes: jax.Array,
    image_size: tuple[int, int],
    stride: int = 1,
) -> jax.Array:
    """Pastes box-frame soft masks into image space (detectron2's paste, before thresholding).

    Output pixel ``(i, j)`` has its centre at image coordinates ``((j + 0.5) * stride,
    (i + 0.5) * stride)``; its value is the bilinear sample, with zero padding, of the box-frame
    mask at that point, i.e. ``grid_sample(mask, grid, align_corners=False)`` with
    ``gx = (x - x1) / (x2 - x1) * 2 - 1``. Values are non-zero up to half a mask cell outside the
    box (as detectron2's GPU path, which does not crop to the box); for mask values in [0, 1], no
    pixel centred outside the box reaches 0.5, so after thresholding this matches both of
    detectron2's code paths. The caller applies the threshold.

    The output size is ``ceil(H / stride) x ceil(W / stride)`` so that the canvas covers the whole
    image (the size of a stride-``stride`` "SAME" convolution output; equal to ``H // stride`` when
    the padded image size is a multiple of the stride, as the configs guarantee).

    Memory: the output is ``N * H' * W' * 4`` bytes, e.g. 720 MB for N=100, 1344x1344 at stride 1,
    45 MB at stride 4. Intermediates are only ``N * M * W'``. Use stride 1 on full-size images only
    for small N, or map over chunks of boxes (``jax.lax.map``) and reduce each chunk; the op is
    linear per box, so chunking over N is exact.

    Boxes with non-positive width or height give all-zero masks (grid_sample would give NaN).

    Args:
        masks: [N, M, M] float masks in the box frame (e.g. 28x28 mask probabilities). Non-square
            [N, Mh, Mw] also works.
        boxes: [N, 4] float boxes (x1, y1, x2, y2) in image pixels; may extend past the image.
        image_size: (H, W) static ints, image size in pixels.
        stride: static int output stride (1 for image resolution, 4 for the SRM canvas).

    Returns:
        [N, ceil(H / stride), ceil(W / stride)] float32 soft masks in image space.
    """
    size = (int(image_size[0]), int(image_size[1]))  # hashable, whatever sequence was passed
    return _paste_masks(masks, boxes, size, int(stride))


@functools.partial(jax.jit, static_argnames=("image_size", "stride"))
def _paste_masks(
    masks: jax.Array, boxes: jax.Array, image_size: tuple[int, int], stride: int
) -> jax.Array:
    """Jitted body of :func:`paste_masks` (same arguments, ``image_size`` a tuple)."""
    masks = jnp.asarray(masks, jnp.float32)
    boxes = jnp.asarray(boxes, jnp.float32)
    height, width = image_size
    out_h = -(-height // stride)
    out_w = -(-width // stride)
    mh, mw = masks.shape[-2], masks.shape[-1]
    x1, y1, x2, y2 = (boxes[:, k] for k in range(4))
    bw, bh = x2 - x1, y2 - y1

    ys = (jnp.arange(out_h, dtype=jnp.float32) + 0.5) * stride  # pixel-centre y coordinates
    xs = (jnp.arange(out_w, dtype=jnp.float32) + 0.5) * stride
    uy = _box_frame_positions(ys[None, :] - y1[:, None], bh, mh)  # [N, H']
    ux = _box_frame_positions(xs[None, :] - x1[:, None], bw, mw)  # [N, W']
    wy = _triangle_weights(uy, mh)  # [N, H', Mh]
    wx = _triangle_weights(ux, mw)  # [N, W', Mw]
    nondegenerate = ((bw > 0) & (bh > 0)).astype(jnp.float32)
    wy = wy * nondegenerate[:, None, None]

    cols = jnp.einsum("nab,nwb->naw", masks, wx, precision=_HIGHEST)  # [N, Mh, W']
    return jnp.einsum("nha,naw->nhw", wy, cols, precision=_HIGHEST)


@functools.partial(jax.jit, static_argnames=("out_size",))
def resample_masks(
    masks: jax.Array,
    src_boxes: jax.Array,
    dst_boxes: jax.Array,
    index: jax.Array,
    out_size: int,
) -> jax.Array:
    """Resamples box-cropped masks into other boxes' frames (mask targets from cropped GT).

    Destination cell ``(i, j)`` of box k samples the image point ``(dst_x1 + (j + 0.5) * dst_w /
    out_size, dst_y1 + (i + 0.5) * dst_h / out_size)``; its value is the bilinear sample, with zero
    padding, of source mask ``index[k]`` at that point's position in the source box frame (source
    cell ``(a, b)`` lies at box-frame point ``((b + 0.5) / S, (a + 0.5) / S)``). Points outside the
    source box get 0 (up to the half-cell bilinear fade at its border).

    This approximates detectron2's mask target, ``ROIAlign(aligned=True)`` of the full-resolution
    bitmask into the proposal followed by ``>= 0.5``: the ground truth is only known through its
    S x S crop (point samples, so detail finer than a crop cell is lost for large objects), and each
    destination cell takes one bilinear point sample rather than RoIAlign's average over a
    sampling_ratio x sampling_ratio sub-grid. After thresholding the two agree on the vast majority
    of cells and differ only along mask boundaries (see tests/ops/test_masks.py for measured
    numbers). The caller applies the threshold.

    Source boxes with non-positive width or height give all-zero outputs.

    Args:
        masks: [N, S, S] float masks in [0, 1] cropped to their source boxes (S = 112 by default).
        src_boxes: [N, 4] float (x1, y1, x2, y2) source boxes in image pixels.
        dst_boxes: [K, 4] float (x1, y1, x2, y2) destination boxes (e.g. proposals) in image pixels.
        index: [K] int32 source mask of each destination, in ``[0, N)`` (out-of-range values are
            clamped; pad with any valid index and mask the result with the caller's ``valid``).
        out_size: static int side of the output masks (28 for mask targets).

    Returns:
        [K, out_size, out_size] float32 resampled masks.
    """
    masks = jnp.asarray(masks, jnp.float32)
    src_boxes = jnp.asarray(src_boxes, jnp.float32)
    dst_boxes = jnp.asarray(dst_boxes, jnp.float32)
    index = jnp.asarray(index, jnp.int32)
    sh, sw = masks.shape[-2], masks.shape[-1]

    src = jnp.take(src_boxes, index, axis=0, mode="clip")  # [K, 4]
    sel = jnp.take(masks, index, axis=0, mode="clip")  # [K, S, S]
    frac = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) / out_size  # [out]
    dst_w = dst_boxes[:, 2] - dst_boxes[:, 0]
    dst_h = dst_boxes[:, 3] - dst_boxes[:, 1]
    src_w = src[:, 2] - src[:, 0]
    src_h = src[:, 3] - src[:, 1]
    # Offsets of the destination sample points from the source box corner, computed relative to
    # the boxes (not as absolute image coordinates) to keep float32 error small.
    off_x = (dst_boxes[:, 0] - src[:, 0])[:, None] + frac[None, :] * dst_w[:, None]  # [K, out]
    off_y = (dst_boxes[:, 1] - src[:, 1])[:, None] + frac[None, :] * dst_h[:, None]
    wx = _triangle_weights(_box_frame_positions(off_x, src_w, sw), sw)  # [K, out, S]
    wy = _triangle_weights(_box_frame_positions(off_y, src_h, sh), sh)
    nondegenerate = ((src_w > 0) & (src_h > 0)).astype(jnp.float32)
    wy = wy * nondegenerate[:, None, None]

    cols = jnp.einsum("kab,kwb->kaw", sel, wx, precision=_HIGHEST)  # [K, S, out]
    return jnp.einsum("kha,kaw->khw", wy, cols, precision=_HIGHEST)


@functools.partial(jax.jit, static_argnames=("size",))
def crop_and_resize_masks(full_masks: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
    """Crops image-space masks to their boxes at a fixed size (the ground-truth crop convention).

    Output cell ``(i, j)`` of mask n is the bilinear sample, with zero padding, of the image-space
    mask at the box-frame point ``(x1 + (j + 0.5) * w / size, y1 + (i + 0.5) * h / size)``, with
    image pixel ``(r, c)`` centred at ``(c + 0.5, r + 0.5)``. This is the inverse convention of
    :func:`paste_masks`: cropping then pasting back reproduces the mask up to interpolation. One
    point sample per cell (no area averaging), implemented as a 4-corner gather.

    Args:
        full_masks: [N, H, W] float or bool masks in image space.
        boxes: [N, 4] float (x1, y1, x2, y2) boxes in image pixels.
        size: static int output side S (112 for the ground-truth crops).

    Returns:
        [N, size, size] float32 masks in the box frames.
    """
    full = jnp.asarray(full_masks).astype(jnp.float32)
    n, height, width = full.shape
    batch = jnp.arange(n)[:, None, None]
    return crop_masks_by_lookup(lambda r, c: full[batch, r, c], boxes, height, width, size)


def crop_masks_by_lookup(
    lookup: Callable[[jax.Array, jax.Array], jax.Array],
    boxes: jax.Array,
    height: jax.Array | int,
    width: jax.Array | int,
    size: int,
) -> jax.Array:
    """:func:`crop_and_resize_masks` for masks given by a lookup function, sizes may be traced.

    The masks need not exist as arrays: ``lookup(rows, cols)`` returns instance n's mask value at
    in-range pixels (rows in [0, height), cols in [0, width)), e.g. a label-map comparison or a
    run-length search (:func:`mask_value_from_runs`). Points outside the image read 0.

    Args:
        lookup: ``(rows int32 [N, S, S], cols int32 [N, S, S]) -> [N, S, S]`` mask values (0 / 1
            or soft).
        boxes: [N, 4] float (x1, y1, x2, y2) in image pixels.
        height: H, the image height (Python int or traced int32 scalar).
        width: W.
        size: static S.

    Returns:
        float32 [N, S, S] masks in the box frames.
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    n = boxes.shape[0]
    frac = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size
    # Continuous pixel-index positions (pixel r centred at r + 0.5, so index = coordinate - 0.5).
    vy = boxes[:, 1:2] + frac[None, :] * (boxes[:, 3:4] - boxes[:, 1:2]) - 0.5  # [N, S]
    vx = boxes[:, 0:1] + frac[None, :] * (boxes[:, 2:3] - boxes[:, 0:1]) - 0.5
    y0 = jnp.floor(vy)
    x0 = jnp.floor(vx)
    fy = vy - y0
    fx = vx - x0
    y0 = y0.astype(jnp.int32)
    x0 = x0.astype(jnp.int32)

    def axis_taps(i0: jax.Array, f: jax.Array, limit: Any) -> list[tuple[jax.Array, jax.Array]]:
        taps = []
        for idx, w in ((i0, 1.0 - f), (i0 + 1, f)):
            inside = (idx >= 0) & (idx < limit)
            taps.append((jnp.clip(idx, 0, limit - 1), jnp.where(inside, w, 0.0)))
        return taps

    out = jnp.zeros((n, size, size), jnp.float32)
    for yi, wyi in axis_taps(y0, fy, height):
        for xi, wxi in axis_taps(x0, fx, width):
            rows = jnp.broadcast_to(yi[:, :, None], (n, size, size))
            cols = jnp.broadcast_to(xi[:, None, :], (n, size, size))
            vals = lookup(rows, cols).astype(jnp.float32)
            out = out + vals * wyi[:, :, None] * wxi[:, None, :]
    return out


def mask_value_from_runs(
    run_ends: jax.Array,
    run_start: jax.Array,
    rows: jax.Array,
    cols: jax.Array,
    height: jax.Array | int,
    width: jax.Array | int,
) -> jax.Array:
    """Values of run-length-coded binary masks at pixels (the wire format's ``run_ends``).

    Instance n's mask is coded column-major over H x W as runs alternating zeros and ones,
    starting with zeros; all instances' runs are concatenated and accumulated, so instance n's
    tile ``[n * H * W, (n + 1) * H * W)`` and ``run_ends`` is sorted. Pixel (r, c) of instance n
    is position ``q = n * H * W + c * H + r``; the run holding it is the number of ends <= q, and
    it is a run of ones when its index counted from ``run_start[n]`` is odd.

    Args:
        run_ends: int32 [R] accumulated run ends, padded with 2**31 - 1.
        run_start: int32 [N] index of each instance's first run.
        rows: int32 [N, ...] in-range pixel rows; cols: int32 [N, ...] columns (same shape).
        height: H (int or traced int32 scalar); width: W.

    Returns:
        bool [N, ...] mask values.
    """
    n = rows.shape[0]
    index = jnp.arange(n, dtype=jnp.int32).reshape((n,) + (1,) * (rows.ndim - 1))
    q = (index * width + cols) * height + rows
    run = jnp.searchsorted(run_ends, q, side="right").astype(jnp.int32)
    start = run_start.reshape(index.shape)
    return (run - start) % 2 == 1


def boxes_from_label_map(
    label_map: jax.Array, num: int, height: jax.Array | int, width: jax.Array | int
) -> jax.Array:
    """Tight boxes of the regions ``label_map == n + 1`` for n < num (segment min / max).

    Same convention as :func:`masks_to_boxes` (``x2 = max column + 1``; empty regions give
    zeros), without materialising the N masks: one segment reduction per coordinate.

    Args:
        label_map: integer [Hs, Ws]; 0 = no instance; only ``[:height, :width]`` is read.
        num: static N.
        height: rows of the valid region (int or traced); width: its columns.

    Returns:
        float32 [N, 4] (x1, y1, x2, y2).
    """
    hs, ws = label_map.shape
    r = jnp.arange(hs, dtype=jnp.int32)[:, None]
    c = jnp.arange(ws, dtype=jnp.int32)[None, :]
    inside = (r < height) & (c < width)
    seg = jnp.where(inside, label_map.astype(jnp.int32), 0).reshape(-1)
    rr = jnp.broadcast_to(r, (hs, ws)).reshape(-1)
    cc = jnp.broadcast_to(c, (hs, ws)).reshape(-1)
    segments = num + 1
    y1 = jax.ops.segment_min(rr, seg, num_segments=segments)[1:]
    x1 = jax.ops.segment_min(cc, seg, num_segments=segments)[1:]
    y2 = jax.ops.segment_max(rr, seg, num_segments=segments)[1:] + 1
    x2 = jax.ops.segment_max(cc, seg, num_segments=segments)[1:] + 1
    present = jax.ops.segment_sum(jnp.ones_like(seg), seg, num_segments=segments)[1:] > 0
    boxes = jnp.stack([x1, y1, x2, y2], axis=1).astype(jnp.float32)
    return jnp.where(present[:, None], boxes, 0.0)


@functools.partial(jax.jit, static_argnames=("threshold",))
def masks_to_boxes(masks: jax.Array, threshold: float = 0.5) -> jax.Array:
    """Tight boxes around image-space masks (detectron2's BitMasks.get_bounding_boxes).

    A pixel is on where ``mask >= threshold``. The box covers the on pixels' full extent:
    ``x1 = min column``, ``x2 = max column + 1`` (and likewise for y), so that ``x2 - x1`` is the
    width in pixels. Empty masks give ``(0, 0, 0, 0)``.

    Args:
        masks: [N, H, W] float or bool masks.
        threshold: on-pixel threshold.

    Returns:
        [N, 4] float32 boxes (x1, y1, x2, y2) in image pixels.
    """
    on = jnp.asarray(masks).astype(jnp.float32) >= threshold
    rows = jnp.any(on, axis=2)  # [N, H]
    cols = jnp.any(on, axis=1)  # [N, W]
    height, width = rows.shape[1], cols.shape[1]
    y1 = jnp.argmax(rows, axis=1)
    y2 = height - jnp.argmax(rows[:, ::-1], axis=1)
    x1 = jnp.argmax(cols, axis=1)
    x2 = width - jnp.argmax(cols[:, ::-1], axis=1)
    boxes = jnp.stack([x1, y1, x2, y2], axis=1).astype(jnp.float32)
    nonempty = jnp.any(rows, axis=1)
    return jnp.where(nonempty[:, None], boxes, 0.0)


# --- numpy host twins


def crop_and_resize_masks_np(masks: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Host (numpy) twin of :func:`crop_and_resize_masks`: the same op, for the input pipeline.

    Output cell ``(i, j)`` of mask n is the bilinear sample, with zero padding, of mask n at the
    image point ``(x1 + (j + 0.5) * (x2 - x1) / S, y1 + (i + 0.5) * (y2 - y1) / S)``, with image
    pixel ``(r, c)`` centred at ``(c + 0.5, r + 0.5)``: ``torch.nn.functional.grid_sample(mask,
    grid, mode='bilinear', padding_mode='zeros', align_corners=False)`` at those points. One
    point sample per cell (no area averaging), no thresholding; a 4-corner gather of [N, S, S].

    Differs from the jnp version only in precision: sample positions are computed in float64
    (jnp: float32), the interpolation weights and the sum in float32.

    Args:
        masks: [N, H, W] uint8 / bool / float masks (binary: 0/1; uint8 values are taken as-is,
            so pass 0/1 masks, not 0/255).
        boxes: [N, 4] float (x1, y1, x2, y2) in the masks' pixel frame.
        size: S.

    Returns:
        float32 [N, S, S], in [0, 1] for binary masks.
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


def paste_mask_np(mask: np.ndarray, box: Sequence[float], image_size: Sequence[int]) -> np.ndarray:
    """Host (numpy, float64) twin of :func:`paste_masks` for one mask at stride 1.

    Pixel (i, j), centred at (j + 0.5, i + 0.5), takes the bilinear sample with zero padding of
    the mask at box-frame position ``u = (x - x1) / (x2 - x1) * Mw - 0.5`` (and likewise in y):
    the separable triangle weights ``max(0, 1 - |u - k|)``, as :func:`paste_masks`. Only the rows
    and columns with a non-zero weight are computed, so pasting into a large image costs
    O(box area), not O(image). A box with non-positive width or height (or a non-finite
    coordinate) gives zeros.

    Args:
        mask: [Mh, Mw] float mask (e.g. 28 x 28 probabilities).
        box: (x1, y1, x2, y2) in image pixels.
        image_size: (H, W).

    Returns:
        float32 [H, W].
    """
    mask = np.asarray(mask, np.float64)
    height, width = int(image_size[0]), int(image_size[1])
    out = np.zeros((height, width), np.float32)
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (np.all(np.isfinite([x1, y1, x2, y2])) and x2 > x1 and y2 > y1):
        return out

    def weights(lo: float, hi: float, n_out: int, n_mask: int) -> tuple[np.ndarray, int]:
        u = ((np.arange(n_out, dtype=np.float64) + 0.5) - lo) / (hi - lo) * n_mask - 0.5
        inside = np.flatnonzero((u > -1.0) & (u < n_mask))
        if inside.size == 0:
            return np.zeros((0, n_mask)), 0
        start, stop = int(inside[0]), int(inside[-1]) + 1
        w = np.maximum(0.0, 1.0 - np.abs(u[start:stop, None] - np.arange(n_mask)[None, :]))
        return w, start

    wy, y0 = weights(y1, y2, height, mask.shape[0])
    wx, x0 = weights(x1, x2, width, mask.shape[1])
    if wy.shape[0] and wx.shape[0]:
        out[y0 : y0 + wy.shape[0], x0 : x0 + wx.shape[0]] = wy @ mask @ wx.T
    return out
