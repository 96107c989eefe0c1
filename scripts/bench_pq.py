"""Timing helper: oanet_jax.panoptic.pq.pq_compute versus panopticapi's pq_compute.

Both evaluate the same prediction files: synthetic ground truth (`oanet_jax.data.synthetic`,
`num_images` train images of `size`) against randomly perturbed predictions (segments split,
dropped to void, shifted, relabelled; extra false positives), written as COCO panoptic PNG + JSON.
The results must be identical (1e-9). panopticapi's `pq_compute` forks a pool of `cpu_count()`
workers; it runs in a freshly spawned child process (never fork a process that may hold JAX) and is
timed inside the child. Also timed: both single-threaded, and the PNG decoding alone (a floor for
any evaluator reading PNGs). Wall times on a shared machine are noisy.

Usage: python scripts/bench_pq.py [--num-images 500] [--height 480 --width 640] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from oanet_jax.data import synthetic  # noqa: E402
from oanet_jax.panoptic import io as pio  # noqa: E402
from oanet_jax.panoptic import pq  # noqa: E402


def _perturb(
    gt_map: np.ndarray, segments: list[dict], cat_ids: list[int], rng: np.random.Generator
) -> tuple[np.ndarray, list[dict]]:
    """A plausible imperfect prediction: int64 [H, W] id map and its segments_info."""
    h, w = gt_map.shape
    pred = np.zeros((h, w), np.int64)
    cat_of: dict[int, int] = {}
    next_id = 1
    for seg in segments:
        m = gt_map == seg["id"]
        r = rng.random()
        if r < 0.08:
            continue  # missed
        next_id += 1
        cat_of[next_id] = seg["category_id"] if rng.random() > 0.1 else int(rng.choice(cat_ids))
        if r < 0.25:  # shifted by a few pixels
            dy, dx = (int(v) for v in rng.integers(-6, 7, 2))
            m = np.roll(m, (dy, dx), axis=(0, 1))
        pred[m] = next_id
        if r > 0.85:  # split in two along a row
            ys = np.flatnonzero(m.any(axis=1))
            cut = int(ys[len(ys) // 2])
            next_id += 1
            cat_of[next_id] = cat_of[next_id - 1]
            pred[cut:][m[cut:]] = next_id
    for _ in range(int(rng.integers(0, 4))):  # false positives
        next_id += 1
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        pred[y : y + int(rng.integers(4, h // 4)), x : x + int(rng.integers(4, w // 4))] = next_id
        cat_of[next_id] = int(rng.choice(cat_ids))
    present = np.unique(pred)
    return pred, [{"id": int(i), "category_id": cat_of[int(i)]} for i in present if i != 0]


def _prepare(data_dir: str, num_images: int, size: tuple[int, int], seed: int) -> dict[str, str]:
    """Generates (or reuses) the ground truth and writes the perturbed predictions."""
    gt_json_file = os.path.join(data_dir, "train", "panoptic.json")
    reuse = False
    if os.path.exists(gt_json_file):
        with open(gt_json_file) as f:
            gt = json.load(f)
        first = gt["images"][0] if gt["images"] else {}
        reuse = len(gt["annotations"]) == num_images and (
            first.get("height"),
            first.get("width"),
        ) == tuple(size)
    if not reuse:
        synthetic.generate(data_dir, num_images, 0, seed, size=size)
        with open(gt_json_file) as f:
            gt = json.load(f)
    gt_folder = os.path.join(data_dir, "train", "panoptic")
    pred_folder = os.path.join(data_dir, "pred")
    cat_ids = [c["id"] for c in gt["categories"]]
    rng = np.random.default_rng(seed + 1)
    annotations = []
    for ann in gt["annotations"]:
        gt_map = pio.read_panoptic_png(os.path.join(gt_folder, ann["file_name"]))
        pred_map, segs = _perturb(gt_map, ann["segments_info"], cat_ids, rng)
        segs = pio.write_prediction(pred_folder, ann["file_name"], pred_map, segs)
        annotations.append(pio.segments_to_coco_annotation(ann["image_id"], ann["file_name"], segs))
    pred_json_file = os.path.join(data_dir, "pred.json")
    pio.write_predictions_json(pred_json_file, annotations, gt["categories"])
    return {
        "gt_json": gt_json_file,
        "pred_json": pred_json_file,
        "gt_folder": gt_folder,
        "pred_folder": pred_folder,
    }


def _panopticapi_child(queue: Any, files: dict[str, str], single_core: bool) -> None:
    """Runs in a spawned process: times panopticapi (its pool forks this clean process)."""
    from panopticapi import evaluation

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # silence panopticapi and its forked workers
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            if single_core:
                with open(files["gt_json"]) as f:
                    gt = json.load(f)
                with open(files["pred_json"]) as f:
                    preds = {a["image_id"]: a for a in json.load(f)["annotations"]}
                cats = {c["id"]: c for c in gt["categories"]}
                pairs = [(a, preds[a["image_id"]]) for a in gt["annotations"]]
                stat = evaluation.pq_compute_single_core(
                    0, pairs, files["gt_folder"], files["pred_folder"], cats
                )
                results = {}
                for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
                    results[name], per_class = stat.pq_average(cats, isthing=isthing)
                    if name == "All":
                        results["per_class"] = per_class
            else:
                results = evaluation.pq_compute(
                    files["gt_json"], files["pred_json"], files["gt_folder"], files["pred_folder"]
                )
            seconds = time.perf_counter() - t0
        queue.put((seconds, results, None))
    except Exception as e:  # report to the parent instead of hanging it
        queue.put((0.0, None, repr(e)))


def _time_panopticapi(files: dict[str, str], single_core: bool) -> tuple[float, dict]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_panopticapi_child, args=(queue, files, single_core))
    proc.start()
    seconds, results, error = queue.get()
    proc.join()
    if error is not None:
        raise RuntimeError(f"panopticapi failed: {error}")
    return seconds, results


def _max_difference(a: dict, b: dict) -> float:
    diffs = [0.0]
    for name in ("All", "Things", "Stuff"):
        if a[name]["n"] != b[name]["n"]:
            return float("inf")
        diffs += [abs(a[name][k] - b[name][k]) for k in ("pq", "sq", "rq")]
    if a["per_class"].keys() != b["per_class"].keys():
        return float("inf")
    for cat, v in b["per_class"].items():
        diffs += [abs(a["per_class"][cat][k] - v[k]) for k in ("pq", "sq", "rq")]
    return float(max(diffs))


def _decode_seconds(files: dict[str, str]) -> float:
    """Serial time to decode every ground-truth and prediction PNG (PIL, as both evaluators)."""
    from PIL import Image

    names = sorted(os.listdir(files["gt_folder"]))
    t0 = time.perf_counter()
    for folder in (files["gt_folder"], files["pred_folder"]):
        for name in names:
            with Image.open(os.path.join(folder, name)) as im:
                im.load()
    return time.perf_counter() - t0


def bench_pq(
    num_images: int = 500,
    size: tuple[int, int] = (480, 640),
    seed: int = 0,
    data_dir: str | None = None,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Times ours and panopticapi's pq_compute on the same files; checks identical numbers.

    Args:
      num_images: synthetic ground-truth images (and predictions).
      size: (H, W) of the images.
      seed: dataset and perturbation seed.
      data_dir: where to write (and reuse) the data; default: a temporary folder, deleted after.
      num_workers: our threads (default: the CPUs available, as panopticapi's pool).

    Returns:
      Seconds of each variant, speed-up ratios, max |ours - panopticapi| over all PQ/SQ/RQ values
      (All, Things, Stuff, per class), `identical` (max difference <= 1e-9) and the PQ values.
    """
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_pq_"))
        t0 = time.perf_counter()
        files = _prepare(data_dir, num_images, size, seed)
        prepare_s = time.perf_counter() - t0
        workers = num_workers if num_workers is not None else len(os.sched_getaffinity(0))

        t0 = time.perf_counter()
        ours = pq.pq_compute(
            files["gt_json"], files["pred_json"], files["gt_folder"], files["pred_folder"], workers
        )
        ours_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours_serial = pq.pq_compute(
            files["gt_json"], files["pred_json"], files["gt_folder"], files["pred_folder"], 1
        )
        ours_serial_s = time.perf_counter() - t0
        ref_s, ref = _time_panopticapi(files, single_core=False)
        ref_serial_s, ref_serial = _time_panopticapi(files, single_core=True)
        decode_s = _decode_seconds(files)

    diff = max(_max_difference(ours, ref), _max_difference(ours_serial, ref_serial))
    return {
        "num_images": num_images,
        "size": list(size),
        "cpus": len(os.sched_getaffinity(0)),
        "our_threads": workers,
        "prepare_s": prepare_s,
        "ours_s": ours_s,
        "panopticapi_s": ref_s,
        "speedup": ref_s / ours_s,
        "ours_1_thread_s": ours_serial_s,
        "panopticapi_single_core_s": ref_serial_s,
        "speedup_single_core": ref_serial_s / ours_serial_s,
        "png_decode_only_s": decode_s,
        "max_abs_difference": diff,
        "identical": diff <= 1e-9,
        "pq": {k: dict(ours[k]) for k in ("All", "Things", "Stuff")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="reuse/keep the data here")
    parser.add_argument("--num-workers", type=int, default=None)
    args = parser.parse_args()
    result = bench_pq(
        args.num_images, (args.height, args.width), args.seed, args.data_dir, args.num_workers
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
