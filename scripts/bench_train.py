"""Timing helper: one OANet training step (ResNet-50, 1024x1024) vs torchvision's Mask R-CNN.

Ours: `configs/base.py` (paper defaults: FrozenBN ResNet-50 + FPN, RPN, box/mask heads, stuff
head over 133 classes, SRM), padded image 1024x1024, the full jitted train step of
`oanet_jax.train.step` (forward, on-device targets, Eq. 1 losses, backward, SGD update).
Peer: torchvision `maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)` in train mode on
the same images and ground truth (its own forward with losses, backward and an SGD step; no
stuff branch, no SRM, so it does less work). Both get the same synthetic batch: 1024x1024 images
with a few boxes and masks. Medians over `repeats` steps after warm-up steps (compile excluded).

Usage: python scripts/bench_train.py [--batch 2] [--size 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch  # before tensorflow (the other order segfaults here)
import torchvision

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from oanet_jax.data import spec as data_spec  # noqa: E402
from oanet_jax.modeling.build import build_model  # noqa: E402
from oanet_jax.train import sharding, state, step  # noqa: E402


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
    images = rng.uniform(0, 255, ours["image"].shape).astype(np.float32)
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
    torch_images = [torch.from_numpy(images[b]).permute(2, 0, 1) / 255.0 for b in range(batch)]
    return ours, torch_images, targets


def _median(fn, warmup: int, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def bench_train(batch: int = 2, size: int = 1024, repeats: int = 3, num_instances: int = 8) -> dict:
    """Median train-step seconds of ours and torchvision's Mask R-CNN on the same batch."""
    config = base.get_config()
    config.data.image_size = (size, size)
    config.train.batch_size = batch
    ours_batch, torch_images, targets = make_batch(config, num_instances)

    model = build_model(config)
    mesh = sharding.make_mesh(config.sharding, devices=jax.devices()[:1])
    t0 = time.perf_counter()
    train_state, state_sharding = state.create_train_state(config, model, mesh, ours_batch)
    init_s = time.perf_counter() - t0
    fn = step.jit_train_step(model, config, mesh, state_sharding)
    device_batch = sharding.shard_batch(ours_batch, mesh)
    holder = {"state": train_state}

    def ours_step():
        holder["state"], metrics = fn(holder["state"], device_batch)
        jax.block_until_ready(metrics)

    ours_first, ours_s = _median(ours_step, 1, repeats)

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

    tv_first, tv_s = _median(tv_step, 1, repeats)
    return {
        "batch": batch,
        "image_size": size,
        "ours_init_compile_s": init_s,
        "ours_first_step_s": ours_first,
        "ours_step_s": ours_s,
        "ours_images_per_s": batch / ours_s,
        "torchvision_first_step_s": tv_first,
        "torchvision_step_s": tv_s,
        "torchvision_images_per_s": batch / tv_s,
        "ratio": tv_s / ours_s,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(bench_train(args.batch, args.size, args.repeats), indent=1))


if __name__ == "__main__":
    main()
