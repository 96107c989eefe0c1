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

Whole Mask R-CNN (`convert_maskrcnn`, torchvision ``maskrcnn_resnet50_fpn`` v1 -> `OANet`): the
backbone and FPN as above, then (``W``/``b`` the torch weight/bias; legacy pre-0.13 names accepted
where given in brackets)::

    rpn/conv                  rpn.head.conv.0.0            [rpn.head.conv]       OIHW -> HWIO
    rpn/objectness            rpn.head.cls_logits                                OIHW -> HWIO
    rpn/deltas                rpn.head.bbox_pred                                 OIHW -> HWIO
    box_head/fc1              roi_heads.box_head.fc6       W: (c, y, x) -> (y, x, c) flatten, W.T
    box_head/fc2              roi_heads.box_head.fc7       W.T
    box_predictor/cls_score   roi_heads.box_predictor.cls_score   rows [classes..., 0], W.T
    box_predictor/bbox_pred   roi_heads.box_predictor.bbox_pred   rows 4c..4c+3 of each class, W.T
    mask_head/mask_fcn{i}     roi_heads.mask_head.{i-1}.0  [roi_heads.mask_head.mask_fcn{i}]
    mask_head/deconv          roi_heads.mask_predictor.conv5_mask       W.transpose(2, 3, 1, 0)
    mask_head/predictor       roi_heads.mask_predictor.mask_fcn_logits  channels [classes...]

Classes: torchvision has ``N + 1`` outputs with background at index 0 (N = 90 for COCO: the
COCO category ids 1..90, ten of them unused), ours ``T`` thing classes with background LAST. By
default our class ``t`` is torchvision's label ``t + 1`` (needs ``T == N``); ``class_indices``
picks any ``T`` torchvision labels instead (e.g. `COCO_THING_IDS` for the 80 COCO panoptic thing
classes, contiguous ids sorted by COCO id as `oanet_jax.data.coco_panoptic.CategoryTable`); the
rows of the other classes are consumed and dropped. The background box deltas and mask channel
have no counterpart in our heads and are dropped.

OANet modules that torchvision has no weights for (`NOT_IN_TORCHVISION`: the stuff head and the
SRM) keep a fresh initialisation: taken from the caller's ``init_variables`` when given, else
initialised from ``rng`` with their own initialisers (`init_non_torchvision`).

Returned variables are host numpy arrays in the module's parameter dtype, unboxed (no logical
partitioning metadata), ready for ``module.apply`` or for ``jax.device_put`` with shardings.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from oanet_jax.modeling import fpn as fpn_lib
from oanet_jax.modeling import resnet as resnet_lib
from oanet_jax.modeling.build import build_model
from oanet_jax.modeling.oanet import OANet

Variables = dict[str, Any]

_NORM_LEAF = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# torchvision's classification head: present in ImageNet checkpoints, explicitly dropped.
RESNET_DROPPED_KEYS = ("fc.weight", "fc.bias")
# Top-level OANet modules filled from a torchvision Mask R-CNN, and those left at initialisation.
TORCHVISION_MODULES = ("backbone", "fpn", "rpn", "box_head", "box_predictor", "mask_head")
NOT_IN_TORCHVISION = ("stuff_head", "srm")
# The 80 COCO thing category ids (= torchvision's COCO detection labels) in increasing order: our
# contiguous thing class t of COCO panoptic is COCO id COCO_THING_IDS[t].
COCO_THING_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
)  # fmt: skip


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
    variables, consumed, errors = _convert_backbone_fpn(arrays, backbone, fpn, prefix)
    errors.unused = sorted(set(arrays) - consumed)
    errors.raise_if_any("Mask R-CNN backbone")
    return variables, frozenset(consumed)


