"""Input pipeline throughput: the training stream vs bare decoding of the same files.

The real COCO val2017 images of the sample (``../shared/data/coco_panoptic_sample``) are written
``copies`` times into a temporary dataset with distinct image, file and annotation ids. Timed on
it, one after the other (never concurrently, so neither steals the other's cores):

* ``bare_decode``: single-threaded PIL decoding of every image's JPEG and panoptic PNG to numpy
  arrays, nothing else: the floor a Python input pipeline is measured against;
* ``stream_<masks>``: the training stream (``pipeline.build_dataset(config, 'train', ...)``) at
  the given data config (paper defaults: short side 800, max 1333, padded 1344x1344, 100
  instances, 112x112 masks, random flip), instance masks from the instances JSON
  (``instances_json``) and from the panoptic PNG (``png``); batches pulled as numpy arrays,
  after a warm-up of a few batches. The timed calls run inside the first epoch, where every
  record is visited for the first time (``first_epoch`` says so); then one whole epoch is
  timed as ``cached_epoch``: what every later epoch costs once the reader has cached the
  instance masks' run lengths.

Reported: images/s of each, images/s per host core (``len(os.sched_getaffinity(0))``), the
ratio stream / bare decode, and the bytes per example the stream ships (the wire format of
:mod:`oanet_jax.data.spec`: source-size canvases; the finished batch the device makes of it, and
the float32 image of before, for comparison). Timing through :mod:`oanet_jax.bench.timing`.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np
from PIL import Image

from oanet_jax.bench import timing

SAMPLE = pathlib.Path(__file__).resolve().parents[2].parent / "shared/data/coco_panoptic_sample"


def replicate_sample(sample: pathlib.Path, out: pathlib.Path, copies: int) -> dict[str, str]:
    """Writes the sample ``copies`` times with distinct ids (images, PNGs, both JSONs).

    Args:
        sample: the COCO panoptic sample folder (``input_images``, ``panoptic_examples``, their
            JSONs and ``panoptic_coco_detection_format.json``).
        out: an empty folder.
        copies: k; image id ``i`` of copy ``c`` becomes ``c * 10**7 + i``.

    Returns:
        Paths: 'image_dir', 'panoptic_json', 'panoptic_dir', 'instances_json'.
    """
    pan = json.loads((sample / "panoptic_examples.json").read_text())
    det = json.loads((sample / "panoptic_coco_detection_format.json").read_text())
    (out / "images").mkdir(parents=True)
    (out / "panoptic").mkdir()
    new_pan = {"images": [], "annotations": [], "categories": pan["categories"]}
    new_det = {"images": [], "annotations": [], "categories": det["categories"]}
    images = {img["id"]: img for img in pan["images"]}
    for c in range(copies):
        for ann in pan["annotations"]:
            img = images[ann["image_id"]]
            iid = c * 10**7 + int(img["id"])
            stem = f"{iid:015d}"
            shutil.copyfile(sample / "input_images" / img["file_name"], out / f"images/{stem}.jpg")
            shutil.copyfile(
                sample / "panoptic_examples" / ann["file_name"], out / f"panoptic/{stem}.png"
            )
            new_img = dict(img, id=iid, file_name=f"{stem}.jpg")
            new_pan["images"].append(new_img)
            new_det["images"].append(dict(new_img))
            new_pan["annotations"].append(
                dict(copy.deepcopy(ann), image_id=iid, file_name=f"{stem}.png")
            )
            for a in det["annotations"]:
                if a["image_id"] == img["id"]:
                    new_det["annotations"].append(
                        dict(a, image_id=iid, id=c * 10**7 + int(a["id"]))
                    )
    (out / "panoptic.json").write_text(json.dumps(new_pan))
    (out / "instances.json").write_text(json.dumps(new_det))
    return {
        "image_dir": str(out / "images"),
        "panoptic_json": str(out / "panoptic.json"),
        "panoptic_dir": str(out / "panoptic"),
        "instances_json": str(out / "instances.json"),
    }


def bare_decode(pairs: list[tuple[str, str]]) -> int:
    """Decodes every (JPEG, PNG) pair with PIL on this thread; returns the pixel count."""
    total = 0
    for jpg, png in pairs:
        with Image.open(jpg) as im:
            total += np.asarray(im.convert("RGB")).shape[0]
        with Image.open(png) as im:
            total += np.asarray(im.convert("RGB")).shape[0]
    return total


def stream_config(paths: dict[str, str], *, instances: bool, data: dict[str, Any] | None = None):
    """The base config (paper defaults) reading the replicated dataset."""
    from configs import base

    config = base.get_config()
    d = config.data
    d.root = ""
    d.train.image_dir = paths["image_dir"]
    d.train.panoptic_json = paths["panoptic_json"]
    d.train.panoptic_dir = paths["panoptic_dir"]
    d.train.instances_json = paths["instances_json"] if instances else ""
    for k, v in (data or {}).items():
        d[k] = v
    return config


def run(
    *,
    copies: int = 128,
    batch_size: int = 2,
    batches_per_call: int = 16,
    repeats: int = 3,
    warmup_batches: int = 4,
    data: dict[str, Any] | None = None,
    sample: pathlib.Path | None = None,
) -> dict[str, Any]:
    """Times the training stream and bare decoding (see the module docstring).

    Args:
        copies: replication factor of the sample (2 images each); the default 128 keeps the
            timed calls inside the first epoch.
        batch_size: per-host batch of the stream.
        batches_per_call: batches per timed call of the stream.
        repeats: timed calls (median reported).
        warmup_batches: batches pulled before timing (tracing, buffers).
        data: overrides of ``config.data`` (the tests use tiny sizes), default paper defaults.
        sample: the sample folder (default ``../shared/data/coco_panoptic_sample``).

    Returns:
        Dict with the settings, 'cores', 'bare_decode' and 'stream_<masks>' timings, images/s,
        per core, the ratios and the bytes per example.
    """
    import tensorflow as tf  # after torch (bench.main imports torch first)

    from oanet_jax.data import pipeline, spec

    sample = pathlib.Path(sample or SAMPLE)
    cores = len(os.sched_getaffinity(0))
    result: dict[str, Any] = {
        "copies": copies,
        "batch_size": batch_size,
        "cores": cores,
        "tf": tf.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = replicate_sample(sample, pathlib.Path(tmp) / "ds", copies)
        pan = json.loads(pathlib.Path(paths["panoptic_json"]).read_text())
        pairs = [
            (
                os.path.join(paths["image_dir"], img["file_name"]),
                os.path.join(paths["panoptic_dir"], ann["file_name"]),
            )
            for img, ann in zip(pan["images"], pan["annotations"], strict=True)
        ]
        n = len(pairs)
        result["images"] = n
        bare = timing.time_fn(lambda: bare_decode(pairs), warmup=1, repeats=repeats)
        result["bare_decode"] = dict(bare, images_per_s=n / bare["median_s"])
        for name, instances in (("instances_json", True), ("png", False)):
            config = stream_config(paths, instances=instances, data=data)
            ds = pipeline.build_dataset(
                config,
                "train",
                training=True,
                batch_size=batch_size,
                seed=0,
                process_index=0,
                process_count=1,
            )
            it = ds.as_numpy_iterator()
            for _ in range(warmup_batches):
                batch = next(it)
            # The first epoch visits every record for the first time (file checks, the
            # instances-JSON masks decoded to run lengths); the next one finds the run lengths
            # in the reader's cache, as every later epoch of a training run does.
            per_epoch = n // batch_size
            t = timing.time_fn(
                lambda it=it: [next(it) for _ in range(batches_per_call)],
                warmup=0,
                repeats=repeats,
            )
            rate = batches_per_call * batch_size / t["median_s"]
            stream = dict(t, images_per_s=rate, images_per_s_per_core=rate / cores)
            done = warmup_batches + repeats * batches_per_call
            if done <= per_epoch:
                # The timed calls above ran inside the first epoch: finish it, then time one
                # whole cached epoch.
                for _ in range(per_epoch - done):
                    next(it)
                cached = timing.time_fn(
                    lambda it=it, k=per_epoch: [next(it) for _ in range(k)], warmup=0, repeats=1
                )
                cached_rate = per_epoch * batch_size / cached["median_s"]
                stream["first_epoch"] = True
                stream["cached_epoch"] = dict(
                    cached,
                    images_per_s=cached_rate,
                    images_per_s_per_core=cached_rate / cores,
                )
            else:
                stream["first_epoch"] = False  # the timed calls reached the second epoch
            result[f"stream_{name}"] = stream
            del it, ds
        # Bare decoding again: the machine's load may drift; the ratios use the mean of both.
        again = timing.time_fn(lambda: bare_decode(pairs), warmup=0, repeats=repeats)
        both = 0.5 * (n / bare["median_s"] + n / again["median_s"])
        result["bare_decode_after"] = dict(again, images_per_s=n / again["median_s"])
        result["bare_decode_images_per_s"] = both
        result["bare_decode_images_per_s_per_core"] = both  # one thread
        for name in ("instances_json", "png"):
            s = result[f"stream_{name}"]
            s["ratio_to_bare_decode"] = s["images_per_s"] / both
            if "cached_epoch" in s:
                c = s["cached_epoch"]
                c["ratio_to_bare_decode"] = c["images_per_s"] / both
        # What the stream ships (the wire format: source-size canvases, run lengths), per
        # example, beside the batch spec the device makes of it (what was shipped before).
        nbytes = {k: int(v.nbytes) // batch_size for k, v in batch.items()}
        result["bytes_per_example"] = nbytes
        result["bytes_per_example_total"] = sum(nbytes.values())
        result["bytes_per_image_uint8"] = nbytes["image"]
        shapes = spec.example_shapes(config.data)
        finished = {k: int(np.prod(shapes[k])) * spec.DTYPES[k].itemsize for k in spec.KEYS}
        result["bytes_per_finished_example"] = sum(finished.values())
        result["bytes_per_image_float32_before"] = finished["image"] * 4
        result["check_batch_keys"] = sorted(batch)
    return result
