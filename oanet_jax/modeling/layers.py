"""Shared convolution and normalisation layers (flax.linen, NHWC).

Every layer here reproduces its PyTorch counterpart numerically, so that weights converted from
torchvision/detectron2 give the same outputs:

* `Conv2D`: explicit symmetric padding ``((p, p), (p, p))`` as ``torch.nn.Conv2d(padding=p)``,
  never ``'SAME'`` (which pads asymmetrically for stride 2 and breaks converted weights, see flax
  issue #2993). Kernel layout HWIO.
* `FrozenBatchNorm`: ``torchvision.ops.FrozenBatchNorm2d`` / detectron2 ``FrozenBatchNorm2d``
  (eps 1e-5). All four tensors (``scale``, ``bias``, ``mean``, ``var``) live in the
  ``'batch_stats'`` collection, so they are never trained, never weight-decayed and never seen by
  the optimizer; ``params`` holds only trainable tensors.
* `BatchNorm`: trainable ``torch.nn.BatchNorm2d`` (eps 1e-5, momentum 0.1 in PyTorch's sense,
  unbiased variance for the running estimate). ``scale``/``bias`` in ``'params'``, ``mean``/``var``
  in ``'batch_stats'`` (flax's convention). Under ``jit`` with a batch sharded over a mesh the
  batch statistics are global (synchronised BN), because the mean is taken over the whole array.
* `GroupNorm`: ``torch.nn.GroupNorm`` (eps 1e-5); ``scale``/``bias`` in ``'params'``.

Logical axis names. Every variable carries logical axis names (``nn.with_logical_partitioning``)
so a sharding rule table can place it on a mesh later:

* conv kernels ``[kh, kw, cin, cout]``: ``('conv_h', 'conv_w', 'conv_in', 'conv_out')``;
* conv biases ``[cout]``: ``('conv_out',)``;
* normalisation tensors ``[C]``: ``('norm',)``.

Normalisation statistics are always computed in float32, whatever the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

CONV_KERNEL_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
CONV_BIAS_AXES = ("conv_out",)
NORM_AXES = ("norm",)
LOGICAL_AXIS_NAMES = ("conv_h", "conv_w", "conv_in", "conv_out", "norm")

NORM_KINDS = ("frozen_bn", "batch_norm", "group_norm")

# He (MSRA) normal, std sqrt(2 / fan_out), as torchvision's ResNet and detectron2's `c2_msra_fill`.
msra_fill = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# kaiming_uniform(a=1) as torchvision's FPN and detectron2's `c2_xavier_fill`: U(+-sqrt(3/fan_in)).
xavier_fill = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


class Conv2D(nn.Module):
    """2-D convolution, NHWC / HWIO, with PyTorch-style explicit symmetric padding.

    Equivalent to ``torch.nn.Conv2d(cin, features, kernel_size, stride, padding, dilation,
    bias=use_bias)`` once the PyTorch weight ``[cout, cin, kh, kw]`` is transposed to
    ``[kh, kw, cin, cout]``.
    """

    features: int
    """Number of output channels."""
    kernel_size: int | tuple[int, int] = 3
    """Kernel size (kh, kw), or one int for a square kernel."""
    strides: int | tuple[int, int] = 1
    """Stride (sh, sw), or one int."""
    padding: int | tuple[int, int] | None = None
    """Symmetric zero padding (ph, pw) on each side; None: ``dilation * (k - 1) // 2``."""
    dilation: int | tuple[int, int] = 1
    """Kernel dilation (dh, dw), or one int."""
    use_bias: bool = True
    """Whether to add a bias."""
    kernel_init: Initializer = msra_fill
    """Initializer of the kernel ``[kh, kw, cin, cout]``."""
    bias_init: Initializer = nn.initializers.zeros_init()
    """Initializer of the bias ``[cout]``."""
    dtype: Dtype = jnp.float32
    """Compute dtype (inputs and kernel are cast to it; the output has it)."""
    param_dtype: Dtype = jnp.float32
    """Dtype of the stored parameters."""
    precision: Any = None
    """``jax.lax.Precision`` of the convolution (None: backend default)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the convolution.

        Args:
          x: [B, H, W, Cin] any float dtype.

        Returns:
          [B, H', W', features] `dtype`, with H' = floor((H + 2 ph - dh (kh - 1) - 1) / sh) + 1.
        """
        kh, kw = _pair(self.kernel_size)
        dh, dw = _pair(self.dilation)
        if self.padding is None:
            ph, pw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
        else:
            ph, pw = _pair(self.padding)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, CONV_KERNEL_AXES),
            (kh, kw, x.shape[-1], self.features),
            self.param_dtype,
        )
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=_pair(self.strides),
            padding=((ph, ph), (pw, pw)),
            rhs_dilation=(dh, dw),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(self.bias_init, CONV_BIAS_AXES),
                (self.features,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


class FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics and affine (torchvision/detectron2 FrozenBatchNorm2d).

    ``y = (x - mean) / sqrt(var + eps) * scale + bias``, computed as ``x * a + b`` with
    ``a = scale * rsqrt(var + eps)`` and ``b = bias - mean * a`` (in float32), as PyTorch does.
    All four variables are in the ``'batch_stats'`` collection (never trained).
    """

    eps: float = 1e-5
    """Added to the variance (torchvision FrozenBatchNorm2d and detectron2 use 1e-5)."""
    dtype: Dtype = jnp.float32
    """Compute/output dtype."""
    param_dtype: Dtype = jnp.float32
    """Dtype of the stored statistics."""

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Normalises `x`.

        Args:
          x: [..., C] any float dtype.
          train: ignored (the statistics are frozen); present for a uniform norm interface.

        Returns:
          [..., C] `dtype`.
        """
        del train
        c = x.shape[-1]

        def stat(name: str, init: Initializer) -> Array:
            return self.variable(
                "batch_stats",
                name,
                nn.with_logical_partitioning(lambda s, d: init(None, s, d), NORM_AXES),
                (c,),
                self.param_dtype,
            ).value

        scale = stat("scale", nn.initializers.ones_init())
        bias = stat("bias", nn.initializers.zeros_init())
        mean = stat("mean", nn.initializers.zeros_init())
        var = stat("var", nn.initializers.ones_init())
        a = scale.astype(jnp.float32) * jax.lax.rsqrt(var.astype(jnp.float32) + self.eps)
        b = bias.astype(jnp.float32) - mean.astype(jnp.float32) * a
        return x.astype(self.dtype) * a.astype(self.dtype) + b.astype(self.dtype)


class BatchNorm(nn.Module):
    """Trainable batch norm over all axes but the last (torch.nn.BatchNorm2d semantics).

    In training, normalises with the (biased) batch statistics in float32 and, when the
    ``'batch_stats'`` collection is mutable, updates the running estimates as PyTorch does:
    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased batch variance.
    In evaluation, uses the running estimates.
    """

    momentum: float = 0.1
    """PyTorch-style momentum: weight of the new batch statistic in the running average."""
    eps: float = 1e-5
    """Added to the variance."""
    dtype: Dtype = jnp.float32
    """Compute/output dtype."""
    param_dtype: Dtype = jnp.float32
    """Dtype of the stored parameters and statistics."""

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Normalises `x`.

        Args:
          x: [..., C] any float dtype.
          train: use batch statistics (and update the running ones when mutable).

        Returns:
          [..., C] `dtype`.
        """
        c = x.shape[-1]
        part = lambda init: nn.with_logical_partitioning(init, NORM_AXES)
        scale = self.param("scale", part(nn.initializers.ones_init()), (c,), self.param_dtype)
        bias = self.param("bias", part(nn.initializers.zeros_init()), (c,), self.param_dtype)
        ra_mean = self.variable(
            "batch_stats", "mean", part(lambda s, d: jnp.zeros(s, d)), (c,), self.param_dtype
        )
        ra_var = self.variable(
            "batch_stats", "var", part(lambda s, d: jnp.ones(s, d)), (c,), self.param_dtype
        )
        if train:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
                n = math.prod(x.shape[:-1])
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                ra_mean.value = ((1 - m) * ra_mean.value + m * mean).astype(self.param_dtype)
                ra_var.value = ((1 - m) * ra_var.value + m * unbiased).astype(self.param_dtype)
        else:
            mean = ra_mean.value.astype(jnp.float32)
            var = ra_var.value.astype(jnp.float32)
        a = scale.astype(jnp.float32) * jax.lax.rsqrt(var + self.eps)
        b = bias.astype(jnp.float32) - mean * a
        return x.astype(self.dtype) * a.astype(self.dtype) + b.astype(self.dtype)


class GroupNorm(nn.Module):
    """Group normalisation over (H, W, C/G) per group (torch.nn.GroupNorm semantics).

    The number of groups is ``gcd(num_groups, C)``: 32 for every width of the standard ResNets,
    fewer for the narrow test variant (e.g. 8 groups of one channel for C = 8).
    """

    num_groups: int = 32
    """Requested number of groups (reduced to gcd(num_groups, C))."""
    eps: float = 1e-5
    """Added to the variance (torch.nn.GroupNorm default)."""
    dtype: Dtype = jnp.float32
    """Compute/output dtype."""
    param_dtype: Dtype = jnp.float32
    """Dtype of the stored parameters."""

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Normalises `x`.

        Args:
          x: [B, ..., C] any float dtype.
          train: ignored; present for a uniform norm interface.

        Returns:
          [B, ..., C] `dtype`.
        """
        del train
        c = x.shape[-1]
        g = math.gcd(self.num_groups, c)
        part = lambda init: nn.with_logical_partitioning(init, NORM_AXES)
        scale = self.param("scale", part(nn.initializers.ones_init()), (c,), self.param_dtype)
        bias = self.param("bias", part(nn.initializers.zeros_init()), (c,), self.param_dtype)
        xf = x.astype(jnp.float32).reshape(*x.shape[:-1], g, c // g)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        mean = jnp.mean(xf, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def make_norm(
    kind: str,
    *,
    name: str,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    num_groups: int = 32,
) -> nn.Module:
    """Builds a normalisation layer; all three take ``(x, train=False)``.

    Args:
      kind: 'frozen_bn' | 'batch_norm' | 'group_norm'.
      name: module name (its variables are ``<name>/{scale,bias[,mean,var]}``).
      dtype: compute dtype.
      param_dtype: stored dtype.
      num_groups: groups of 'group_norm'.

    Returns:
      An unbound module.
    """
    if kind == "frozen_bn":
        return FrozenBatchNorm(dtype=dtype, param_dtype=param_dtype, name=name)
    if kind == "batch_norm":
        return BatchNorm(dtype=dtype, param_dtype=param_dtype, name=name)
    if kind == "group_norm":
        return GroupNorm(num_groups=num_groups, dtype=dtype, param_dtype=param_dtype, name=name)
    raise ValueError(f"Unknown norm {kind!r}; expected one of {NORM_KINDS}.")


def max_pool(x: Array, window: int, stride: int, padding: int) -> Array:
    """Max pooling as ``torch.nn.functional.max_pool2d`` (padding with -inf).

    Args:
      x: [B, H, W, C].
      window: square window size.
      stride: stride.
      padding: symmetric padding on each side, filled with -inf (never selected).

    Returns:
      [B, floor((H + 2 p - k) / s) + 1, floor((W + 2 p - k) / s) + 1, C], dtype of `x`.
    """
    return nn.max_pool(
        x, (window, window), strides=(stride, stride), padding=((padding, padding),) * 2
    )


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))
