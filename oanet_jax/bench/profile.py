"""Profile section: the training step broken into its parts, ours beside torchvision's.

Each part of our step (`configs/base.py` paper defaults unless a config is given) is jitted on
its own, on the intermediates a real step computes for the batch of `oanet_jax.bench.train`
(random weights, `num_instances` ground-truth boxes per image):

* differentiable parts (backbone + FPN, RPN head, RoIAlign, box head, mask head, stuff head,
  semantic loss, SRM) run forward and backward: the gradient of ``0.5 * sum(out ** 2)`` (or of
  the part's own loss) w.r.t. the part's parameters and, where the real step needs it, its
  input features;
* proposals (per-level top-k, decode, NMS) and target assignment run forward only (no gradient
  flows through them in the step);
* the optimizer update is ``tx.update`` + ``apply_updates`` of the step's optimizer.

Time: median wall-clock of the compiled executable (warm-up excluded), through
`oanet_jax.bench.timing`; where torchvision has the part, ours and torchvision's are timed in
turn (`time_interleaved`) so machine noise hits both alike. FLOPs: ours from XLA's
``compiled.cost_analysis()['flops']`` (every HLO op, elementwise included; a ``while`` body is
counted once, so NMS and the chunked losses are undercounted), torchvision's from
``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions only).
Torchvision's parts are the pieces of ``maskrcnn_resnet50_fpn(weights=None,
weights_backbone=None)`` in train mode (its backbone then has BatchNorm2d and no frozen stage,
unlike ours). The plain comparison times one and the same ResNet-50 + FPN (FrozenBN, stem and
res2 frozen, P2..P6) on both sides, forward + backward, to separate the framework from our
design. The `avoidable` entry compares variants of the costs that issue 10 calls avoidable.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from configs import base
from oanet_jax import losses
from oanet_jax.bench.timing import time_fn, time_interleaved
from oanet_jax.bench.train import make_batch
from oanet_jax.modeling import targets as targets_lib
from oanet_jax.modeling.build import build_model
from oanet_jax.modeling.oanet import POOLER_STRIDES
from oanet_jax.modeling.rpn import generate_proposals
from oanet_jax.ops import resize
from oanet_jax.ops import roi_align as roi_ops
from oanet_jax.train import optimizer as optimizer_lib
from oanet_jax.train import sharding, state, step

Array = jax.Array

# The rows of the table, in step order.
PARTS = (
    "backbone_fpn",
    "rpn_head",
    "proposals",
    "rpn_targets",
    "roi_sampling",
    "mask_targets",
    "srm_targets",
    "roi_align_box_fwd",
    "roi_align_box_fwd_bwd",
    "box_head",
    "roi_align_mask_fwd",
    "roi_align_mask_fwd_bwd",
    "mask_head",
    "stuff_head",
    "semantic_loss",
    "srm",
    "optimizer",
)


# --------------------------------------------------------------------------------- helpers
def xla_cost(compiled: Any) -> dict[str, float]:
    """FLOPs and memory of a compiled XLA executable.

    Args:
      compiled: a `jax.stages.Compiled`.

    Returns:
      {'flops': XLA's cost-analysis FLOPs, 'temp_bytes': scratch memory of the executable,
      'peak_bytes': temp + arguments + outputs (an upper bound of the live device memory)}.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    out = {"flops": float((cost or {}).get("flops", 0.0))}
    try:
        mem = compiled.memory_analysis()
        out["temp_bytes"] = float(mem.temp_size_in_bytes)
        out["peak_bytes"] = float(
            mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        )
    except Exception:  # noqa: BLE001 - a backend without memory analysis
        pass
    return out


def compile_part(fn: Callable[..., Any], *args: Any) -> tuple[Callable[[], Any], dict]:
    """Jits and compiles ``fn(*args)``; returns a no-argument runner and its XLA cost."""
    compiled = jax.jit(fn).lower(*args).compile()
    return (lambda: compiled(*args)), xla_cost(compiled)


