"""Import torchvision ResNet / Mask R-CNN (v1) backbone weights into the flax modules.

The conversion is driven by the target module: its variable tree (from ``jax.eval_shape`` of
``init``) lists every tensor that must be filled, each flax path maps to one PyTorch key, and the
tensor must have the expected shape after the layout change (conv ``OIHW -> HWIO``). Any missing
key, mis-shaped tensor or unused key in the converted namespace raises `ConversionError`, which
lists all of them at once.

Mapping (ResNet; torchvision names on the right)::

    stem_conv/kernel                       conv1.weight
    stem_norm/{scale,bias,mean,var}        bn1.{weight,bias,running_mean,running_var}
    res{k}/block{i}/conv{j}/kernel         layer{k-1}.{i}.conv{j}.weight
    res{k}/block{i}/norm{j}/*              layer{k-1}.{i}.bn{j}.*
    res{k}/block0/shortcut_conv/kernel     layer{k-1}.0.downsample.0.weight
    res{k}/block0/shortcut_norm/*          layer{k-1}.0.downsample.1.*

``*.num_batches_tracked`` (BatchNorm2d bookkeeping) is consumed and dropped. Where the norm
variables go depends on the module's `norm`: with 'frozen_bn' all four are in ``batch_stats``;
with 'batch_norm' scale/bias are ``params`` and mean/var ``batch_stats``; a BatchNorm checkpoint
cannot fill a 'group_norm' model (running statistics would be unused: error).

FPN (``backbone.fpn.*`` of ``maskrcnn_resnet50_fpn``; level k = 2..5, index k - 2)::

    lateral{k}/{kernel,bias}     inner_blocks.{k-2}.0.{weight,bias}  (or legacy inner_blocks.{k-2})
    output{k}/{kernel,bias}      layer_blocks.{k-2}.0.{weight,bias}  (or legacy layer_blocks.{k-2})

Returned variables are host numpy arrays in the module's parameter dtype, unboxed (no logical
partitioning metadata), ready for ``module.apply`` or for ``jax.device_put`` with shardings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oanet_jax.modeling import fpn as fpn_lib
from oanet_jax.modeling import resnet as resnet_lib

Variables = dict[str, Any]

_NORM_LEAF = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# torchvision's classification head: present in ImageNet checkpoints, explicitly dropped.
RESNET_DROPPED_KEYS = ("fc.weight", "fc.bias")


class ConversionError(ValueError):
    """A state dict does not match the target module (missing / unused / mis-shaped keys)."""


def convert_resnet(
    state_dict: Mapping[str, Any], backbone: resnet_lib.ResNet | None = None
) -> Variables:
    """Converts a torchvision ImageNet ResNet state dict (``resnet50().state_dict()``).

    Args:
      state_dict: torchvision key -> tensor (torch tensors or numpy arrays). ``fc.*`` keys are
        dropped; every other key must be used.
      backbone: the target module (default ``resnet50()``, FrozenBN); its architecture decides the
        expected keys and shapes, e.g. ``resnet101()`` for a ResNet-101 checkpoint.

    Returns:
      ``{'params': {...}, 'batch_stats': {...}}`` for ``backbone.apply``; numpy arrays, e.g.
      ``params['res2']['block0']['conv2']['kernel']: [3, 3, 64, 64]`` float32.

    Raises:
      ConversionError: listing missing, mis-shaped and unused keys.
    """
    backbone = resnet_lib.resnet50() if backbone is None else backbone
    arrays = _to_numpy(state_dict)
    variables, consumed, errors = _convert_resnet(arrays, backbone, prefix="")
    consumed |= {k for k in RESNET_DROPPED_KEYS if k in arrays}
    errors.unused = sorted(set(arrays) - consumed)
    errors.raise_if_any("ResNet")
    return variables


def convert_maskrcnn_backbone(
    state_dict: Mapping[str, Any],
    backbone: resnet_lib.ResNet | None = None,
    fpn: fpn_lib.FPN | None = None,
    *,
    prefix: str = "backbone.",
) -> tuple[Variables, frozenset[str]]:
    """Converts the backbone (body + FPN) of torchvision's ``maskrcnn_resnet50_fpn`` (v1).

    Only keys starting with `prefix` are looked at; every one of them must be used (an unused
    ``backbone.*`` key is an error). Other keys (``rpn.*``, ``roi_heads.*``) are left to the
    caller, which can check that the union of the consumed sets covers the whole state dict.

    Args:
      state_dict: full Mask R-CNN state dict (torch tensors or numpy arrays).
      backbone: target ResNet (default ``resnet50()``).
      fpn: target FPN (default ``FPN()``: 256 channels, res2..res5, P6 max-pool).
      prefix: key prefix of the backbone; the body is under ``prefix + 'body.'`` and the FPN
        under ``prefix + 'fpn.'``.

    Returns:
      (variables, consumed): variables ``{'params': {'backbone': ..., 'fpn': ...},
      'batch_stats': {'backbone': ...}}`` (a parent module should name its submodules
      'backbone' and 'fpn'); consumed: the state-dict keys used or explicitly dropped.

    Raises:
      ConversionError: listing missing, mis-shaped and unused keys.
    """
    backbone = resnet_lib.resnet50() if backbone is None else backbone
    fpn = fpn_lib.FPN() if fpn is None else fpn
    arrays = _to_numpy({k: v for k, v in state_dict.items() if k.startswith(prefix)})
    body_vars, consumed, errors = _convert_resnet(arrays, backbone, prefix=prefix + "body.")
    fpn_vars, fpn_consumed, fpn_errors = _convert_fpn(arrays, backbone, fpn, prefix + "fpn.")
    consumed |= fpn_consumed
    errors.merge(fpn_errors)
    errors.unused = sorted(set(arrays) - consumed)
    errors.raise_if_any("Mask R-CNN backbone")
    variables: Variables = {}
    for name, tree in (("backbone", body_vars), ("fpn", fpn_vars)):
        for collection, value in tree.items():
            variables.setdefault(collection, {})[name] = value
    return variables, frozenset(consumed)


# ------------------------------------------------------------------------------------ internals


class _Errors:
    def __init__(self) -> None:
        self.missing: list[str] = []
        self.mis_shaped: list[str] = []
        self.unused: list[str] = []

    def merge(self, other: _Errors) -> None:
        self.missing += other.missing
        self.mis_shaped += other.mis_shaped
        self.unused += other.unused

    def raise_if_any(self, what: str) -> None:
        parts = []
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {sorted(self.missing)}")
        if self.mis_shaped:
            parts.append(f"mis-shaped keys ({len(self.mis_shaped)}): {self.mis_shaped}")
        if self.unused:
            parts.append(f"unused keys ({len(self.unused)}): {self.unused}")
        if parts:
            raise ConversionError(f"Cannot convert {what} state dict: " + "; ".join(parts))


def _to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in state_dict.items():
        if hasattr(v, "detach"):  # torch.Tensor, without importing torch here
            v = v.detach().cpu()
            v = (v.float() if v.is_floating_point() else v).numpy()  # bf16/fp16 -> float32
        out[k] = np.asarray(v)
    return out


def _abstract_variables(module: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Variable shapes of `module` for abstract inputs `args` (ShapeDtypeStruct pytrees)."""
    shapes = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, **kwargs), *args)
    return nn.meta.unbox(shapes)


