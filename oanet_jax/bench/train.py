"""Train section: one OANet training step (ResNet-50, 1024x1024) vs torchvision's Mask R-CNN.

Ours: `configs/base.py` (paper defaults: FrozenBN ResNet-50 + FPN, RPN, box/mask heads, stuff
head over 133 classes, SRM), padded image 1024x1024, the full jitted train step of
`oanet_jax.train.step` (forward, on-device targets, Eq. 1 losses, backward, SGD update).
Peer: torchvision `maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)` in train mode on
the same images and ground truth (its own forward with losses, backward and an SGD step; no
stuff branch, no SRM, so it does less work). Both get the same synthetic batch: 1024x1024 images
with a few boxes and masks. Medians over `repeats` steps after one warm-up step (whose time,
compilation included for ours, is reported as the first step), through `oanet_jax.bench.timing`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import torch
import torchvision

from configs import base
from oanet_jax.bench.timing import time_fn
from oanet_jax.data import spec as data_spec
from oanet_jax.modeling.build import build_model
from oanet_jax.train import sharding, state, step


def make_batch(config, num_instances: int):
    """A synthetic batch of the batch spec, plus the same ground truth for torchvision.

    The layout is `oanet_jax.data.spec.zeros_batch` (train keys), batch size
    `config.train.batch_size`, square `config.data.image_size`; random images, `num_instances`
    valid boxes per image with a rectangle mask, random semantic labels.
    """
    batch = int(config.train.batch_size)
    size = int(config.data.image_size[0])
    mask_size = int(config.data.mask_size)
    ours = data_spec.zeros_batch(config.data, batch, train=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, ours["image"].shape, dtype=np.uint8)  # spec: uint8 RGB
    boxes = ours["boxes"]
    xy = rng.uniform(0, size * 0.6, (batch, num_instances, 2))
    wh = rng.uniform(32, size * 0.4, (batch, num_instances, 2))
    boxes[:, :num_instances] = np.concatenate([xy, xy + wh], -1)
    classes = ours["classes"]
    classes[:, :num_instances] = rng.integers(0, 80, (batch, num_instances))
    ours["valid"][:, :num_instances] = True
    ours["masks"][
        :, :num_instances, mask_size // 4 : -mask_size // 4, mask_size // 8 : -mask_size // 8
    ] = 1
    ours["semantic"][:] = rng.integers(0, 133, ours["semantic"].shape)
    ours["image"] = images
    targets = []
    for b in range(batch):
        full = np.zeros((num_instances, size, size), np.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes[b, :num_instances].astype(int)):
            full[
                i,
                y1 + (y2 - y1) // 4 : y2 - (y2 - y1) // 4,
                x1 + (x2 - x1) // 8 : x2 - (x2 - x1) // 8,
            ] = 1
        targets.append(
            {
                "boxes": torch.from_numpy(boxes[b, :num_instances]),
                "labels": torch.from_numpy(classes[b, :num_instances].astype(np.int64) + 1),
                "masks": torch.from_numpy(full),
            }
        )
    torch_images = [
        torch.from_numpy(images[b]).permute(2, 0, 1).float() / 255.0 for b in range(batch)
    ]
    return ours, torch_images, targets


def run(batch: int = 2, size: int = 1024, repeats: int = 3, num_instances: int = 8) -> dict:
    """Median train-step seconds of ours and torchvision's Mask R-CNN on the same batch.

    Args:
      batch: images per step.
      size: square padded image side.
      repeats: timed steps of each side (after one warm-up step).
      num_instances: ground-truth instances per image.

    Returns:
      JSON-able dict: 'ours_init_compile_s' (train state creation), first-step and median step
      seconds and images/s of each side, 'ratio' (torchvision / ours), 'torch_threads'.
    """
    config = base.get_config()
    config.data.image_size = (size, size)
    config.train.batch_size = batch
    ours_batch, torch_images, targets = make_batch(config, num_instances)

    model = build_model(config)
    mesh = sharding.make_mesh(config.sharding, devices=jax.devices()[:1])
    holder: dict[str, Any] = {}

    def create() -> Any:
        holder["state"], holder["sharding"] = state.create_train_state(
            config, model, mesh, ours_batch
        )
        return holder["state"]

    init_s = time_fn(create, warmup=0, repeats=1)["median_s"]
    fn = step.jit_train_step(model, config, mesh, holder["sharding"])
    device_batch = sharding.shard_batch(ours_batch, mesh)

    def ours_step():
        holder["state"], metrics = fn(holder["state"], device_batch)
        return metrics

    ours = time_fn(ours_step, warmup=1, repeats=repeats)

    torch.manual_seed(0)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=size, max_size=size
    )
    tv.train()
    opt = torch.optim.SGD(tv.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)

    def tv_step():
        loss = sum(tv(torch_images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    peer = time_fn(tv_step, warmup=1, repeats=repeats)
    ours_s, tv_s = ours["median_s"], peer["median_s"]
    return {
        "batch": batch,
        "image_size": size,
        "ours_init_compile_s": init_s,
        "ours_first_step_s": ours["first_s"],
        "ours_step_s": ours_s,
        "ours_images_per_s": batch / ours_s,
        "torchvision_first_step_s": peer["first_s"],
        "torchvision_step_s": tv_s,
        "torchvision_images_per_s": batch / tv_s,
        "ratio": tv_s / ours_s,
        "torch_threads": torch.get_num_threads(),
    }