def torch_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call of ``fn`` counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def _half_sq(tree: Any) -> Array:
    """``0.5 * sum(x ** 2)`` over the float leaves (its cotangent is the output itself)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return sum(0.5 * jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)


def _torch_half_sq(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum(0.5 * (t.float() ** 2).sum() for t in tensors)


def _ms(t: dict) -> float:
    return 1e3 * float(t["median_s"])


def _row(ours_t: dict, ours_cost: dict, tv_t: dict | None = None, tv_flops: float | None = None):
    row = {
        "ours_ms": _ms(ours_t),
        "ours_gflop": ours_cost["flops"] / 1e9,
        "ours_times_ms": [1e3 * t for t in ours_t["times_s"]],
    }
    if "peak_bytes" in ours_cost:
        row["ours_peak_mb"] = ours_cost["peak_bytes"] / 2**20
    if tv_t is not None:
        row["torchvision_ms"] = _ms(tv_t)
        row["torchvision_times_ms"] = [1e3 * t for t in tv_t["times_s"]]
        row["torchvision_gflop"] = None if tv_flops is None else tv_flops / 1e9
        row["ratio"] = float(tv_t["median_s"]) / float(ours_t["median_s"])
    return row


def _measure(
    ours: Callable[[], Any],
    ours_cost: dict,
    tv: Callable[[], Any] | None,
    repeats: int,
) -> dict:
    """Times ours (and torchvision's, interleaved) and counts torchvision's FLOPs."""
    if tv is None:
        return _row(time_fn(ours, warmup=1, repeats=repeats), ours_cost)
    tv_flops = torch_flops(tv)
    t = time_interleaved({"ours": ours, "tv": tv}, warmup=1, repeats=repeats)
    return _row(t["ours"], ours_cost, t["tv"], tv_flops)


def _progress(name: str, row: dict) -> None:
    """One line per measured part on stderr, so a long run shows its figures as it goes."""
    brief = {k: round(v, 3) for k, v in row.items() if isinstance(v, float)}
    print(f"[profile] {name} {brief}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ our parts
class _Ours:
    """Our model's parts as pure functions of (params subtree, inputs), plus the intermediates."""

    def __init__(self, config: Any, batch: dict[str, np.ndarray]):
        self.config = config
        self.model = build_model(config)
        mesh = sharding.make_mesh(config.sharding, devices=jax.devices()[:1])
        self.mesh = mesh
        self.state, self.state_sharding = state.create_train_state(config, self.model, mesh, batch)
        self.params = self.state.params
        self.batch = {k: jnp.asarray(v) for k, v in batch.items()}
        m = config.model
        self.f = int(m.roi.batch_size_per_image * m.roi.positive_fraction)

    def apply(self, names: Sequence[str], sub: dict, method: Callable[..., Any], *args: Any):
        params = {**{k: v for k, v in self.params.items() if k not in names}, **sub}
        variables = {"params": params}
        if jax.tree.leaves(self.state.batch_stats):
            variables["batch_stats"] = self.state.batch_stats  # FrozenBN statistics
        return self.model.apply(variables, *args, method=method)

    def sub(self, names: Sequence[str]) -> dict:
        return {k: self.params[k] for k in names}

    def grad_part(
        self,
        names: Sequence[str],
        method: Callable[..., Any],
        loss: Callable[[Any], Array] = _half_sq,
        diff_inputs: bool = True,
    ) -> Callable[..., Any]:
        """``(sub, *inputs) -> grads`` of ``loss(method(*inputs))`` w.r.t. sub (and inputs)."""

        def objective(sub, *inputs):
            return loss(self.apply(names, sub, method, *inputs))

        argnums = (0, 1) if diff_inputs else 0
        return jax.grad(objective, argnums=argnums)


def _backbone_fpn(m, image):
    pyramid = m.fpn(m.backbone(image, train=True))
    return [pyramid[f"p{k}"] for k in range(2, 7)]


def _rpn_head(m, levels):
    return m.rpn(levels)


def _box_head(m, pooled):
    return m.box_predictor(m.box_head(pooled))


def _mask_head(m, pooled):
    return m.mask_head(pooled)


def _stuff_head(m, shared):
    return m.stuff_head(shared, train=True)["logits"]


def _srm(m, canvas):
    return m.srm(canvas)


def _our_parts(ours: _Ours, repeats: int, tv: _Torch | None, results: dict) -> dict:
    """Builds, runs and times every part of our step; returns the intermediates."""
    config, model, batch = ours.config, ours.model, ours.batch
    mc = config.model
    image = batch["image"].astype(model.dtype)
    b = image.shape[0]
    image_size = tuple(image.shape[1:3])
    key_rpn, key_roi = jax.random.split(jax.random.key(0))

    def tv_fn(name):
        return None if tv is None else tv.parts.get(name)

    def record(name, run, cost):
        results[name] = _measure(run, cost, tv_fn(name), repeats)
        _progress(name, results[name])

    # Backbone + FPN: gradient w.r.t. their parameters (the image needs none).
    names = ("backbone", "fpn")
    fwd = jax.jit(lambda sub, x: ours.apply(names, sub, _backbone_fpn, x))
    levels = fwd(ours.sub(names), image)
    run, cost = compile_part(
        ours.grad_part(names, _backbone_fpn, diff_inputs=False), ours.sub(names), image
    )
    record("backbone_fpn", run, cost)

    names = ("rpn",)
    rpn_out = jax.jit(lambda sub, x: ours.apply(names, sub, _rpn_head, x))(ours.sub(names), levels)
    run, cost = compile_part(ours.grad_part(names, _rpn_head), ours.sub(names), levels)
    record("rpn_head", run, cost)

    anchors = model.anchors(image_size)

    def proposals_fn(objectness, deltas, image_shape):
        rc = mc.rpn
        return generate_proposals(
            objectness,
            deltas,
            [jnp.asarray(a) for a in anchors],
            image_shape,
            pre_nms_topk=int(rc.pre_nms_topk_train),
            post_nms_topk=int(rc.post_nms_topk_train),
            nms_thresh=float(rc.nms_thresh),
            min_size=float(rc.min_size),
            box_weights=tuple(rc.box_weights),
            clamp=float(mc.roi.bbox_reg_clamp),
        )

    prop_args = (rpn_out["objectness"], rpn_out["deltas"], batch["image_shape"])
    run, cost = compile_part(proposals_fn, *prop_args)
    props = run()
    record("proposals", run, cost)

    gt_boxes = batch["boxes"].astype(jnp.float32)
    flat_anchors = jnp.concatenate([jnp.asarray(a) for a in anchors], axis=0)

    def rpn_targets_fn(bx, v, c, shape, key):
        rc = mc.rpn
        return jax.vmap(
            lambda bx, v, c, shape, k: targets_lib.rpn_targets(
                flat_anchors,
                bx,
                v,
                c,
                shape,
                k,
                iou_thresholds=tuple(rc.iou_thresholds),
                batch_size_per_image=int(rc.batch_size_per_image),
                positive_fraction=float(rc.positive_fraction),
                box_weights=tuple(rc.box_weights),
            )
        )(bx, v, c, shape, jax.random.split(key, b))

    run, cost = compile_part(
        rpn_targets_fn, gt_boxes, batch["valid"], batch["is_crowd"], batch["image_shape"], key_rpn
    )
    record("rpn_targets", run, cost)

    def sample_fn(p, pv, bx, cl, v, c, key):
        rc = mc.roi
        return jax.vmap(
            lambda p, pv, bx, cl, v, c, k: targets_lib.sample_rois(
                p,
                pv,
                bx,
                cl,
                v,
                c,
                k,
                num_classes=int(mc.num_thing_classes),
                batch_size_per_image=int(rc.batch_size_per_image),
                positive_fraction=float(rc.positive_fraction),
                iou_threshold=float(rc.iou_threshold),
                box_weights=tuple(rc.box_weights),
            )
        )(p, pv, bx, cl, v, c, jax.random.split(key, b))

    sample_args = (
        props["boxes"],
        props["valid"],
        gt_boxes,
        batch["classes"],
        batch["valid"],
        batch["is_crowd"],
        key_roi,
    )
    run, cost = compile_part(sample_fn, *sample_args)
    rois = run()
    record("roi_sampling", run, cost)

    f = ours.f
    fg_rois = rois["rois"][:, :f]
    mask_out = 2 * int(mc.mask_head.pooler_resolution)

    def mask_targets_fn(masks, bx, r, idx):
        return jax.vmap(
            lambda m, bx, r, i: targets_lib.mask_targets(m, bx, r, i, out_size=mask_out)
        )(masks, bx, r, idx)

    mt_args = (batch["masks"], gt_boxes, fg_rois, rois["matched_gt"][:, :f])
    run, cost = compile_part(mask_targets_fn, *mt_args)
    mask_t = run()
    record("mask_targets", run, cost)

    def srm_targets_fn(masks, bx, cl, v, sem):
        return jax.vmap(
            lambda m, bx, cl, v, sem: targets_lib.srm_targets(
                m,
                bx,
                cl,
                v,
                sem,
                image_size=image_size,
                stride=int(mc.srm.stride),
                num_thing_classes=int(mc.num_thing_classes),
            )
        )(masks, bx, cl, v, sem)

    srm_args = (
        batch["masks"],
        gt_boxes,
        batch["classes"],
        batch["valid"] & ~batch["is_crowd"],
        batch["semantic"],
    )
    run, cost = compile_part(srm_targets_fn, *srm_args)
    srm_t = run()
    record("srm_targets", run, cost)

    pool_levels = levels[:4]

    def pool(feats, boxes, resolution):
        rc = mc.roi
        return roi_ops.multilevel_roi_align(
            feats,
            boxes,
            resolution,
            strides=POOLER_STRIDES,
            sampling_ratio=int(rc.pooler_sampling_ratio),
            aligned=bool(rc.pooler_aligned),
            level_mapper=rc.pooler_level_mapper,
        )

    def pool_parts(tag, boxes, resolution):
        fwd_fn = functools.partial(pool, resolution=resolution)
        run, cost = compile_part(fwd_fn, pool_levels, boxes)
        pooled = run()
        record(f"roi_align_{tag}_fwd", run, cost)
        bwd_fn = jax.grad(lambda feats, bx: _half_sq(fwd_fn(feats, bx)))
        run, cost = compile_part(bwd_fn, pool_levels, boxes)
        record(f"roi_align_{tag}_fwd_bwd", run, cost)
        return pooled

    box_pooled = pool_parts("box", rois["rois"], int(mc.box_head.pooler_resolution))
    names = ("box_head", "box_predictor")

    def box_loss(out):
        cls, box = losses.fast_rcnn_losses(
            out["class_logits"],
            out["box_deltas"],
            rois["classes"],
            rois["box_targets"],
            rois["valid"],
            smooth_l1_beta=float(mc.roi.smooth_l1_beta),
        )
        return cls + box

    run, cost = compile_part(
        ours.grad_part(names, _box_head, box_loss), ours.sub(names), box_pooled
    )
    record("box_head", run, cost)

    mask_pooled = pool_parts("mask", fg_rois, int(mc.mask_head.pooler_resolution))
    names = ("mask_head",)

    def mask_loss(logits):
        return losses.mask_loss(logits, rois["classes"][:, :f], mask_t, rois["is_fg"][:, :f])

    run, cost = compile_part(
        ours.grad_part(names, _mask_head, mask_loss), ours.sub(names), mask_pooled
    )
    record("mask_head", run, cost)

    names = ("stuff_head",)
    shared = rpn_out["shared"][:4]
    stuff_logits = jax.jit(lambda sub, x: ours.apply(names, sub, _stuff_head, x))(
        ours.sub(names), shared
    )
    run, cost = compile_part(ours.grad_part(names, _stuff_head), ours.sub(names), shared)
    record("stuff_head", run, cost)

    def seg_fn(logits, semantic):
        return losses.semantic_loss(logits, semantic, ignore_label=int(config.loss.ignore_label))

    run, cost = compile_part(jax.grad(seg_fn), stuff_logits, batch["semantic"])
    record("semantic_loss", run, cost)

    names = ("srm",)

    def srm_loss(logits):
        return losses.srm_loss(logits, srm_t["labels"])

    run, cost = compile_part(
        ours.grad_part(names, _srm, srm_loss, False), ours.sub(names), srm_t["canvas"]
    )
    record("srm", run, cost)

    freeze_at = int(mc.freeze_at)
    tx = optimizer_lib.make_optimizer(config.train, ours.params, freeze_at)

    def update_fn(params, grads, opt_state):
        updates, new_opt = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt

    run, cost = compile_part(update_fn, ours.params, ours.params, ours.state.opt_state)
    record("optimizer", run, cost)
    return {
        "stuff_logits": stuff_logits,
        "levels": levels,
        "rois": rois,
        "rpn_out": rpn_out,
        "proposals_fn": proposals_fn,
        "anchors": anchors,
        "image_shape": batch["image_shape"],
    }


# -------------------------------------------------------------------------- torchvision
class _Torch:
    """torchvision's Mask R-CNN training pieces on the same batch, each a no-argument callable."""

    def __init__(self, size: int, torch_images: list, targets: list):
        torch.manual_seed(0)
        tv = torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, min_size=size, max_size=size
        )
        tv.train()
        self.model = tv
        self.raw_images, self.raw_targets = torch_images, targets
        images, targets = tv.transform(torch_images, targets)
        self.images, self.targets = images, targets
        with torch.no_grad():
            feats = tv.backbone(images.tensors)
        self.features = feats
        levels = list(feats.values())
        rpn = tv.rpn
        with torch.no_grad():
            objectness, deltas = rpn.head(levels)
        anchors = rpn.anchor_generator(images, levels)
        num_per_level = [o[0].numel() for o in objectness]
        obj_flat, deltas_flat = torchvision.models.detection.rpn.concat_box_prediction_layers(
            objectness, deltas
        )
        n = len(anchors)
        with torch.no_grad():
            boxes, _ = rpn.filter_proposals(
                rpn.box_coder.decode(deltas_flat, anchors).view(n, -1, 4),
                obj_flat,
                images.image_sizes,
                num_per_level,
            )
        roi = tv.roi_heads
        props, matched, labels, reg = roi.select_training_samples(
            [b.clone() for b in boxes], targets
        )
        pos = [torch.where(lab > 0)[0] for lab in labels]
        mask_props = [p[i] for p, i in zip(props, pos, strict=True)]
        pos_matched = [m[i] for m, i in zip(matched, pos, strict=True)]
        with torch.no_grad():
            box_pooled = roi.box_roi_pool(feats, props, images.image_sizes)
            mask_pooled = roi.mask_roi_pool(feats, mask_props, images.image_sizes)
        self.num_mask_rois = sum(len(p) for p in mask_props)

        def backbone_fpn():
            tv.zero_grad(set_to_none=True)
            out = tv.backbone(images.tensors)
            _torch_half_sq(list(out.values())).backward()

        def leaf(t):
            return t.detach().clone().requires_grad_(True)

        def rpn_head():
            tv.zero_grad(set_to_none=True)
            o, d = rpn.head([leaf(x) for x in levels])
            _torch_half_sq(o + d).backward()

        @torch.no_grad()
        def proposals():
            rpn.filter_proposals(
                rpn.box_coder.decode(deltas_flat, anchors).view(n, -1, 4),
                obj_flat,
                images.image_sizes,
                num_per_level,
            )

        @torch.no_grad()
        def rpn_targets():
            lab, matched_gt = rpn.assign_targets_to_anchors(anchors, targets)
            rpn.box_coder.encode(matched_gt, anchors)
            rpn.fg_bg_sampler(lab)

        @torch.no_grad()
        def roi_sampling():
            roi.select_training_samples([b.clone() for b in boxes], targets)

        @torch.no_grad()
        def mask_targets():
            for t, p, i in zip(targets, mask_props, pos_matched, strict=True):
                tv_roi_heads.project_masks_on_boxes(t["masks"], p, i, 28)

        def roi_align_box_fwd():
            with torch.no_grad():
                roi.box_roi_pool(feats, props, images.image_sizes)

        def roi_align_box_fwd_bwd():
            f = {k: leaf(v) for k, v in feats.items()}
            _torch_half_sq([roi.box_roi_pool(f, props, images.image_sizes)]).backward()

        def box_head():
            tv.zero_grad(set_to_none=True)
            x = leaf(box_pooled)
            cls, reg_out = roi.box_predictor(roi.box_head(x))
            a, c = tv_roi_heads.fastrcnn_loss(cls, reg_out, labels, reg)
            (a + c).backward()

        def roi_align_mask_fwd():
            with torch.no_grad():
                roi.mask_roi_pool(feats, mask_props, images.image_sizes)

        def roi_align_mask_fwd_bwd():
            f = {k: leaf(v) for k, v in feats.items()}
            _torch_half_sq([roi.mask_roi_pool(f, mask_props, images.image_sizes)]).backward()

        gt_masks = [t["masks"] for t in targets]
        gt_labels = [t["labels"] for t in targets]

        def mask_head():
            tv.zero_grad(set_to_none=True)
            x = leaf(mask_pooled)
            logits = roi.mask_predictor(roi.mask_head(x))
            tv_roi_heads.maskrcnn_loss(
                logits, mask_props, gt_masks, gt_labels, pos_matched
            ).backward()

        params = [p for p in tv.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
        for p in params:
            p.grad = torch.randn_like(p)

        def optimizer():
            opt.step()

        self.parts = {
            "backbone_fpn": backbone_fpn,
            "rpn_head": rpn_head,
            "proposals": proposals,
            "rpn_targets": rpn_targets,
            "roi_sampling": roi_sampling,
            "mask_targets": mask_targets,
            "roi_align_box_fwd": roi_align_box_fwd,
            "roi_align_box_fwd_bwd": roi_align_box_fwd_bwd,
            "box_head": box_head,
            "roi_align_mask_fwd": roi_align_mask_fwd,
            "roi_align_mask_fwd_bwd": roi_align_mask_fwd_bwd,
            "mask_head": mask_head,
            "optimizer": optimizer,
        }


# --------------------------------------------------------------------------- plain R50+FPN
def plain_backbone(batch_images: np.ndarray, repeats: int, torchvision_side: bool = True) -> dict:
    """The same ResNet-50 + FPN (FrozenBN, stem + res2 frozen, P2..P6) on both sides.

    Forward + backward (gradient of ``0.5 * sum`` of squares of P2..P6 w.r.t. the trainable
    parameters) on the same normalised input [B, H, W, 3].
    """
    cfg = base.get_config()
    cfg.model.backbone = "resnet50"
    cfg.model.norm = "frozen_bn"
    cfg.model.freeze_at = 2
    model = build_model(cfg)
    image = jnp.asarray(batch_images)
    variables = jax.jit(lambda k, x: model.init(k, x, method=lambda m, x: _backbone_fpn(m, x)))(
        jax.random.key(0), image
    )
    params = nn.meta.unbox(variables["params"])
    stats = nn.meta.unbox({k: v for k, v in variables.items() if k != "params"})

    def objective(p, x):
        v = {"params": p, **stats}
        return _half_sq(model.apply(v, x, method=lambda m, x: _backbone_fpn(m, x)))

    run, cost = compile_part(jax.grad(objective), params, image)
    if not torchvision_side:
        return _measure(run, cost, None, repeats)

    torch.manual_seed(0)
    tv = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )
    x = torch.from_numpy(np.ascontiguousarray(batch_images.transpose(0, 3, 1, 2)))

    def tv_run():
        tv.zero_grad(set_to_none=True)
        _torch_half_sq(list(tv(x).values())).backward()

    row = _measure(run, cost, tv_run, repeats)
    row["tv_trainable_params"] = int(sum(p.numel() for p in tv.parameters() if p.requires_grad))
    return row


