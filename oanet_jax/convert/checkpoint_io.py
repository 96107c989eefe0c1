"""Reads torchvision state-dict files and writes/reads the converted OANet variables.

The library half of `oanet-convert` (`oanet_jax.convert.main`): `load_state_dict` reads a
``torch.save`` file (weights only, nothing downloaded), `detect_kind` tells a torchvision
``maskrcnn_resnet50_fpn`` dict from an ImageNet ResNet-18/34/50/101 one, `convert_file` converts it
with `oanet_jax.convert.torchvision` for a config, and `save_variables` / `load_variables` write and
read the orbax ``StandardCheckpointer`` checkpoint of ``{'params': ..., 'batch_stats': ...}``
(what `oanet_jax.train.checkpoint.init_from_pretrained` overlays on a fresh state).

torch is imported only by `load_state_dict`, so the rest works without it.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from oanet_jax.convert import torchvision as convert
from oanet_jax.modeling import build

__all__ = [
    "RESNET_DEPTHS",
    "class_indices",
    "convert_file",
    "detect_kind",
    "load_state_dict",
    "load_variables",
    "resnet_name",
    "save_variables",
]

# (block kind, blocks in layer1..layer4) -> torchvision ResNet name.
RESNET_DEPTHS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
}


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a state dict file (weights only, on CPU) into numpy arrays.

    Args:
      path: a file written by ``torch.save(state_dict)`` (possibly wrapped under 'model' or
        'state_dict', keys possibly prefixed 'module.').

    Returns:
      key -> numpy array (floating tensors as float32).
    """
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in obj.items()}


def detect_kind(keys: Sequence[str]) -> str:
    """'maskrcnn', or the ResNet name ('resnet18' ... 'resnet101') of a classification dict.

    Args:
      keys: the state dict's keys.

    Returns:
      'maskrcnn' | 'resnet18' | 'resnet34' | 'resnet50' | 'resnet101'.

    Raises:
      ValueError: an unrecognised layout.
    """
    keys = set(keys)
    if "backbone.body.conv1.weight" in keys and any(k.startswith("roi_heads.") for k in keys):
        return "maskrcnn"
    if "conv1.weight" in keys:
        return resnet_name(keys, prefix="")
    raise ValueError(
        "unrecognised state dict: expected torchvision maskrcnn_resnet50_fpn keys "
        "(backbone.body.*, rpn.*, roi_heads.*) or a torchvision ResNet (conv1.*, layer1.*...)"
    )


def resnet_name(keys: set[str], prefix: str) -> str:
    """The torchvision ResNet name of the blocks under `prefix` ('' or 'backbone.body.').

    Raises:
      ValueError: a block layout that is not ResNet-18/34/50/101.
    """
    block = "bottleneck" if f"{prefix}layer1.0.conv3.weight" in keys else "basic"
    counts = []
    for layer in range(1, 5):
        pattern = re.compile(rf"^{re.escape(prefix)}layer{layer}\.(\d+)\.")
        idx = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
        counts.append(max(idx) + 1 if idx else 0)
    name = RESNET_DEPTHS.get((block, tuple(counts)))
    if name is None:
        raise ValueError(f"unrecognised ResNet: {block} blocks {tuple(counts)} in layer1..layer4")
    return name


def class_indices(choice: str, model_classes: int, tv_classes: int) -> list[int] | None:
    """torchvision label of each of our thing classes for ``--classes`` (None: identity).

    Args:
      choice: 'auto' | 'all' | 'coco80'.
      model_classes: the config's num_thing_classes T.
      tv_classes: torchvision's class outputs N + 1 (background included).

    Returns:
      None (our class t is label t + 1) or a list of T labels.
    """
    if choice == "auto":
        if model_classes == tv_classes - 1:
            choice = "all"
        elif model_classes == len(convert.COCO_THING_IDS) and tv_classes == 91:
            choice = "coco80"
        else:
            raise ValueError(
                f"the checkpoint has {tv_classes - 1} classes, the config {model_classes}: "
                "choose --classes or set model.num_thing_classes"
            )
    if choice == "all":
        return None
    if model_classes != len(convert.COCO_THING_IDS):
        raise ValueError(
            f"--classes coco80 needs model.num_thing_classes = 80, not {model_classes}"
        )
    return list(convert.COCO_THING_IDS)


def convert_file(
    state: Mapping[str, np.ndarray], config: ml_collections.ConfigDict, classes: str, seed: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Converts a loaded state dict for `config`.

    Args:
      state: `load_state_dict`'s output.
      config: the OANet config (its ``model`` section builds the target).
      classes: 'auto' | 'all' | 'coco80' (see `class_indices`; Mask R-CNN dicts only).
      seed: init seed of the modules torchvision does not have (stuff head, SRM).

    Returns:
      (variables, summary): ``{'params': ..., 'batch_stats': ...}`` (the full OANet tree for a
      Mask R-CNN dict, ``{collection: {'backbone': ...}}`` for a ResNet one) and a dict with
      'kind', 'tensors', 'elements', 'left_at_init', and 'classes' / 'note' where they apply.
    """
    kind = detect_kind(list(state))
    summary: dict[str, Any] = {"kind": kind, "tensors": len(state)}
    if kind == "maskrcnn":
        body = resnet_name(set(state), prefix="backbone.body.")
        if body != config.model.backbone:
            raise ValueError(
                f"the checkpoint's backbone is {body}, the config's {config.model.backbone}"
            )
        model = build.build_model(config)
        tv_classes = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
        indices = class_indices(classes, model.num_thing_classes, tv_classes)
        variables = convert.convert_maskrcnn(
            state, model, class_indices=indices, rng=jax.random.key(seed)
        )
        summary["classes"] = "all" if indices is None else f"{len(indices)} of {tv_classes - 1}"
        summary["left_at_init"] = list(convert.NOT_IN_TORCHVISION)
    else:
        m = config.model
        backbone = build.BACKBONES[kind](
            norm=m.norm,
            freeze_at=m.freeze_at,
            dtype=build.DTYPES[m.compute_dtype],
            param_dtype=build.DTYPES[m.param_dtype],
        )
        converted = convert.convert_resnet(state, backbone)
        variables = {collection: {"backbone": tree} for collection, tree in converted.items()}
        summary["left_at_init"] = [
            n
            for n in (*convert.TORCHVISION_MODULES, *convert.NOT_IN_TORCHVISION)
            if n != "backbone"
        ]
        if kind != m.backbone:
            summary["note"] = f"the config's backbone is {m.backbone}; this checkpoint is {kind}"
    summary["elements"] = {
        collection: {name: _num_elements(t) for name, t in tree.items()}
        for collection, tree in variables.items()
    }
    return variables, summary


def _num_elements(tree: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def save_variables(variables: dict[str, Any], out_dir: str, force: bool = False) -> str:
    """Writes `variables` as an orbax StandardCheckpointer checkpoint; returns the absolute path."""
    import orbax.checkpoint as ocp

    path = str(pathlib.Path(out_dir).resolve())
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, variables, force=force)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return path


def load_variables(out_dir: str) -> dict[str, Any]:
    """Reads a checkpoint written by `save_variables`: ``{'params': ..., 'batch_stats': ...}``.

    Every array lands on this process's first local device, whatever devices it was saved from.
    """
    from oanet_jax.train import checkpoint as ckpt_lib

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return ckpt_lib.restore_standard(str(pathlib.Path(out_dir).resolve()), device)