def _fill(
    expected: dict[str, Any],
    arrays: Mapping[str, np.ndarray],
    torch_keys: Any,
) -> tuple[dict[str, Any], set[str], _Errors]:
    """Fills `expected` (abstract variables) from `arrays` with `torch_keys(path) -> candidates`."""
    errors = _Errors()
    consumed: set[str] = set()

    def one(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> Any:
        keys = tuple(p.key for p in path)
        candidates = torch_keys(keys)
        key = next((c for c in candidates if c in arrays), None)
        if key is None:
            errors.missing.append(candidates[0])
            return None
        consumed.add(key)
        value = arrays[key]
        if keys[-1] == "kernel":  # OIHW -> HWIO
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
        if tuple(value.shape) != tuple(leaf.shape):
            errors.mis_shaped.append(
                f"{key}: got {tuple(arrays[key].shape)}, expected {_torch_shape(keys, leaf)}"
            )
            return None
        return np.asarray(value, dtype=leaf.dtype)

    filled = jax.tree_util.tree_map_with_path(one, expected)
    return filled, consumed, errors


def _torch_shape(keys: tuple[str, ...], leaf: jax.ShapeDtypeStruct) -> tuple[int, ...]:
    shape = tuple(leaf.shape)
    if keys[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


def _resnet_module_key(keys: tuple[str, ...]) -> str:
    """('res3', 'block0', 'shortcut_norm') -> 'layer2.0.downsample.1'."""
    if keys[0] == "stem_conv":
        return "conv1"
    if keys[0] == "stem_norm":
        return "bn1"
    stage, block, layer = keys
    base = f"layer{int(stage[3:]) - 1}.{int(block[5:])}"
    if layer == "shortcut_conv":
        return base + ".downsample.0"
    if layer == "shortcut_norm":
        return base + ".downsample.1"
    if layer.startswith("conv"):
        return f"{base}.{layer}"
    return f"{base}.bn{layer[4:]}"


def _leaf_key(leaf: str) -> str:
    return "weight" if leaf == "kernel" else _NORM_LEAF[leaf]


def _convert_resnet(
    arrays: Mapping[str, np.ndarray], backbone: resnet_lib.ResNet, prefix: str
) -> tuple[Variables, set[str], _Errors]:
    expected = _abstract_variables(
        backbone, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32), train=False
    )

    def torch_keys(keys: tuple[str, ...]) -> tuple[str, ...]:
        # keys = (collection, *module path, leaf)
        return (f"{prefix}{_resnet_module_key(keys[1:-1])}.{_leaf_key(keys[-1])}",)

    variables, consumed, errors = _fill(expected, arrays, torch_keys)
    # BatchNorm2d's counter: consumed (dropped) for every BN that was filled from this dict.
    for key in list(consumed):
        if key.endswith(".running_mean"):
            counter = key[: -len("running_mean")] + "num_batches_tracked"
            if counter in arrays:
                consumed.add(counter)
    return variables, consumed, errors


def _convert_fpn(
    arrays: Mapping[str, np.ndarray],
    backbone: resnet_lib.ResNet,
    fpn: fpn_lib.FPN,
    prefix: str,
) -> tuple[Variables, set[str], _Errors]:
    channels = backbone.feature_channels()
    strides = backbone.feature_strides()
    feats = {
        n: jax.ShapeDtypeStruct((1, 64 // strides[n], 64 // strides[n], channels[n]), jnp.float32)
        for n in fpn.in_features
    }
    expected = _abstract_variables(fpn, feats)
    index = {int(n[3:]): i for i, n in enumerate(fpn.in_features)}

    def torch_keys(keys: tuple[str, ...]) -> tuple[str, ...]:
        _, module, leaf = keys
        if module.startswith("lateral"):
            block, level = "inner_blocks", int(module[len("lateral") :])
        else:
            block, level = "layer_blocks", int(module[len("output") :])
        base = f"{prefix}{block}.{index[level]}"
        name = _leaf_key(leaf)
        return (f"{base}.0.{name}", f"{base}.{name}")

    return _fill(expected, arrays, torch_keys)
