"""Resampling conventions, one home each (TF Model Garden's spatial_transform_ops in spirit).

* Nearest neighbour, pixel-centre rule: output index ``dst`` of a length-``out_size`` axis reads
  input index ``floor((dst + 0.5) * in_size / out_size)``, computed exactly in integers as
  ``((2 * dst + 1) * in_size) // (2 * out_size)`` (float formulas and PIL's fixed point can differ
  at exact ties). Used for label maps (data), id maps back to the original image (evaluation,
  prediction) on the host and on device.
* Bilinear upsampling with PyTorch ``F.interpolate(..., mode='bilinear', align_corners=False)``
  semantics (added with the stuff head / losses / merge consolidation).

Functions take numpy or jax arrays where stated; shapes are in the docstrings.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["nearest_indices", "nearest_source_index"]


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
