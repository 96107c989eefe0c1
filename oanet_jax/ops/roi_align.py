"""RoIAlign (single- and multi-level) with torchvision semantics, written with jnp gathers.

Semantics follow ``torchvision.ops.roi_align`` (CPU kernel) exactly:

* A box ``(x1, y1, x2, y2)`` in image pixels maps to the feature map as
  ``x * spatial_scale - offset`` with ``offset = 0.5`` when ``aligned`` (pixel centres at
  half-integers, Detectron2's "aligned" RoIAlign) and ``0`` otherwise. With ``aligned=False`` the
  RoI width and height are forced to be at least 1 (legacy Mask R-CNN behaviour).
* The RoI is split into ``oh x ow`` bins; each bin is sampled on a regular
  ``grid_h x grid_w`` grid at ``start + p * bin + (i + 0.5) * bin / grid`` and the bilinearly
  interpolated samples are averaged (divided by ``max(grid_h * grid_w, 1)``).
* ``sampling_ratio > 0`` uses ``grid_h = grid_w = sampling_ratio``. ``sampling_ratio == 0`` is
  adaptive, per box: ``grid_h = ceil(roi_h / oh)``, ``grid_w = ceil(roi_w / ow)``. Static shapes
  need a bound, so the sample grid is allocated at ``cap = max_sampling_ratio`` per axis and
  masked per box: the result is exact whenever ``ceil(roi / out) <= cap``; above the cap a box
  uses ``cap`` evenly spaced samples on that axis (what torchvision computes with
  ``sampling_ratio=cap`` on that axis), a slightly sparser sampling of the same bin. The default
  (``None``) is ``ceil(sqrt(2) * R / min(oh, ow))`` with ``R = 28`` map pixels, the largest
  side-length-over-stride that the FPN level assignment (224 px at P4) gives a square box: every
  box of aspect ratio up to 2:1 pooled from its assigned level is exact (cap 6 for 7x7 outputs,
  3 for 14x14; at the top level, where the assignment clamps, for sides up to ``cap * out``
  strides). The cost grows with ``cap ** 2``. A box with a non-positive adaptive grid (empty or
  inverted RoI with ``aligned=True``) pools to 0, as in torchvision.
* Out-of-map samples: a sample with ``y < -1`` or ``y > H`` (or the same in x) contributes 0.
  Otherwise ``y <= 0`` is clamped to 0, and when ``floor(y) >= H - 1`` both interpolation rows
  are ``H - 1`` (the sample takes the last row's value).
* Sample coordinates are computed with torchvision's float32 operation order and rounding (no
  fused multiply-adds, true divisions), so they agree bit for bit whenever ``spatial_scale`` is a
  power of two (every FPN level); other scales may differ by one float32 ulp (FMA contraction of
  ``box * scale - 0.5``).

Implementation: the feature map(s) of each image are flattened channels-last into ``[rows, C]``
(a ``[B, rows, C]`` buffer) and every bilinear tap is one row gather (``jnp.take`` on the flattened
``y * W + x`` index, vmapped over the images) of a contiguous C-vector. A box gathers from its own
image only, so with the batch sharded over 'data' the gathers and the backward's scatter-adds stay
on the device that holds the image (no collective). The taps of all samples of a bin are written as
an unrolled weighted sum, so XLA fuses the gathers, the interpolation and the bin average into a
single elementwise kernel that writes only the ``[B, N, oh, ow, C]`` output (no
``[..., samples, 4, C]`` intermediate, no interpolation matrices over H or W). For several FPN
levels the levels are concatenated into the same buffer and each box gathers from its own level
through a per-box row offset, height, width and scale, so each box is pooled exactly once.

Interpolation weights and accumulation are float32 whatever the feature dtype (bf16 accepted);
the result has the feature dtype. Gradients (reverse mode, a custom VJP) w.r.t. the features are
the transpose of the gathers, i.e. torchvision's backward, accumulated by one running scatter-add
per tap, over the samples that some box uses only; as in torchvision no gradient flows to the
boxes (their cotangent is zero). Forward-mode differentiation (jvp) is not defined.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["assign_levels", "multilevel_roi_align", "roi_align"]

LevelMapper = Literal["detectron2", "torchvision"]

# Grids with more samples per bin than this are summed in a loop instead of unrolled.
_MAX_UNROLLED_SAMPLES = 36
# Largest RoI side (map pixels) of a square box on its FPN level: 2 * 224 / 2**4.
_FPN_MAX_SQUARE_ROI = 28.0


def _pair(output_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(output_size, int):
        return int(output_size), int(output_size)
    oh, ow = output_size
    return int(oh), int(ow)


def _default_cap(output_size: tuple[int, int], max_square_roi: float) -> int:
    """Adaptive-grid cap that is exact for boxes of aspect ratio <= 2 up to ``max_square_roi``."""
    return max(1, math.ceil(math.sqrt(2.0) * max_square_roi / min(output_size)))


def _exact_product(count: jax.Array, value: jax.Array) -> jax.Array:
    """Correctly rounded float32 ``count * value`` for integer-valued ``count < 4096``.

    XLA's CPU and GPU backends contract ``a + b * c`` into one fused multiply-add, which rounds
    differently from torchvision's kernel (``start + p * bin`` then rounds twice); on a 256-pixel
    map that moves sample coordinates by ~3e-5 px and pooled values by ~1e-4. Splitting
    ``value`` into a 12-bit head and a 12-bit tail makes both partial products exact, so their
    sum is the correctly rounded product whether or not the compiler fuses anything, and what the
    caller adds to it is no longer a multiply.
    """
    bits = jax.lax.bitcast_convert_type(value, jnp.uint32)
    head = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
    tail = value - head
    return count * head + count * tail


def _divide(numerator: jax.Array, denominator: int | jax.Array) -> jax.Array:
    """IEEE float32 ``numerator / denominator``.

    XLA rewrites a division by a constant into a multiplication by its rounded reciprocal, which
    is not the correctly rounded quotient (e.g. ``x / 7``); torchvision divides. Hiding the
    constant behind a select on ``numerator`` (taken only for NaN, where both give NaN) keeps
    a true division.
    """
    denominator = jnp.asarray(denominator, jnp.float32)
    return numerator / jnp.where(jnp.isnan(numerator), jnp.float32(jnp.nan), denominator)


def _axis_taps(
    start: jax.Array,
    bin_size: jax.Array,
    size: jax.Array | int,
    grid: jax.Array | int,
    n_out: int,
    n_grid: int,
    adaptive: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Bilinear taps along one axis for every (bin, sample) of every box.

    Args:
      start: [M] float32 RoI start on the feature map (already scaled and offset).
      bin_size: [M] float32 bin extent.
      size: [M] int32 (or int) map extent along this axis (H or W of the box's level).
      grid: [M] int32 samples per bin on this axis (or the static sampling ratio).
      n_out: number of bins (oh or ow), static.
      n_grid: allocated samples per bin, static.
      adaptive: whether ``grid`` is per box (masks samples ``>= grid``).

    Returns:
      low, high: [M, n_out, n_grid] int32 tap indices along the axis.
      w_low, w_high: [M, n_out, n_grid] float32 tap weights, already divided by ``grid`` and
        zeroed for out-of-map or masked samples.
    """
    p = jnp.arange(n_out, dtype=jnp.float32)[None, :, None]
    i = jnp.arange(n_grid, dtype=jnp.float32)[None, None, :]
    start = start[:, None, None]
    bin_size = bin_size[:, None, None]
    if adaptive:
        # An empty grid (0: empty or inverted RoI) masks every sample; place them as for 1.
        grid_f = jnp.maximum(jnp.asarray(grid), 1).astype(jnp.float32)[:, None, None]
        # Masked samples (i >= grid) repeat the last real one: their taps (weight 0) then hit
        # rows that were just loaded, instead of other memory.
        i = jnp.minimum(i, grid_f - 1.0)
    else:
        grid_f = jnp.float32(grid)
    i = i + 0.5
    # Same operation order as torchvision: start + p * bin + ((i + .5) * bin) / grid.
    pos = (start + _exact_product(p, bin_size)) + _divide(i * bin_size, grid_f)
    size_i = jnp.asarray(size, jnp.int32)
    if size_i.ndim:
        size_i = size_i[:, None, None]
    size_f = size_i.astype(jnp.float32)
    valid = (pos >= -1.0) & (pos <= size_f)
    if adaptive:
        grid_i = jnp.asarray(grid)[:, None, None]
        valid = valid & (jnp.arange(n_grid, dtype=jnp.int32)[None, None, :] < grid_i)
    pos = jnp.maximum(pos, 0.0)
    low = jnp.floor(pos).astype(jnp.int32)
    at_edge = low >= size_i - 1
    low = jnp.where(at_edge, size_i - 1, low)
    high = jnp.where(at_edge, size_i - 1, low + 1)
    pos = jnp.where(at_edge, low.astype(jnp.float32), pos)
    frac = pos - low.astype(jnp.float32)
    norm = jnp.where(valid, 1.0 / grid_f, 0.0)
    return low, high, (1.0 - frac) * norm, frac * norm