def convert_maskrcnn(
    state_dict: Mapping[str, Any],
    model: OANet | Any | None = None,
    *,
    class_indices: Sequence[int] | None = None,
    init_variables: Variables | None = None,
    rng: jax.Array | None = None,
) -> Variables:
    """Converts a whole torchvision ``maskrcnn_resnet50_fpn`` (v1) state dict into OANet variables.

    Every tensor of the state dict must be used (or be a documented drop: ``num_batches_tracked``,
    the background rows, the rows of classes not in ``class_indices``); every variable of the
    torchvision-covered modules (`TORCHVISION_MODULES`) must be filled with the right shape. The
    mapping is in the module docstring. The stuff head and the SRM (`NOT_IN_TORCHVISION`) keep
    their fresh initialisation.

    Args:
      state_dict: torchvision key -> tensor (torch tensors or numpy arrays), e.g.
        ``maskrcnn_resnet50_fpn().state_dict()`` or a ``.pth`` file of it.
      model: the target `OANet`, or a config (``ml_collections.ConfigDict`` as in
        ``configs/base.py``) to build it with `oanet_jax.modeling.build.build_model`, or None for
        ``OANet(resnet50(), num_thing_classes=N, num_stuff_classes=53)`` with the other fields at
        their defaults (N = torchvision classes without background, 90 for COCO).
      class_indices: torchvision label (1..N) of each of our T thing classes, in our order; None
        means ``1..T`` (our class t is torchvision's t + 1) and requires T == N.
      init_variables: freshly initialised variables of `model` (``model.init(...)``, boxed or
        not); the converted modules replace theirs (shapes must agree) and the other modules are
        taken from it. If None, the other modules are initialised here from `rng`.
      rng: PRNG key for the modules not in torchvision when `init_variables` is None (default
        ``jax.random.key(0)``); see `init_non_torchvision`.

    Returns:
      The full variable tree of `model` (``{'params': ..., 'batch_stats': ...}`` for a FrozenBN
      backbone), host numpy arrays in the parameter dtype, e.g.
      ``params['box_head']['fc1']['kernel']: [7 * 7 * 256, 1024]`` float32,
      ``params['box_predictor']['cls_score']['kernel']: [1024, T + 1]`` (background last).

    Raises:
      ConversionError: listing every missing, mis-shaped and unused key (all at once).
      ValueError: bad `class_indices`.
    """
    model = _resolve_model(state_dict, model)
    arrays = _to_numpy(state_dict)
    expected = _abstract_model_variables(model)

    fpn = fpn_lib.FPN(features=model.fpn_channels, dtype=model.dtype, param_dtype=model.param_dtype)
    backbone_arrays = {k: v for k, v in arrays.items() if k.startswith("backbone.")}
    variables, consumed, errors = _convert_backbone_fpn(
        backbone_arrays, model.backbone, fpn, "backbone."
    )
    heads, heads_consumed, heads_errors = _convert_heads(arrays, model, expected, class_indices)
    consumed |= heads_consumed
    errors.merge(heads_errors)
    errors.unused = sorted(set(arrays) - consumed)
    errors.raise_if_any("Mask R-CNN")
    for collection, tree in heads.items():
        variables.setdefault(collection, {}).update(tree)

    if init_variables is None:
        rest = init_non_torchvision(model, jax.random.key(0) if rng is None else rng)
    else:
        rest = nn.meta.unbox(init_variables)
    for collection, tree in rest.items():
        for name, value in tree.items():
            if name not in TORCHVISION_MODULES:
                variables.setdefault(collection, {})[name] = jax.tree.map(np.asarray, value)
    _check_structure(variables, expected)
    if init_variables is not None:
        _check_structure(variables, rest)
    return variables


