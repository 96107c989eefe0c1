"""Ops section: RoIAlign and NMS against torchvision's C++ kernels on this machine's CPU.

RoIAlign (Mask R-CNN FPN setting): one 1024x1024 image, P2..P5 (strides 4..32) with 256 channels,
512 proposal-like boxes (log-uniform sizes 16..700 px, aspect 1:2..2:1, clipped to the image),
aligned=True, detectron2's level assignment. torchvision runs ``roi_align`` once per level on that
level's boxes and scatters the results back, as ``MultiScaleRoIAlign`` does (which itself only
supports aligned=False).

NMS: boxes like RPN proposals in a 1024 square image (uniform centres, log-uniform sides from 16
to 512 px, clipped), scores uniform random.

Medians over ``repeats`` calls, warm-up (compilation) excluded, through `oanet_jax.bench.timing`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision

from oanet_jax.bench.timing import time_fn, time_interleaved
from oanet_jax.ops.nms import nms as nms_op
from oanet_jax.ops.roi_align import _default_cap, assign_levels, multilevel_roi_align


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


def _interleaved_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median ms of each function (`timing.time_interleaved`, one warm-up call each)."""
    return {k: 1e3 * t["median_s"] for k, t in time_interleaved(fns, repeats=repeats).items()}


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


def roi_align(
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
                case: dict[str, Any] = _interleaved_ms(fns, repeats)
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
    concat_ms = _interleaved_ms({"concat": lambda: concat(feats_j).block_until_ready()}, repeats)[
        "concat"
    ]
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


def nms(
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
    torch_ms = (
        1e3
        * time_fn(lambda: torchvision.ops.nms(tb, ts, iou_threshold), repeats=repeats)["median_s"]
    )

    def run(k: int) -> tuple[jax.Array, jax.Array]:
        return jax.block_until_ready(nms_op(jb, js, iou_threshold, k, tile_size=tile_size))

    jax_ms = 1e3 * time_fn(lambda: run(max_output), repeats=repeats)["median_s"]
    jax_all_ms = 1e3 * time_fn(lambda: run(num_boxes), repeats=repeats)["median_s"]

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


def run() -> dict:
    """The section: RoIAlign cases and NMS with 1,000 and with all outputs."""
    return {"roi_align": roi_align(), "nms": [nms(max_output=1000), nms(max_output=10000)]}