class _Config(NamedTuple):
    """Static RoIAlign configuration."""

    output_size: tuple[int, int]
    sampling_ratio: int
    aligned: bool
    max_sampling_ratio: int


class _Taps(NamedTuple):
    """Bilinear taps of every (bin, sample) of every box, separable in y and x.

    rows: (low, high) [M, oh, G] int32 buffer rows of the y taps (``row_base + y * width``).
    wy: (low, high) [M, oh, G] float32 y weights (divided by grid_h, 0 if dropped/masked).
    cols: (low, high) [M, ow, G] int32 x taps.
    wx: (low, high) [M, ow, G] float32 x weights (divided by grid_w, 0 if dropped/masked).
    """

    rows: tuple[jax.Array, jax.Array]
    wy: tuple[jax.Array, jax.Array]
    cols: tuple[jax.Array, jax.Array]
    wx: tuple[jax.Array, jax.Array]


def _compute_taps(
    row_base: jax.Array,
    heights: jax.Array,
    widths: jax.Array,
    scales: jax.Array,
    boxes: jax.Array,
    config: _Config,
) -> _Taps:
    """Sample positions and bilinear taps of every box ([M] level geometry, [M, 4] boxes)."""
    oh, ow = config.output_size
    boxes = boxes.astype(jnp.float32)
    offset = 0.5 if config.aligned else 0.0
    # Exact (so immune to FMA contraction) when the scales are powers of two, as for FPN levels.
    scaled = boxes * scales[:, None]
    x1 = scaled[:, 0] - offset
    y1 = scaled[:, 1] - offset
    x2 = scaled[:, 2] - offset
    y2 = scaled[:, 3] - offset
    roi_w = x2 - x1
    roi_h = y2 - y1
    if not config.aligned:
        roi_w = jnp.maximum(roi_w, 1.0)
        roi_h = jnp.maximum(roi_h, 1.0)
    bin_h = _divide(roi_h, oh)
    bin_w = _divide(roi_w, ow)
    adaptive = config.sampling_ratio <= 0
    if adaptive:
        cap = config.max_sampling_ratio
        # ceil(roi / out) as torchvision; <= 0 means an empty grid (pools to 0).
        grid_h = jnp.clip(jnp.ceil(bin_h), 0, cap).astype(jnp.int32)
        grid_w = jnp.clip(jnp.ceil(bin_w), 0, cap).astype(jnp.int32)
        n_grid = cap
    else:
        grid_h = grid_w = n_grid = config.sampling_ratio
    y_lo, y_hi, wy_lo, wy_hi = _axis_taps(y1, bin_h, heights, grid_h, oh, n_grid, adaptive)
    x_lo, x_hi, wx_lo, wx_hi = _axis_taps(x1, bin_w, widths, grid_w, ow, n_grid, adaptive)
    base = row_base[:, None, None]
    stride = widths[:, None, None]
    return _Taps(
        rows=(y_lo * stride + base, y_hi * stride + base),
        wy=(wy_lo, wy_hi),
        cols=(x_lo, x_hi),
        wx=(wx_lo, wx_hi),
    )


