"""Learning-rate schedule and optimizer (detectron2's solver, paper section 4.2).

* Schedule: detectron2's ``WarmupMultiStepLR`` with linear warmup. At step ``t``::

      lr(t) = base_lr * warmup(t) * lr_decay_factor ** #{m in lr_decay_steps : m <= t}
      warmup(t) = f + (1 - f) * t / warmup_steps   if t < warmup_steps else 1
      f = warmup_init_lr / base_lr

  (``bisect_right`` on the milestones, as ``torch.optim.lr_scheduler.MultiStepLR``.)
* Optimizer: ``torch.optim.SGD(momentum=0.9, dampening=0, nesterov=False, weight_decay=1e-4)``:
  the weight decay is *coupled* (``g + wd * p`` is fed to the momentum buffer), the momentum
  buffer is ``buf = momentum * buf + g`` (first step ``buf = g``) and the update ``-lr * buf``,
  which is ``optax.sgd(schedule, momentum)``. Normalisation parameters get
  ``weight_decay_norm`` (0 by default, as detectron2's ``WEIGHT_DECAY_NORM``); biases get the
  ordinary weight decay (detectron2's ``WEIGHT_DECAY_BIAS`` default). Frozen parameters (the
  stem and res2..res{freeze_at} of the backbone) get no update at all and no optimizer state.
  Optional clipping by the global norm of the trainable gradients happens first, on the raw
  gradients, as detectron2's ``CLIP_GRADIENTS`` (type 'full_model', norm 2).

Parameters may be given *boxed* (``flax.linen.Partitioned`` leaves carrying logical axis names,
as ``jax.eval_shape(model.init, ...)`` returns them) or as plain arrays. A parameter is a
normalisation parameter when its logical axes are ``('norm',)`` or when the module that holds it
is named like a norm (``norm``, ``norm1``, ``stem_norm``, ``fuse_conv_norm``, ``bn``, ``gn2``,
...). Both rules agree on every model of this package (tested), so an optimizer built from plain
parameters (inside the train step) has exactly the labels of one built from boxed ones.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from oanet_jax.modeling import resnet

FROZEN = "frozen"
DECAY = "decay"
NO_DECAY = "no_decay"  # normalisation parameters (weight_decay_norm)

_NORM_MODULE = re.compile(r"(?:^|_)(?:norm|bn|gn)\d*$")
# The ResNets whose stem and first stages `freeze_at` freezes: the shared one, and the stuff
# branch's own under `model.sharing='none'`.
_BACKBONE_PATHS = (("backbone",), ("stuff_backbone",))


def learning_rate_schedule(train_config: Any) -> optax.Schedule:
    """detectron2's WarmupMultiStepLR (linear warmup) as an optax schedule.

    Args:
      train_config: ``config.train`` (uses base_lr, warmup_steps, warmup_init_lr,
        lr_decay_steps, lr_decay_factor).

    Returns:
      ``schedule(step) -> lr``: step an int scalar (or int array), lr float32 of the same shape.
    """
    base_lr = float(train_config.base_lr)
    warmup = int(train_config.warmup_steps)
    factor0 = float(train_config.warmup_init_lr) / base_lr if base_lr else 1.0
    milestones = tuple(int(m) for m in train_config.lr_decay_steps)
    if list(milestones) != sorted(milestones):
        raise ValueError(f"lr_decay_steps must be increasing, got {milestones}")
    gamma = float(train_config.lr_decay_factor)

    def schedule(step: Any) -> jax.Array:
        t = jnp.asarray(step, jnp.int32)
        if warmup > 0:
            alpha = t.astype(jnp.float32) / warmup
            warm = jnp.where(t < warmup, factor0 * (1.0 - alpha) + alpha, 1.0)
        else:
            warm = jnp.ones_like(t, jnp.float32)
        num_decays = sum((t >= m).astype(jnp.int32) for m in milestones) if milestones else 0
        decay = jnp.power(jnp.float32(gamma), jnp.asarray(num_decays, jnp.float32))
        return (base_lr * warm * decay).astype(jnp.float32)

    return schedule


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def is_norm_module_name(name: str) -> bool:
    """Whether a module name denotes a normalisation layer ('norm1', 'stem_norm', 'bn', ...)."""
    return _NORM_MODULE.search(name) is not None


def param_labels(params: Any, freeze_at: int = 0) -> Any:
    """Labels every parameter 'frozen', 'decay' or 'no_decay' (normalisation parameters).

    Args:
      params: the model's 'params' collection, boxed (``nn.Partitioned`` leaves) or plain
        arrays / ShapeDtypeStructs; the backbone's parameters are under ``'backbone'`` (and
        the stuff branch's own ResNet, with ``model.sharing='none'``, under
        ``'stuff_backbone'``).
      freeze_at: detectron2 FREEZE_AT (stem + res2..res{freeze_at} frozen).

    Returns:
      A pytree of str with the structure of the *unboxed* params.
    """
    plain = nn.meta.unbox(params)
    masks = [resnet.frozen_param_mask(plain, freeze_at, path) for path in _BACKBONE_PATHS]
    frozen_leaves = [any(flags) for flags in zip(*map(jax.tree.leaves, masks), strict=True)]
    boxed_flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)
    if len(boxed_flat) != len(frozen_leaves):
        raise ValueError("params and their unboxed form have different numbers of leaves")
    labels = []
    for (path, leaf), is_frozen in zip(boxed_flat, frozen_leaves, strict=True):
        names = tuple(getattr(leaf, "names", ()) or ())
        module = _key_name(path[-2]) if len(path) >= 2 else ""
        if is_frozen:
            labels.append(FROZEN)
        elif names == ("norm",) or is_norm_module_name(module):
            labels.append(NO_DECAY)
        else:
            labels.append(DECAY)
    return jax.tree.unflatten(jax.tree.structure(plain), labels)


def make_optimizer(
    train_config: Any, params: Any, freeze_at: int = 0
) -> optax.GradientTransformation:
    """SGD with momentum, coupled weight decay, frozen-parameter masking and optional clipping.

    Args:
      train_config: ``config.train`` (schedule fields, momentum, weight_decay,
        weight_decay_norm, grad_clip_norm: 0 disables clipping).
      params: the params pytree (boxed or plain; only its structure, paths and logical axis
        names are used, so ShapeDtypeStructs or tracers work).
      freeze_at: detectron2 FREEZE_AT (``config.model.freeze_at``).

    Returns:
      An optax transformation over the *plain* (unboxed) params tree; it also accepts boxed
      params in ``init`` (the state then carries the boxes, to read sharding specs from).
      Updates of frozen parameters are exactly zero.
    """
    labels = param_labels(params, freeze_at)
    trainable = jax.tree.map(lambda lab: "frozen" if lab == FROZEN else "trainable", labels)
    decay_mask = jax.tree.map(lambda lab: lab == DECAY, labels)
    norm_mask = jax.tree.map(lambda lab: lab == NO_DECAY, labels)

    parts: list[optax.GradientTransformation] = []
    clip = float(train_config.grad_clip_norm)
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    wd = float(train_config.weight_decay)
    if wd > 0:
        parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
    wd_norm = float(train_config.weight_decay_norm)
    if wd_norm > 0:
        parts.append(optax.add_decayed_weights(wd_norm, mask=norm_mask))
    parts.append(
        optax.sgd(
            learning_rate_schedule(train_config),
            momentum=float(train_config.momentum) or None,
            nesterov=False,
        )
    )
    return optax.multi_transform(
        {"trainable": optax.chain(*parts), "frozen": optax.set_to_zero()}, trainable
    )


def trainable_global_norm(grads: Any, labels: Any) -> jax.Array:
    """Global L2 norm of the gradients of the non-frozen parameters.

    Args:
      grads: gradient pytree (plain arrays).
      labels: :func:`param_labels` of the params (same structure).

    Returns:
      [] float32.
    """
    total = jnp.zeros((), jnp.float32)
    for g, lab in zip(jax.tree.leaves(grads), jax.tree.leaves(labels), strict=True):
        if lab != FROZEN:
            total = total + jnp.sum(jnp.square(g.astype(jnp.float32)))
    return jnp.sqrt(total)
