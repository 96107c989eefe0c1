"""PQ benchmark: panopticapi's ``pq_compute`` versus our three evaluation paths.

Data: `num_images` synthetic ground-truth images (`oanet_jax.data.synthetic`, train split, (H, W)
= `size`) and randomly perturbed predictions (segments missed, shifted, split, relabelled; extra
false positives), written as COCO panoptic PNG + JSON. Timed, each on the same images:

* ``panopticapi``: its ``pq_compute`` on the files (reads every PNG; its pool forks ``cpu_count()``
  workers). It runs in a freshly spawned child (never fork a process that may hold JAX) and is timed
  there, once.
* ``file``: `oanet_jax.panoptic.pq.pq_compute` on the same files (reads every PNG; threads).
* ``in_memory``: `pq.evaluate_id_maps` on id maps already in memory (ground truth decoded once
  beforehand into the compact index maps that evaluation caches, `eval.ground_truth.decode_image`;
  predictions as the jitted inference ships them, in `panoptic.io.smallest_id_dtype` (uint8),
  after the resize to the original size), serial as evaluation runs it. Includes the joint
  histograms, the matching, the accumulation and the summary; no PNG decoding.
* ``device``: `panoptic.pq_device.pq_stats` (jitted; here on whatever backend JAX uses, CPU in CI)
  over batches already on the device (ground truth converted once with
  `pq_device.ground_truth_to_device`; predictions are id maps with the merge's numbering), plus
  the host `DevicePQAccumulator` and the summary. Compilation is excluded (warm-up call).

Every result is compared with panopticapi's: ``max_abs_difference`` over All / Things / Stuff and
per-class PQ, SQ, RQ (``inf`` when a count ``n`` or the class set differs). Times come from
`oanet_jax.bench.timing` (medians; wall-clock on a shared machine, noisy).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import tempfile
from typing import Any

import jax
import numpy as np

from oanet_jax.bench.timing import time_fn
from oanet_jax.data import synthetic
from oanet_jax.data.coco_panoptic import CategoryTable
from oanet_jax.eval import ground_truth
from oanet_jax.panoptic import io as pio
from oanet_jax.panoptic import pq, pq_device

__all__ = ["run"]


def _perturb(
    gt_map: np.ndarray, segments: list[dict], cat_ids: list[int], rng: np.random.Generator
) -> tuple[np.ndarray, list[dict]]:
    """A plausible imperfect prediction: int32 [H, W] id map (small ids 2, 3, ...), segments."""
    h, w = gt_map.shape
    pred = np.zeros((h, w), np.int32)
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


def _prepare(data_dir: str, num_images: int, size: tuple[int, int], seed: int) -> dict[str, Any]:
    """Generates (or reuses) the ground truth, writes the predictions; returns paths and maps."""
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
    table = CategoryTable.from_categories(gt["categories"])
    annotations, gt_items, gt_cached, pred_items = [], [], [], []
    for ann in gt["annotations"]:
        gt_map = pio.read_panoptic_png(os.path.join(gt_folder, ann["file_name"]))
        pred_map, segs = _perturb(gt_map, ann["segments_info"], cat_ids, rng)
        segs = pio.write_prediction(pred_folder, ann["file_name"], pred_map, segs)
        annotations.append(pio.segments_to_coco_annotation(ann["image_id"], ann["file_name"], segs))
        gt_items.append((gt_map, ann["segments_info"]))
        cached = ground_truth.decode_image(ann, gt_folder, table)  # evaluation's cached form
        gt_cached.append((cached.index_map, cached.segments_info))
        pred_items.append((pred_map, segs))
    pred_json_file = os.path.join(data_dir, "pred.json")
    pio.write_predictions_json(pred_json_file, annotations, gt["categories"])
    return {
        "gt_json": gt_json_file,
        "pred_json": pred_json_file,
        "gt_folder": gt_folder,
        "pred_folder": pred_folder,
        "categories": gt["categories"],
        "gt_items": gt_items,
        "gt_cached": gt_cached,
        "pred_items": pred_items,
        # As the jitted inference ships them: the smallest dtype holding the ids (uint8 here).
        "pred_shipped": [(m.astype(pio.smallest_id_dtype(int(m.max()))), s) for m, s in pred_items],
    }


def _panopticapi_child(queue: Any, files: dict[str, str]) -> None:
    """Runs in a spawned process: times panopticapi (its pool forks this clean process)."""
    from panopticapi import evaluation

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # silence panopticapi and its forked workers
    try:
        results: dict[str, Any] = {}

        def call() -> None:
            results.update(
                evaluation.pq_compute(
                    files["gt_json"], files["pred_json"], files["gt_folder"], files["pred_folder"]
                )
            )

        with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115
            timing = time_fn(call, warmup=0, repeats=1)
        queue.put((dict(timing), results, None))
    except Exception as e:  # report to the parent instead of hanging it
        queue.put((None, None, repr(e)))


def _time_panopticapi(files: dict[str, str]) -> tuple[dict, dict]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_panopticapi_child, args=(queue, files))
    proc.start()
    timing, results, error = queue.get()
    proc.join()
    if error is not None:
        raise RuntimeError(f"panopticapi failed: {error}")
    return timing, results


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


def _device_batches(
    data: dict[str, Any], table: CategoryTable, batch_size: int
) -> tuple[list[dict[str, jax.Array]], int, int]:
    """Ground truth and predictions in the device form, batched and put on the device.

    The predictions' ids are already small (2, 3, ...), so the map is used as the merge's id map
    (P = the largest id) with the category of id j + 1 in row j.
    """
    to_contiguous = {d: c for c, d in enumerate(table.dataset_ids)}
    max_gt = max(len({s["id"] for s in segs}) for _, segs in data["gt_items"])
    max_pred = max(int(m.max()) for m, _ in data["pred_items"])
    batches = []
    items = list(zip(data["gt_items"], data["pred_items"], strict=True))
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        gts = [
            pq_device.ground_truth_to_device(m, segs, to_contiguous, max_gt)
            for (m, segs), _ in chunk
        ]
        pred_cat = np.zeros((len(chunk), max_pred), np.int32)
        pred_valid = np.zeros((len(chunk), max_pred), bool)
        for b, (_, (_, segs)) in enumerate(chunk):
            for s in segs:
                pred_cat[b, s["id"] - 1] = to_contiguous[s["category_id"]]
                pred_valid[b, s["id"] - 1] = True
        batch = {
            "gt_index_map": np.stack([g["index_map"] for g in gts]),
            "gt_category": np.stack([g["category"] for g in gts]),
            "gt_iscrowd": np.stack([g["iscrowd"] for g in gts]),
            "gt_area": np.stack([g["area"] for g in gts]),
            "gt_valid": np.stack([g["valid"] for g in gts]),
            "pred_id_map": np.stack([m for _, (m, _) in chunk]).astype(np.int32),
            "pred_category": pred_cat,
            "pred_valid": pred_valid,
        }
        batches.append(jax.device_put(batch))
    return batches, max_gt, max_pred


def run(
    num_images: int = 500,
    size: tuple[int, int] = (480, 640),
    seed: int = 0,
    data_dir: str | None = None,
    batch_size: int = 25,
) -> dict[str, Any]:
    """Times panopticapi and our file, in-memory and device paths on the same images.

    Args:
      num_images: synthetic ground-truth images (and predictions).
      size: (H, W) of the images.
      seed: dataset and perturbation seed.
      data_dir: where to write (and reuse) the data; default: a temporary folder, deleted after.
      batch_size: images per `pq_stats` call on the device path (the last batch may be smaller:
        a second compilation, done in the warm-up).

    Returns:
      JSON-able dict: sizes, seconds (median) of each path, speed-up ratios vs panopticapi,
      ``max_abs_difference`` of each path vs panopticapi and the PQ values.
    """
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_pq_"))
        data = _prepare(data_dir, num_images, size, seed)
        files = {k: data[k] for k in ("gt_json", "pred_json", "gt_folder", "pred_folder")}
        categories = data["categories"]
        table = CategoryTable.from_categories(categories)

        ref_timing, ref = _time_panopticapi(files)
        out: dict[str, Any] = {}

        def file_path() -> None:
            out["file"] = pq.pq_compute(*files.values())

        def in_memory() -> None:
            out["in_memory"] = pq.evaluate_id_maps(
                data["gt_cached"], data["pred_shipped"], categories
            )

        batches, max_gt, max_pred = _device_batches(data, table, batch_size)

        def device() -> None:
            acc = pq_device.DevicePQAccumulator(table.dataset_ids)
            for batch in batches:
                acc.add(pq_device.pq_stats(**batch, num_classes=table.num_classes))
            out["device"] = acc.summarize(categories)

        timings = {
            "file": time_fn(file_path, warmup=1, repeats=3),
            "in_memory": time_fn(in_memory, warmup=1, repeats=5),
            "device": time_fn(device, warmup=1, repeats=3),
        }

    result: dict[str, Any] = {
        "num_images": num_images,
        "size": list(size),
        "cpus": len(os.sched_getaffinity(0)),
        "jax_backend": jax.default_backend(),
        "device_batch": batch_size,
        "device_table_sizes": {"G": max_gt, "P": max_pred},
        "panopticapi_s": ref_timing["median_s"],
    }
    for name, timing in timings.items():
        result[f"{name}_s"] = timing["median_s"]
        result[f"{name}_speedup_vs_panopticapi"] = ref_timing["median_s"] / timing["median_s"]
        result[f"{name}_max_abs_difference"] = _max_difference(out[name], ref)
    result["device_first_call_s"] = timings["device"]["first_s"]
    result["identical"] = all(result[f"{n}_max_abs_difference"] <= 1e-9 for n in timings)
    result["pq"] = {k: dict(ref[k]) for k in ("All", "Things", "Stuff")}
    return result