def _sample_taps(
    taps: _Taps, iy: int | jax.Array, ix: int | jax.Array
) -> list[tuple[jax.Array, jax.Array]]:
    """The 4 (index [M, oh, ow] int32, weight [M, oh, ow] float32) taps of sample (iy, ix)."""
    out = []
    for row, wy in zip(taps.rows, taps.wy, strict=True):
        for col, wx in zip(taps.cols, taps.wx, strict=True):
            index = row[:, :, None, iy] + col[:, None, :, ix]
            weight = wy[:, :, None, iy] * wx[:, None, :, ix]
            out.append((index, weight))
    return out


def _gather_rows(buffer: jax.Array, index: jax.Array) -> jax.Array:
    """Per-image row gather: [B, R, C] buffer, [B * M, ...] rows -> [B * M, ..., C].

    Box ``i`` reads rows of image ``i // M`` only, so with the batch sharded over devices every
    gather stays on the device that holds its image (a flat ``[B * R, C]`` table would make XLA
    all-gather the whole batch's pyramid on every device).
    """
    b = buffer.shape[0]
    per_image = index.reshape(b, -1, *index.shape[1:])
    out = jax.vmap(lambda buf, idx: jnp.take(buf, idx, axis=0, mode="clip"))(buffer, per_image)
    return out.reshape(index.shape + buffer.shape[-1:])


