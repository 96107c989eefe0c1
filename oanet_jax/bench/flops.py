"""FLOPs section: arithmetic of one training step per image, ours vs torchvision's Mask R-CNN.

Deterministic counts (valid on a loaded machine; nothing is timed):

* Ours: XLA's cost analysis (``jax.jit(...).lower(...).compile().cost_analysis()['flops']``) of
  the full jitted train step of `oanet_jax.train.step` (forward with on-device targets, the
  losses of Eq. 1, backward, SGD update), `configs/base.py` paper defaults (ResNet-50 FPN, FrozenBN,
  512 RoIs/image, stuff head over 133 classes, SRM) at a square padded image size.
* Peer: `torch.utils.flop_counter.FlopCounterMode` over the forward with losses and the backward
  of torchvision's ``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` in train mode
  (resize a no-op: min/max size = the image side), on the same images and ground truth
  (`oanet_jax.bench.train.make_batch`). FlopCounterMode counts matrix products and convolutions
  only; the SGD update adds no such op.

Mask-RoI buckets: our mask head runs inside a `jax.lax.switch` over
`config.model.mask_head.train_buckets`, and XLA's cost analysis of a ``conditional`` counts its
dearest branch, not the branch a batch takes (the section measures this on a toy switch and
reports it). So the section finds, with a jitted forward pass of the step's own parameters and
sampling key, how many foreground RoIs each image has and which bucket the step takes, and counts
the step compiled with that bucket forced (``OANet.train_mask_rois``: no switch). It also counts
the unbucketed step (all F = 128 foreground slots per image, the mask head before buckets).

Per-module breakdown: the convolutions and matrix products of the step's jaxpr, grouped by the
flax module in their name stack (forward and backward separately), each costed by XLA's cost
analysis of that one op; 'other' holds those outside the modules (losses, resampling), and
'non_conv_matmul' the rest of XLA's total (elementwise ops, reductions, RoIAlign's gathers, the
optimizer update). Torchvision's counts are grouped by its modules (FlopCounterMode attributes
the backward to the module too; it counts convolutions and matrix products only).

Positives: with random weights the foreground RoIs of an image are its ground-truth boxes (the
sampler appends them to the proposals) plus the proposals overlapping one with IoU >= 0.5; both
sides' counts are reported (torchvision's: the boxes its mask head pools).

This module imports torch before anything that might import tensorflow (the other order crashes
on this machine) and imports no tensorflow itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from jax.extend import core as jax_core
from torch.utils.flop_counter import FlopCounterMode

from configs import base
from oanet_jax.bench import train as train_bench
from oanet_jax.modeling.build import build_model
from oanet_jax.modeling.oanet import choose_bucket, mask_buckets
from oanet_jax.train import sharding, state, step

# Our flax modules, in the order of the report; a name-stack segment equal to one of these names
# assigns an op to that group (the first such segment from the left wins).
OURS_GROUPS = {
    "backbone": "backbone",
    "fpn": "fpn",
    "rpn": "rpn",
    "box_head": "box_head",
    "box_predictor": "box_head",
    "mask_head": "mask_head",
    "stuff_head": "stuff_head",
    "srm": "srm",
}
GROUPS = ("backbone", "fpn", "rpn", "box_head", "mask_head", "stuff_head", "srm", "other")
# torchvision MaskRCNN modules -> the same groups.
TORCHVISION_GROUPS = {
    "MaskRCNN.backbone.body": "backbone",
    "MaskRCNN.backbone.fpn": "fpn",
    "MaskRCNN.rpn": "rpn",
    "MaskRCNN.roi_heads.box_head": "box_head",
    "MaskRCNN.roi_heads.box_predictor": "box_head",
    "MaskRCNN.roi_heads.mask_head": "mask_head",
    "MaskRCNN.roi_heads.mask_predictor": "mask_head",
}
COUNTED_PRIMITIVES = ("conv_general_dilated", "dot_general")


def _flops(cost: Any) -> float:
    """The 'flops' entry of a cost analysis (a dict, or a list of one dict in older jax)."""
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def toy_switch_flops(sizes: tuple[int, ...] = (16, 32, 128), width: int = 256) -> dict:
    """How XLA's cost analysis counts a ``conditional``: a toy `jax.lax.switch` over matmuls.

    Branch i multiplies the first ``sizes[i]`` rows of a [max(sizes), width] matrix by a
    [width, width] one.

    Returns:
      {'branches': flops of each branch compiled alone, 'switch': flops XLA reports for the
      switch, 'counts': 'max' | 'sum' | 'other'}.
    """
    x = jax.ShapeDtypeStruct((max(sizes), width), jnp.float32)
    w = jax.ShapeDtypeStruct((width, width), jnp.float32)

    def branch(k: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
        return lambda a, b: jnp.sum(a[:k] @ b)

    def switched(i: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        return jax.lax.switch(i, [branch(k) for k in sizes], a, b)

    alone = [_flops(jax.jit(branch(k)).lower(x, w).compile().cost_analysis()) for k in sizes]
    index = jax.ShapeDtypeStruct((), jnp.int32)
    total = _flops(jax.jit(switched).lower(index, x, w).compile().cost_analysis())
    # Within a few flops (XLA also counts the clamp of the branch index).
    counts = "other"
    for name, value in (("max", max(alone)), ("sum", sum(alone))):
        if abs(total - value) <= 1e-3 * value:
            counts = name
    return {"branch_sizes": list(sizes), "branches": alone, "switch": total, "counts": counts}


# ------------------------------------------------------------------------------ ours, by module
def _group_of(name_stack: str) -> str:
    for segment in name_stack.split("/"):
        if segment in OURS_GROUPS:
            return OURS_GROUPS[segment]
    return "other"


def _sub_jaxprs(params: Mapping[str, Any]):
    """(jaxpr, multiplicity) of the sub-computations of one equation's params."""
    for value in params.values():
        items = value if isinstance(value, list | tuple) else (value,)
        for item in items:
            if isinstance(item, jax_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax_core.Jaxpr):
                yield item


