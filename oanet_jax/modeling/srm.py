"""The spatial ranking module (SRM) of OANet (paper section 3.2, Fig. 4, Eq. 2-3).

Instance masks are pasted into a zero canvas with one channel per thing class (value 1 wherever
an instance of that class covers the pixel), a large-kernel convolution block (the GCN block of
the paper's ref. [34]: 1xk then kx1, plus kx1 then 1xk, summed) turns the canvas into a ranking
score map S, a softmax over thing classes. The ranking score of an instance is the mean of
S[..., its class] over its mask (Eq. 3; the paper's Eq. 4 has m inverted, here m = 1 inside the
instance).

Everything is static-shape: instances are padded to N with a `valid` mask, and padded instances
paste nothing and get a ranking score of 0.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oanet_jax.modeling.layers import Conv2D, xavier_fill
from oanet_jax.ops import masks as mask_ops

Array = jax.Array

SRM_KERNELS = ("large", "3x3", "1x1")
SRM_TRAIN_MASKS = ("gt", "predicted", "both")
"""What the SRM canvas is built from in training (`config.model.srm.train_masks`, resolved)."""


def paste_instances(
    masks: Array,
    boxes: Array,
    valid: Array,
    image_size: tuple[int, int],
    stride: int,
    threshold: float = 0.5,
) -> Array:
    """Pastes box-frame masks into binary image-space masks at an output stride.

    Args:
      masks: [B, N, M, M] float box-frame masks (probabilities or 0/1).
      boxes: [B, N, 4] float32 (x1, y1, x2, y2) in padded-image pixels.
      valid: [B, N] bool; invalid instances give all-zero masks.
      image_size: (H, W) static padded image size.
      stride: static output stride (4 for the SRM canvas).
      threshold: a pixel is inside when the pasted soft mask is >= threshold.

    Returns:
      [B, N, h, w] float32 in {0, 1}, h = ceil(H / stride), w = ceil(W / stride).
    """
    paste = jax.vmap(lambda m, b: mask_ops.paste_masks(m, b, image_size, stride))
    soft = paste(masks.astype(jnp.float32), boxes.astype(jnp.float32))
    return ((soft >= threshold) & valid[:, :, None, None]).astype(jnp.float32)


def build_canvas(instance_masks: Array, classes: Array, valid: Array, num_classes: int) -> Array:
    """The SRM input: one channel per thing class, 1 where an instance of that class lies.

    Args:
      instance_masks: [B, N, h, w] float32 binary masks (from `paste_instances`).
      classes: [B, N] int32 contiguous thing class ids in [0, num_classes).
      valid: [B, N] bool.
      num_classes: number of thing classes T.

    Returns:
      [B, h, w, T] float32 in {0, 1}.
    """
    onehot = jax.nn.one_hot(classes, num_classes, dtype=jnp.float32) * valid[..., None]
    counts = jnp.einsum("bnhw,bnt->bhwt", instance_masks, onehot)
    return jnp.minimum(counts, 1.0)


def conflict_mask(canvas: Array) -> Array:
    """Pixels where instances of two or more DIFFERENT thing classes lie (the SRM's supervision).

    The paper's Fig. 4: a conflict is a pixel with several active canvas channels. Two instances
    of one class overlap in one channel only, so such a pixel carries no ordering information
    for a per-class score map and is not a conflict.

    Args:
      canvas: [B, h, w, T] float32 in {0, 1} (`build_canvas`).

    Returns:
      [B, h, w] bool.
    """
    return jnp.sum(canvas, axis=-1) >= 2.0


def _window3x3(x: Array, op: str) -> Array:
    """3x3 min ('erode') or max ('dilate') over the two spatial axes of [B, h, w, ...] arrays.

    Outside the map counts as neither (the window is cut at the border), so a mask that runs
    off the canvas edge is not eroded there.
    """
    init, fn = (jnp.inf, jax.lax.min) if op == "erode" else (-jnp.inf, jax.lax.max)
    window = (1, 3, 3) + (1,) * (x.ndim - 3)
    return jax.lax.reduce_window(x, init, fn, window, (1,) * x.ndim, "SAME")


def split_conflicts(canvas: Array) -> tuple[Array, Array]:
    """Splits the conflict pixels of a canvas into genuine overlaps and resampling seams.

    A *seam* is a conflict pixel of an overlap at most two canvas pixels thick: masks that only
    touch (the visible panoptic segments, which never overlap at full resolution) overlap by
    a pixel or two once cropped to their boxes, resampled and pasted back at the SRM stride.
    Measured as: erode every class channel with a 3x3 min (a mask loses its one-pixel rim), the
    *core* is the conflict set of the eroded canvas (an overlap at least three pixels thick
    keeps one there), and a conflict pixel is *genuine* when it lies within one pixel (3x3
    dilation) of the core, a *seam* otherwise. Two masks pasted at the SRM stride that overlap
    by at least 3 * stride image pixels give genuine pixels only; masks that abut at full
    resolution give seams only (tests/modeling/test_srm_training.py checks both).

    Args:
      canvas: [B, h, w, T] float32 in {0, 1} (`build_canvas`).

    Returns:
      (genuine, seam): [B, h, w] bool each, disjoint, their union `conflict_mask(canvas)`.
    """
    conflict = conflict_mask(canvas)
    core = conflict_mask(_window3x3(canvas, "erode"))
    near_core = _window3x3(core.astype(jnp.float32), "dilate") > 0
    genuine = conflict & near_core
    return genuine, conflict & ~near_core


def ranking_scores(score_map: Array, instance_masks: Array, classes: Array, valid: Array) -> Array:
    """Per-instance ranking score, Eq. 3: the mean of S[..., class] over the instance's mask.

    Args:
      score_map: [B, h, w, T] float32 probabilities over thing classes (softmax of the SRM).
      instance_masks: [B, N, h, w] float32 binary masks at the score map's resolution.
      classes: [B, N] int32 thing class ids.
      valid: [B, N] bool.

    Returns:
      [B, N] float32; 0 for invalid instances and for empty masks.
    """
    onehot = jax.nn.one_hot(classes, score_map.shape[-1], dtype=jnp.float32)
    per_class = jnp.einsum("bhwt,bnt->bnhw", score_map.astype(jnp.float32), onehot)
    num = jnp.sum(per_class * instance_masks, axis=(2, 3))
    den = jnp.sum(instance_masks, axis=(2, 3))
    score = jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0)
    return jnp.where(valid, score, 0.0)


class SpatialRankingModule(nn.Module):
    """Canvas [B, h, w, T] -> ranking logits [B, h, w, T] (softmax over T = score map S)."""

    num_classes: int
    """Number of thing classes T (canvas and output channels)."""
    kernel: str = "large"
    """'large' (GCN block: 1xk->kx1 plus kx1->1xk, summed), '3x3' or '1x1' (Table 5)."""
    kernel_size: int = 7
    """k of the large-kernel block."""
    hidden: int = 0
    """Channels between the two convs of each large-kernel branch; 0 = num_classes."""
    dtype: Any = jnp.float32
    """Compute dtype; logits are returned in float32."""
    param_dtype: Any = jnp.float32
    """Dtype of the stored parameters."""

    @nn.compact
    def __call__(self, canvas: Array) -> Array:
        """Computes the ranking logits.

        Args:
          canvas: [B, h, w, T] float32 in {0, 1} (from `build_canvas`).

        Returns:
          [B, h, w, T] float32 logits; `jax.nn.softmax(logits, -1)` is the score map S.
        """
        t = self.num_classes
        k = self.kernel_size
        conv = lambda feat, ks, name: Conv2D(
            feat,
            ks,
            kernel_init=xavier_fill,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        if self.kernel == "large":
            hidden = self.hidden or t
            a = conv(t, (k, 1), "right_kx1")(conv(hidden, (1, k), "right_1xk")(canvas))
            b = conv(t, (1, k), "left_1xk")(conv(hidden, (k, 1), "left_kx1")(canvas))
            logits = a + b
        elif self.kernel == "3x3":
            logits = conv(t, 3, "conv3x3")(canvas)
        elif self.kernel == "1x1":
            logits = conv(t, 1, "conv1x1")(canvas)
        else:
            raise ValueError(f"Unknown SRM kernel {self.kernel!r}; expected one of {SRM_KERNELS}.")
        return logits.astype(jnp.float32)
