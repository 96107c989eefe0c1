"""Config validation at load time: one message per broken rule, naming the field and the rule.

`validate_config(config, purpose)` is called first thing by the training loop
(`train.loop.train_and_evaluate`), the evaluation of a checkpoint
(`eval.evaluator.evaluate_checkpoint`) and prediction (`predict`), before any model is built or
data read, so that a bad value gives a one-paragraph `ConfigError` instead of a trace from deep
inside JAX. The rules:

* ``train.batch_size`` (training): a positive integer divisible by the size of the mesh's 'data'
  axis (``sharding.mesh_shape`` resolved over ``jax.device_count()`` devices) and by the process
  count.
* ``eval.batch_size`` (training, evaluation): a positive integer.
* ``data.image_size``: two positive integers, each a multiple of the coarsest stride of the
  backbone named by ``model.backbone`` (32 for every ResNet): the backbone halves the size five
  times and the FPN adds its levels back, which is exact only for such sizes.
* ``data.source_size`` (training, evaluation): (0, 0) or two positive integers;
  ``data.max_mask_runs`` a positive integer; ``data.max_instances`` at most 254 (the wire format
  of :mod:`oanet_jax.data.spec` carries instance ids in a uint8 map).
* ``data.root`` (training, evaluation; ``data.source == 'coco_panoptic'``): must exist, except in
  training with a synthetic config (``data.synthetic_num_images`` is set), where the training
  loop generates the dataset there and says so loudly (`announce_synthetic_generation`).

The architecture check (a checkpoint of another architecture) lives with the checkpoints:
`oanet_jax.train.checkpoint.check_architecture`.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

__all__ = ["PURPOSES", "ConfigError", "announce_synthetic_generation", "validate_config"]

PURPOSES = ("train", "eval", "predict")


class ConfigError(ValueError):
    """A config value that breaks a rule; the message names each field and its rule."""


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _data_axis_size(config: Any, num_devices: int) -> tuple[int | None, str | None]:
    """(size of the 'data' mesh axis, None) or (None, the problem with ``config.sharding``)."""
    from oanet_jax.train.sharding import DATA_AXIS, resolve_mesh_shape

    s = config.sharding
    try:
        shape = resolve_mesh_shape(s.mesh_shape, num_devices)
    except ValueError as e:
        return None, f"sharding.mesh_shape={tuple(s.mesh_shape)}: {e}"
    axes = tuple(s.mesh_axes)
    if len(axes) != len(shape) or DATA_AXIS not in axes:
        return None, (
            f"sharding.mesh_axes={axes} must name the '{DATA_AXIS}' axis once per entry of "
            f"sharding.mesh_shape={tuple(s.mesh_shape)}"
        )
    return shape[axes.index(DATA_AXIS)], None


def coarsest_backbone_stride(config: Any) -> int:
    """The largest output stride of the backbone named by ``config.model.backbone``.

    Raises:
      ConfigError: the backbone name is unknown.
    """
    from oanet_jax.modeling.build import BACKBONES

    name = config.model.backbone
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone={name!r}: expected one of {sorted(BACKBONES)}")
    return max(BACKBONES[name]().feature_strides().values())


def validate_config(
    config: Any,
    purpose: str,
    *,
    num_devices: int | None = None,
    process_count: int | None = None,
) -> None:
    """Checks the rules of the module docstring for one use of the config.

    Args:
      config: the full config (configs/*.py, after command-line overrides).
      purpose: 'train', 'eval' or 'predict' (which rules apply).
      num_devices: devices of the training mesh (default ``jax.device_count()``).
      process_count: JAX processes (default ``jax.process_count()``).

    Raises:
      ConfigError: listing every broken rule, one line each, as ``field=value: rule``.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    problems: list[str] = []
    if purpose == "train":
        problems += _train_batch_problems(config, num_devices, process_count)
    if purpose in ("train", "eval"):
        eval_batch = config.eval.batch_size
        if not _positive_int(eval_batch):
            problems.append(f"eval.batch_size={eval_batch!r}: must be a positive integer")
    problems += _image_size_problems(config)
    if purpose in ("train", "eval"):
        problems += _wire_problems(config)
        problems += _root_problems(config, purpose)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _wire_problems(config: Any) -> list[str]:
    """The wire format's static shapes (``data.source_size``, ``max_mask_runs``, instance ids)."""
    d = config.data
    problems = []
    size = tuple(d.source_size)
    if (
        len(size) != 2
        or not all(isinstance(v, int) and v >= 0 for v in size)
        or (0 in size and size != (0, 0))
    ):
        problems.append(
            f"data.source_size={size}: must be two positive integers [H, W] (the canvas images "
            "travel on before the device resizes them) or (0, 0) for the split's largest image"
        )
    if not _positive_int(d.max_mask_runs):
        problems.append(f"data.max_mask_runs={d.max_mask_runs!r}: must be a positive integer")
    if _positive_int(d.max_instances) and d.max_instances > 254:
        problems.append(
            f"data.max_instances={d.max_instances}: at most 254 (the wire's instance map is uint8)"
        )
    return problems


def _train_batch_problems(
    config: Any, num_devices: int | None, process_count: int | None
) -> list[str]:
    import jax

    batch = config.train.batch_size
    if not _positive_int(batch):
        return [f"train.batch_size={batch!r}: must be a positive integer"]
    num_devices = jax.device_count() if num_devices is None else int(num_devices)
    process_count = jax.process_count() if process_count is None else int(process_count)
    data_axis, problem = _data_axis_size(config, num_devices)
    if problem:
        return [problem]
    from oanet_jax.train.sharding import batch_split_problems

    problems = batch_split_problems(batch, process_count, data_axis)
    if not problems:
        return []
    step = math.lcm(process_count, data_axis)
    return [
        f"train.batch_size={batch}: must be divisible by {' and by '.join(problems)} "
        f"(sharding.mesh_shape={tuple(config.sharding.mesh_shape)} over {num_devices} devices); "
        f"e.g. {step * max(1, round(batch / step))}"
    ]


def _image_size_problems(config: Any) -> list[str]:
    size = tuple(config.data.image_size)
    try:
        stride = coarsest_backbone_stride(config)
    except ConfigError as e:
        return [str(e)]
    if len(size) != 2 or not all(_positive_int(v) for v in size):
        return [f"data.image_size={size}: must be two positive integers [H, W]"]
    if any(v % stride for v in size):
        fixed = tuple(-(-v // stride) * stride for v in size)
        return [
            f"data.image_size={size}: each side must be a multiple of {stride}, the coarsest "
            f"stride of model.backbone={config.model.backbone!r}; e.g. {fixed}"
        ]
    return []


def _root_problems(config: Any, purpose: str) -> list[str]:
    d = config.data
    if d.source != "coco_panoptic" or os.path.exists(d.root):
        return []
    if purpose == "train" and "synthetic_num_images" in d:
        return []  # generated by the training loop (announced loudly)
    where = os.path.abspath(d.root)
    if "synthetic_num_images" in d:
        rule = "it is generated only by training (oanet-train) with a synthetic config"
    else:
        rule = (
            "only a synthetic config (one with data.synthetic_num_images) generates a missing "
            "root; check the path"
        )
    return [f"data.root={d.root!r}: does not exist ({where}); {rule}"]


def announce_synthetic_generation(root: str, num_train: int, num_val: int, size: Any) -> None:
    """The loud notice before a synthetic dataset is generated at a missing ``data.root``.

    Printed to stderr (framed, with the absolute path) and logged as a warning, so that a
    mistyped ``--config.data.root`` is noticed.
    """
    from absl import logging

    where = os.path.abspath(root)
    text = (
        f"data.root={root!r} does not exist: GENERATING a synthetic dataset there ({where}): "
        f"{num_train} train + {num_val} val images of {size[0]}x{size[1]}. If you meant an "
        "existing dataset, stop now (Ctrl-C) and check --config.data.root."
    )
    logging.warning("%s", text)
    rule = "!" * 72
    print(f"{rule}\n{text}\n{rule}", file=sys.stderr, flush=True)
