"""The embedded default: OANet on the synthetic occlusion dataset, trainable on a 2-core CPU.

The dataset is made by `scripts/make_synthetic.py --out data/synthetic` (COCO panoptic format:
`{train,val}/images`, `{train,val}/panoptic/*.png`, `{train,val}/panoptic.json`,
`{train,val}/instances.json`, and `categories.json`).
"""

import ml_collections

from configs import base


def synthetic_split(root: str, split: str) -> ml_collections.ConfigDict:
    """The paths of one split written by the synthetic generator, relative to `data.root`."""
    del root
    return base._split(
        f"{split}/images", f"{split}/panoptic.json", f"{split}/panoptic", f"{split}/instances.json"
    )


def get_config() -> ml_collections.ConfigDict:
    """Returns the synthetic-dataset configuration (small backbone, 128x128 images)."""
    c = base.get_config()
    c.data.root = "data/synthetic"
    c.data.train = synthetic_split(c.data.root, "train")
    c.data.eval = synthetic_split(c.data.root, "val")
    c.data.synthetic_num_images = 1000
    c.data.synthetic_num_val_images = 100
    c.data.synthetic_size = (128, 128)
    # The benchmark's difficulty (oanet_jax.data.synthetic.Knobs): the chance that an instance is
    # placed next to one of another class, and that it follows the depth rule.
    c.data.synthetic_near_prob = 0.18
    c.data.synthetic_depth_consistency = 1.0
    c.data.min_size_train = (128,)
    c.data.min_size_test = 128
    c.data.max_size = 128
    c.data.image_size = (128, 128)
    c.data.max_instances = 16
    c.data.mask_size = 32
    c.data.shuffle_buffer = 256

    m = c.model
    m.backbone = "resnet18"
    m.norm = "group_norm"
    m.freeze_at = 0
    m.fpn_channels = 64
    m.num_thing_classes = 4
    m.num_stuff_classes = 3
    m.rpn.anchor_sizes = (8, 16, 32, 64, 128)
    m.rpn.pre_nms_topk_train = 512
    m.rpn.pre_nms_topk_test = 256
    m.rpn.post_nms_topk_train = 128
    m.rpn.post_nms_topk_test = 64
    m.rpn.batch_size_per_image = 128
    m.roi.batch_size_per_image = 64
    # Fixed 2x2 sampling: the adaptive grid (0) allocates its cap per bin, which makes the
    # RoIAlign backward (a scatter-add) several times slower on CPU for these small boxes.
    m.roi.pooler_sampling_ratio = 2
    m.box_head.fc_dim = 256
    m.mask_head.conv_dim = 32
    m.mask_head.num_convs = 2
    m.stuff_head.channels = 32
    m.test.detections_per_image = 16
    m.test.max_candidates = 256

    t = c.train
    # Sized so that the README's main command (data generation, training, evaluation) ends in
    # under 15 minutes on a 2-core CPU.
    t.batch_size = 8
    t.num_steps = 400
    t.warmup_steps = 50
    t.lr_decay_steps = (300, 370)
    t.log_every_steps = 10

    c.checkpoint.every_steps = 100
    c.eval.batch_size = 8
    # Evaluation during training (all 100 val images, ~10 s each on 2 CPU cores); the best
    # checkpoint by PQ (SRM ordering... see eval.orderings) is kept in checkpoints_best.
    c.eval.every_steps = 100
    c.eval.stuff_area_limit = 64  # 4900 px at COCO scale ~ 64 px at 128x128
    return c
