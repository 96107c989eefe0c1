"""Tests for oanet_jax.data.pipeline (the tf.data assembly), end to end.

On the real COCO sample and on a small generated synthetic set (order, determinism, resume, host
sharding, eval padding; every wire batch, finished by the device transform, matches the batch
spec and equals the per-example host transform),
and the TFDS source on the COCO sample written as a real TFDS ``coco/2017_panoptic`` dataset
(read through TFDS's own Coco builder; its batches must equal the raw-folder reader's).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")  # imported before tensorflow (conftest too)

from configs import base, tiny  # noqa: E402
from oanet_jax.data import (  # noqa: E402
    device_transform,
    ordering,
    pipeline,
    spec,
    synthetic,
    transforms,
)

# ------------------------------------------------------------------------------------ helpers


def _unbatch(batch: dict, i: int) -> dict:
    return {k: v[i] for k, v in batch.items()}


def _finished(wire: dict, config) -> dict:
    """A wire batch of the pipeline, finished by the device transform (numpy, every batch key)."""
    assert spec.is_wire(wire)
    return device_transform.finish_numpy(wire, transforms.TransformConfig.from_config(config.data))


def _take(ds, n: int, config) -> list[dict]:
    it = ds.as_numpy_iterator()
    return [_finished(next(it), config) for _ in range(n)]


def _all(ds, config) -> list[dict]:
    return [_finished(b, config) for b in ds.as_numpy_iterator()]


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------------- end to end: COCO


def _coco_config(sample: pathlib.Path, instances: bool = True):
    c = base.get_config()
    d = c.data
    d.root = str(sample)
    d.train.image_dir = d.eval.image_dir = "input_images"
    d.train.panoptic_json = d.eval.panoptic_json = "panoptic_examples.json"
    d.train.panoptic_dir = d.eval.panoptic_dir = "panoptic_examples"
    inst = "panoptic_coco_detection_format.json" if instances else ""
    d.train.instances_json = d.eval.instances_json = inst
    d.min_size_train = (200, 240)
    d.min_size_test = 240
    d.max_size = 320
    d.image_size = (320, 320)
    d.max_instances = 40
    d.mask_size = 16
    d.prefetch = 1
    return c


def test_coco_sample_train_batches_match_transform(coco_sample_dir, check_padding):
    c = _coco_config(coco_sample_dir)
    cfg = transforms.TransformConfig.from_config(c.data)
    reader = pipeline.make_reader(c.data, "train")
    assert reader.masks_from_instances and len(reader) == 2
    records = [reader.read(i) for i in range(len(reader))]
    ds = pipeline.build_dataset(
        c, "train", training=True, batch_size=2, seed=3, process_index=0, process_count=1
    )
    batches = _take(ds, 3, c)  # 3 epochs of the 2 images
    plan = ordering.TrainPlan(2, 3, 0, 1, (200, 240))
    seen_flip, seen_sizes = set(), set()
    for step, batch in enumerate(batches):
        spec.validate(batch, cfg, 2, train=False)
        assert sorted(batch["image_id"].tolist()) == sorted(reader.image_ids)  # one epoch
        for i in range(2):
            ex = _unbatch(batch, i)
            index, flip, size, _ = plan(step * 2 + i)
            rec = records[index]
            assert ex["image_id"] == rec["image_id"] and bool(ex["flipped"]) == flip
            check_padding(ex)
            h, w = (int(v) for v in ex["image_shape"])
            height, width = rec["image"].shape[:2]
            assert ex["orig_shape"].tolist() == [height, width]
            assert min(h, w) == size or max(h, w) == 320  # resize obeys min/max size
            assert max(h, w) <= 320
            n = len(rec["classes"])
            assert int(ex["valid"].sum()) == n
            sx, sy = w / width, h / height
            ob = rec["boxes"].astype(np.float64)
            x1, x2 = ob[:, 0] * sx, ob[:, 2] * sx
            if flip:
                x1, x2 = w - x2, w - x1
            expected = np.stack([x1, ob[:, 1] * sy, x2, ob[:, 3] * sy], axis=1)
            np.testing.assert_allclose(ex["boxes"][:n], expected, rtol=1e-5, atol=1e-4)
            np.testing.assert_array_equal(ex["classes"][:n], rec["classes"])
            # Everything equals the host transform of the same record and plan, except the
            # image (the device's float resize vs PIL's fixed-point one, at most one level
            # apart) and the mask crops (sample positions in float32 on the device, float64 on
            # the host).
            ref = transforms.transform_record(rec, cfg, short_size=size, flip=flip)
            for k in ref:
                if k == "image":
                    diff = np.abs(ex[k].astype(np.int16) - ref[k].astype(np.int16))
                    assert ex[k].dtype == np.uint8 and diff.max() <= 1 and diff.mean() < 0.2
                elif k in ("masks", "boxes"):
                    np.testing.assert_allclose(ex[k], ref[k], atol=1e-4, err_msg=k)
                else:
                    np.testing.assert_array_equal(ex[k], ref[k], err_msg=k)
            seen_flip.add(flip)
            seen_sizes.add(size)
    assert seen_flip == {False, True} and seen_sizes == {200, 240}


def test_coco_sample_eval_padding_and_hosts(coco_sample_dir, check_padding):
    c = _coco_config(coco_sample_dir)
    cfg = transforms.TransformConfig.from_config(c.data)
    (batch,) = _all(
        pipeline.build_dataset(
            c, "eval", training=False, batch_size=3, seed=0, process_index=0, process_count=1
        ),
        c,
    )
    spec.validate(batch, cfg, 3, train=False)
    assert batch["example_valid"].tolist() == [True, True, False]
    assert batch["image_id"].tolist() == [142238, 439180, -1]
    assert not batch["flipped"].any()
    for i in range(2):
        ex = _unbatch(batch, i)
        check_padding(ex)
        height, width = (int(v) for v in ex["orig_shape"])
        # min_size_test 240 would make the long side > 320, so max_size decides.
        assert tuple(ex["image_shape"]) == transforms.resize_shape(height, width, 240, 320)[:2]
        assert max(ex["image_shape"]) == 320
    pad = _unbatch(batch, 2)
    assert not pad["image"].any() and np.all(pad["semantic"] == 255) and not pad["valid"].any()
    # Two hosts: one image each, the same number of batches.
    per_host = [
        list(
            pipeline.build_dataset(
                c, "eval", training=False, batch_size=1, seed=0, process_index=h, process_count=2
            ).as_numpy_iterator()
        )
        for h in range(2)
    ]
    assert [len(b) for b in per_host] == [1, 1]
    assert [b[0]["image_id"].tolist() for b in per_host] == [[142238], [439180]]


# ---------------------------------------------------------------------- end to end: synthetic


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("synthetic_pipeline")
    synthetic.generate(str(out), num_images=16, num_val_images=3, seed=0, size=(64, 64))
    return out


def _tiny_config(root: pathlib.Path):
    c = tiny.get_config()
    c.data.root = str(root)
    c.data.min_size_train = (48, 56, 64)
    c.data.prefetch = 1
    return c


def test_synthetic_determinism_resume_and_hosts(synthetic_dir, check_padding):
    c = _tiny_config(synthetic_dir)
    cfg = transforms.TransformConfig.from_config(c.data)

    def run(start_step=0, seed=0, host=0, hosts=1, steps=4):
        ds = pipeline.build_dataset(
            c,
            "train",
            training=True,
            batch_size=4,
            seed=seed,
            start_step=start_step,
            process_index=host,
            process_count=hosts,
        )
        return _take(ds, steps, c)

    first = run()
    spec.validate(first[0], cfg, 4, train=False)
    for b in first:
        for i in range(4):
            check_padding(_unbatch(b, i))
    _assert_batches_equal(first, run())  # same seed, same stream
    _assert_batches_equal(first[2:], run(start_step=2, steps=2))  # resume = batches 2, 3
    other = run(seed=1)
    assert any(
        not np.array_equal(a["image_id"], b["image_id"]) for a, b in zip(first, other, strict=True)
    )
    # One epoch = 16 images = 4 batches: each image exactly once.
    ids = np.concatenate([b["image_id"] for b in first])
    assert len(set(ids.tolist())) == 16
    # Two hosts: 8 images each per epoch, disjoint, together the whole split.
    h0, h1 = (run(host=h, hosts=2, steps=2) for h in range(2))
    ids0 = set(np.concatenate([b["image_id"] for b in h0]).tolist())
    ids1 = set(np.concatenate([b["image_id"] for b in h1]).tolist())
    assert len(ids0) == len(ids1) == 8 and not ids0 & ids1 and ids0 | ids1 == set(ids.tolist())
    # Overlapping instance masks from instances.json reach the batch.
    reader = pipeline.make_reader(c.data, "train")
    assert reader.masks_from_instances
    assert any(b["valid"].any() for b in first)


def test_synthetic_default_process_and_eval(synthetic_dir, check_padding):
    c = _tiny_config(synthetic_dir)
    # process_index / process_count default to jax's (one process here).
    ds = pipeline.build_dataset(c, "eval", training=False, batch_size=2, seed=0)
    batches = _all(ds, c)
    assert len(batches) == 2  # 3 val images -> 2 batches, the last one padded
    assert [b["example_valid"].tolist() for b in batches] == [[True, True], [True, False]]
    for b in batches:
        for i in range(2):
            ex = _unbatch(b, i)
            check_padding(ex)
            if ex["example_valid"]:
                assert ex["image_shape"].tolist() == [64, 64]
    with pytest.raises(ValueError, match="start_step"):
        pipeline.build_dataset(c, "eval", training=False, batch_size=2, seed=0, start_step=1)


_EXIT_SCRIPT = """
import sys
import torch  # before tensorflow
from configs import tiny
from oanet_jax.data import pipeline
c = tiny.get_config()
c.data.root = sys.argv[1]
it = pipeline.build_dataset(
    c, "train", training=True, batch_size=2, seed=0, process_index=0, process_count=1
).as_numpy_iterator()
next(it)
print("batch ok", flush=True)
# Exit with the iterator alive and tf.data still filling its buffers.
"""


def test_interpreter_exits_with_live_iterator(synthetic_dir):
    # Without the pipeline's atexit drain, tf.data threads calling the numpy transform during
    # interpreter finalisation deadlock the exit.
    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT, str(synthetic_dir)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "batch ok" in proc.stdout


# ----------------------------------------------------------------- TFDS end to end (real files)


@pytest.fixture(scope="session")
def tfds_coco_dir(coco_sample_dir, tmp_path_factory) -> pathlib.Path:
    """The COCO sample written as a real TFDS ``coco/2017_panoptic`` dataset (train = validation).

    Uses the registered Coco builder's own features and TFDS's writer, so ``tfds.builder(
    'coco/2017_panoptic', data_dir=...)`` reads it as it reads a user-prepared dataset.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path_factory.mktemp("tfds")
    features = tfds.builder("coco/2017_panoptic", data_dir=str(data_dir)).info.features
    pan = json.loads((coco_sample_dir / "panoptic_examples.json").read_text())
    names = [c["name"] for c in pan["categories"]]  # TFDS: label names in file order
    features["panoptic_objects"]["label"].names = names
    name_of = {c["id"]: c["name"] for c in pan["categories"]}
    images = {img["id"]: img for img in pan["images"]}
    examples = []
    for key, ann in enumerate(pan["annotations"]):
        img = images[ann["image_id"]]
        height, width = img["height"], img["width"]
        objects = []
        for seg in ann["segments_info"]:
            x, y, w, h = seg["bbox"]
            box = tfds.features.BBox(y / height, x / width, (y + h) / height, (x + w) / width)
            objects.append(
                {
                    "id": seg["id"],
                    "area": seg["area"],
                    "bbox": box,
                    "label": name_of[seg["category_id"]],
                    "is_crowd": bool(seg["iscrowd"]),
                }
            )
        example = {
            "image": str(coco_sample_dir / "input_images" / img["file_name"]),
            "image/filename": img["file_name"],
            "image/id": ann["image_id"],
            "panoptic_image": str(coco_sample_dir / "panoptic_examples" / ann["file_name"]),
            "panoptic_image/filename": ann["file_name"],
            "panoptic_objects": objects,
        }
        examples.append((key, example))
    tfds.dataset_builders.store_as_tfds_dataset(
        name="coco",
        version="1.1.0",
        config="2017_panoptic",
        features=features,
        split_datasets={"train": examples, "validation": examples},
        data_dir=str(data_dir),
    )
    return data_dir


