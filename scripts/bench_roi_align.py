"""Timing of multi-level RoIAlign: ours (jitted JAX) against torchvision's C++ kernel on the CPU.

Setting (Mask R-CNN FPN): one 1024x1024 image, P2..P5 (strides 4..32) with 256 channels, 512
proposal-like boxes (log-uniform sizes 16..700 px, aspect 1:2..2:1, clipped to the image),
aligned=True, detectron2's level assignment. torchvision runs ``roi_align`` once per level on that
level's boxes and scatters the results back, as ``MultiScaleRoIAlign`` does (which itself only
supports aligned=False). Medians over ``repeats`` calls; compilation and a warm-up call excluded.

Usage: ``python scripts/bench_roi_align.py [--repeats 5] [--boxes 512]`` prints a JSON dict.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

try:  # torch must be imported before tensorflow (and so before anything that may import it).
    import torch
    import torchvision
except ImportError:  # pragma: no cover - torchvision side is skipped
    torch = None
    torchvision = None

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from oanet_jax.ops.roi_align import (  # noqa: E402
    _default_cap,
    assign_levels,
    multilevel_roi_align,
)


def make_inputs(
    num_boxes: int, image_size: int, channels: int, strides: Sequence[int], seed: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Random NHWC pyramid and proposal-like boxes.

    Returns:
      features: per level [1, image_size / s, image_size / s, channels] float32.
      boxes: [1, num_boxes, 4] float32 (x1, y1, x2, y2).
    """
    rng = np.random.default_rng(seed)
    centre = rng.uniform(0, image_size, (num_boxes, 2))
    size = np.exp(rng.uniform(np.log(16), np.log(700), num_boxes))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), num_boxes))
    wh = np.stack([size * np.sqrt(aspect), size / np.sqrt(aspect)], axis=1)
    boxes = np.concatenate([centre - wh / 2, centre + wh / 2], axis=1).clip(0, image_size)
    features = [
        rng.standard_normal((1, image_size // s, image_size // s, channels), dtype=np.float32)
        for s in strides
    ]
    return features, boxes[None].astype(np.float32)


def _interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time (ms) of each function, calls interleaved so load changes hit all alike.

    Each function is called once first (warm-up, compilation for jitted ones), untimed.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t) * 1e3) for name, t in times.items()}


def _torchvision_multilevel(
    features_nchw: list[Any],
    boxes: Any,
    output_size: int,
    strides: Sequence[int],
    sampling_ratio: int,
    aligned: bool,
) -> Any:
    """Per-level torchvision roi_align with detectron2's level assignment (one image)."""
    min_level = int(np.log2(strides[0]))
    size = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    level = torch.floor(4 + torch.log2(size / 224 + 1e-8))
    level = torch.clamp(level, min_level, min_level + len(strides) - 1).long() - min_level
    rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], dim=1)
    result = torch.zeros(
        (boxes.shape[0], features_nchw[0].shape[1], output_size, output_size),
        dtype=features_nchw[0].dtype,
    )
    for index, (feature, stride) in enumerate(zip(features_nchw, strides, strict=True)):
        keep = torch.where(level == index)[0]
        result[keep] = torchvision.ops.roi_align(
            feature, rois[keep], output_size, 1.0 / stride, sampling_ratio, aligned
        )
    return result