# -------------------------------------------------------------------------------- section
def run(
    batch: int = 2,
    size: int = 512,
    repeats: int = 3,
    num_instances: int = 8,
    config: Any = None,
    plain: bool = True,
    full_step: bool = True,
    avoidable: bool = True,
    torchvision_side: bool = True,
    torch_threads: int = 0,
    seg_chunk_rows: int = 16,
    memory_size: int = 1024,
) -> dict:
    """Time and FLOPs of each part of the training step, ours and torchvision's.

    Args:
      batch: images per step.
      size: square padded image side (multiple of 64).
      repeats: timed calls of each part (after one warm-up call).
      num_instances: ground-truth instances per image.
      config: our config (default `configs/base.py`, paper defaults); its image size and batch
        are overridden by `size` and `batch`.
      plain: also compare a plain ResNet-50 + FPN forward + backward on both sides.
      full_step: also time the whole jitted train step (ours) and torchvision's training step.
      avoidable: also measure the avoidable-cost variants (`avoidable_costs`).
      torchvision_side: measure torchvision's parts too (False: ours only, e.g. in tests).
      torch_threads: torch intra-op threads (0: torch's default).
      seg_chunk_rows: logit rows per chunk of the chunked semantic-loss variants.
      memory_size: image side at which the semantic-loss variants' compiled memory is also
        reported (compile only; 0 skips).

    Returns:
      JSON-able dict: 'parts' {name: {'ours_ms', 'ours_gflop', ['torchvision_ms',
      'torchvision_gflop', 'ratio' (torchvision / ours)]}}, 'sum_of_parts', 'full_step',
      'plain_resnet50_fpn', 'avoidable', and the sizes.
    """
    config = base.get_config() if config is None else config
    config.data.image_size = (size, size)
    config.train.batch_size = batch
    ours_batch, torch_images, targets = make_batch(config, num_instances)

    if torch_threads:
        torch.set_num_threads(int(torch_threads))
    tv = _Torch(size, torch_images, targets) if torchvision_side else None
    ours = _Ours(config, ours_batch)
    parts: dict[str, dict] = {}
    inter = _our_parts(ours, repeats, tv, parts)
    result: dict[str, Any] = {
        "batch": batch,
        "image_size": size,
        "num_instances": num_instances,
        "mask_rois_per_image_ours": ours.f,
        "mask_rois_torchvision_batch": None if tv is None else tv.num_mask_rois,
        "torch_threads": torch.get_num_threads(),
        "parts": {k: parts[k] for k in PARTS},
    }
    result["sum_of_parts"] = {
        "ours_ms": sum(p["ours_ms"] for p in parts.values()),
        "ours_gflop": sum(p["ours_gflop"] for p in parts.values()),
        "torchvision_ms": sum(p.get("torchvision_ms", 0.0) for p in parts.values()),
        "torchvision_gflop": sum(p.get("torchvision_gflop") or 0.0 for p in parts.values()),
    }
    if full_step:
        result["full_step"] = _full_step(ours, tv, repeats)
        _progress("full_step", result["full_step"])
    if plain:
        image = ours_batch["image"] - np.asarray(config.data.pixel_mean, np.float32)
        result["plain_resnet50_fpn"] = plain_backbone(
            image.astype(np.float32), repeats, torchvision_side
        )
        _progress("plain_resnet50_fpn", result["plain_resnet50_fpn"])
    if avoidable:
        result["avoidable"] = avoidable_costs(ours, inter, repeats, seg_chunk_rows)
        if memory_size:
            result["avoidable"]["semantic_loss_memory"] = semantic_memory(
                memory_size, seg_chunk_rows
            )
    return result


