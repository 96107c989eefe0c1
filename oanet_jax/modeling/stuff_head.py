"""The stuff branch of OANet (paper section 3.1, Fig. 3).

On each FPN level the branch takes the *shared* RPN 3x3 feature map (the "skip-connection" conv of
the RPN head, shared by both branches), stacks two 3x3 convs, upsamples every level to stride 4
(bilinear, PyTorch ``align_corners=False``: `oanet_jax.ops.resize.resize_bilinear`),
concatenates them, and applies one 3x3 conv and one 1x1 conv that predicts logits for ALL
panoptic classes (stuff and things, "object context", Table 2 of the paper).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oanet_jax.modeling.layers import Conv2D, make_norm, xavier_fill
from oanet_jax.ops.resize import resize_bilinear

Array = jax.Array


class StuffHead(nn.Module):
    """Per-level 2x(3x3 conv), upsample to stride 4, concat, 3x3 conv, 1x1 conv -> class logits."""

    num_classes: int
    """Number of output classes: all panoptic classes (133 on COCO), things included."""
    channels: int = 128
    """Channels of every conv of the branch before the final 1x1 classifier."""
    norm: str = "group_norm"
    """Normalisation after each 3x3 conv: 'group_norm' | 'batch_norm' | 'frozen_bn' | 'none'."""
    num_groups: int = 32
    """Groups of the GroupNorm (reduced to gcd(num_groups, channels))."""
    dtype: Any = jnp.float32
    """Compute dtype; the logits are returned in float32."""
    param_dtype: Any = jnp.float32
    """Dtype of the stored parameters."""

    def _conv_norm_relu(self, x: Array, name: str, kernel: int, train: bool) -> Array:
        x = Conv2D(
            self.channels,
            kernel,
            use_bias=self.norm == "none",
            kernel_init=xavier_fill,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )(x)
        if self.norm != "none":
            x = make_norm(
                self.norm,
                name=f"{name}_norm",
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                num_groups=self.num_groups,
            )(x, train=train)
        return nn.relu(x)

    @nn.compact
    def __call__(self, features: Sequence[Array], train: bool = False) -> dict[str, Array]:
        """Predicts stuff+thing logits at stride 4.

        Args:
          features: the shared RPN 3x3 feature maps, finest first: [B, H/4, W/4, C] (P2),
            [B, H/8, W/8, C] (P3), ... The first one fixes the output resolution.
          train: training mode (matters only for 'batch_norm').

        Returns:
          dict with 'logits': [B, H/4, W/4, num_classes] float32, and 'features': the
          concatenated, upsampled [B, H/4, W/4, channels * levels] map in the compute dtype.
        """
        size = features[0].shape[1:3]
        per_level = []
        for level, f in enumerate(features):
            x = self._conv_norm_relu(f, f"level{level}_conv0", 3, train)
            x = self._conv_norm_relu(x, f"level{level}_conv1", 3, train)
            per_level.append(resize_bilinear(x, size))
        x = jnp.concatenate(per_level, axis=-1)
        fused = self._conv_norm_relu(x, "fuse_conv", 3, train)
        logits = Conv2D(
            self.num_classes,
            1,
            kernel_init=nn.initializers.normal(0.01),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="predictor",
        )(fused)
        return {"logits": logits.astype(jnp.float32), "features": x}
