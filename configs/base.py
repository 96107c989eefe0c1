"""Paper defaults for OANet (CVPR 2019) on COCO panoptic, ResNet-50 + FPN.

Values follow ../shared/DESIGN.md: detectron2's Base-RCNN-FPN where the paper is silent, and the
paper's section 4.2 for the solver and inference. Other configs start from `get_config()` here and
override fields; a field exists under the same name in every config.
"""

import math

import ml_collections


def _split(image_dir: str, panoptic_json: str, panoptic_dir: str, instances_json: str):
    """One COCO-panoptic-format split: the folders and files the reader needs."""
    return ml_collections.ConfigDict(
        {
            "image_dir": image_dir,
            "panoptic_json": panoptic_json,
            "panoptic_dir": panoptic_dir,
            # Optional COCO instances JSON (full, overlapping masks). Empty string: instance
            # masks come from the panoptic segments (non-overlapping).
            "instances_json": instances_json,
        }
    )


def get_config() -> ml_collections.ConfigDict:
    """Returns the base (paper default) configuration."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    # ----------------------------------------------------------------------------- data
    d = c.data = ml_collections.ConfigDict()
    # 'coco_panoptic': raw COCO-format folders (any dataset in COCO panoptic format);
    # 'tfds': TFDS `coco/2017_panoptic` prepared by the user under `tfds_data_dir`.
    d.source = "coco_panoptic"
    d.root = "data/coco"
    d.train = _split(
        "train2017",
        "annotations/panoptic_train2017.json",
        "annotations/panoptic_train2017",
        "annotations/instances_train2017.json",
    )
    d.eval = _split(
        "val2017",
        "annotations/panoptic_val2017.json",
        "annotations/panoptic_val2017",
        "annotations/instances_val2017.json",
    )
    d.tfds_name = "coco/2017_panoptic"
    d.tfds_data_dir = ""
    # Resize as detectron2's ResizeShortestEdge: shorter side to one of `min_size_train`
    # (chosen at random per image in training), longer side at most `max_size`.
    d.min_size_train = (800,)
    d.min_size_test = 800
    d.max_size = 1333
    # Fixed padded image size [H, W] seen by every jitted function (multiple of 32).
    d.image_size = (1344, 1344)
    d.max_instances = 100  # ground truth padded to this many instances, with a `valid` mask
    d.mask_size = 112  # instance masks cropped to their box at this size (TPU Mask R-CNN)
    # The pipeline ships images and label maps at their source size on a static canvas [H, W];
    # the device resizes, flips, pads and crops the masks (data/device_transform.py).
    # (0, 0): the split's largest image (from its JSON) rounded up to multiples of 32.
    d.source_size = (0, 0)
    # Instance masks from an instances JSON travel as run lengths: at most this many per image
    # (an image with more is a bad record naming its file: raise the limit or skip it).
    d.max_mask_runs = 32768
    d.random_flip = True
    # detectron2 defaults: BGR channel order, mean subtracted, std 1.
    d.channel_order = "BGR"
    d.pixel_mean = (103.53, 116.28, 123.675)
    d.pixel_std = (1.0, 1.0, 1.0)
    d.shuffle_buffer = 1024
    d.prefetch = 2
    # Bad records: False raises an error naming the file and record; True skips and counts.
    d.skip_bad_records = False
    # An image with no segment at all: kept (it still trains the stuff/void pixels) unless False.
    d.keep_empty_images = True
    # Training instance masks: 'full' (from the split's instances JSON when it has one: whole,
    # overlapping masks) or 'panoptic' (the visible panoptic segments even when an instances
    # JSON exists: the paper's "w/ pano-instance GT", Table 3). TFDS has panoptic masks only.
    d.instance_masks = "full"

    # ---------------------------------------------------------------------------- model
    m = c.model = ml_collections.ConfigDict()
    m.backbone = "resnet50"  # resnet50 | resnet101 | resnet18 | resnet34 | tiny
    m.norm = "frozen_bn"  # frozen_bn | group_norm | batch_norm
    m.freeze_at = 2  # stem + res2 frozen, as detectron2
    m.fpn_channels = 256
    m.num_thing_classes = 80
    m.num_stuff_classes = 53
    m.compute_dtype = "float32"  # float32 | bfloat16
    # What the stuff branch shares with the instance branch (Table 4): 'backbone_fpn' (ResNet,
    # FPN and the RPN's 3x3 "skip-connection" conv: the paper's deep share), 'backbone' (the
    # ResNet only; the stuff branch has its own FPN and 3x3 conv) or 'none' (nothing: its own
    # ResNet, FPN and 3x3 conv, as two separate networks).
    m.sharing = "backbone_fpn"
    m.param_dtype = "float32"
    # Sections: one frozen dataclass each in oanet_jax/modeling/config.py, field for field.
    # Anchors / RPN
    rpn = m.rpn = ml_collections.ConfigDict()
    rpn.anchor_sizes = (32, 64, 128, 256, 512)
    rpn.anchor_aspect_ratios = (0.5, 1.0, 2.0)
    rpn.anchor_offset = 0.0  # detectron2's DefaultAnchorGenerator offset
    rpn.pre_nms_topk_train = 2000
    rpn.pre_nms_topk_test = 1000
    rpn.post_nms_topk_train = 1000
    rpn.post_nms_topk_test = 1000
    rpn.nms_thresh = 0.7
    rpn.min_size = 0.0  # torchvision: 1e-3
    rpn.iou_thresholds = (0.3, 0.7)
    rpn.batch_size_per_image = 256
    rpn.positive_fraction = 0.5
    rpn.box_weights = (1.0, 1.0, 1.0, 1.0)
    rpn.smooth_l1_beta = 0.0
    # RoI heads: sampling, box coding, RoIAlign
    roi = m.roi = ml_collections.ConfigDict()
    roi.batch_size_per_image = 512
    roi.positive_fraction = 0.25
    roi.iou_threshold = 0.5
    roi.box_weights = (10.0, 10.0, 5.0, 5.0)
    roi.smooth_l1_beta = 0.0
    roi.bbox_reg_clamp = math.log(1000.0 / 16)  # also clamps the RPN's proposal decoding
    roi.pooler_sampling_ratio = 0
    roi.pooler_aligned = True
    roi.pooler_level_mapper = "detectron2"  # or "torchvision" (parity tests)
    # Box head (2fc) and mask head (conv-upsample, masks twice the pooled size)
    m.box_head = ml_collections.ConfigDict()
    m.box_head.fc_dim = 1024
    m.box_head.pooler_resolution = 7
    m.mask_head = ml_collections.ConfigDict()
    m.mask_head.conv_dim = 256
    m.mask_head.num_convs = 4
    m.mask_head.pooler_resolution = 14
    # Mask RoIs per image in training: the smallest of these static sizes that holds the batch's
    # largest per-image foreground count (lax.switch picks it on device). Cut to the foreground
    # slots F = roi.batch_size_per_image * roi.positive_fraction, F always added; () = always F.
    m.mask_head.train_buckets = (16, 32, 64, 128)
    # Stuff head (paper Fig. 3)
    m.stuff_head = ml_collections.ConfigDict()
    m.stuff_head.channels = 128
    m.stuff_head.norm = "group_norm"
    m.stuff_head.classes = "all"  # all (stuff + things, "object context") | stuff (Table 2)
    # Spatial ranking module
    srm = m.srm = ml_collections.ConfigDict()
    srm.kernel = "large"  # large (1x7/7x1 GCN block) | 3x3 | 1x1
    srm.kernel_size = 7
    srm.stride = 4  # SRM canvas at this output stride
    # SRM training canvas: 'gt' | 'predicted' | 'both' (see SRMConfig.train_masks), or 'auto':
    # 'gt' when the training instance masks overlap (raw COCO-format data with an instances
    # JSON and data.instance_masks='full'), else 'predicted' (TFDS, no instances JSON, or
    # data.instance_masks='panoptic'). The training run logs which one is in use.
    srm.train_masks = "auto"
    # Inference
    test = m.test = ml_collections.ConfigDict()
    test.score_thresh = 0.05
    test.nms_thresh = 0.5
    test.detections_per_image = 100
    test.min_size = 0.0  # torchvision: 1e-2
    test.max_candidates = 2048  # static size of the detection NMS input (see roi_heads)
    # The one home of these two: detections below `instance_score_thresh` are neither pasted into
    # the SRM canvas nor merged into the panoptic output; masks binarised at `mask_threshold` (>=)
    # in both.
    test.instance_score_thresh = 0.5
    test.mask_threshold = 0.5

    # ---------------------------------------------------------------------------- loss
    c.loss = ml_collections.ConfigDict()
    c.loss.seg_weight = 0.25  # lambda of Eq. 1 (Table 1)
    c.loss.srm_weight = 1.0
    c.loss.ignore_label = 255
    # Semantic loss over chunks of this many stride-4 logit rows (memory; must divide Hp / 4);
    # 0 computes it in one shot.
    c.loss.seg_chunk_rows = 0

    # ---------------------------------------------------------------------------- train
    t = c.train = ml_collections.ConfigDict()
    t.batch_size = 16  # global batch
    t.num_steps = 100_000
    t.base_lr = 0.02
    t.warmup_steps = 2000
    t.warmup_init_lr = 0.002
    t.lr_decay_steps = (60_000, 80_000)
    t.lr_decay_factor = 0.1
    t.momentum = 0.9
    t.weight_decay = 1e-4
    t.weight_decay_norm = 0.0
    t.grad_clip_norm = 0.0  # 0 disables
    t.on_nonfinite = "error"  # error | skip
    t.log_every_steps = 20
    t.init_checkpoint = ""  # converted torchvision / ImageNet weights (orbax dir)

    # -------------------------------------------------------------------------- sharding
    s = c.sharding = ml_collections.ConfigDict()
    s.mesh_shape = (-1, 1)  # ('data', 'model'); -1 = all remaining devices
    s.mesh_axes = ("data", "model")
    s.shard_params = False  # FSDP-style parameter sharding on 'model'
    s.distributed = False  # call jax.distributed.initialize()
    # Passed to jax.distributed.initialize when set; ''/-1: detected (Cloud TPU, SLURM, ...).
    s.coordinator_address = ""  # 'host:port' of process 0
    s.num_processes = -1
    s.process_id = -1
    # Collectives of a cluster of CPU processes: 'gloo' (or 'mpi'); '' = JAX's default.
    s.cpu_collectives = ""

    # ------------------------------------------------------------------------ checkpoint
    k = c.checkpoint = ml_collections.ConfigDict()
    k.every_steps = 5000
    k.keep = 3
    k.async_save = True

    # ----------------------------------------------------------------------------- eval
    e = c.eval = ml_collections.ConfigDict()
    e.batch_size = 8
    e.overlap_threshold = 0.5
    # Stuff areas under this many pixels are left void (paper 4.2), counted per stuff class
    # ('class', detectron2) or per 4-connected region of a class ('region', the paper's wording),
    # in pixels of the original image ('original', scaled to the merge resolution on device) or
    # of the padded merge resolution ('merge').
    e.stuff_area_limit = 4900
    e.stuff_area_unit = "class"
    e.stuff_area_pixels = "original"
    # Pixels the stuff branch's argmax over all classes gives to a thing class but no kept
    # instance covers: the best stuff class ('stuff') or void ('void', Panoptic FPN).
    e.thing_pixels = "stuff"
    e.orderings = ("score", "srm")
    # Evaluation during training: every this many steps (0 = only at the end of training when
    # `at_end`), on the first `num_images` images of the eval split (0 = all of it).
    e.every_steps = 0
    e.num_images = 0
    e.at_end = True
    # Checkpoint kept as "best" by this metric, "<ordering>/<metric>" (higher is better): PQ of
    # OANet's own, SRM-ordered fusion by default.
    e.best_metric = "srm/PQ"
    # PQ statistics: 'host' (numpy, in memory; fastest on CPU) or 'device' (jitted matching on
    # the accelerator inside the evaluation step; needs image sizes in the panoptic JSON). Both
    # equal panopticapi's pq_compute.
    e.pq_backend = "host"
    # Also write COCO panoptic PNGs + predictions JSON (for submissions); off by default.
    e.write_predictions = False
    return c