def init_non_torchvision(model: OANet, rng: jax.Array) -> Variables:
    """Fresh variables of the OANet modules torchvision has no weights for (`NOT_IN_TORCHVISION`).

    Runs only those modules (the stuff head on small shared-feature maps, the SRM on a small
    canvas, eagerly), so no ResNet is traced or compiled. flax derives each submodule's PRNG key
    from `rng` and the submodule's path, not from what else is initialised, so the values are
    those ``model.init(rng, batch)`` gives these modules (up to float rounding between this eager
    initialisation and a jitted ``init``: ~1e-7 relative was seen on the tiny model).

    Args:
      model: the target `OANet`.
      rng: the ``'params'`` PRNG key.

    Returns:
      ``{collection: {'stuff_head': ..., 'srm': ...}}``, unboxed jax arrays.
    """
    c = model.fpn_channels
    shared = [jnp.zeros((1, 16 // 2**i, 16 // 2**i, c), model.dtype) for i in range(4)]
    canvas = jnp.zeros((1, 16, 16, model.num_thing_classes), jnp.float32)

    def run(m: OANet, shared: list[jax.Array], canvas: jax.Array) -> None:
        m.stuff_head(shared, train=False)
        m.srm(canvas)

    variables = model.init(rng, shared, canvas, method=run)
    return nn.meta.unbox(variables)


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


def _convert_backbone_fpn(
    arrays: Mapping[str, np.ndarray],
    backbone: resnet_lib.ResNet,
    fpn: fpn_lib.FPN,
    prefix: str,
) -> tuple[Variables, set[str], _Errors]:
    """Body + FPN under `prefix`; variables nested as {collection: {'backbone', 'fpn'}}."""
    body_vars, consumed, errors = _convert_resnet(arrays, backbone, prefix=prefix + "body.")
    fpn_vars, fpn_consumed, fpn_errors = _convert_fpn(arrays, backbone, fpn, prefix + "fpn.")
    consumed |= fpn_consumed
    errors.merge(fpn_errors)
    variables: Variables = {}
    for name, tree in (("backbone", body_vars), ("fpn", fpn_vars)):
        for collection, value in tree.items():
            variables.setdefault(collection, {})[name] = value
    return variables, consumed, errors


@functools.lru_cache(maxsize=8)
def _abstract_model_variables(model: OANet) -> dict[str, Any]:
    """Variable shapes of a whole OANet (cached: modules hash by their fields; never mutated)."""
    batch = {
        "image": jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
        "image_shape": jax.ShapeDtypeStruct((1, 2), jnp.int32),
    }
    return _abstract_variables(model, batch, train=False)


def _num_torchvision_classes(arrays: Mapping[str, Any]) -> int:
    key = "roi_heads.box_predictor.cls_score.weight"
    if key not in arrays:
        raise ConversionError(f"Cannot convert Mask R-CNN state dict: missing keys (1): [{key!r}]")
    return int(arrays[key].shape[0])


def _resolve_model(state_dict: Mapping[str, Any], model: Any) -> OANet:
    if isinstance(model, OANet):
        return model
    if model is None:
        n = _num_torchvision_classes(state_dict) - 1
        return OANet(backbone=resnet_lib.resnet50(), num_thing_classes=n, num_stuff_classes=53)
    if isinstance(model, ml_collections.ConfigDict):
        return build_model(model)
    raise TypeError(f"model must be an OANet, a config or None, got {type(model).__name__}")


def _class_rows(
    class_indices: Sequence[int] | None, num_classes: int, tv_classes: int
) -> np.ndarray:
    """torchvision label of each of our classes, validated."""
    if class_indices is None:
        if tv_classes != num_classes + 1:
            raise ConversionError(
                f"Cannot convert Mask R-CNN state dict: it has {tv_classes - 1} classes (+ "
                f"background), the model {num_classes}; pass class_indices to pick "
                f"{num_classes} of them (e.g. COCO_THING_IDS)"
            )
        return np.arange(1, num_classes + 1)
    rows = np.asarray(class_indices, dtype=np.int64).reshape(-1)
    if rows.shape[0] != num_classes:
        raise ValueError(f"class_indices has {rows.shape[0]} entries, the model {num_classes}")
    if len(set(rows.tolist())) != rows.shape[0]:
        raise ValueError(f"class_indices has duplicates: {rows.tolist()}")
    if rows.min() < 1 or rows.max() >= tv_classes:
        raise ValueError(
            f"class_indices must be torchvision labels in 1..{tv_classes - 1} (0 is background)"
        )
    return rows


_Rule = tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]


def _convert_heads(
    arrays: Mapping[str, np.ndarray],
    model: OANet,
    expected: Variables,
    class_indices: Sequence[int] | None,
) -> tuple[Variables, set[str], _Errors]:
    """rpn, box_head, box_predictor, mask_head from ``rpn.head.*`` and ``roi_heads.*``."""
    errors = _Errors()
    consumed: set[str] = set()
    params = expected.get("params", {})
    tv_key = "roi_heads.box_predictor.cls_score.weight"
    tv_classes = int(arrays[tv_key].shape[0]) if tv_key in arrays else None
    rows = (
        None
        if tv_classes is None
        else _class_rows(class_indices, model.num_thing_classes, tv_classes)
    )
    cls_rows = None if rows is None else np.concatenate([rows, [0]])  # background last
    box_rows = None if rows is None else (4 * rows[:, None] + np.arange(4)).reshape(-1)
    p = model.box_head_config.pooler_resolution
    cin = model.fpn_channels

    def conv(w: np.ndarray) -> np.ndarray:
        return w.transpose(2, 3, 1, 0)

    def fc6(w: np.ndarray) -> np.ndarray:
        return w.reshape(w.shape[0], cin, p, p).transpose(2, 3, 1, 0).reshape(p * p * cin, -1)

    def select(index: np.ndarray | None, size: int | None) -> Callable[[np.ndarray], np.ndarray]:
        def fn(w: np.ndarray) -> np.ndarray:
            if index is None:
                raise ValueError(f"class count unknown: {tv_key} is missing")
            if w.shape[0] != size:
                raise ValueError(f"expected {size} rows for {tv_classes} classes")
            return w[index]

        return fn

    def rule(names: Sequence[str], leaf: str, weight_fn, bias_fn=None) -> _Rule:
        suffix = "weight" if leaf == "kernel" else "bias"
        fn = weight_fn if leaf == "kernel" else (bias_fn or (lambda b: b))
        return tuple(f"{n}.{suffix}" for n in names), fn

    def torch_rule(module: str, sub: str, leaf: str) -> _Rule | None:
        if module == "rpn":
            names = {"conv": ("rpn.head.conv.0.0", "rpn.head.conv"),
                     "objectness": ("rpn.head.cls_logits",),
                     "deltas": ("rpn.head.bbox_pred",)}.get(sub)  # fmt: skip
            return None if names is None else rule(names, leaf, conv)
        if module == "box_head" and sub.startswith("fc"):
            name = f"roi_heads.box_head.fc{int(sub[2:]) + 5}"
            return rule((name,), leaf, fc6 if sub == "fc1" else (lambda w: w.T))
        if module == "box_predictor" and sub == "cls_score":
            sel = select(cls_rows, tv_classes)
            return rule(("roi_heads.box_predictor.cls_score",), leaf, lambda w: sel(w).T, sel)
        if module == "box_predictor" and sub == "bbox_pred":
            sel = select(box_rows, None if tv_classes is None else 4 * tv_classes)
            return rule(("roi_heads.box_predictor.bbox_pred",), leaf, lambda w: sel(w).T, sel)
        if module == "mask_head" and sub.startswith("mask_fcn"):
            i = int(sub[len("mask_fcn") :])
            names = (f"roi_heads.mask_head.{i - 1}.0", f"roi_heads.mask_head.mask_fcn{i}")
            return rule(names, leaf, conv)
        if module == "mask_head" and sub == "deconv":
            return rule(("roi_heads.mask_predictor.conv5_mask",), leaf, conv)
        if module == "mask_head" and sub == "predictor":
            sel = select(rows, tv_classes)
            return rule(
                ("roi_heads.mask_predictor.mask_fcn_logits",), leaf, lambda w: conv(sel(w)), sel
            )
        return None

    def one(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> Any:
        keys = tuple(str(k.key) for k in path)
        found = torch_rule(keys[0], keys[1], keys[-1]) if len(keys) == 3 else None
        if found is None:
            errors.missing.append(f"<no torchvision tensor for OANet {'/'.join(keys)}>")
            return None
        candidates, fn = found
        key = next((c for c in candidates if c in arrays), None)
        if key is None:
            errors.missing.append(candidates[0])
            return None
        consumed.add(key)
        raw = arrays[key]
        try:
            value = fn(raw)
        except (ValueError, IndexError) as e:
            errors.mis_shaped.append(f"{key}: got {tuple(raw.shape)} ({e})")
            return None
        if tuple(value.shape) != tuple(leaf.shape):
            errors.mis_shaped.append(
                f"{key}: got {tuple(raw.shape)}, converts to {tuple(value.shape)}, expected "
                f"{tuple(leaf.shape)} for {'/'.join(keys)}"
            )
            return None
        return np.asarray(value, dtype=leaf.dtype)

    heads = {m: params[m] for m in TORCHVISION_MODULES[2:] if m in params}
    filled = jax.tree_util.tree_map_with_path(one, heads)
    for collection, tree in expected.items():  # e.g. a normalised head: not a torchvision model
        if collection != "params" and any(m in tree for m in heads):
            errors.missing.append(f"<no torchvision tensors for OANet {collection} of the heads>")
    return {"params": filled}, consumed, errors


def _check_structure(got: Variables, want: Variables) -> None:
    """Same tree paths, shapes and dtypes, else ConversionError naming the differences."""
    g = {jax.tree_util.keystr(p): (tuple(x.shape), np.dtype(x.dtype))
         for p, x in jax.tree_util.tree_leaves_with_path(got)}  # fmt: skip
    w = {jax.tree_util.keystr(p): (tuple(x.shape), np.dtype(x.dtype))
         for p, x in jax.tree_util.tree_leaves_with_path(want)}  # fmt: skip
    bad = sorted(set(g) ^ set(w)) + sorted(k for k in set(g) & set(w) if g[k] != w[k])
    if bad:
        raise ConversionError(f"Converted variables do not match the model's variables at {bad}")
