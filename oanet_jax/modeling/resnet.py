"""ResNet backbones (torchvision / detectron2 "pytorch style"), NHWC, flax.linen.

ResNet-18/34 (basic blocks), ResNet-50/101 (bottleneck blocks, the stride in the 3x3 conv) and a
narrow ``tiny`` variant for test configs. The module returns a dict of named feature maps:

====== ======= ===========================================
name   stride  channels (resnet50/101 | resnet18/34 | tiny)
====== ======= ===========================================
stem   4       64 | 64 | 8       (conv 7x7/2, norm, relu, max-pool 3x3/2 pad 1)
res2   4       256 | 64 | 8
res3   8       512 | 128 | 16
res4   16      1024 | 256 | 32
res5   32      2048 | 512 | 64
====== ======= ===========================================

Variable layout (what `oanet_jax.convert.torchvision` fills)::

    stem_conv/kernel, stem_norm/*
    res{2..5}/block{i}/conv{1,2[,3]}/kernel, .../norm{1,2[,3]}/*
    res{2..5}/block0/shortcut_conv/kernel, .../shortcut_norm/*     (projection shortcut)

Freezing (detectron2's ``MODEL.BACKBONE.FREEZE_AT``): ``freeze_at = k`` freezes the stem (k >= 1)
and ``res2 .. res{k}`` (k >= 2). The output of every frozen stage goes through
``jax.lax.stop_gradient``, so no backward pass runs through frozen stages and their parameters get
exactly zero gradient; their normalisation layers always run in inference mode (detectron2
converts them to FrozenBatchNorm). The optimizer should additionally mask the frozen parameters
(weight decay would otherwise still move them): use `frozen_param_mask`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oanet_jax.modeling import layers

Array = jax.Array
Dtype = Any

STAGE_NAMES = ("res2", "res3", "res4", "res5")
BLOCK_KINDS = ("basic", "bottleneck")


class BasicBlock(nn.Module):
    """Two 3x3 convs (stride in the first) plus the identity or a 1x1 projection shortcut."""

    features: int
    """Output channels (= inner channels)."""
    strides: int = 1
    """Stride of the first 3x3 conv and of the projection shortcut."""
    norm: str = "frozen_bn"
    """'frozen_bn' | 'batch_norm' | 'group_norm'."""
    num_groups: int = 32
    """Groups of 'group_norm'."""
    dtype: Dtype = jnp.float32
    """Compute dtype."""
    param_dtype: Dtype = jnp.float32
    """Parameter dtype."""

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Args: x: [B, H, W, Cin]. Returns: [B, ceil(H/s), ceil(W/s), features] `dtype`."""
        conv = functools.partial(
            layers.Conv2D, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
        )
        norm = functools.partial(
            layers.make_norm,
            self.norm,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            num_groups=self.num_groups,
        )
        y = conv(self.features, 3, self.strides, name="conv1")(x)
        y = nn.relu(norm(name="norm1")(y, train))
        y = conv(self.features, 3, 1, name="conv2")(y)
        y = norm(name="norm2")(y, train)
        shortcut = x.astype(self.dtype)
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, 1, self.strides, name="shortcut_conv")(x)
            shortcut = norm(name="shortcut_norm")(shortcut, train)
        return nn.relu(y + shortcut)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (stride here, "pytorch style") -> 1x1 x expansion, plus the shortcut."""

    features: int
    """Inner (bottleneck) channels; the output has ``features * expansion``."""
    strides: int = 1
    """Stride of the 3x3 conv and of the projection shortcut."""
    expansion: int = 4
    """Output channels / inner channels."""
    norm: str = "frozen_bn"
    """'frozen_bn' | 'batch_norm' | 'group_norm'."""
    num_groups: int = 32
    """Groups of 'group_norm'."""
    dtype: Dtype = jnp.float32
    """Compute dtype."""
    param_dtype: Dtype = jnp.float32
    """Parameter dtype."""

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Args: x: [B, H, W, Cin]. Returns: [B, ceil(H/s), ceil(W/s), 4 features] `dtype`."""
        conv = functools.partial(
            layers.Conv2D, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
        )
        norm = functools.partial(
            layers.make_norm,
            self.norm,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            num_groups=self.num_groups,
        )
        out = self.features * self.expansion
        y = conv(self.features, 1, 1, name="conv1")(x)
        y = nn.relu(norm(name="norm1")(y, train))
        y = conv(self.features, 3, self.strides, name="conv2")(y)
        y = nn.relu(norm(name="norm2")(y, train))
        y = conv(out, 1, 1, name="conv3")(y)
        y = norm(name="norm3")(y, train)
        shortcut = x.astype(self.dtype)
        if self.strides != 1 or x.shape[-1] != out:
            shortcut = conv(out, 1, self.strides, name="shortcut_conv")(x)
            shortcut = norm(name="shortcut_norm")(shortcut, train)
        return nn.relu(y + shortcut)