def _scatter_add_rows(grad: jax.Array, index: jax.Array, update: jax.Array) -> jax.Array:
    """Transpose of :func:`_gather_rows`: adds [B * M, ..., C] ``update`` into [B, R, C]."""
    b, c = grad.shape[0], grad.shape[-1]
    return jax.vmap(lambda g, i, u: g.at[i].add(u, mode="clip"))(
        grad, index.reshape(b, -1), update.reshape(b, -1, c)
    )


def _pool(buffer: jax.Array, taps: _Taps, n_grid: int) -> jax.Array:
    """Weighted sum of the gathered taps: [B, R, C] buffer -> [B * M, oh, ow, C] float32."""

    def sample(iy: int | jax.Array, ix: int | jax.Array) -> jax.Array:
        acc = None
        for index, weight in _sample_taps(taps, iy, ix):
            # Row gather of contiguous C-vectors; indices are in range by construction
            # ("clip" only keeps garbage boxes, e.g. NaN, in range too).
            tap = _gather_rows(buffer, index).astype(jnp.float32)
            term = tap * weight[..., None]
            acc = term if acc is None else acc + term
        assert acc is not None
        return acc

    if n_grid * n_grid <= _MAX_UNROLLED_SAMPLES:
        # Unrolled sum over (sample_y, sample_x, tap_y, tap_x): every term is a row gather of
        # [M, oh, ow] contiguous C-vectors times a weight; XLA fuses the whole sum into one
        # elementwise kernel that writes only the output.
        out = None
        for iy in range(n_grid):
            for ix in range(n_grid):
                term = sample(iy, ix)
                out = term if out is None else out + term
        assert out is not None
        return out

    # Large grids: loop over sample rows (bounded program size), one fused kernel per row.
    def body(iy: jax.Array, acc: jax.Array) -> jax.Array:
        for ix in range(n_grid):
            acc = acc + sample(iy, ix)
        return acc

    m, oh = taps.rows[0].shape[:2]
    ow = taps.cols[0].shape[1]
    init = jnp.zeros((m, oh, ow, buffer.shape[-1]), jnp.float32)
    return jax.lax.fori_loop(0, n_grid, body, init)


