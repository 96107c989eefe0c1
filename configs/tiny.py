"""A tiny configuration for tests: small images, narrow network, a few steps."""

import ml_collections

from configs import synthetic


def get_config() -> ml_collections.ConfigDict:
    """Returns the tiny test configuration (64x64 synthetic images)."""
    c = synthetic.get_config()
    c.data.root = "data/synthetic_tiny"
    c.data.synthetic_num_images = 16
    c.data.synthetic_num_val_images = 8
    c.data.synthetic_size = (64, 64)
    c.data.min_size_train = (64,)
    c.data.min_size_test = 64
    c.data.max_size = 64
    c.data.image_size = (64, 64)
    c.data.max_instances = 8
    c.data.mask_size = 16
    c.data.shuffle_buffer = 16

    m = c.model
    m.backbone = "tiny"
    m.fpn_channels = 16
    m.rpn.pre_nms_topk_train = 128
    m.rpn.pre_nms_topk_test = 64
    m.rpn.post_nms_topk_train = 32
    m.rpn.post_nms_topk_test = 16
    m.rpn.batch_size_per_image = 32
    m.roi.batch_size_per_image = 16
    m.box_head.fc_dim = 32
    m.mask_head.conv_dim = 16
    m.mask_head.num_convs = 2
    # Buckets (2, F = 4): the training tests run the mask head through its lax.switch.
    m.mask_head.train_buckets = (2,)
    m.stuff_head.channels = 8
    m.test.detections_per_image = 8
    m.test.max_candidates = 64

    c.train.batch_size = 8
    c.train.num_steps = 4
    c.train.warmup_steps = 2
    c.train.lr_decay_steps = (3,)
    c.checkpoint.every_steps = 2
    c.eval.batch_size = 4
    # Tests train the tiny model many times: no evaluation after each run unless a test asks.
    c.eval.at_end = False
    return c
