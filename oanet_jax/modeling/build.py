"""The one place where a config becomes modules."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from oanet_jax.modeling import resnet
from oanet_jax.modeling.oanet import OANet

BACKBONES = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "tiny": resnet.resnet_tiny,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config: ml_collections.ConfigDict) -> OANet:
    """Builds OANet from a full config (uses `config.model` and `config.eval`).

    Args:
      config: a config from `configs/` (fields as in `configs/base.py`).

    Returns:
      An unbound `OANet` module.
    """
    m = config.model
    if m.backbone not in BACKBONES:
        raise ValueError(f"Unknown backbone {m.backbone!r}; expected one of {sorted(BACKBONES)}.")
    dtype = DTYPES[m.compute_dtype]
    param_dtype = DTYPES[m.param_dtype]
    backbone = BACKBONES[m.backbone](
        norm=m.norm, freeze_at=m.freeze_at, dtype=dtype, param_dtype=param_dtype
    )
    return OANet(
        backbone=backbone,
        num_thing_classes=m.num_thing_classes,
        num_stuff_classes=m.num_stuff_classes,
        fpn_channels=m.fpn_channels,
        anchor_sizes=tuple(m.anchor_sizes),
        anchor_aspect_ratios=tuple(m.anchor_aspect_ratios),
        anchor_offset=m.anchor_offset,
        rpn_pre_nms_topk_train=m.rpn_pre_nms_topk_train,
        rpn_pre_nms_topk_test=m.rpn_pre_nms_topk_test,
        rpn_post_nms_topk_train=m.rpn_post_nms_topk_train,
        rpn_post_nms_topk_test=m.rpn_post_nms_topk_test,
        rpn_nms_thresh=m.rpn_nms_thresh,
        rpn_min_size=m.rpn_min_size,
        rpn_iou_thresholds=tuple(m.rpn_iou_thresholds),
        rpn_batch_size_per_image=m.rpn_batch_size_per_image,
        rpn_positive_fraction=m.rpn_positive_fraction,
        rpn_box_weights=tuple(m.rpn_box_weights),
        roi_batch_size_per_image=m.roi_batch_size_per_image,
        roi_positive_fraction=m.roi_positive_fraction,
        roi_iou_threshold=m.roi_iou_threshold,
        roi_box_weights=tuple(m.roi_box_weights),
        bbox_reg_clamp=m.bbox_reg_clamp,
        box_head_fc_dim=m.box_head_fc_dim,
        box_pooler_resolution=m.box_pooler_resolution,
        mask_pooler_resolution=m.mask_pooler_resolution,
        mask_head_conv_dim=m.mask_head_conv_dim,
        mask_head_num_convs=m.mask_head_num_convs,
        pooler_sampling_ratio=m.pooler_sampling_ratio,
        pooler_aligned=m.pooler_aligned,
        pooler_level_mapper=m.pooler_level_mapper,
        test_score_thresh=m.test_score_thresh,
        test_nms_thresh=m.test_nms_thresh,
        test_detections_per_image=m.test_detections_per_image,
        test_min_size=m.test_min_size,
        test_max_candidates=m.test_max_candidates,
        stuff_head_channels=m.stuff_head_channels,
        stuff_head_norm=m.stuff_head_norm,
        srm_kernel=m.srm_kernel,
        srm_kernel_size=m.srm_kernel_size,
        srm_stride=m.srm_stride,
        srm_score_thresh=config.eval.instance_score_thresh,
        mask_threshold=config.eval.mask_threshold,
        dtype=dtype,
        param_dtype=param_dtype,
    )