class ResNetStage(nn.Module):
    """A stage of `num_blocks` residual blocks; the first one carries the stride."""

    block: str
    """'basic' | 'bottleneck'."""
    num_blocks: int
    """Number of blocks."""
    features: int
    """Inner channels of each block (output: x4 for bottleneck)."""
    strides: int
    """Stride of the first block."""
    norm: str = "frozen_bn"
    """'frozen_bn' | 'batch_norm' | 'group_norm'."""
    num_groups: int = 32
    """Groups of 'group_norm'."""
    dtype: Dtype = jnp.float32
    """Compute dtype."""
    param_dtype: Dtype = jnp.float32
    """Parameter dtype."""

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Args: x: [B, H, W, Cin]. Returns: [B, ceil(H/s), ceil(W/s), Cout] `dtype`."""
        cls = {"basic": BasicBlock, "bottleneck": BottleneckBlock}[self.block]
        for i in range(self.num_blocks):
            x = cls(
                features=self.features,
                strides=self.strides if i == 0 else 1,
                norm=self.norm,
                num_groups=self.num_groups,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"block{i}",
            )(x, train)
        return x


class ResNet(nn.Module):
    """ResNet backbone returning the stem and the four stage outputs.

    Call ``ResNet(...)(images, train)`` with ``images: [B, H, W, C_in]`` (already normalised);
    returns ``{'stem', 'res2', 'res3', 'res4', 'res5'}`` of shapes ``[B, ceil(H/s), ceil(W/s),
    C]`` with the strides 4, 4, 8, 16, 32 (ceil at each stride-2 step; for H a multiple of 32
    exactly H/s) in `dtype`.
    """

    stage_sizes: Sequence[int]
    """Blocks per stage res2..res5, e.g. (3, 4, 6, 3) for ResNet-50."""
    block: str = "bottleneck"
    """'basic' (ResNet-18/34) | 'bottleneck' (ResNet-50/101)."""
    stem_width: int = 64
    """Channels of the 7x7 stem conv."""
    widths: Sequence[int] = (64, 128, 256, 512)
    """Inner channels of the blocks of res2..res5 (bottleneck outputs are x4)."""
    norm: str = "frozen_bn"
    """'frozen_bn' (default, detectron2) | 'batch_norm' (trainable) | 'group_norm'."""
    num_groups: int = 32
    """Groups of 'group_norm'."""
    freeze_at: int = 2
    """0: nothing frozen; 1: stem; k >= 2: stem and res2..res{k} (detectron2 FREEZE_AT)."""
    dtype: Dtype = jnp.float32
    """Compute dtype (float32 or bfloat16); the outputs have it."""
    param_dtype: Dtype = jnp.float32
    """Parameter dtype."""

    @property
    def expansion(self) -> int:
        """Output channels / inner channels of a block."""
        return 4 if self.block == "bottleneck" else 1

    def feature_channels(self) -> dict[str, int]:
        """Channels of each output, e.g. {'stem': 64, 'res2': 256, ..., 'res5': 2048}."""
        out = {"stem": self.stem_width}
        out.update({n: w * self.expansion for n, w in zip(STAGE_NAMES, self.widths, strict=True)})
        return out

    def feature_strides(self) -> dict[str, int]:
        """Stride of each output: {'stem': 4, 'res2': 4, 'res3': 8, 'res4': 16, 'res5': 32}."""
        return {"stem": 4, "res2": 4, "res3": 8, "res4": 16, "res5": 32}

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
        """Runs the backbone.

        Args:
          x: [B, H, W, C_in] float images (normalised as the weights expect).
          train: training mode (batch statistics for 'batch_norm' in non-frozen stages).

        Returns:
          Dict 'stem', 'res2'..'res5' -> [B, h, w, C] `dtype` (see the class docstring).
        """
        if self.block not in BLOCK_KINDS:
            raise ValueError(f"Unknown block {self.block!r}; expected one of {BLOCK_KINDS}.")
        if len(self.stage_sizes) != 4 or len(self.widths) != 4:
            raise ValueError("stage_sizes and widths need 4 entries (res2..res5).")
        if not 0 <= self.freeze_at <= 5:
            raise ValueError(f"freeze_at must be in [0, 5], got {self.freeze_at}.")
        outputs: dict[str, Array] = {}
        frozen = self.freeze_at >= 1
        y = layers.Conv2D(
            self.stem_width,
            7,
            2,
            padding=3,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="stem_conv",
        )(x)
        y = layers.make_norm(
            self.norm,
            name="stem_norm",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            num_groups=self.num_groups,
        )(y, train and not frozen)
        y = layers.max_pool(nn.relu(y), 3, 2, 1)
        if frozen:
            y = jax.lax.stop_gradient(y)
        outputs["stem"] = y
        for k, (name, n, w) in enumerate(
            zip(STAGE_NAMES, self.stage_sizes, self.widths, strict=True), start=2
        ):
            frozen = self.freeze_at >= k
            y = ResNetStage(
                block=self.block,
                num_blocks=n,
                features=w,
                strides=1 if k == 2 else 2,
                norm=self.norm,
                num_groups=self.num_groups,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )(y, train and not frozen)
            if frozen:
                y = jax.lax.stop_gradient(y)
            outputs[name] = y
        return outputs


def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18: basic blocks (2, 2, 2, 2). `kwargs` are `ResNet` fields (norm, dtype, ...)."""
    return ResNet(stage_sizes=(2, 2, 2, 2), block="basic", **kwargs)