def _full_step(ours: _Ours, tv: _Torch | None, repeats: int) -> dict:
    """The whole jitted train step (ours) and torchvision's training step, interleaved."""
    fn = step.jit_train_step(ours.model, ours.config, ours.mesh, ours.state_sharding)
    device_batch = sharding.shard_batch(
        {k: np.asarray(v) for k, v in ours.batch.items()}, ours.mesh
    )
    holder = {"state": jax.tree.map(jnp.copy, ours.state)}
    compiled = fn.lower(holder["state"], device_batch).compile()
    cost = xla_cost(compiled)

    def ours_step():
        holder["state"], metrics = compiled(holder["state"], device_batch)
        return metrics

    if tv is None:
        return _measure(ours_step, cost, None, repeats)
    model = tv.model
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    images, targets = tv.raw_images, tv.raw_targets

    def tv_step():
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    return _measure(ours_step, cost, tv_step, repeats)


# ------------------------------------------------------------------------ avoidable costs
def _semantic_before(logits: Array, semantic: Array, n: int) -> Array:
    """The row-chunked semantic loss as it was before the fused sweep (for the before figure).

    A rematerialised ``lax.map`` over chunks of ``n`` logit rows: the backward pass recomputes
    each chunk's upsample and log-sum-exp, then autodiff pulls the cotangent back through the
    row gather onto the whole map once per chunk.
    """
    labels = semantic.astype(jnp.int32)
    b, h, w, k = logits.shape
    valid = (labels != 255) & (labels >= 0) & (labels < k)
    count = jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)
    c = h // n
    lab = labels.reshape(b, c, 4 * n, 4 * w).swapaxes(0, 1)
    val = valid.reshape(b, c, 4 * n, 4 * w).swapaxes(0, 1)

    @jax.checkpoint
    def chunk(start, lb, vl):
        up = resize.upsample_bilinear_rows(logits, start, n, 4)
        return losses._cross_entropy_sum(up, lb, vl)

    sums = jax.lax.map(lambda xs: chunk(*xs), (jnp.arange(c) * n, lab, val))
    return jnp.sum(sums) / count