def _unpool(
    cotangent: jax.Array, taps: _Taps, n_grid: int, buffer_shape: tuple[int, int]
) -> jax.Array:
    """Transpose of :func:`_pool`: [B * M, oh, ow, C] cotangent -> [B, R, C] float32 gradient.

    One running scatter-add per tap (a loop over sample rows keeps the program small), instead
    of autodiff's one zero-initialised buffer per tap summed afterwards. Samples past the last
    one that carries a weight for any box (the adaptive grid is allocated at the cap and masked
    per box, and most boxes use far fewer samples) only ever add zeros, so the loops over sample
    rows and columns stop there: the same sums, without the zero scatters.
    """
    channels = cotangent.shape[-1]
    cotangent = cotangent.astype(jnp.float32)

    def extent(weights: tuple[jax.Array, jax.Array]) -> jax.Array:
        """1 + the last sample index (along one axis) with a nonzero weight for some box."""
        live = jnp.any((weights[0] != 0) | (weights[1] != 0), axis=(0, 1))  # [G]
        return jnp.max(jnp.where(live, jnp.arange(1, n_grid + 1, dtype=jnp.int32), 0))

    def row(iy: jax.Array, grad: jax.Array) -> jax.Array:
        def col(ix: jax.Array, grad: jax.Array) -> jax.Array:
            for index, weight in _sample_taps(taps, iy, ix):
                grad = _scatter_add_rows(grad, index, cotangent * weight[..., None])
            return grad

        return jax.lax.fori_loop(0, extent(taps.wx), col, grad)

    grad = jnp.zeros((*buffer_shape, channels), jnp.float32)
    return jax.lax.fori_loop(0, extent(taps.wy), row, grad)


def _grid_size(config: _Config) -> int:
    return config.sampling_ratio if config.sampling_ratio > 0 else config.max_sampling_ratio


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _roi_align_vjp(buffer, row_base, heights, widths, scales, boxes, config):
    taps = _compute_taps(row_base, heights, widths, scales, boxes, config)
    return _pool(buffer, taps, _grid_size(config))


def _roi_align_fwd(buffer, row_base, heights, widths, scales, boxes, config):
    taps = _compute_taps(row_base, heights, widths, scales, boxes, config)
    # The zero-width array carries the buffer's row count and dtype to the backward pass.
    proto = jnp.zeros((*buffer.shape[:2], 0), buffer.dtype)
    return _pool(buffer, taps, _grid_size(config)), (taps, proto)


def _roi_align_bwd(config, residuals, cotangent):
    taps, proto = residuals
    grad = _unpool(cotangent, taps, _grid_size(config), proto.shape[:2])
    return grad.astype(proto.dtype), None, None, None, None, None


_roi_align_vjp.defvjp(_roi_align_fwd, _roi_align_bwd)


@functools.partial(jax.jit, static_argnames=("config",))
def _roi_align_flat(
    buffer: jax.Array,
    row_base: jax.Array,
    heights: jax.Array,
    widths: jax.Array,
    scales: jax.Array,
    boxes: jax.Array,
    config: _Config,
) -> jax.Array:
    """RoIAlign on per-image flattened channels-last buffers with per-box level geometry.

    Args:
      buffer: [B, R, C] features (any float dtype); box ``i`` reads image ``i // (M / B)``,
        row ``row_base + y * width + x``.
      row_base: [M] int32 first row of each box's map in its image's rows.
      heights, widths: [M] int32 size of each box's map.
      scales: [M] float32 spatial scale of each box's map.
      boxes: [M, 4] float32 (x1, y1, x2, y2) in image pixels, image-major (M = B * N).
      config: output size, sampling ratio, aligned, adaptive-grid cap.

    Returns:
      [M, oh, ow, C] float32. Differentiable w.r.t. ``buffer`` only (as torchvision).
    """
    if config.sampling_ratio <= 0 and config.max_sampling_ratio < 1:
        raise ValueError(f"max_sampling_ratio must be >= 1, got {config.max_sampling_ratio}")
    m = boxes.shape[0]
    row_base, heights, widths = (
        jnp.broadcast_to(jnp.asarray(v, jnp.int32), (m,)) for v in (row_base, heights, widths)
    )
    scales = jnp.broadcast_to(jnp.asarray(scales, jnp.float32), (m,))
    return _roi_align_vjp(buffer, row_base, heights, widths, scales, boxes, config)