@functools.cache
def _op_flops(primitive: Any, avals: tuple[tuple[tuple[int, ...], str], ...], params: Any) -> float:
    args = [jax.ShapeDtypeStruct(shape, np.dtype(dtype)) for shape, dtype in avals]
    fn = jax.jit(lambda *a: primitive.bind(*a, **dict(params)))
    return _flops(fn.lower(*args).cost_analysis())


def module_flops(fn: Callable[..., Any], *args: Any) -> dict[str, dict[str, float]]:
    """Convolution and matmul FLOPs of ``fn(*args)`` by flax module, forward and backward.

    Walks the jaxpr of ``fn`` (and its sub-jaxprs: a scan's body counts ``length`` times, a
    while loop's body once, a conditional's dearest branch as XLA does); each
    ``conv_general_dilated`` / ``dot_general`` is costed by XLA's cost analysis of that op alone
    (which counts only the kernel taps that land on data, as the whole step's analysis does) and
    assigned to the module named in its name stack (`OURS_GROUPS`); an op under ``transpose(``
    is backward.

    Returns:
      {group: {'forward': flops, 'backward': flops}} over `GROUPS` except 'other', which holds
      the convolutions and matmuls outside the modules (losses, resampling).
    """
    out = {g: {"forward": 0.0, "backward": 0.0} for g in GROUPS}

    def walk(jaxpr: Any, prefix: str, times: float) -> dict[str, dict[str, float]]:
        acc = {g: {"forward": 0.0, "backward": 0.0} for g in GROUPS}
        for eqn in jaxpr.eqns:
            stack = f"{prefix}/{eqn.source_info.name_stack}"
            name = eqn.primitive.name
            if name in COUNTED_PRIMITIVES:
                avals = tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in eqn.invars)
                params = tuple(sorted(eqn.params.items()))
                flops = _op_flops(eqn.primitive, avals, params) * times
                direction = "backward" if "transpose(" in stack else "forward"
                acc[_group_of(stack)][direction] += flops
                continue
            subs = list(_sub_jaxprs(eqn.params))
            if not subs:
                continue
            if name == "cond":  # XLA counts the dearest branch
                branches = [walk(s, stack, times) for s in subs]
                best = max(branches, key=lambda b: sum(sum(d.values()) for d in b.values()))
                parts = [best]
            else:
                n = float(eqn.params.get("length", 1)) if name == "scan" else 1.0
                parts = [walk(s, stack, times * n) for s in subs]
            for part in parts:
                for g, d in part.items():
                    for k, v in d.items():
                        acc[g][k] += v
        return acc

    closed = jax.make_jaxpr(fn)(*args)
    for g, d in walk(closed.jaxpr, "", 1.0).items():
        for k, v in d.items():
            out[g][k] += v
    return out


