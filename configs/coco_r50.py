"""OANet ResNet-50 + FPN on COCO panoptic 2017: the paper's setting (section 4.2).

The paper's schedule: SGD momentum 0.9, weight decay 1e-4, batch 16, linear warm-up from 0.002
to 0.02 over 2,000 steps, learning rate x0.1 at 60k and 80k steps, 100k steps; lambda = 0.25;
shorter side 800 (longer at most 1333); at most 100 detections; stuff areas under 4,900 pixels
of the original image removed; overlap ratio 0.5 in the merge. Those are `configs/base.py`'s
values; this file adds what a real COCO run needs: the standard COCO layout under `data.root`

    data/coco/train2017/  val2017/
    data/coco/annotations/panoptic_{train,val}2017.json
    data/coco/annotations/panoptic_{train,val}2017/   (PNGs)
    data/coco/annotations/instances_{train,val}2017.json

evaluation on val2017 every 10k steps with the best checkpoint kept, and checkpoints every 5k.
The paper starts from an ImageNet-pretrained backbone: convert one you have with
`oanet-convert resnet50.pth weights/r50` and pass `--config.train.init_checkpoint=weights/r50`
(nothing is downloaded).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the COCO ResNet-50 configuration."""
    c = base.get_config()
    c.data.root = "data/coco"
    c.model.backbone = "resnet50"
    c.eval.every_steps = 10_000
    c.eval.num_images = 0  # all of val2017
    c.checkpoint.every_steps = 5_000
    return c
