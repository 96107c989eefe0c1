"""The one place where a config becomes modules."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax.numpy as jnp
import ml_collections

from oanet_jax.modeling import resnet
from oanet_jax.modeling.config import SECTIONS
from oanet_jax.modeling.oanet import OANet
from oanet_jax.modeling.srm import SRM_TRAIN_MASKS

T = TypeVar("T")

BACKBONES = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "tiny": resnet.resnet_tiny,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def section_to_dataclass(section: ml_collections.ConfigDict, cls: type[T], path: str) -> T:
    """Converts one ConfigDict section into its frozen dataclass, field for field.

    Lists become tuples (the dataclasses must be hashable: they are flax module fields).

    Args:
      section: e.g. ``config.model.rpn``.
      cls: the dataclass, e.g. `RPNConfig`.
      path: dotted name of `section` for error messages, e.g. ``'model.rpn'``.

    Returns:
      ``cls(**section)``.

    Raises:
      ValueError: naming every field the config has and the dataclass lacks, or the reverse.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    given = set(section.keys())
    problems = [f"{path}.{k} is not a field of {cls.__name__}" for k in sorted(given - names)]
    problems += [f"{path}.{k} ({cls.__name__} field) is missing" for k in sorted(names - given)]
    if problems:
        raise ValueError("Config does not match the model: " + "; ".join(problems))
    values = {}
    for k in sorted(names):
        v = section[k]
        values[k] = tuple(v) if isinstance(v, list | tuple) else v
    return cls(**values)


INSTANCE_MASKS = ("full", "panoptic")
"""Values of `config.data.instance_masks`."""

_SRM_SOURCES = {
    "gt": "ground-truth instance masks",
    "predicted": "its own predicted masks (post-NMS detections, panoptic thing labels)",
    "both": "ground-truth and predicted masks",
}


def resolve_srm_train_masks(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """What the SRM is trained on, and one line that tells the user why.

    `config.model.srm.train_masks` 'auto' becomes 'gt' when the training instance masks overlap
    (source 'coco_panoptic' with an instances JSON for the train split and
    ``data.instance_masks == 'full'``) and 'predicted' otherwise (TFDS `coco/2017_panoptic`, no
    instances JSON, or ``data.instance_masks == 'panoptic'``: the masks are the visible
    panoptic segments, which never overlap, so a ground-truth canvas holds resampling seams
    only). An explicit 'gt' on such data is kept, and the line says what it means. A config
    without a data section counts as overlapping.

    Args:
      config: a full config (`config.model.srm.train_masks`, `config.data`).

    Returns:
      (mode in `oanet_jax.modeling.srm.SRM_TRAIN_MASKS`, the line to log).

    Raises:
      ValueError: an unknown `train_masks` or `data.instance_masks`.
    """
    asked = str(config.model.srm.train_masks)
    if asked not in (*SRM_TRAIN_MASKS, "auto"):
        raise ValueError(
            f"model.srm.train_masks={asked!r}; expected one of {(*SRM_TRAIN_MASKS, 'auto')}."
        )
    d = config.get("data")
    why = ""
    if d is not None:
        instance_masks = str(d.get("instance_masks", "full"))
        if instance_masks not in INSTANCE_MASKS:
            raise ValueError(
                f"data.instance_masks={instance_masks!r}; expected one of {INSTANCE_MASKS}."
            )
        if d.get("source", "coco_panoptic") == "tfds":
            why = "TFDS panoptic data has no overlapping instance masks"
        elif "train" in d and not d.train.get("instances_json", ""):
            why = "no instances JSON for the training split (masks = panoptic segments)"
        elif instance_masks == "panoptic":
            why = "data.instance_masks='panoptic' (masks = visible panoptic segments)"
    mode = asked if asked != "auto" else ("predicted" if why else "gt")
    line = f"SRM training: {_SRM_SOURCES[mode]} (model.srm.train_masks={asked!r})"
    if why:
        line += f"; {why}"
        if mode == "gt":
            line += (
                ": the ground-truth canvas holds resampling seams only, not occlusions; "
                "'predicted' or 'auto' trains the SRM on real overlaps"
            )
    return mode, line + "."


def build_model(config: ml_collections.ConfigDict) -> OANet:
    """Builds OANet from a full config (`config.model`, and the input normalisation of
    `config.data`: pixel mean/std and channel order, applied on device by the model).

    Args:
      config: a config from `configs/` (fields as in `configs/base.py`).

    Returns:
      An unbound `OANet` module.

    Raises:
      ValueError: for an unknown backbone or dtype, or a `config.model` section whose fields
        differ from its dataclass (`oanet_jax.modeling.config.SECTIONS`), or an unknown
        `model.srm.train_masks` (its 'auto' is resolved by :func:`resolve_srm_train_masks`).
    """
    m = config.model
    if m.backbone not in BACKBONES:
        raise ValueError(f"Unknown backbone {m.backbone!r}; expected one of {sorted(BACKBONES)}.")
    for name in ("compute_dtype", "param_dtype"):
        if m[name] not in DTYPES:
            raise ValueError(f"model.{name}={m[name]!r}; expected one of {sorted(DTYPES)}.")
    dtype = DTYPES[m.compute_dtype]
    param_dtype = DTYPES[m.param_dtype]
    backbone = BACKBONES[m.backbone](
        norm=m.norm, freeze_at=m.freeze_at, dtype=dtype, param_dtype=param_dtype
    )

    def section(name: str) -> Any:
        return section_to_dataclass(m[name], SECTIONS[name], f"model.{name}")

    srm_config = dataclasses.replace(section("srm"), train_masks=resolve_srm_train_masks(config)[0])
    return OANet(
        backbone=backbone,
        sharing=str(m.sharing),
        num_thing_classes=m.num_thing_classes,
        num_stuff_classes=m.num_stuff_classes,
        fpn_channels=m.fpn_channels,
        rpn_config=section("rpn"),
        roi_config=section("roi"),
        box_head_config=section("box_head"),
        mask_head_config=section("mask_head"),
        stuff_head_config=section("stuff_head"),
        srm_config=srm_config,
        test_config=section("test"),
        dtype=dtype,
        param_dtype=param_dtype,
        **_normalisation(config),
    )


def _normalisation(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The input normalisation of `config.data` (pixel mean/std, channel order), if it has one."""
    d = config.get("data")
    if d is None or "pixel_mean" not in d:
        return {}
    return dict(
        pixel_mean=tuple(float(v) for v in d.pixel_mean),
        pixel_std=tuple(float(v) for v in d.pixel_std),
        channel_order=str(d.channel_order),
    )