def semantic_costs(logits: Array, semantic: Array, chunk_rows: int, repeats: int) -> dict:
    """Forward + backward of the 133-class semantic loss: one shot, chunked before, fused now."""
    variants = {
        "one_shot": lambda lg, sm: losses.semantic_loss(lg, sm),
        "chunked_remat_before": lambda lg, sm: _semantic_before(lg, sm, chunk_rows),
        "chunked_fused_after": lambda lg, sm: losses.semantic_loss(lg, sm, chunk_rows=chunk_rows),
    }
    h = logits.shape[1]
    # XLA counts a loop body once: the FLOPs of a chunked variant are counted exactly on one
    # chunk of all h rows (the same per-pixel arithmetic).
    whole = {
        "one_shot": variants["one_shot"],
        "chunked_remat_before": lambda lg, sm: _semantic_before(lg, sm, h),
        "chunked_fused_after": lambda lg, sm: losses.semantic_loss(lg, sm, chunk_rows=h),
    }
    runs, out = {}, {}
    for name, fn in variants.items():
        run, cost = compile_part(jax.value_and_grad(fn), logits, semantic)
        runs[name] = run
        flops = xla_cost(jax.jit(jax.value_and_grad(whole[name])).lower(logits, semantic).compile())
        out[name] = {"gflop": flops["flops"] / 1e9, "temp_mb": cost.get("temp_bytes", 0) / 2**20}
    ref_v, ref_g = runs["one_shot"]()
    for name, run in runs.items():
        v, g = run()
        out[name]["max_abs_grad_diff_vs_one_shot"] = float(jnp.max(jnp.abs(g - ref_g)))
        out[name]["loss_diff_vs_one_shot"] = float(jnp.abs(v - ref_v))
    times = time_interleaved(runs, warmup=1, repeats=repeats)
    for name, t in times.items():
        out[name]["ms"] = _ms(t)
        out[name]["times_ms"] = [1e3 * x for x in t["times_s"]]
    out["chunk_rows"] = chunk_rows
    out["logits_shape"] = list(logits.shape)
    return out


