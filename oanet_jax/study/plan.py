"""The study's runs: arms (config switches), seeds, benchmark settings (generator knobs), sizes.

An arm is one training configuration; each is trained once per seed on the dataset of its
benchmark setting drawn with that seed (``config.seed`` seeds both the data and the model, as
``--config.seed=7`` with a fresh data root does). A run's evaluation gives both merge orderings
(detection score and SRM ranking score), so "baseline vs SRM" (Table 3) is one arm, not two.

Benchmark settings (`SETTINGS`) were fixed before any study result was seen:

* ``default``: the synthetic benchmark as the README's main command trains it (near_prob 0.18,
  depth rule always followed): 33-45% of thing instances overlap one of another class.
* ``sparse``: near_prob 0.02, so that most instances overlap nothing: the paper explains its
  pano-instance result (Table 3) by most COCO objects not overlapping, and this setting tests
  that explanation. What COCO's share is cannot be measured here: the two sample images of
  ../shared/data/coco_panoptic_sample have panoptic (visible) masks only; the share of visible
  thing segments touching one of another class (`report.contact_share`) is reported beside the
  settings' in RESULTS.md, two images being no estimate.
* ``shuffled``: the default overlap, but a person/car/ball follows the depth rule only half of the
  time (depth_consistency 0.5): class and position no longer tell who is in front, so the order
  must be read from the image.

Sizes (`PRESETS`): 'full' is the README main command's (128x128 images, ResNet-18 + GN, 400 steps
of batch 8 on 1000 images): 5-11 min a run on the 2-core VMs seen so far, 4.5-7 hours for the 45
runs, so it is run in parts (``--arms``) and accumulates in the repository's record of finished runs
(`oanet_jax.study.main`). 'short' fits the 45 runs in about 2 hours on that CPU: the 'tiny'
backbone (one basic block per stage, widths 8-64; 0.40 s per step of batch 8 vs ResNet-18's 0.77
s), 200 steps, 500 training images. It is a check that the whole plan runs, not a measurement:
measured on full_gt seed 0 it reached PQ 48.6 (score order) / 48.2 (SRM), 206 s, where 'full'
gives 68.4 / 73.0 (mean of three seeds, docs/RESULTS.md); shorter schedules with ResNet-18
diverged (warm-up 20 steps) or stay near PQ 40-60 (the main command's PQ at steps 100-200).
'tiny' is for tests.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from oanet_jax.data.synthetic import Knobs

__all__ = ["ARMS", "PRESETS", "SETTINGS", "Arm", "Preset", "arm_by_name", "runs"]

SETTINGS: dict[str, Knobs] = {
    "default": Knobs(near_prob=0.18, depth_consistency=1.0),
    "sparse": Knobs(near_prob=0.02, depth_consistency=1.0),
    "shuffled": Knobs(near_prob=0.18, depth_consistency=0.5),
}


@dataclasses.dataclass(frozen=True)
class Arm:
    """One training configuration of the study.

    Attributes:
      name: the run folder's name (``<name>/seed<k>``).
      title: what it is, in words (RESULTS.md's occlusion table).
      overrides: dotted config paths -> values, on top of the preset.
      setting: the benchmark setting (a key of `SETTINGS`).
      merge_variants: also evaluate the merge options (thing_pixels, stuff area per region).
    """

    name: str
    title: str
    overrides: tuple[tuple[str, Any], ...] = ()
    setting: str = "default"
    merge_variants: bool = False


_NO_JSON = (("data.train.instances_json", ""),)
ARMS: tuple[Arm, ...] = (
    # Table 3: full (amodal, overlapping) masks, SRM on ground truth; and the merge options.
    Arm("full_gt", "full masks, SRM trained on GT", merge_variants=True),
    # No instances JSON: the visible panoptic segments are the instance masks (Table 3 row 2,
    # "w/ pano-instance GT"), and the SRM trains on predicted masks (the 'auto' default).
    Arm("pano", "panoptic-only data (visible masks), SRM trained on predicted masks", _NO_JSON),
    Arm(
        "full_pred",
        "full masks, SRM trained on predicted masks",
        (("model.srm.train_masks", "predicted"),),
    ),
    Arm(
        "pano_gt",
        "panoptic-only data, SRM trained on GT (its conflicts are seams only)",
        (*_NO_JSON, ("model.srm.train_masks", "gt")),
    ),
    Arm("full_gt@sparse", "full masks, SRM on GT", setting="sparse"),
    Arm("pano@sparse", "visible masks", _NO_JSON, setting="sparse"),
    Arm("full_gt@shuffled", "full masks, SRM on GT", setting="shuffled"),
    Arm("pano@shuffled", "visible masks", _NO_JSON, setting="shuffled"),
    Arm("lambda_0.5", "lambda 0.5", (("loss.seg_weight", 0.5),)),
    Arm("lambda_1.0", "lambda 1.0", (("loss.seg_weight", 1.0),)),
    Arm("stuff_only", "stuff classes only", (("model.stuff_head.classes", "stuff"),)),
    Arm("share_none", "no sharing", (("model.sharing", "none"),)),
    Arm("share_backbone", "res1-res5 (backbone)", (("model.sharing", "backbone"),)),
    Arm("kernel_1x1", "1 x 1", (("model.srm.kernel", "1x1"),)),
    Arm("kernel_3x3", "3 x 3", (("model.srm.kernel", "3x3"),)),
)


def arm_by_name(name: str) -> Arm:
    """The arm called `name` (ValueError naming the known ones otherwise)."""
    for arm in ARMS:
        if arm.name == name:
            return arm
    raise ValueError(f"unknown study arm {name!r}; known: {[a.name for a in ARMS]}")


@dataclasses.dataclass(frozen=True)
class Preset:
    """The study's sizes.

    Attributes:
      name: 'full', 'short' or 'tiny'.
      config: the config file the runs start from (configs/<config>.py).
      overrides: dotted config paths -> values on top of it.
      seeds: the seeds of every arm.
    """

    name: str
    config: str
    overrides: tuple[tuple[str, Any], ...]
    seeds: tuple[int, ...]


PRESETS: dict[str, Preset] = {
    "full": Preset("full", "synthetic", (), (0, 1, 2)),
    "short": Preset(
        "short",
        "synthetic",
        (
            ("data.synthetic_num_images", 500),
            ("model.backbone", "tiny"),
            ("train.num_steps", 200),
            ("train.warmup_steps", 50),
            ("train.lr_decay_steps", (150, 185)),
        ),
        (0, 1, 2),
    ),
    "tiny": Preset(
        "tiny",
        "tiny",
        (("train.num_steps", 2), ("train.batch_size", 2), ("eval.batch_size", 2)),
        (0, 1),
    ),
}


def runs(
    preset: Preset, arms: tuple[Arm, ...] = ARMS, seeds: tuple[int, ...] | None = None
) -> list[tuple[Arm, int]]:
    """(arm, seed) in the order they run: arm by arm, seed by seed (`ARMS` lists the core arms
    and the benchmark settings first, the ablation tables last)."""
    return [(arm, seed) for arm in arms for seed in (seeds or preset.seeds)]