# ---------------------------------------------------------------------------------- torchvision
def torchvision_flops(images: list[torch.Tensor], targets: list[dict], size: int) -> dict:
    """FLOPs of one torchvision Mask R-CNN training step (forward with losses + backward).

    Args:
      images: [3, size, size] float tensors in [0, 1].
      targets: torchvision targets (boxes, labels, full-image masks).
      size: the image side (min and max size of its transform: no resize).

    Returns:
      {'total', 'forward', 'backward', 'forward_by_module': {group: flops}, 'mask_rois':
      mask-head boxes per image}. The split by module is of the forward pass only:
      FlopCounterMode's module tracker attributes backward ops unreliably (in a trial, half of
      the backbone's backward landed in the FPN and the RPN).
    """
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=size, max_size=size
    )
    model.train()
    mask_rois: list[int] = []

    def record(_module, inputs, _output):
        mask_rois.extend(int(p.shape[0]) for p in inputs[1])

    hook = model.roi_heads.mask_roi_pool.register_forward_hook(record)
    forward = FlopCounterMode(display=False)
    with forward:
        loss = sum(model(images, targets).values())
    backward = FlopCounterMode(display=False)
    with backward:
        loss.backward()
    hook.remove()
    counts = forward.get_flop_counts()
    by_module = {g: 0.0 for g in GROUPS}
    for name, group in TORCHVISION_GROUPS.items():
        by_module[group] += float(sum(counts.get(name, {}).values()))
    fwd, bwd = float(forward.get_total_flops()), float(backward.get_total_flops())
    by_module["other"] = fwd - sum(by_module.values())
    return {
        "total": fwd + bwd,
        "forward": fwd,
        "backward": bwd,
        "forward_by_module": by_module,
        "mask_rois": mask_rois,
    }


# ------------------------------------------------------------------------------------- the run
def _compiler_options() -> dict | None:
    """CPU: compile without LLVM's optimisations (the same HLO, so the same count, faster)."""
    return state.CPU_FAST_COMPILE if jax.default_backend() == "cpu" else None


def _step_flops(model, config, mesh, state_sharding, train_state, batch) -> float:
    fn = step.jit_train_step(
        model, config, mesh, state_sharding, compiler_options=_compiler_options()
    )
    return _flops(fn.lower(train_state, batch).compile().cost_analysis())