def semantic_memory(size: int, chunk_rows: int) -> dict:
    """Compiled scratch memory (no run) of the semantic loss's forward + backward at `size`."""
    logits = jax.ShapeDtypeStruct((1, size // 4, size // 4, 133), jnp.float32)
    semantic = jax.ShapeDtypeStruct((1, size, size), jnp.uint8)
    out = {"image_size": size, "batch": 1, "chunk_rows": chunk_rows}
    for name, fn in {
        "one_shot": lambda lg, sm: losses.semantic_loss(lg, sm),
        "chunked_remat_before": lambda lg, sm: _semantic_before(lg, sm, chunk_rows),
        "chunked_fused_after": lambda lg, sm: losses.semantic_loss(lg, sm, chunk_rows=chunk_rows),
    }.items():
        compiled = jax.jit(jax.value_and_grad(fn)).lower(logits, semantic).compile()
        cost = xla_cost(compiled)
        out[name] = {"gflop": cost["flops"] / 1e9, "temp_mb": cost.get("temp_bytes", 0) / 2**20}
    return out


def roi_align_costs(inter: dict, config: Any) -> dict:
    """How much of RoIAlign's work goes to masked adaptive-grid samples, on the step's RoIs.

    With sampling_ratio 0 the sample grid is allocated at the cap (6 x 6 per bin for 7x7, 3 x 3
    for 14x14) and masked per box; a box with ``g = ceil(roi / out)`` uses g_h * g_w of them.
    """
    rois = inter["rois"]["rois"]
    f = _fg_slots(config)
    out = {}
    for tag, boxes, res in (
        ("box", rois, config.model.box_head.pooler_resolution),
        ("mask", rois[:, :f], config.model.mask_head.pooler_resolution),
    ):
        res = int(res)
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        level = np.asarray(roi_ops.assign_levels(jnp.asarray(boxes, jnp.float32)))
        scale = 1.0 / np.asarray(POOLER_STRIDES, np.float64)[level]
        cap = roi_ops._default_cap((res, res), roi_ops._FPN_MAX_SQUARE_ROI)
        gh = np.clip(np.ceil((boxes[:, 3] - boxes[:, 1]) * scale / res), 0, cap)
        gw = np.clip(np.ceil((boxes[:, 2] - boxes[:, 0]) * scale / res), 0, cap)
        out[tag] = {
            "cap": cap,
            "boxes": len(boxes),
            "max_grid": int(max(gh.max(), gw.max())),
            "samples_used_fraction": float(np.sum(gh * gw) / (len(boxes) * cap * cap)),
        }
    return out


def _fg_slots(config: Any) -> int:
    return int(config.model.roi.batch_size_per_image * config.model.roi.positive_fraction)


def nms_costs(inter: dict, config: Any, repeats: int) -> dict:
    """Training proposals: NMS stopping after post_nms_topk kept (ours) vs NMS of every candidate.

    detectron2 runs batched NMS over all per-level top-k candidates, then keeps the first
    post_nms_topk; our tiled NMS stops once post_nms_topk boxes are kept, which gives the same
    kept set (NMS visits boxes in score order) without suppressing the rest.
    """
    rpn_out = inter["rpn_out"]
    mc = config.model
    k = int(mc.rpn.pre_nms_topk_train)
    cand = []
    for logit in rpn_out["objectness"]:
        cand.append(min(k, logit.shape[1]))
    n = sum(cand)
    props_fn = inter["proposals_fn"]
    args = (rpn_out["objectness"], rpn_out["deltas"], inter["image_shape"])
    run_stop, cost_stop = compile_part(props_fn, *args)

    def full_fn(objectness, deltas, image_shape):
        return generate_proposals(
            objectness,
            deltas,
            [jnp.asarray(a) for a in inter["anchors"]],
            image_shape,
            pre_nms_topk=k,
            post_nms_topk=n,
            nms_thresh=float(mc.rpn.nms_thresh),
            min_size=float(mc.rpn.min_size),
            box_weights=tuple(mc.rpn.box_weights),
            clamp=float(mc.roi.bbox_reg_clamp),
        )

    run_full, cost_full = compile_part(full_fn, *args)
    post = int(mc.rpn.post_nms_topk_train)
    a, f = run_stop(), run_full()
    same = bool(
        np.array_equal(np.asarray(a["boxes"]), np.asarray(f["boxes"])[:, :post])
        and np.array_equal(np.asarray(a["valid"]), np.asarray(f["valid"])[:, :post])
    )
    t = time_interleaved({"stop": run_stop, "full": run_full}, warmup=1, repeats=repeats)
    return {
        "candidates_per_image": n,
        "post_nms_topk": post,
        "kept_per_image_full": [int(v) for v in np.asarray(f["valid"]).sum(1)],
        "same_kept_set": same,
        "ours_stop_at_post_nms_ms": _ms(t["stop"]),
        "nms_of_all_candidates_ms": _ms(t["full"]),
    }


def convert_ops(stablehlo_text: str, top: int = 8) -> dict:
    """``stablehlo.convert`` ops of a lowered module: count, bytes written, the largest ones.

    Args:
      stablehlo_text: ``jax.jit(f).lower(...).as_text()`` (before XLA's optimisations, which
        may fuse a convert into its consumer but do not remove the conversion itself).
      top: how many of the largest conversions to list.

    Returns:
      {'count', 'total_mb', 'largest': [{'from', 'to', 'bytes'}]}.
    """
    sizes = {"f32": 4, "i32": 4, "ui32": 4, "bf16": 2, "f16": 2, "ui8": 1, "i8": 1, "i1": 1}
    found = []
    for line in stablehlo_text.splitlines():
        if "stablehlo.convert" not in line or "->" not in line:
            continue
        src, dst = (part.strip() for part in line.rsplit(":", 1)[1].split("->"))
        dst_type = dst.strip().removeprefix("tensor<").split(">")[0]
        *dims, dtype = dst_type.split("x")
        count = int(np.prod([int(d) for d in dims])) if dims else 1
        found.append(
            {
                "from": src.strip("() ").removeprefix("tensor<").rstrip(">"),
                "to": dst_type,
                "bytes": count * sizes.get(dtype, 4),
            }
        )
    found.sort(key=lambda r: -r["bytes"])
    return {
        "count": len(found),
        "total_mb": sum(r["bytes"] for r in found) / 2**20,
        "largest": found[:top],
    }


def _step_stablehlo(ours: _Ours) -> str:
    """The lowered (not compiled) train step of `ours` as StableHLO text."""
    fn = step.jit_train_step(ours.model, ours.config, ours.mesh, ours.state_sharding)
    device_batch = sharding.shard_batch(
        {k: np.asarray(v) for k, v in ours.batch.items()}, ours.mesh
    )
    return fn.lower(ours.state, device_batch).as_text()


def avoidable_costs(ours: _Ours, inter: dict, repeats: int, seg_chunk_rows: int) -> dict:
    """Before/after (or analysis) of the costs issue 10 item 3 names."""
    config = ours.config
    h = int(config.data.image_size[0]) // 4
    n = seg_chunk_rows if h % seg_chunk_rows == 0 else h
    out = {
        "semantic_loss": semantic_costs(inter["stuff_logits"], ours.batch["semantic"], n, repeats),
        "roi_align_samples": roi_align_costs(inter, config),
        "nms": nms_costs(inter, config, repeats),
    }
    out["converts_in_step"] = convert_ops(_step_stablehlo(ours))
    return out