def bench_roi_align(
    num_boxes: int = 512,
    image_size: int = 1024,
    channels: int = 256,
    output_sizes: Sequence[int] = (7, 14),
    sampling_ratios: Sequence[int] = (2, 0),
    aligned: bool = True,
    max_sampling_ratio: int | None = None,
    strides: Sequence[int] = (4, 8, 16, 32),
    repeats: int = 5,
    seed: int = 0,
    with_torchvision: bool = True,
) -> dict[str, Any]:
    """Median forward times of ``multilevel_roi_align`` and of torchvision on this CPU.

    Returns:
      ``{"setting": {...}, "cases": {"7x7_sr2": {"ours_ms", "torchvision_ms", "speedup",
      "max_abs_diff"}, ...}}``; ``speedup`` = torchvision_ms / ours_ms (> 1: ours faster);
      for sampling_ratio 0 also ``cap`` (the adaptive-grid cap used) and
      ``frac_boxes_over_cap`` (boxes whose adaptive grid exceeds it, where ours samples more
      sparsely than torchvision, so max_abs_diff is then not small).
      ``setting["pyramid_concat_ms"]``: the part of ``ours_ms`` spent concatenating the levels.
    """
    features, boxes = make_inputs(num_boxes, image_size, channels, strides, seed)
    feats_j = [jnp.asarray(f) for f in features]
    boxes_j = jnp.asarray(boxes)
    use_tv = with_torchvision and torchvision is not None
    if use_tv:
        feats_t = [
            torch.from_numpy(np.ascontiguousarray(f.transpose(0, 3, 1, 2))) for f in features
        ]
        boxes_t = torch.from_numpy(boxes[0])
    min_level = int(np.log2(strides[0]))
    level = np.asarray(
        assign_levels(boxes_j, min_level=min_level, max_level=min_level + len(strides) - 1)
    )[0]
    cases: dict[str, Any] = {}
    for out in output_sizes:
        for sr in sampling_ratios:
            fn = jax.jit(
                lambda f, b, out=out, sr=sr: multilevel_roi_align(
                    f,
                    b,
                    out,
                    strides=strides,
                    sampling_ratio=sr,
                    aligned=aligned,
                    max_sampling_ratio=max_sampling_ratio,
                )
            )
            fns = {"ours_ms": lambda fn=fn: fn(feats_j, boxes_j).block_until_ready()}
            if use_tv:
                fns["torchvision_ms"] = lambda out=out, sr=sr: _torchvision_multilevel(
                    feats_t, boxes_t, out, strides, sr, aligned
                )
            with torch.no_grad() if use_tv else contextlib.nullcontext():
                case: dict[str, Any] = _interleaved_medians(fns, repeats)
                if use_tv:
                    ref = fns["torchvision_ms"]().permute(0, 2, 3, 1).numpy()
            ours = np.asarray(fn(feats_j, boxes_j))[0]
            if use_tv:
                case["speedup"] = case["torchvision_ms"] / case["ours_ms"]
                case["max_abs_diff"] = float(np.abs(ours - ref).max())
            if sr == 0:
                cap = max_sampling_ratio or _default_cap((out, out), 224.0 * 2 / 2**4)
                scale = 1.0 / np.asarray(strides, np.float64)[level]
                extent = (boxes[0, :, 2:] - boxes[0, :, :2]) * scale[:, None]
                grid = np.ceil(extent / out)
                case["cap"] = cap
                case["frac_boxes_over_cap"] = float(np.mean(grid.max(1) > cap))
            cases[f"{out}x{out}_sr{sr}"] = case
    # Share of ours spent copying the pyramid into one flat buffer (part of ours_ms).
    concat = jax.jit(lambda fs: jnp.concatenate([f.reshape(1, -1, channels) for f in fs], axis=1))
    concat_ms = _interleaved_medians(
        {"concat": lambda: concat(feats_j).block_until_ready()}, repeats
    )["concat"]
    return {
        "setting": {
            "num_boxes": num_boxes,
            "image_size": image_size,
            "channels": channels,
            "strides": list(strides),
            "aligned": aligned,
            "max_sampling_ratio": max_sampling_ratio,
            "boxes_per_level": np.bincount(level, minlength=len(strides)).tolist(),
            "repeats": repeats,
            "torch_threads": torch.get_num_threads() if use_tv else None,
            "jax_backend": jax.default_backend(),
            "pyramid_concat_ms": concat_ms,
        },
        "cases": cases,
    }


def main() -> None:
    """Command-line entry point: prints the benchmark dict as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-sampling-ratio", type=int, default=None)
    parser.add_argument("--no-torchvision", action="store_true")
    args = parser.parse_args()
    result = bench_roi_align(
        num_boxes=args.boxes,
        repeats=args.repeats,
        max_sampling_ratio=args.max_sampling_ratio,
        with_torchvision=not args.no_torchvision,
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