def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34: basic blocks (3, 4, 6, 3)."""
    return ResNet(stage_sizes=(3, 4, 6, 3), block="basic", **kwargs)


def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50: bottleneck blocks (3, 4, 6, 3), outputs 256/512/1024/2048 channels."""
    return ResNet(stage_sizes=(3, 4, 6, 3), block="bottleneck", **kwargs)


def resnet101(**kwargs: Any) -> ResNet:
    """ResNet-101: bottleneck blocks (3, 4, 23, 3)."""
    return ResNet(stage_sizes=(3, 4, 23, 3), block="bottleneck", **kwargs)


def resnet_tiny(**kwargs: Any) -> ResNet:
    """Narrow test variant: one basic block per stage, widths 8/16/32/64, stem 8."""
    return ResNet(
        stage_sizes=(1, 1, 1, 1), block="basic", stem_width=8, widths=(8, 16, 32, 64), **kwargs
    )


def frozen_module_names(freeze_at: int) -> tuple[str, ...]:
    """Top-level ResNet variable names frozen by `freeze_at`.

    Args:
      freeze_at: detectron2 FREEZE_AT (0..5).

    Returns:
      e.g. ('stem_conv', 'stem_norm', 'res2') for freeze_at=2; () for 0.
    """
    names: tuple[str, ...] = ("stem_conv", "stem_norm") if freeze_at >= 1 else ()
    return names + tuple(f"res{k}" for k in range(2, min(freeze_at, 5) + 1))


def frozen_param_mask(params: Any, freeze_at: int, backbone_path: Sequence[str] = ()) -> Any:
    """Which parameters `freeze_at` freezes, for masking the optimizer (e.g. optax.masked).

    Args:
      params: a pytree of parameters (nested dicts), either the ResNet's own (``backbone_path``
        empty) or a whole model's with the ResNet under ``backbone_path`` (e.g. ('backbone',)).
      freeze_at: detectron2 FREEZE_AT (0..5).
      backbone_path: dict keys leading from the root of `params` to the ResNet's variables.

    Returns:
      A pytree with the structure of `params`, bool leaves: True for frozen parameters (the
      stem and res2..res{freeze_at} of the ResNet), False elsewhere.
    """
    frozen = set(frozen_module_names(freeze_at))
    prefix = tuple(backbone_path)

    def is_frozen(path: tuple[Any, ...], _: Any) -> bool:
        keys = tuple(getattr(p, "key", getattr(p, "name", p)) for p in path)
        if keys[: len(prefix)] != prefix or len(keys) <= len(prefix):
            return False
        return str(keys[len(prefix)]) in frozen

    return jax.tree_util.tree_map_with_path(is_frozen, params)
