"""Hyperparameters of OANet's parts, one small frozen dataclass per section of `config.model`.

Each dataclass mirrors one section of ``config.model`` in ``configs/base.py`` field for field
(`oanet_jax.modeling.build` converts the ConfigDict sections and fails on any difference), and
`oanet_jax.modeling.oanet.OANet` takes one of each. They are plain, hashable values (tuples, not
lists), so they can be flax module fields and static arguments. Defaults are the paper's
(detectron2's Base-RCNN-FPN where the paper is silent).
"""

from __future__ import annotations

import dataclasses
import math

__all__ = [
    "BoxHeadConfig",
    "MaskHeadConfig",
    "ROIConfig",
    "RPNConfig",
    "SRMConfig",
    "SECTIONS",
    "StuffHeadConfig",
    "TestConfig",
]


@dataclasses.dataclass(frozen=True)
class RPNConfig:
    """Anchors, proposal generation and anchor sampling of the region proposal network."""

    anchor_sizes: tuple[float, ...] = (32, 64, 128, 256, 512)
    """One anchor size (pixels) per level P2..P6."""
    anchor_aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    """Anchor aspect ratios (h / w), shared by all levels."""
    anchor_offset: float = 0.0
    """Anchor centre offset in units of the stride (detectron2's DefaultAnchorGenerator)."""
    pre_nms_topk_train: int = 2000
    """Per-level top-k proposals before NMS, training."""
    pre_nms_topk_test: int = 1000
    """Per-level top-k proposals before NMS, inference."""
    post_nms_topk_train: int = 1000
    """Proposals per image after NMS, training."""
    post_nms_topk_test: int = 1000
    """Proposals per image after NMS, inference."""
    nms_thresh: float = 0.7
    """Proposal NMS IoU threshold."""
    min_size: float = 0.0
    """Proposals with a side <= this are dropped (torchvision: 1e-3)."""
    iou_thresholds: tuple[float, ...] = (0.3, 0.7)
    """Anchor matcher thresholds (negative below the first, positive from the second)."""
    batch_size_per_image: int = 256
    """Anchors sampled per image for the RPN losses (also their normaliser)."""
    positive_fraction: float = 0.5
    """Positive fraction of the sampled anchors."""
    box_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    """RPN box coder weights (wx, wy, ww, wh)."""
    smooth_l1_beta: float = 0.0
    """Smooth-L1 beta of the RPN box loss (0 = L1)."""


@dataclasses.dataclass(frozen=True)
class ROIConfig:
    """RoI sampling, box coding and RoIAlign pooling of the RoI heads."""

    batch_size_per_image: int = 512
    """RoIs sampled per image for the box head."""
    positive_fraction: float = 0.25
    """Foreground fraction of the sampled RoIs (F = int(R * this) mask-head slots)."""
    iou_threshold: float = 0.5
    """Foreground IoU threshold of the RoI matcher."""
    box_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
    """RoI box coder weights (wx, wy, ww, wh)."""
    smooth_l1_beta: float = 0.0
    """Smooth-L1 beta of the box-head regression loss (0 = L1)."""
    bbox_reg_clamp: float = math.log(1000.0 / 16)
    """dw/dh clamp of every box decoder (RPN proposals and detections)."""
    pooler_sampling_ratio: int = 0
    """RoIAlign samples per bin (0 = adaptive, detectron2)."""
    pooler_aligned: bool = True
    """RoIAlign half-pixel alignment (detectron2 True, torchvision False)."""
    pooler_level_mapper: str = "detectron2"
    """FPN level assignment formula: 'detectron2' or 'torchvision'."""


@dataclasses.dataclass(frozen=True)
class BoxHeadConfig:
    """The 2fc box head."""

    fc_dim: int = 1024
    """Width of the two fc layers."""
    pooler_resolution: int = 7
    """RoIAlign output size P (the head's input is P x P x fpn_channels)."""


@dataclasses.dataclass(frozen=True)
class MaskHeadConfig:
    """The conv-upsample mask head."""

    conv_dim: int = 256
    """Channels of the 3x3 convs."""
    num_convs: int = 4
    """Number of 3x3 convs."""
    pooler_resolution: int = 14
    """RoIAlign output size P (the predicted masks are 2P x 2P)."""
    train_buckets: tuple[int, ...] = (16, 32, 64, 128)
    """Static numbers of mask RoIs per image in training. The smallest bucket holding the batch's
    largest per-image foreground count runs (`jax.lax.switch`, one branch executes); buckets
    above F = int(roi.batch_size_per_image * roi.positive_fraction) are cut to F, and F is
    always the last bucket, so every count fits. () = always F."""


@dataclasses.dataclass(frozen=True)
class StuffHeadConfig:
    """The stuff branch (paper Fig. 3)."""

    channels: int = 128
    """Channels of every conv before the 1x1 classifier."""
    norm: str = "group_norm"
    """Normalisation after each 3x3 conv: 'group_norm' | 'batch_norm' | 'frozen_bn' | 'none'."""
    classes: str = "all"
    """Supervised classes (Table 2): 'all' (stuff and things, the paper's "object context") or
    'stuff' (only the stuff classes; thing pixels are ignored by the semantic loss and the head
    predicts stuff classes only; its thing channels are a constant that never wins an argmax)."""


@dataclasses.dataclass(frozen=True)
class SRMConfig:
    """The spatial ranking module (paper section 3.2)."""

    kernel: str = "large"
    """SRM block: 'large' (GCN 1xk / kx1), '3x3' or '1x1'."""
    kernel_size: int = 7
    """k of the large-kernel block."""
    stride: int = 4
    """Output stride of the SRM canvas."""
    train_masks: str = "gt"
    """What the SRM canvas is built from in training: 'gt' (ground-truth instance masks, which
    overlap when they come from a COCO instances JSON), 'predicted' (the network's own
    thresholded masks of its post-NMS detections, gradient stopped, labelled by the panoptic
    thing class where masks of different classes overlap: learns from panoptic-only data) or
    'both' (the two canvases as one batch of 2B for the SRM). The config's 'auto' is resolved
    by `oanet_jax.modeling.build.resolve_srm_train_masks` before it reaches this field."""


@dataclasses.dataclass(frozen=True)
class TestConfig:
    """Inference: detection post-processing and which detections the SRM ranks.

    `instance_score_thresh` and `mask_threshold` are the one home of these two values: the
    network's SRM canvas and the panoptic merge (`oanet_jax.panoptic.merge`) use the same ones.
    """

    __test__ = False  # not a pytest test class, despite its name

    score_thresh: float = 0.05
    """Detection score threshold of the box post-processing."""
    nms_thresh: float = 0.5
    """Per-class NMS IoU threshold."""
    detections_per_image: int = 100
    """Detections per image D (padded)."""
    min_size: float = 0.0
    """Detections with a side <= this are dropped (torchvision: 1e-2)."""
    max_candidates: int = 2048
    """Top class-box candidates kept before the detection NMS (static size, see roi_heads)."""
    instance_score_thresh: float = 0.5
    """Detections with a lower score are neither pasted into the SRM canvas nor merged."""
    mask_threshold: float = 0.5
    """Binarisation threshold (>=) of pasted mask probabilities: SRM canvas and panoptic merge."""


SECTIONS = {
    "rpn": RPNConfig,
    "roi": ROIConfig,
    "box_head": BoxHeadConfig,
    "mask_head": MaskHeadConfig,
    "stuff_head": StuffHeadConfig,
    "srm": SRMConfig,
    "test": TestConfig,
}
"""Section name of `config.model` -> its dataclass."""
