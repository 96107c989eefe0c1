"""OANet ResNet-101 + FPN on COCO panoptic 2017 (paper Table 6): `coco_r50` with ResNet-101.

Same data layout, schedule and evaluation as `configs/coco_r50.py`; the backbone starts from
ImageNet ResNet-101 weights you convert with `oanet-convert resnet101.pth weights/r101` and pass
as `--config.train.init_checkpoint=weights/r101`.
"""

import ml_collections

from configs import coco_r50


def get_config() -> ml_collections.ConfigDict:
    """Returns the COCO ResNet-101 configuration."""
    c = coco_r50.get_config()
    c.model.backbone = "resnet101"
    return c
