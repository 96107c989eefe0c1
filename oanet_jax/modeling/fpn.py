"""Feature Pyramid Network (Lin et al. 2017) as torchvision's / detectron2's, NHWC, flax.linen.

Lateral 1x1 convs and output 3x3 convs (both with bias, no norm), top-down pathway with nearest
upsampling to the lateral's size (torchvision's ``F.interpolate(size=lateral.shape[-2:])``, which
is exactly x2 for even sizes and handles odd sizes), and P6 = max-pool(kernel 1, stride 2) of P5
(``LastLevelMaxPool``).

Variable layout (what `oanet_jax.convert.torchvision` fills)::

    lateral{2..5}/{kernel,bias}, output{2..5}/{kernel,bias}

Outputs ``{'p2', ..., 'p6'}`` with strides 4, 8, 16, 32, 64 (level k: the input named ``res{k}``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oanet_jax.modeling import layers

Array = jax.Array
Dtype = Any


def upsample_nearest_to(x: Array, size: tuple[int, int]) -> Array:
    """Nearest-neighbour resize to `size`, as ``torch.nn.functional.interpolate(mode='nearest')``.

    Output pixel i reads input pixel ``floor(i * in / out)`` (exact integer arithmetic; for the
    in/out ratios of an FPN this equals PyTorch's float computation).

    Args:
      x: [B, h, w, C].
      size: (H, W) static output size.

    Returns:
      [B, H, W, C], dtype of `x`.
    """
    h, w = x.shape[1:3]
    out_h, out_w = size
    if (out_h, out_w) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (np.arange(out_h) * h) // out_h
    cols = (np.arange(out_w) * w) // out_w
    return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


class FPN(nn.Module):
    """Feature pyramid on top of a backbone's feature dict.

    Call ``FPN(...)(features)`` with ``features`` holding the `in_features` maps
    (``res{k}: [B, H_k, W_k, C_k]``, each level half the size of the previous, rounded up);
    returns ``{'p{k}': [B, H_k, W_k, features]}`` for every input level, plus
    ``'p{k_max + 1}': [B, ceil(H/2), ceil(W/2), features]`` when `top_block_maxpool`.
    """

    features: int = 256
    """Channels of every output level."""
    in_features: Sequence[str] = ("res2", "res3", "res4", "res5")
    """Backbone outputs used, finest first, named ``res{k}`` (k = log2 of the stride)."""
    top_block_maxpool: bool = True
    """Add P6 = max_pool(P5, kernel 1, stride 2) (detectron2/torchvision LastLevelMaxPool)."""
    dtype: Dtype = jnp.float32
    """Compute dtype; the outputs have it."""
    param_dtype: Dtype = jnp.float32
    """Parameter dtype."""

    def level_names(self) -> tuple[str, ...]:
        """Output names, finest first, e.g. ('p2', 'p3', 'p4', 'p5', 'p6')."""
        levels = [_level(n) for n in self.in_features]
        if self.top_block_maxpool:
            levels.append(levels[-1] + 1)
        return tuple(f"p{k}" for k in levels)

    @nn.compact
    def __call__(self, feats: Mapping[str, Array]) -> dict[str, Array]:
        """Builds the pyramid.

        Args:
          feats: dict with at least `in_features`: 'res{k}' -> [B, H_k, W_k, C_k].

        Returns:
          Dict 'p{k}' -> [B, H_k, W_k, features] `dtype` (see the class docstring).
        """
        levels = [_level(n) for n in self.in_features]
        conv = lambda k, name: layers.Conv2D(
            self.features,
            k,
            1,
            use_bias=True,
            kernel_init=layers.xavier_fill,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        outputs: dict[str, Array] = {}
        top = None
        for name, k in reversed(list(zip(self.in_features, levels, strict=True))):
            lateral = conv(1, f"lateral{k}")(feats[name])
            if top is not None:
                lateral = lateral + upsample_nearest_to(top, lateral.shape[1:3])
            top = lateral
            outputs[f"p{k}"] = conv(3, f"output{k}")(lateral)
        outputs = {f"p{k}": outputs[f"p{k}"] for k in levels}
        if self.top_block_maxpool:
            outputs[f"p{levels[-1] + 1}"] = outputs[f"p{levels[-1]}"][:, ::2, ::2, :]
        return outputs


def _level(name: str) -> int:
    if not (name.startswith("res") and name[3:].isdigit()):
        raise ValueError(f"FPN input names must be 'res<k>', got {name!r}.")
    return int(name[3:])