def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    aligned: bool = True,
    max_sampling_ratio: int | None = None,
) -> jax.Array:
    """RoIAlign of boxes on one feature map, matching ``torchvision.ops.roi_align``.

    Args:
      features: [B, H, W, C] float32 or bfloat16 feature map (channels last).
      boxes: [B, N, 4] float32 boxes (x1, y1, x2, y2) in image pixels; box ``n`` of image ``b``
        pools from ``features[b]``. Padding boxes (e.g. all zeros) pool finite values; the
        caller masks them with its ``valid`` flags.
      output_size: ``oh`` or ``(oh, ow)``, static.
      spatial_scale: feature-map pixels per image pixel (1 / stride).
      sampling_ratio: samples per bin axis; 0 = adaptive ``ceil(roi / out)`` per box, capped
        at ``max_sampling_ratio`` (see the module docstring). Static.
      aligned: torchvision's ``aligned`` (half-pixel offset; False forces roi size >= 1).
      max_sampling_ratio: static per-axis cap of the adaptive grid (only used when
        ``sampling_ratio == 0``); exact for boxes with ``ceil(roi / out) <= cap``. ``None``:
        ``ceil(sqrt(2) * 28 / min(oh, ow))`` (6 for 7x7), see the module docstring.

    Returns:
      [B, N, oh, ow, C] pooled features, dtype of ``features`` (computed in float32).
    """
    oh, ow = _pair(output_size)
    if max_sampling_ratio is None:
        max_sampling_ratio = _default_cap((oh, ow), _FPN_MAX_SQUARE_ROI)
    b, h, w, c = features.shape
    n = boxes.shape[1]
    if boxes.shape != (b, n, 4):
        raise ValueError(f"boxes must be [B, N, 4] with B={b}, got {boxes.shape}")
    out = _roi_align_flat(
        features.reshape(b, h * w, c),
        0,
        h,
        w,
        spatial_scale,
        boxes.reshape(b * n, 4),
        _Config((oh, ow), int(sampling_ratio), bool(aligned), int(max_sampling_ratio)),
    )
    return out.reshape(b, n, oh, ow, c).astype(features.dtype)


def _log2(x: jax.Array) -> jax.Array:
    """float32 log2 that is exact at powers of two (XLA's log2 is not, e.g. at 2**13)."""
    mantissa, exponent = jnp.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    return exponent.astype(jnp.float32) + jnp.log2(mantissa)


def assign_levels(
    boxes: jax.Array,
    min_level: int = 2,
    max_level: int = 5,
    canonical_box_size: float = 224.0,
    canonical_level: int = 4,
    level_mapper: LevelMapper = "detectron2",
) -> jax.Array:
    """FPN level of each box (FPN paper eq. 1), as an index into ``min_level..max_level``.

    ``"detectron2"`` (ROIPooler): ``floor(k0 + log2(sqrt(area) / s0 + 1e-8))``;
    ``"torchvision"`` (LevelMapper): ``floor(k0 + log2(sqrt(area) / s0) + 1e-6)``; both in
    float32 and clamped to ``[min_level, max_level]``, with area ``(x2 - x1) * (y2 - y1)``.
    Boxes whose size is NaN (negative area) go to ``min_level``.

    Args:
      boxes: [..., 4] float32 boxes (x1, y1, x2, y2) in image pixels.
      min_level, max_level: the available pyramid levels (P2..P5 -> 2, 5).
      canonical_box_size: s0 (224).
      canonical_level: k0 (4).
      level_mapper: which library's formula to reproduce.

    Returns:
      [...] int32 level index in ``[0, max_level - min_level]``.
    """
    boxes = boxes.astype(jnp.float32)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    size = jnp.sqrt(area)
    if level_mapper == "detectron2":
        level = jnp.floor(canonical_level + _log2(size / canonical_box_size + 1e-8))
    elif level_mapper == "torchvision":
        level = jnp.floor(canonical_level + _log2(size / canonical_box_size) + 1e-6)
    else:
        raise ValueError(f"unknown level_mapper {level_mapper!r}")
    level = jnp.where(jnp.isnan(level), min_level, level)
    level = jnp.clip(level, min_level, max_level)
    return level.astype(jnp.int32) - min_level


