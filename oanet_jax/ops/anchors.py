"""FPN anchors for a fixed (padded) image size, laid out like detectron2's DefaultAnchorGenerator.

Anchors depend only on static quantities (image size, strides, sizes, ratios), so they are built
with numpy at trace time, cached, and returned as float32 ``jnp`` constants: calling these
functions inside ``jax.jit`` embeds them in the program and costs nothing at run time.

Layout, per level with stride ``s`` and feature map ``Hl x Wl``:

* Feature sizes are ``Hl = ceil(H / s)``, ``Wl = ceil(W / s)``. This is what a ResNet/FPN with
  "SAME"-style (or torch-style ``padding = k // 2``) stride-2 convs produces, and equals
  ``H / s`` exactly when the image is padded to a multiple of 32 (P6 is a stride-2 subsample of
  P5: ceil(ceil(H/32)/2) = ceil(H/64)).
* Cell anchors: for every size (outer loop) and aspect ratio (inner loop),
  ``w = sqrt(size**2 / ratio)``, ``h = ratio * w`` (ratio = h / w), as the box
  ``(-w/2, -h/2, w/2, h/2)`` centred at 0; rounded to float32.
* Shifts: cell ``(y, x)`` moves the cell anchors by ``(x * s + offset * s, y * s + offset * s)``.
  ``offset=0`` (detectron2's default, and the config's ``model.rpn.anchor_offset``) puts anchor
  centres on the top-left corner of each stride-s cell, i.e. at pixel coordinates ``0, s, 2s, ...``;
  ``offset=0.5`` puts them at cell centres ``s/2, 3s/2, ...``.
* Order: location-major, ``y`` outer, ``x`` inner, then the ``A`` cell anchors, so anchor
  ``((y * Wl + x) * A + a)`` belongs to feature position ``(y, x)`` and channel ``a`` of a head
  output of shape ``[Hl, Wl, A]``. Reshaping an NHWC head output ``[B, Hl, Wl, A * k]`` to
  ``[B, Hl * Wl * A, k]`` lines up with these anchors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray

DEFAULT_STRIDES = (4, 8, 16, 32, 64)
DEFAULT_SIZES = (32, 64, 128, 256, 512)
DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)


def feature_sizes(image_size: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """Feature map sizes ``(ceil(H / s), ceil(W / s))`` for each stride.

    Args:
      image_size: (H, W) of the padded input image, Python ints.
      strides: one stride per level, e.g. (4, 8, 16, 32, 64).

    Returns:
      A list of (Hl, Wl) Python int tuples, one per level.
    """
    h, w = (int(v) for v in image_size)
    return [(math.ceil(h / s), math.ceil(w / s)) for s in strides]


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """Zero-centred anchors for every (size, aspect ratio), sizes in the outer loop.

    Args:
      sizes: anchor sizes (sqrt of the area) in pixels.
      aspect_ratios: height / width ratios.

    Returns:
      [len(sizes) * len(aspect_ratios), 4] float32 numpy array (x1, y1, x2, y2).
    """
    out = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / float(ratio))
            h = float(ratio) * w
            out.append((-w / 2.0, -h / 2.0, w / 2.0, h / 2.0))
    return np.asarray(out, dtype=np.float64).astype(np.float32).reshape(-1, 4)


def grid_anchors(
    feature_size: Sequence[int], stride: int, cells: np.ndarray, offset: float = 0.0
) -> np.ndarray:
    """Shift cell anchors over a feature grid, location-major (y, x), then anchor.

    Args:
      feature_size: (Hl, Wl) of the level.
      stride: the level's stride in pixels.
      cells: [A, 4] float32 zero-centred cell anchors (see :func:`cell_anchors`).
      offset: shift of anchor centres in units of the stride (0 = cell corner, 0.5 = centre).

    Returns:
      [Hl * Wl * A, 4] float32 numpy array.
    """
    hl, wl = (int(v) for v in feature_size)
    start = np.float32(offset * stride)
    shift_x = np.arange(wl, dtype=np.float32) * np.float32(stride) + start
    shift_y = np.arange(hl, dtype=np.float32) * np.float32(stride) + start
    sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")
    sx = sx.reshape(-1)
    sy = sy.reshape(-1)
    shifts = np.stack([sx, sy, sx, sy], axis=1)
    cells = np.asarray(cells, dtype=np.float32)
    return (shifts[:, None, :] + cells[None, :, :]).reshape(-1, 4)


def _is_seq(x: object) -> bool:
    return isinstance(x, Sequence | np.ndarray) and not isinstance(x, str)


def _per_level_sizes(sizes: Sequence, num_levels: int) -> list[tuple[float, ...]]:
    if len(sizes) != num_levels:
        raise ValueError(f"need one anchor size (or list of sizes) per level: {sizes!r}")
    return [tuple(float(v) for v in s) if _is_seq(s) else (float(s),) for s in sizes]


def _per_level_ratios(aspect_ratios: Sequence, num_levels: int) -> list[tuple[float, ...]]:
    if len(aspect_ratios) > 0 and _is_seq(aspect_ratios[0]):
        if len(aspect_ratios) != num_levels:
            raise ValueError(f"need one list of aspect ratios per level: {aspect_ratios!r}")
        return [tuple(float(v) for v in r) for r in aspect_ratios]
    return [tuple(float(v) for v in aspect_ratios)] * num_levels


@functools.lru_cache(maxsize=64)
def _fpn_anchors_np(
    image_size: tuple[int, int],
    strides: tuple[int, ...],
    sizes: tuple[tuple[float, ...], ...],
    aspect_ratios: tuple[tuple[float, ...], ...],
    offset: float,
) -> tuple[np.ndarray, ...]:
    levels = []
    for fs, stride, s, r in zip(
        feature_sizes(image_size, strides), strides, sizes, aspect_ratios, strict=True
    ):
        a = grid_anchors(fs, stride, cell_anchors(s, r), offset)
        a.setflags(write=False)
        levels.append(a)
    return tuple(levels)


def fpn_anchors(
    image_size: Sequence[int],
    strides: Sequence[int] = DEFAULT_STRIDES,
    sizes: Sequence = DEFAULT_SIZES,
    aspect_ratios: Sequence = DEFAULT_ASPECT_RATIOS,
    offset: float = 0.0,
) -> list[Array]:
    """Anchors for every FPN level of a fixed-size (padded) image.

    Args:
      image_size: (H, W) of the padded input, Python ints.
      strides: one stride per level (P2..P6: 4, 8, 16, 32, 64).
      sizes: one entry per level: a number (one size, as Panoptic FPN: 32..512) or a sequence of
        sizes for that level.
      aspect_ratios: height/width ratios shared by all levels (flat sequence), or one sequence
        per level.
      offset: anchor-centre offset in units of the stride (see the module docstring).

    Returns:
      A list with one [Hl * Wl * A_l, 4] float32 array per level, where
      ``(Hl, Wl) = (ceil(H / s), ceil(W / s))`` and ``A_l = len(sizes_l) * len(ratios_l)``;
      location-major (y, x) then anchor, matching detectron2's DefaultAnchorGenerator.
    """
    strides = tuple(int(s) for s in strides)
    levels = _fpn_anchors_np(
        tuple(int(v) for v in image_size),
        strides,
        tuple(_per_level_sizes(sizes, len(strides))),
        tuple(_per_level_ratios(aspect_ratios, len(strides))),
        float(offset),
    )
    return [jnp.asarray(a) for a in levels]


def fpn_anchors_concat(
    image_size: Sequence[int],
    strides: Sequence[int] = DEFAULT_STRIDES,
    sizes: Sequence = DEFAULT_SIZES,
    aspect_ratios: Sequence = DEFAULT_ASPECT_RATIOS,
    offset: float = 0.0,
) -> Array:
    """All levels of :func:`fpn_anchors` concatenated in level order (P2 first).

    Args:
      image_size, strides, sizes, aspect_ratios, offset: as in :func:`fpn_anchors`.

    Returns:
      [sum_l Hl * Wl * A_l, 4] float32 anchors (x1, y1, x2, y2).
    """
    return jnp.concatenate(fpn_anchors(image_size, strides, sizes, aspect_ratios, offset), axis=0)


def num_anchors_per_level(
    image_size: Sequence[int],
    strides: Sequence[int] = DEFAULT_STRIDES,
    sizes: Sequence = DEFAULT_SIZES,
    aspect_ratios: Sequence = DEFAULT_ASPECT_RATIOS,
) -> list[int]:
    """Number of anchors of each level, ``Hl * Wl * A_l`` (Python ints).

    Args:
      image_size, strides, sizes, aspect_ratios: as in :func:`fpn_anchors`.

    Returns:
      One int per level.
    """
    n = len(strides)
    per_s = _per_level_sizes(sizes, n)
    per_r = _per_level_ratios(aspect_ratios, n)
    return [
        hl * wl * len(s) * len(r)
        for (hl, wl), s, r in zip(feature_sizes(image_size, strides), per_s, per_r, strict=True)
    ]
