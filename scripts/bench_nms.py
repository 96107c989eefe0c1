"""Timing helper: oanet_jax.ops.nms versus torchvision.ops.nms (C++) on this machine's CPU.

Boxes look like RPN proposals in an ``image_size`` square image (uniform centres, log-uniform
sides from 16 to 512 px, clipped), scores uniform random. Reports medians over ``repeats`` runs
after one warm-up run each (jit compilation excluded). CPU timings on a shared machine are noisy.

Usage: python scripts/bench_nms.py [--num-boxes 10000] [--tile-sizes 128,256,512]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
import torch
import torchvision

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from oanet_jax.ops.nms import nms  # noqa: E402


def make_proposals(
    num_boxes: int, image_size: float = 1024.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Random RPN-like boxes.

    Returns:
      boxes: [num_boxes, 4] float32 (x1, y1, x2, y2); scores: [num_boxes] float32 in [0, 1).
    """
    rng = np.random.default_rng(seed)
    cx, cy = rng.uniform(0.0, image_size, (2, num_boxes))
    w, h = np.exp(rng.uniform(np.log(16.0), np.log(512.0), (2, num_boxes)))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    boxes = boxes.clip(0.0, image_size).astype(np.float32)
    scores = rng.uniform(size=num_boxes).astype(np.float32)
    return boxes, scores


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (includes jit compilation for the JAX function)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_nms(
    num_boxes: int = 10000,
    repeats: int = 7,
    iou_threshold: float = 0.7,
    max_output: int = 1000,
    tile_size: int = 256,
    image_size: float = 1024.0,
    seed: int = 0,
) -> dict:
    """Median wall times (ms) of ours and torchvision.ops.nms on the same random proposals.

    Args:
      num_boxes: N, number of input boxes.
      repeats: timed runs per function (after one untimed warm-up run).
      iou_threshold: NMS IoU threshold.
      max_output: output length of the "topk" JAX run; a second JAX run uses max_output = N.
      tile_size: JAX NMS tile size.
      image_size: side of the square image the boxes live in.
      seed: numpy seed of the box generator.

    Returns:
      dict with num_boxes, iou_threshold, max_output, tile_size, num_kept (torchvision),
      torchvision_ms, jax_ms (max_output), jax_all_ms (max_output = N), speedup and speedup_all
      (torchvision_ms / jax time, > 1 means ours is faster) and matches (both JAX outputs equal
      torchvision's kept list, truncated).
    """
    boxes, scores = make_proposals(num_boxes, image_size, seed)
    tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
    jb, js = jax.device_put(boxes), jax.device_put(scores)

    ref = torchvision.ops.nms(tb, ts, iou_threshold).numpy()
    torch_ms = _median_ms(lambda: torchvision.ops.nms(tb, ts, iou_threshold), repeats)

    def run(k: int) -> tuple[jax.Array, jax.Array]:
        return jax.block_until_ready(nms(jb, js, iou_threshold, k, tile_size=tile_size))

    jax_ms = _median_ms(lambda: run(max_output), repeats)
    jax_all_ms = _median_ms(lambda: run(num_boxes), repeats)

    matches = True
    for k in (max_output, num_boxes):
        idx, valid = (np.asarray(a) for a in run(k))
        matches &= bool(np.array_equal(idx[valid], ref[:k]))
    return {
        "num_boxes": num_boxes,
        "iou_threshold": iou_threshold,
        "max_output": max_output,
        "tile_size": tile_size,
        "num_kept": len(ref),
        "torchvision_ms": torch_ms,
        "jax_ms": jax_ms,
        "jax_all_ms": jax_all_ms,
        "speedup": torch_ms / jax_ms,
        "speedup_all": torch_ms / jax_all_ms,
        "matches": matches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-boxes", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-output", type=int, default=1000)
    parser.add_argument("--thresholds", default="0.7", help="comma-separated IoU thresholds")
    parser.add_argument("--tile-sizes", default="256", help="comma-separated tile sizes")
    args = parser.parse_args()
    for thr in (float(x) for x in args.thresholds.split(",")):
        for tile in (int(x) for x in args.tile_sizes.split(",")):
            result = bench_nms(args.num_boxes, args.repeats, thr, args.max_output, tile_size=tile)
            print(
                json.dumps(
                    {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
                )
            )


if __name__ == "__main__":
    main()