def test_tfds_source_equals_reader_source(coco_sample_dir, tfds_coco_dir):
    reader_cfg = _coco_config(coco_sample_dir, instances=False)  # masks from segments, as TFDS
    tfds_cfg = _coco_config(coco_sample_dir, instances=False)
    tfds_cfg.data.source = "tfds"
    tfds_cfg.data.tfds_data_dir = str(tfds_coco_dir)
    cfg = transforms.TransformConfig.from_config(tfds_cfg.data)

    def eval_batches(c):
        ds = pipeline.build_dataset(
            c, "eval", training=False, batch_size=3, seed=0, process_index=0, process_count=1
        )
        return _all(ds, c)

    (a,), (b,) = eval_batches(tfds_cfg), eval_batches(reader_cfg)
    spec.validate(a, cfg, 3, train=False)
    assert a["example_valid"].tolist() == [True, True, False]
    order = np.argsort(a["image_id"][:2])  # TFDS stores examples in its own (hashed) order
    for k in a:
        # Same semantic map, instances and crops; the same decoded pixels (PIL for TFDS, TF's
        # accurate IDCT for the reader), resized on the device alike.
        if k == "image":
            diff = np.abs(a[k][:2][order].astype(np.int16) - b[k][:2].astype(np.int16))
            assert diff.max() <= 1 and diff.mean() < 0.2
        else:
            np.testing.assert_array_equal(a[k][:2][order], b[k][:2], err_msg=k)
        np.testing.assert_array_equal(a[k][2], b[k][2], err_msg=k)

    # Training: deterministic for a seed, a resume yields the later batches, hosts disjoint.
    def train(start_step=0, steps=3, host=0, hosts=1):
        ds = pipeline.build_dataset(
            tfds_cfg,
            "train",
            training=True,
            batch_size=1,
            seed=5,
            start_step=start_step,
            process_index=host,
            process_count=hosts,
        )
        return _take(ds, steps, tfds_cfg)

    full = train()
    spec.validate(full[0], cfg, 1, train=False)
    _assert_batches_equal(full, train())
    _assert_batches_equal(full[1:], train(start_step=1, steps=2))
    ids = [{int(b["image_id"][0]) for b in train(host=h, hosts=2, steps=2)} for h in range(2)]
    assert len(ids[0]) == len(ids[1]) == 1 and ids[0] != ids[1]
