"""OANet: the assembled network (paper Fig. 2).

ResNet + FPN backbone shared by a Mask R-CNN instance branch (RPN, box head, mask head) and the
stuff branch (on the RPN's shared 3x3 maps, Fig. 3), plus the spatial ranking module (SRM).
`OANet.sharing` selects how much the two branches share (Table 4); the SRM is trained on
ground-truth or predicted masks (`SRMConfig.train_masks`).

Two entry points, both returning dicts of named tensors (big_vision style):

* ``model.apply(variables, batch, train=True, rngs={'sampling': key})``: the training forward pass
  with every target made on device (RPN anchor labels, sampled RoIs, mask targets, the SRM canvas
  from ground-truth or predicted masks and its conflict-pixel labels);
  `oanet_jax.losses.compute_losses` turns the dict into the terms of Eq. 1.
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

from oanet_jax import losses
from oanet_jax.data.transforms import normalize_image
from oanet_jax.modeling import srm as srm_lib
from oanet_jax.modeling import targets as targets_lib
from oanet_jax.modeling.config import (
    BoxHeadConfig,
    MaskHeadConfig,
    ROIConfig,
    RPNConfig,
    SRMConfig,
    StuffHeadConfig,
    TestConfig,
)
from oanet_jax.modeling.fpn import FPN
from oanet_jax.modeling.layers import Conv2D
from oanet_jax.modeling.roi_heads import (
    BoxHead,
    BoxPredictor,
    MaskHead,
    postprocess_detections,
    select_class_masks,
)
from oanet_jax.modeling.rpn import RPNHead, generate_proposals, rpn_init
from oanet_jax.modeling.stuff_head import StuffHead
from oanet_jax.ops import anchors as anchor_ops
from oanet_jax.ops import roi_align as roi_ops

Array = jax.Array

FPN_STRIDES = (4, 8, 16, 32, 64)  # P2..P6
POOLER_STRIDES = (4, 8, 16, 32)  # RoI heads and stuff branch use P2..P5
SHARING_MODES = ("backbone_fpn", "backbone", "none")
"""Values of `OANet.sharing` (`config.model.sharing`, Table 4)."""
STUFF_CLASSES = ("all", "stuff")
"""Values of `StuffHeadConfig.classes` (Table 2)."""
STUFF_ONLY_THING_LOGIT = -1e4
"""The constant thing-class logits of a stuff-only head: below any real logit (never an argmax),
finite (no NaN in a softmax), and never supervised (the semantic loss ignores thing pixels)."""


def mask_buckets(train_buckets: Sequence[int], num_fg_slots: int) -> tuple[int, ...]:
    """The static mask-RoI bucket sizes of a training step, ascending, the last one F.

    Args:
      train_buckets: `config.model.mask_head.train_buckets` (any order; values >= 1).
      num_fg_slots: F, the sampler's foreground slots per image.

    Returns:
      The distinct sizes ``min(b, F)`` plus F, sorted: every foreground count in [0, F] fits.
    """
    f = int(num_fg_slots)
    if any(int(b) < 1 for b in train_buckets):
        raise ValueError(f"mask_head.train_buckets must be >= 1: {tuple(train_buckets)}")
    return tuple(sorted({min(int(b), f) for b in train_buckets} | {f}))


def choose_bucket(num_fg: Array, buckets: Sequence[int]) -> Array:
    """Index of the smallest bucket that holds the largest per-image foreground count.

    Args:
      num_fg: [B] int foreground RoIs per image (each <= buckets[-1]). Under a data-sharded jit
        the max is global (the compiler inserts the all-reduce), so every device agrees.
      buckets: static ascending sizes from :func:`mask_buckets`.

    Returns:
      [] int32 in [0, len(buckets)): 0 when there is no foreground at all.
    """
    largest = jnp.max(jnp.asarray(num_fg, jnp.int32))
    index = jnp.searchsorted(jnp.asarray(buckets, jnp.int32), largest, side="left")
    return jnp.minimum(index, len(buckets) - 1).astype(jnp.int32)


class OANet(nn.Module):
    """The end-to-end panoptic network.

    Fields are plain hyperparameters: a few scalars and one frozen dataclass per section of
    `config.model` (`oanet_jax.modeling.config`); `oanet_jax.modeling.build` sets them.
    """

    backbone: nn.Module
    """Backbone returning {'res2', ..., 'res5'} (a `resnet.ResNet`)."""
    num_thing_classes: int
    """Thing classes T (contiguous ids 0..T-1)."""
    num_stuff_classes: int
    """Stuff classes S (contiguous ids T..T+S-1)."""
    sharing: str = "backbone_fpn"
    """What the stuff branch shares with the instance branch (Table 4, `config.model.sharing`):
    'backbone_fpn' (the paper's deep share, Fig. 3): ResNet, FPN and the RPN head's 3x3
    "skip-connection" conv; the stuff head reads the RPN's shared P2..P5 maps.
    'backbone' (shallow share, "res1-res5"): the ResNet only; the stuff branch has its own FPN
    (`stuff_fpn`) and its own 3x3 conv + ReLU (`stuff_skip`, same shape and init as the RPN's)
    on the shared ResNet features, so its depth equals the shared mode's.
    'none' (two separate networks): its own ResNet too (`stuff_backbone`, same architecture and
    freezing as `backbone`), so no parameter and no activation is shared; only the input image
    and the sum of the losses are common."""
    fpn_channels: int = 256
    """FPN width (also the RPN's shared conv width)."""
    rpn_config: RPNConfig = RPNConfig()
    """Anchors, proposals and anchor sampling (`config.model.rpn`)."""
    roi_config: ROIConfig = ROIConfig()
    """RoI sampling, box coding and RoIAlign pooling (`config.model.roi`)."""
    box_head_config: BoxHeadConfig = BoxHeadConfig()
    """Box head width and pooled size (`config.model.box_head`)."""
    mask_head_config: MaskHeadConfig = MaskHeadConfig()
    """Mask head convs and pooled size (`config.model.mask_head`)."""
    stuff_head_config: StuffHeadConfig = StuffHeadConfig()
    """Stuff branch width and norm (`config.model.stuff_head`)."""
    srm_config: SRMConfig = SRMConfig()
    """Spatial ranking module block and stride (`config.model.srm`)."""
    test_config: TestConfig = TestConfig()
    """Inference post-processing and SRM thresholds (`config.model.test`)."""
    dtype: Any = jnp.float32
    """Compute dtype of convolutions and dense layers (box math and losses stay float32)."""
    param_dtype: Any = jnp.float32
    """Dtype of stored parameters."""
    train_mask_rois: int | None = None
    """Static override of the mask RoIs per image in training, in [1, F], without a switch: F
    runs the unbucketed head (the path before buckets; the tests' reference), a bucket size lets
    a FLOP count see the branch a batch takes (XLA costs a `conditional` as its dearest branch).
    Foreground beyond it would be dropped, so only for counting and tests. None =
    `mask_head.train_buckets`."""
    pixel_mean: tuple[float, float, float] = (103.53, 116.28, 123.675)
    """Per-channel mean of the input normalisation, in `channel_order` (`config.data`)."""
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Per-channel std of the input normalisation, in `channel_order` (`config.data`)."""
    channel_order: str = "BGR"
    """Channel order the backbone expects ('BGR': the uint8 RGB image is reversed)."""

    def setup(self) -> None:
        if self.sharing not in SHARING_MODES:
            raise ValueError(f"model.sharing={self.sharing!r}; expected one of {SHARING_MODES}.")
        if self.stuff_head_config.classes not in STUFF_CLASSES:
            raise ValueError(
                f"model.stuff_head.classes={self.stuff_head_config.classes!r}; expected one of "
                f"{STUFF_CLASSES}."
            )
        if self.srm_config.train_masks not in srm_lib.SRM_TRAIN_MASKS:
            raise ValueError(
                f"model.srm.train_masks={self.srm_config.train_masks!r}; expected one of "
                f"{srm_lib.SRM_TRAIN_MASKS} ('auto' is resolved by modeling.build)."
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        num_anchors = len(self.rpn_config.anchor_aspect_ratios)
        self.fpn = FPN(features=self.fpn_channels, **kw)
        if self.sharing == "none":
            self.stuff_backbone = self.backbone.clone(parent=None, name=None)
        if self.sharing != "backbone_fpn":
            self.stuff_fpn = FPN(features=self.fpn_channels, top_block_maxpool=False, **kw)
            self.stuff_skip = Conv2D(
                self.fpn_channels,
                3,
                kernel_init=rpn_init,
                bias_init=nn.initializers.zeros_init(),
                **kw,
            )
        self.rpn = RPNHead(num_anchors=num_anchors, channels=self.fpn_channels, **kw)
        self.box_head = BoxHead(fc_dim=self.box_head_config.fc_dim, **kw)
        self.box_predictor = BoxPredictor(num_classes=self.num_thing_classes, **kw)
        self.mask_head = MaskHead(
            num_classes=self.num_thing_classes,
            conv_dim=self.mask_head_config.conv_dim,
            num_convs=self.mask_head_config.num_convs,
            **kw,
        )
        stuff_only = self.stuff_head_config.classes == "stuff"
        self.stuff_head = StuffHead(
            num_classes=self.num_stuff_classes + (0 if stuff_only else self.num_thing_classes),
            channels=self.stuff_head_config.channels,
            norm=self.stuff_head_config.norm,
            **kw,
        )
        self.srm = srm_lib.SpatialRankingModule(
            num_classes=self.num_thing_classes,
            kernel=self.srm_config.kernel,
            kernel_size=self.srm_config.kernel_size,
            **kw,
        )

    # ------------------------------------------------------------------------------ pieces
    def anchors(self, image_size: tuple[int, int]) -> list[np.ndarray]:
        """FPN anchors P2..P6 for the padded image size: per level [Hl * Wl * A, 4] float32."""
        return anchor_ops.fpn_anchors(
            image_size,
            strides=FPN_STRIDES,
            sizes=self.rpn_config.anchor_sizes,
            aspect_ratios=self.rpn_config.anchor_aspect_ratios,
            offset=self.rpn_config.anchor_offset,
        )

    def _pool(self, features: Sequence[Array], boxes: Array, resolution: int) -> Array:
        return roi_ops.multilevel_roi_align(
            features,
            boxes,
            resolution,
            strides=POOLER_STRIDES,
            sampling_ratio=self.roi_config.pooler_sampling_ratio,
            aligned=self.roi_config.pooler_aligned,
            level_mapper=self.roi_config.pooler_level_mapper,
        )

    def _box_branch(self, levels: Sequence[Array], boxes: Array) -> dict[str, Array]:
        """Box head + predictor on [B, K, 4] boxes pooled at the box head's resolution."""
        pooled = self._pool(levels, boxes, self.box_head_config.pooler_resolution)
        return self.box_predictor(self.box_head(pooled))

    def _mask_branch(self, levels: Sequence[Array], boxes: Array) -> Array:
        """Mask head logits [B, K, 2P, 2P, T] on [B, K, 4] boxes (P: mask pooler resolution)."""
        return self.mask_head(self._pool(levels, boxes, self.mask_head_config.pooler_resolution))

    def _mask_loss(
        self,
        k: int,
        levels: Sequence[Array],
        rois: Array,
        classes: Array,
        matched_gt: Array,
        is_fg: Array,
        gt_masks: Array,
        gt_boxes: Array,
    ) -> Array:
        """Mask loss on the first `k` RoI slots of each image: RoIAlign, head, targets, BCE.

        Args:
          k: static number of slots (a bucket); must hold every foreground RoI of the batch.
          levels: P2..P5 feature maps, [B, Hl, Wl, C] each.
          rois: [B, F, 4] the sampled RoIs' first F slots (foreground first).
          classes, matched_gt: [B, F] int32 class and matched GT index of each slot.
          is_fg: [B, F] bool valid foreground slots.
          gt_masks: [B, M, S, S] GT masks cropped to `gt_boxes` [B, M, 4].

        Returns:
          [] float32 `losses.mask_loss` over the batch's foreground RoIs.
        """
        r = rois[:, :k]
        logits = self._mask_branch(levels, r)  # [B, k, 2P, 2P, T]
        targets = jax.vmap(
            lambda m, bx, rr, idx: targets_lib.mask_targets(
                m, bx, rr, idx, out_size=2 * self.mask_head_config.pooler_resolution
            )
        )(gt_masks, gt_boxes, r, matched_gt[:, :k])
        return losses.mask_loss(logits, classes[:, :k], targets, is_fg[:, :k])

    def _trunk(self, batch: dict[str, Array], train: bool) -> dict[str, Any]:
        # The one place where the batch's uint8 image becomes the normalised float input
        # (training, evaluation, prediction and export all pass through here).
        image = normalize_image(
            batch["image"],
            batch["image_shape"],
            self.pixel_mean,
            self.pixel_std,
            self.channel_order,
        )
        image = image.astype(self.dtype)
        feats = self.backbone(image, train=train)
        pyramid = self.fpn(feats)
        levels = [pyramid[f"p{k}"] for k in range(2, 7)]
        rpn_out = self.rpn(levels)
        if self.sharing == "backbone_fpn":
            stuff_in = rpn_out["shared"][:4]
        else:
            own = self.stuff_backbone(image, train=train) if self.sharing == "none" else feats
            own_pyramid = self.stuff_fpn(own)
            stuff_in = [nn.relu(self.stuff_skip(own_pyramid[f"p{k}"])) for k in range(2, 6)]
        logits = self.stuff_head(stuff_in, train=train)["logits"]
        if self.stuff_head_config.classes == "stuff":
            # Stuff-only head (Table 2): thing channels are a constant, keeping [.., T + S].
            things = jnp.full((*logits.shape[:-1], self.num_thing_classes), STUFF_ONLY_THING_LOGIT)
            logits = jnp.concatenate([things.astype(logits.dtype), logits], axis=-1)
        return {"levels": levels, "rpn": rpn_out, "stuff_logits": logits}

    def _detect(
        self, levels: Sequence[Array], props: dict[str, Array], image_shape: Array
    ) -> dict[str, Array]:
        """Box head on the proposals, detection post-processing, mask head on the detections.

        Args:
          levels: P2..P5 feature maps, [B, Hl, Wl, C] each.
          props: `generate_proposals` output ('boxes' [B, K, 4], 'valid' [B, K]).
          image_shape: [B, 2] int32 (h, w) of the images inside the padding.

        Returns:
          dict: 'class_logits' [B, K, T+1], 'box_deltas' [B, K, T, 4] (of the proposals),
          'boxes' [B, D, 4], 'scores' [B, D], 'classes' [B, D] int32, 'valid' [B, D] bool,
          'masks' [B, D, 2P, 2P] probabilities of each detection's class (box frame).
        """
        test = self.test_config
        box_out = self._box_branch(levels, props["boxes"])
        dets = postprocess_detections(
            box_out["class_logits"],
            box_out["box_deltas"],
            props["boxes"],
            props["valid"],
            image_shape,
            score_thresh=test.score_thresh,
            nms_thresh=test.nms_thresh,
            max_detections=test.detections_per_image,
            box_weights=self.roi_config.box_weights,
            clamp=self.roi_config.bbox_reg_clamp,
            min_size=test.min_size,
            max_candidates=test.max_candidates,
        )
        masks = select_class_masks(self._mask_branch(levels, dets["boxes"]), dets["classes"])
        return {**box_out, **dets, "masks": masks}

    def _srm_train_targets(
        self,
        batch: dict[str, Array],
        levels: Sequence[Array],
        props: dict[str, Array],
        image_size: tuple[int, int],
    ) -> tuple[Array, Array, dict[str, Array]]:
        """The SRM's training canvas(es) and labels (`SRMConfig.train_masks`), and their counts.

        'gt': the ground-truth masks (non-crowd), as the paper. 'predicted': the masks of the
        network's own post-NMS detections, with the inference thresholds (score >=
        `instance_score_thresh`, pasted mask >= `mask_threshold`) and the same static paste ops
        (`targets.srm_targets`), labelled by the panoptic thing class at pixels where masks of
        two or more different classes overlap and that class's mask is one of them. Detections
        rather than the sampled positive RoIs because they are exactly what the SRM ranks at
        inference (one mask per object, the predicted class, the score filter): the sampled RoIs
        hold tens of jittered copies of each object, whose union swells every mask, and carry
        the ground-truth class, so the confusions the SRM must order at inference never reach
        it. The detection pass (box head on the training proposals, NMS, mask head on D boxes)
        runs on stop-gradient features: the SRM loss trains the SRM only, never the instance
        branch. 'both': the two canvases stacked into one batch of 2B.

        Returns:
          (canvas [B', h, w, T] float32, labels [B', h, w] int32 (255 = ignored), counts):
          B' = B, or 2B for 'both' (ground truth first). `counts` holds per-image means of the
          supervised pixels, split as `srm.split_conflicts`: 'srm_{gt,pred}_genuine_px' and
          'srm_{gt,pred}_seam_px' for each canvas in use.
        """
        mode = self.srm_config.train_masks
        common = dict(
            image_size=image_size,
            stride=self.srm_config.stride,
            num_thing_classes=self.num_thing_classes,
        )
        made: dict[str, dict[str, Array]] = {}
        if mode in ("gt", "both"):
            made["gt"] = jax.vmap(
                lambda m, bx, cl, v, sem: targets_lib.srm_targets(m, bx, cl, v, sem, **common)
            )(
                batch["masks"],
                batch["boxes"].astype(jnp.float32),
                batch["classes"],
                batch["valid"] & ~batch["is_crowd"],
                batch["semantic"],
            )
        if mode in ("predicted", "both"):
            test = self.test_config
            frozen = [jax.lax.stop_gradient(x) for x in levels]
            props = jax.tree.map(jax.lax.stop_gradient, props)
            dets = self._detect(frozen, props, batch["image_shape"])
            in_canvas = dets["valid"] & (dets["scores"] >= test.instance_score_thresh)
            made["pred"] = jax.vmap(
                lambda m, bx, cl, v, sem: targets_lib.srm_targets(
                    m,
                    bx,
                    cl,
                    v,
                    sem,
                    mask_threshold=test.mask_threshold,
                    label_in_canvas=True,
                    **common,
                )
            )(
                jax.lax.stop_gradient(dets["masks"]),
                jax.lax.stop_gradient(dets["boxes"]),
                dets["classes"],
                in_canvas,
                batch["semantic"],
            )
        counts = {}
        for name, t in made.items():
            labelled = (t["labels"] >= 0) & (t["labels"] < self.num_thing_classes)
            for kind in ("genuine", "seam"):
                px = jnp.sum(labelled & t[kind], axis=(1, 2), dtype=jnp.float32)
                counts[f"srm_{name}_{kind}_px"] = jnp.mean(px)
        canvas = jnp.concatenate([t["canvas"] for t in made.values()], axis=0)
        labels = jnp.concatenate([t["labels"] for t in made.values()], axis=0)
        return canvas, labels, counts

    def _proposals(self, rpn_out: dict[str, Any], anchors, image_shape: Array, train: bool):
        rpn = self.rpn_config
        return generate_proposals(
            rpn_out["objectness"],
            rpn_out["deltas"],
            [jnp.asarray(a) for a in anchors],
            image_shape,
            pre_nms_topk=rpn.pre_nms_topk_train if train else rpn.pre_nms_topk_test,
            post_nms_topk=rpn.post_nms_topk_train if train else rpn.post_nms_topk_test,
            nms_thresh=rpn.nms_thresh,
            min_size=rpn.min_size,
            box_weights=rpn.box_weights,
            clamp=self.roi_config.bbox_reg_clamp,
        )

    # ------------------------------------------------------------------------------ entry
    def __call__(self, batch: dict[str, Array], train: bool = False) -> dict[str, Any]:
        """Runs the network.

        Args:
          batch: the input pipeline's batch (see `oanet_jax.data.spec`): 'image'
            [B, Hp, Wp, 3] uint8 RGB, normalised here (`data.transforms.normalize_image`; a
            floating image is taken as already normalised), 'image_shape' [B, 2] int32, and in
            training the ground truth
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
        RoIs, F = int(R * roi.positive_fraction) foreground slots, h x w = Hp/4 x Wp/4):
          'rpn_objectness' [B, A], 'rpn_deltas' [B, A, 4], 'rpn_labels' [B, A] int32,
          'rpn_box_targets' [B, A, 4]; 'proposals' [B, K, 4], 'proposal_valid' [B, K];
          'class_logits' [B, R, T+1], 'box_deltas' [B, R, T, 4], 'roi_classes' [B, R],
          'roi_box_targets' [B, R, 4], 'roi_valid' [B, R], 'roi_is_fg' [B, R];
          'mask_loss' [] float32 (`losses.mask_loss` over every foreground RoI of the batch),
          'mask_num_fg' [B] int32 foreground RoIs per image, 'mask_rois' [] int32 the mask RoIs
          per image the head ran on (the chosen bucket, see `mask_buckets`);
          'stuff_logits' [B, h, w, T+S]; 'srm_logits' [B', h, w, T], 'srm_labels' [B', h, w]
          int32 (255 = ignored), 'srm_canvas' [B', h, w, T] (B' = B, or 2B when
          `srm.train_masks` is 'both'), 'srm_counts' {name: [] float32} supervised SRM pixels
          per image, genuine overlaps vs resampling seams (see `_srm_train_targets`).

        The mask head runs inside the branch of a `jax.lax.switch` over the static buckets of
        `mask_head.train_buckets`: RoIAlign, head, targets and the loss of the first k RoI slots
        of each image, k the smallest bucket holding the batch's largest foreground count. The
        loss equals the unbucketed one (all F slots): the slots past k are not foreground.
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
                iou_thresholds=self.rpn_config.iou_thresholds,
                batch_size_per_image=self.rpn_config.batch_size_per_image,
                positive_fraction=self.rpn_config.positive_fraction,
                box_weights=self.rpn_config.box_weights,
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
                batch_size_per_image=self.roi_config.batch_size_per_image,
                positive_fraction=self.roi_config.positive_fraction,
                iou_threshold=self.roi_config.iou_threshold,
                box_weights=self.roi_config.box_weights,
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
        box_out = self._box_branch(levels, rois["rois"])

        # The sampler puts foreground first: the mask head only needs the first F slots, and
        # of those only a static bucket that holds the batch's largest foreground count.
        f = int(self.roi_config.batch_size_per_image * self.roi_config.positive_fraction)
        mask_in = (
            levels,
            rois["rois"][:, :f],
            rois["classes"][:, :f],
            rois["matched_gt"][:, :f],
            rois["is_fg"][:, :f],
            batch["masks"],
            gt_boxes,
        )
        num_fg = jnp.sum(rois["is_fg"][:, :f], axis=1, dtype=jnp.int32)
        buckets = mask_buckets(self.mask_head_config.train_buckets, f)
        if self.train_mask_rois is not None:
            if not 1 <= int(self.train_mask_rois) <= f:
                raise ValueError(f"train_mask_rois={self.train_mask_rois} must be in [1, F={f}]")
            buckets = (int(self.train_mask_rois),)
        if len(buckets) == 1 or self.is_initializing():
            # One size (or init, where the parameters' shapes do not depend on it): no switch.
            bucket = jnp.asarray(0, jnp.int32)
            mask_loss = self._mask_loss(buckets[0], *mask_in)
        else:
            bucket = choose_bucket(num_fg, buckets)
            branches = [lambda mdl, *xs, k=k: mdl._mask_loss(k, *xs) for k in buckets]
            mask_loss = nn.switch(bucket, branches, self, *mask_in, rngs=False)
        mask_rois = jnp.take(jnp.asarray(buckets, jnp.int32), bucket)

        srm_canvas, srm_labels, srm_counts = self._srm_train_targets(
            batch, levels, props, image_size
        )
        srm_logits = self.srm(srm_canvas)

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
            "mask_loss": mask_loss,
            "mask_num_fg": num_fg,
            "mask_rois": mask_rois,
            "stuff_logits": trunk["stuff_logits"],
            "srm_logits": srm_logits,
            "srm_labels": srm_labels,
            "srm_canvas": srm_canvas,
            "srm_counts": srm_counts,
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
        test = self.test_config
        image_size = tuple(batch["image"].shape[1:3])
        trunk = self._trunk(batch, train=False)
        props = self._proposals(trunk["rpn"], self.anchors(image_size), batch["image_shape"], False)
        levels = trunk["levels"][:4]
        dets = self._detect(levels, props, batch["image_shape"])
        masks = dets["masks"]

        in_canvas = dets["valid"] & (dets["scores"] >= test.instance_score_thresh)
        inst = srm_lib.paste_instances(
            masks, dets["boxes"], in_canvas, image_size, self.srm_config.stride, test.mask_threshold
        )
        canvas = srm_lib.build_canvas(inst, dets["classes"], in_canvas, self.num_thing_classes)
        srm_logits = self.srm(canvas)
        srm_map = jax.nn.softmax(srm_logits, axis=-1)
        srm_scores = srm_lib.ranking_scores(srm_map, inst, dets["classes"], in_canvas)
        return {
            "proposals": props["boxes"],
            "proposal_logits": props["logits"],
            "proposal_valid": props["valid"],
            "class_logits": dets["class_logits"],
            "box_deltas": dets["box_deltas"],
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