def count(config, num_instances: int = 8, *, torchvision_side: bool = True) -> dict:
    """Counts ours (bucket taken, unbucketed) and torchvision's FLOPs on one synthetic batch.

    Args:
      config: a full config; `data.image_size` (square) and `train.batch_size` set the batch.
      num_instances: ground-truth boxes (with masks) per image.
      torchvision_side: also count torchvision's (needs its 91-class model: the base config
        sizes only).

    Returns:
      The JSON-able result (see `run`).
    """
    b = int(config.train.batch_size)
    size = int(config.data.image_size[0])
    ours_batch, torch_images, targets = train_bench.make_batch(config, num_instances)
    ours_batch["classes"] %= int(config.model.num_thing_classes)  # no-op for the 80 COCO things
    model = build_model(config)
    mesh = sharding.make_mesh(config.sharding, devices=jax.devices()[:1])
    train_state, state_sharding = state.create_train_state(config, model, mesh, ours_batch)
    device_batch = sharding.shard_batch(ours_batch, mesh)

    # The bucket the step takes: its own parameters and sampling key (train_step's).
    key = jax.random.fold_in(jax.random.wrap_key_data(train_state.rng), train_state.step)
    variables = {"params": train_state.params, "batch_stats": train_state.batch_stats}
    forward = jax.jit(
        lambda v, bt, k: model.apply(v, bt, train=True, rngs={"sampling": k}),
        compiler_options=_compiler_options(),
    )
    out = forward(variables, device_batch, key)
    num_fg = [int(n) for n in np.asarray(out["mask_num_fg"])]
    taken = int(out["mask_rois"])
    rc = config.model.roi
    f = int(rc.batch_size_per_image * rc.positive_fraction)
    buckets = mask_buckets(config.model.mask_head.train_buckets, f)

    result: dict[str, Any] = {
        "batch": b,
        "image_size": size,
        "gt_boxes_per_image": num_instances,
        "foreground_rois_per_image": num_fg,
        "buckets": list(buckets),
        "bucket_taken": taken,
    }
    tv = torchvision_flops(torch_images, targets, size) if torchvision_side else None
    variants = {"taken": taken, "unbucketed": f}
    if tv is not None:
        # The bucket our step would take with torchvision's number of foreground RoIs (its
        # random proposals differ from ours): the mask-head work of an equal footing.
        index = int(choose_bucket(jnp.asarray(tv["mask_rois"]), buckets))
        variants["at_torchvision_foreground"] = buckets[index]
    for name, k in variants.items():
        counted_as = [n for n in variants if f"ours_{n}" in result and variants[n] == k]
        same = [f"ours_{n}" for n in counted_as]
        if same:  # the same bucket as a variant counted already
            result[f"ours_{name}"] = result[same[0]]
            continue
        forced = model.clone(train_mask_rois=k)
        total = _step_flops(forced, config, mesh, state_sharding, train_state, device_batch)
        step_fn = functools.partial(step.train_step, model=forced, config=config)
        modules = module_flops(step_fn, train_state, device_batch)
        counted = sum(sum(d.values()) for d in modules.values())
        split = {}
        for g in GROUPS:
            forward, backward = modules[g]["forward"], modules[g]["backward"]
            split[g] = {
                "forward": forward / b,
                "backward": backward / b,
                "share": (forward + backward) / total,
            }
        result[f"ours_{name}"] = {
            "mask_rois_per_image": k,
            "flops_per_image": total / b,
            "conv_matmul_flops_per_image": counted / b,
            "by_module_per_image": split,
            # Elementwise ops, reductions, RoIAlign's gathers, the optimizer update, ...
            "non_conv_matmul_per_image": (total - counted) / b,
        }
    ours = result["ours_taken"]["flops_per_image"]
    result["bucket_saving"] = 1.0 - ours / result["ours_unbucketed"]["flops_per_image"]
    if tv is not None:
        peer = tv["total"] / b
        result["torchvision"] = {
            "flops_per_image": peer,
            "forward_per_image": tv["forward"] / b,
            "backward_per_image": tv["backward"] / b,
            "foreground_rois_per_image": tv["mask_rois"],
            "forward_by_module_per_image": {g: v / b for g, v in tv["forward_by_module"].items()},
        }
        result["ratio_ours_over_torchvision"] = ours / peer  # the headline: the bucket taken
        for name in variants:
            result[f"ratio_{name}_over_torchvision"] = (
                result[f"ours_{name}"]["flops_per_image"] / peer
            )
    result["xla_conditional"] = toy_switch_flops()
    result["note"] = (
        "ours_taken: the step compiled with the bucket this batch takes forced (XLA's cost "
        "analysis counts a conditional as its dearest branch, see xla_conditional); "
        "ours_unbucketed: the mask head on all F slots; ours_at_torchvision_foreground: the "
        "bucket that would hold torchvision's foreground count on this batch. by_module: "
        "convolutions and matmuls (XLA cost of each op), 'other' = those outside the modules "
        "(losses, resampling);"
        "non_conv_matmul = XLA total minus all convolutions and matmuls."
    )
    return result


def run(batch: int = 2, size: int = 512, num_instances: int = 8) -> dict:
    """FLOPs per training image, ours and torchvision's, on the same batch (paper defaults).

    Args:
      batch: images per step.
      size: square padded image side (a multiple of 32).
      num_instances: ground-truth boxes with masks per image.

    Returns:
      JSON-able dict: the batch, foreground RoIs per image (ours, torchvision's), the buckets and
      the one taken; for ours with the bucket taken, unbucketed, and with the bucket that
      torchvision's foreground count would take: FLOPs per image and the per-module split
      (forward, backward, share); torchvision's FLOPs per image (forward, backward) and its
      forward split; the ratios ours / torchvision; how XLA counts a conditional (toy switch).
    """
    config = base.get_config()
    config.data.image_size = (size, size)
    config.train.batch_size = batch
    return count(config, num_instances)