def multilevel_roi_align(
    features: Sequence[jax.Array],
    boxes: jax.Array,
    output_size: int | Sequence[int],
    strides: Sequence[int] = (4, 8, 16, 32),
    sampling_ratio: int = 0,
    aligned: bool = True,
    canonical_box_size: float = 224.0,
    canonical_level: int = 4,
    max_sampling_ratio: int | None = None,
    level_mapper: LevelMapper = "detectron2",
) -> jax.Array:
    """Multi-level (FPN) RoIAlign: each box pooled once, from its assigned level.

    The levels are flattened channels-last and concatenated into one ``[B, sum(Hl * Wl), C]``
    buffer; every box gathers from it with its level's row offset, size and scale, so the cost is
    that of a single-level RoIAlign over all boxes (plus one copy of the pyramid).

    Args:
      features: per level [B, Hl, Wl, C] maps (e.g. P2..P5), same B, C and dtype.
      boxes: [B, N, 4] float32 boxes (x1, y1, x2, y2) in image pixels.
      output_size: ``oh`` or ``(oh, ow)``, static.
      strides: stride of each level, consecutive powers of two (level = log2(stride)).
      sampling_ratio: as in :func:`roi_align` (0 = adaptive, capped at ``max_sampling_ratio``).
      aligned: as in :func:`roi_align`. torchvision's ``MultiScaleRoIAlign`` uses False.
      canonical_box_size: s0 of the level mapping (224).
      canonical_level: k0 of the level mapping (4).
      max_sampling_ratio: static per-axis cap of the adaptive grid. ``None``: exact for every
        box of aspect ratio up to 2:1 on its assigned level, ``ceil(sqrt(2) * R / min(oh, ow))``
        with ``R = 2 * canonical_box_size / 2**canonical_level`` (6 for 7x7, 3 for 14x14).
      level_mapper: ``"detectron2"`` (default) or ``"torchvision"``; see :func:`assign_levels`.

    Returns:
      [B, N, oh, ow, C] pooled features, dtype of ``features[0]`` (computed in float32).
    """
    oh, ow = _pair(output_size)
    features = list(features)
    if len(features) != len(strides) or not features:
        raise ValueError(f"got {len(features)} feature maps for strides {tuple(strides)}")
    levels = [math.log2(s) for s in strides]
    min_level = round(levels[0])
    if any(abs(lv - (min_level + i)) > 1e-9 for i, lv in enumerate(levels)):
        raise ValueError(f"strides must be consecutive powers of two, got {tuple(strides)}")
    if max_sampling_ratio is None:
        max_sampling_ratio = _default_cap((oh, ow), 2.0 * canonical_box_size / 2.0**canonical_level)
    b, _, _, c = features[0].shape
    n = boxes.shape[1]
    if boxes.shape != (b, n, 4):
        raise ValueError(f"boxes must be [B, N, 4] with B={b}, got {boxes.shape}")
    dtype = features[0].dtype
    heights = [f.shape[1] for f in features]
    widths = [f.shape[2] for f in features]
    for f in features:
        if f.shape[0] != b or f.shape[3] != c:
            raise ValueError(f"all levels must be [B={b}, Hl, Wl, C={c}], got {f.shape}")
    level_rows = [h * w for h, w in zip(heights, widths, strict=True)]
    # [B, sum(Hl*Wl), C]; row of (level l, y, x) in its image's rows = off_l + y*Wl + x.
    buffer = jnp.concatenate(
        [f.astype(dtype).reshape(b, r, c) for f, r in zip(features, level_rows, strict=True)],
        axis=1,
    )
    level = assign_levels(
        boxes,
        min_level=min_level,
        max_level=min_level + len(features) - 1,
        canonical_box_size=canonical_box_size,
        canonical_level=canonical_level,
        level_mapper=level_mapper,
    ).reshape(b * n)
    offsets = [0]
    for r in level_rows[:-1]:
        offsets.append(offsets[-1] + r)
    row_base = jnp.asarray(offsets, jnp.int32)[level]
    heights_box = jnp.asarray(heights, jnp.int32)[level]
    widths_box = jnp.asarray(widths, jnp.int32)[level]
    scales_box = jnp.asarray([1.0 / s for s in strides], jnp.float32)[level]
    out = _roi_align_flat(
        buffer,
        row_base,
        heights_box,
        widths_box,
        scales_box,
        boxes.reshape(b * n, 4),
        _Config((oh, ow), int(sampling_ratio), bool(aligned), int(max_sampling_ratio)),
    )
    return out.reshape(b, n, oh, ow, c).astype(dtype)
