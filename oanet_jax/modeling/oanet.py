"""OANet: the assembled network (paper Fig. 2).

ResNet + FPN backbone shared by a Mask R-CNN instance branch (RPN, box head, mask head) and the
stuff branch (on the RPN's shared 3x3 maps, Fig. 3), plus the spatial ranking module (SRM).

Two entry points, both returning dicts of named tensors (big_vision style):

* ``model.apply(variables, batch, train=True, rngs={'sampling': key})``: the training forward pass
  with every target made on device (RPN anchor labels, sampled RoIs, mask targets, the SRM canvas
  from ground-truth masks and its conflict-pixel labels); `oanet_jax.losses.compute_losses` turns
  the dict into the terms of Eq. 1.
* ``model.apply(variables, batch, train=False)``: inference: proposals, detections, their masks,
  stuff logits, the SRM score map on the predicted masks and each detection's ranking score.

All shapes are static: proposals, RoIs and detections are padded with ``valid`` masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oanet_jax.modeling import srm as srm_lib
from oanet_jax.modeling import targets as targets_lib
from oanet_jax.modeling.fpn import FPN
from oanet_jax.modeling.roi_heads import (
    BoxHead,
    BoxPredictor,
    MaskHead,
    postprocess_detections,
    select_class_masks,
)
from oanet_jax.modeling.rpn import RPNHead, generate_proposals
from oanet_jax.modeling.stuff_head import StuffHead
from oanet_jax.ops import anchors as anchor_ops
from oanet_jax.ops import roi_align as roi_ops

Array = jax.Array

FPN_STRIDES = (4, 8, 16, 32, 64)  # P2..P6
POOLER_STRIDES = (4, 8, 16, 32)  # RoI heads and stuff branch use P2..P5


class OANet(nn.Module):
    """The end-to-end panoptic network. Fields are plain hyperparameters (build.py sets them)."""

    backbone: nn.Module
    """Backbone returning {'res2', ..., 'res5'} (a `resnet.ResNet`)."""
    num_thing_classes: int
    """Thing classes T (contiguous ids 0..T-1)."""
    num_stuff_classes: int
    """Stuff classes S (contiguous ids T..T+S-1)."""
    fpn_channels: int = 256
    """FPN width (also the RPN's shared conv width)."""
    anchor_sizes: Sequence[float] = (32, 64, 128, 256, 512)
    """One anchor size per level P2..P6."""
    anchor_aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
    """Anchor aspect ratios (h / w), shared by all levels."""
    anchor_offset: float = 0.0
    """Anchor centre offset in units of the stride (detectron2's DefaultAnchorGenerator)."""
    rpn_pre_nms_topk_train: int = 2000
    """Per-level top-k before NMS, training."""
    rpn_pre_nms_topk_test: int = 1000
    """Per-level top-k before NMS, inference."""
    rpn_post_nms_topk_train: int = 1000
    """Proposals per image after NMS, training."""
    rpn_post_nms_topk_test: int = 1000
    """Proposals per image after NMS, inference."""
    rpn_nms_thresh: float = 0.7
    """RPN NMS IoU threshold."""
    rpn_min_size: float = 0.0
    """Proposals with a side <= this are dropped (torchvision: 1e-3)."""
    rpn_iou_thresholds: Sequence[float] = (0.3, 0.7)
    """Anchor matcher thresholds (negative below the first, positive from the second)."""
    rpn_batch_size_per_image: int = 256
    """Anchors sampled per image for the RPN losses."""
    rpn_positive_fraction: float = 0.5
    """Positive fraction of the sampled anchors."""
    rpn_box_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
    """RPN box coder weights."""
    roi_batch_size_per_image: int = 512
    """RoIs sampled per image for the box head."""
    roi_positive_fraction: float = 0.25
    """Foreground fraction of the sampled RoIs."""
    roi_iou_threshold: float = 0.5
    """Foreground IoU threshold of the RoI matcher."""
    roi_box_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)
    """RoI box coder weights."""
    bbox_reg_clamp: float = float(np.log(1000.0 / 16))
    """dw/dh clamp of the box decoders."""
    box_head_fc_dim: int = 1024
    """Width of the two fc layers of the box head."""
    box_pooler_resolution: int = 7
    """RoIAlign output of the box head."""
    mask_pooler_resolution: int = 14
    """RoIAlign output of the mask head (its masks are twice this size)."""
    mask_head_conv_dim: int = 256
    """Channels of the mask head convs."""
    mask_head_num_convs: int = 4
    """Number of 3x3 convs of the mask head."""
    pooler_sampling_ratio: int = 0
    """RoIAlign samples per bin (0 = adaptive, detectron2)."""
    pooler_aligned: bool = True
    """RoIAlign half-pixel alignment (detectron2 True, torchvision False)."""
    pooler_level_mapper: str = "detectron2"
    """FPN level assignment formula: 'detectron2' or 'torchvision'."""
    test_score_thresh: float = 0.05
    """Detection score threshold at inference."""
    test_nms_thresh: float = 0.5
    """Per-class NMS threshold at inference."""
    test_detections_per_image: int = 100
    """Detections per image D (padded)."""
    test_min_size: float = 0.0
    """Detections with a side <= this are dropped (torchvision: 1e-2)."""
    test_max_candidates: int = 2048
    """Top class-box candidates kept before the detection NMS (static size)."""
    stuff_head_channels: int = 128
    """Channels of the stuff branch."""
    stuff_head_norm: str = "group_norm"
    """Normalisation of the stuff branch."""
    srm_kernel: str = "large"
    """SRM block: 'large' (GCN 1x7/7x1), '3x3' or '1x1'."""
    srm_kernel_size: int = 7
    """k of the large-kernel SRM block."""
    srm_stride: int = 4
    """Output stride of the SRM canvas."""
    srm_score_thresh: float = 0.5
    """At inference, detections with a lower score are not pasted into the SRM canvas."""
    mask_threshold: float = 0.5
    """Binarisation threshold of pasted masks (SRM canvas)."""
    dtype: Any = jnp.float32
    """Compute dtype of convolutions and dense layers (box math and losses stay float32)."""
    param_dtype: Any = jnp.float32
    """Dtype of stored parameters."""

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        num_anchors = len(self.anchor_aspect_ratios)
        self.fpn = FPN(features=self.fpn_channels, **kw)
        self.rpn = RPNHead(num_anchors=num_anchors, channels=self.fpn_channels, **kw)
        self.box_head = BoxHead(fc_dim=self.box_head_fc_dim, **kw)
        self.box_predictor = BoxPredictor(num_classes=self.num_thing_classes, **kw)
        self.mask_head = MaskHead(
            num_classes=self.num_thing_classes,
            conv_dim=self.mask_head_conv_dim,
            num_convs=self.mask_head_num_convs,
            **kw,
        )
        self.stuff_head = StuffHead(
            num_classes=self.num_thing_classes + self.num_stuff_classes,
            channels=self.stuff_head_channels,
            norm=self.stuff_head_norm,
            **kw,
        )
        self.srm = srm_lib.SpatialRankingModule(
            num_classes=self.num_thing_classes,
            kernel=self.srm_kernel,
            kernel_size=self.srm_kernel_size,
            **kw,
        )

    # ------------------------------------------------------------------------------ pieces
    def anchors(self, image_size: tuple[int, int]) -> list[np.ndarray]:
        """FPN anchors P2..P6 for the padded image size: per level [Hl * Wl * A, 4] float32."""
        return anchor_ops.fpn_anchors(
            image_size,
            strides=FPN_STRIDES,
            sizes=tuple(self.anchor_sizes),
            aspect_ratios=tuple(self.anchor_aspect_ratios),
            offset=self.anchor_offset,
        )

    def _pool(self, features: Sequence[Array], boxes: Array, resolution: int) -> Array:
        return roi_ops.multilevel_roi_align(
            features,
            boxes,
            resolution,
            strides=POOLER_STRIDES,
            sampling_ratio=self.pooler_sampling_ratio,
            aligned=self.pooler_aligned,
            level_mapper=self.pooler_level_mapper,
        )

    def _trunk(self, batch: dict[str, Array], train: bool) -> dict[str, Any]:
        image = batch["image"]
        feats = self.backbone(image.astype(self.dtype), train=train)
        pyramid = self.fpn(feats)
        levels = [pyramid[f"p{k}"] for k in range(2, 7)]
        rpn_out = self.rpn(levels)
        stuff = self.stuff_head(rpn_out["shared"][:4], train=train)
        return {"levels": levels, "rpn": rpn_out, "stuff_logits": stuff["logits"]}

    def _proposals(self, rpn_out: dict[str, Any], anchors, image_shape: Array, train: bool):
        return generate_proposals(
            rpn_out["objectness"],
            rpn_out["deltas"],
            [jnp.asarray(a) for a in anchors],
            image_shape,
            pre_nms_topk=self.rpn_pre_nms_topk_train if train else self.rpn_pre_nms_topk_test,
            post_nms_topk=self.rpn_post_nms_topk_train if train else self.rpn_post_nms_topk_test,
            nms_thresh=self.rpn_nms_thresh,
            min_size=self.rpn_min_size,
            box_weights=tuple(self.rpn_box_weights),
            clamp=self.bbox_reg_clamp,
        )

    # ------------------------------------------------------------------------------ entry
    def __call__(self, batch: dict[str, Array], train: bool = False) -> dict[str, Any]:
        """Runs the network.

        Args:
          batch: the input pipeline's batch (see `oanet_jax.data.pipeline`): 'image'
            [B, Hp, Wp, 3] float32, 'image_shape' [B, 2] int32, and in training the ground truth
            'boxes' [B, M, 4], 'classes' [B, M], 'is_crowd' [B, M], 'valid' [B, M],
            'masks' [B, M, S, S], 'semantic' [B, Hp, Wp].
          train: training forward (targets, sampled RoIs) or inference.

        Returns:
          A dict of named tensors; see `train_forward` and `inference`.
        """
        if train:
            return self.train_forward(batch)
        return self.inference(batch)

    def train_forward(self, batch: dict[str, Array]) -> dict[str, Any]:
        """Training forward pass with all targets made on device.

        Needs the 'sampling' PRNG stream. Returns a dict with (B images, A anchors, R sampled
        RoIs, F = int(R * roi_positive_fraction) foreground slots, h x w = Hp/4 x Wp/4):
          'rpn_objectness' [B, A], 'rpn_deltas' [B, A, 4], 'rpn_labels' [B, A] int32,
          'rpn_box_targets' [B, A, 4]; 'proposals' [B, K, 4], 'proposal_valid' [B, K];
          'class_logits' [B, R, T+1], 'box_deltas' [B, R, T, 4], 'roi_classes' [B, R],
          'roi_box_targets' [B, R, 4], 'roi_valid' [B, R], 'roi_is_fg' [B, R];
          'mask_logits' [B, F, 28, 28, T], 'mask_targets' [B, F, 28, 28], 'mask_classes' [B, F],
          'mask_is_fg' [B, F]; 'stuff_logits' [B, h, w, T+S]; 'srm_logits' [B, h, w, T],
          'srm_labels' [B, h, w] int32 (255 = ignored), 'srm_canvas' [B, h, w, T].
        """
        image_size = tuple(batch["image"].shape[1:3])
        trunk = self._trunk(batch, train=True)
        rpn_out = trunk["rpn"]
        anchors = self.anchors(image_size)
        props = self._proposals(rpn_out, anchors, batch["image_shape"], train=True)

        b = batch["image"].shape[0]
        key_rpn, key_roi = jax.random.split(self.make_rng("sampling"))
        gt_boxes = batch["boxes"].astype(jnp.float32)
        gt_valid = batch["valid"]
        gt_crowd = batch["is_crowd"]
        rpn_t = jax.vmap(
            lambda bx, v, c, shape, k: targets_lib.rpn_targets(
                jnp.concatenate(anchors, axis=0),
                bx,
                v,
                c,
                shape,
                k,
                iou_thresholds=tuple(self.rpn_iou_thresholds),
                batch_size_per_image=self.rpn_batch_size_per_image,
                positive_fraction=self.rpn_positive_fraction,
                box_weights=tuple(self.rpn_box_weights),
            )
        )(gt_boxes, gt_valid, gt_crowd, batch["image_shape"], jax.random.split(key_rpn, b))

        rois = jax.vmap(
            lambda p, pv, bx, cl, v, c, k: targets_lib.sample_rois(
                p,
                pv,
                bx,
                cl,
                v,
                c,
                k,
                num_classes=self.num_thing_classes,
                batch_size_per_image=self.roi_batch_size_per_image,
                positive_fraction=self.roi_positive_fraction,
                iou_threshold=self.roi_iou_threshold,
                box_weights=tuple(self.roi_box_weights),
            )
        )(
            props["boxes"],
            props["valid"],
            gt_boxes,
            batch["classes"],
            gt_valid,
            gt_crowd,
            jax.random.split(key_roi, b),
        )

        levels = trunk["levels"][:4]
        box_out = self.box_predictor(self.box_head(self._pool(levels, rois["rois"], 7)))

        # The sampler puts foreground first: the mask head only needs the first F slots.
        f = int(self.roi_batch_size_per_image * self.roi_positive_fraction)
        fg_rois = rois["rois"][:, :f]
        mask_logits = self.mask_head(self._pool(levels, fg_rois, self.mask_pooler_resolution))
        mask_t = jax.vmap(
            lambda m, bx, r, idx: targets_lib.mask_targets(
                m, bx, r, idx, out_size=2 * self.mask_pooler_resolution
            )
        )(batch["masks"], gt_boxes, fg_rois, rois["matched_gt"][:, :f])

        srm_t = jax.vmap(
            lambda m, bx, cl, v, sem: targets_lib.srm_targets(
                m,
                bx,
                cl,
                v,
                sem,
                image_size=image_size,
                stride=self.srm_stride,
                num_thing_classes=self.num_thing_classes,
            )
        )(
            batch["masks"],
            gt_boxes,
            batch["classes"],
            gt_valid & ~gt_crowd,
            batch["semantic"],
        )
        srm_logits = self.srm(srm_t["canvas"])

        return {
            "rpn_objectness": jnp.concatenate(rpn_out["objectness"], axis=1),
            "rpn_deltas": jnp.concatenate(rpn_out["deltas"], axis=1),
            "rpn_labels": rpn_t["labels"],
            "rpn_box_targets": rpn_t["box_targets"],
            "proposals": props["boxes"],
            "proposal_valid": props["valid"],
            "class_logits": box_out["class_logits"],
            "box_deltas": box_out["box_deltas"],
            "roi_classes": rois["classes"],
            "roi_box_targets": rois["box_targets"],
            "roi_valid": rois["valid"],
            "roi_is_fg": rois["is_fg"],
            "mask_logits": mask_logits,
            "mask_targets": mask_t,
            "mask_classes": rois["classes"][:, :f],
            "mask_is_fg": rois["is_fg"][:, :f],
            "stuff_logits": trunk["stuff_logits"],
            "srm_logits": srm_logits,
            "srm_labels": srm_t["labels"],
            "srm_canvas": srm_t["canvas"],
        }

    def inference(self, batch: dict[str, Array]) -> dict[str, Any]:
        """Inference forward pass.

        Returns a dict with (K proposals, D detections, h x w = Hp/4 x Wp/4):
          'proposals' [B, K, 4], 'proposal_logits' [B, K], 'proposal_valid' [B, K];
          'class_logits' [B, K, T+1], 'box_deltas' [B, K, T, 4] (of the proposals);
          'boxes' [B, D, 4], 'scores' [B, D], 'classes' [B, D] int32, 'valid' [B, D];
          'masks' [B, D, 28, 28] probabilities of each detection's class (box frame);
          'stuff_logits' [B, h, w, T+S]; 'srm_logits' [B, h', w', T], 'srm_map' (softmax),
          'srm_scores' [B, D] (Eq. 3 ranking scores; 0 for detections not in the canvas).
        """
        image_size = tuple(batch["image"].shape[1:3])
        trunk = self._trunk(batch, train=False)
        props = self._proposals(trunk["rpn"], self.anchors(image_size), batch["image_shape"], False)
        levels = trunk["levels"][:4]
        box_out = self.box_predictor(self.box_head(self._pool(levels, props["boxes"], 7)))
        dets = postprocess_detections(
            box_out["class_logits"],
            box_out["box_deltas"],
            props["boxes"],
            props["valid"],
            batch["image_shape"],
            score_thresh=self.test_score_thresh,
            nms_thresh=self.test_nms_thresh,
            max_detections=self.test_detections_per_image,
            box_weights=tuple(self.roi_box_weights),
            clamp=self.bbox_reg_clamp,
            min_size=self.test_min_size,
            max_candidates=self.test_max_candidates,
        )
        mask_logits = self.mask_head(self._pool(levels, dets["boxes"], self.mask_pooler_resolution))
        masks = select_class_masks(mask_logits, dets["classes"])

        in_canvas = dets["valid"] & (dets["scores"] >= self.srm_score_thresh)
        inst = srm_lib.paste_instances(
            masks, dets["boxes"], in_canvas, image_size, self.srm_stride, self.mask_threshold
        )
        canvas = srm_lib.build_canvas(inst, dets["classes"], in_canvas, self.num_thing_classes)
        srm_logits = self.srm(canvas)
        srm_map = jax.nn.softmax(srm_logits, axis=-1)
        srm_scores = srm_lib.ranking_scores(srm_map, inst, dets["classes"], in_canvas)
        return {
            "proposals": props["boxes"],
            "proposal_logits": props["logits"],
            "proposal_valid": props["valid"],
            "class_logits": box_out["class_logits"],
            "box_deltas": box_out["box_deltas"],
            "boxes": dets["boxes"],
            "scores": dets["scores"],
            "classes": dets["classes"],
            "valid": dets["valid"],
            "masks": masks,
            "stuff_logits": trunk["stuff_logits"],
            "srm_logits": srm_logits,
            "srm_map": srm_map,
            "srm_scores": srm_scores,
        }
