"""Tests of the wire format and its device half (oanet_jax.data.device_transform).

The oracle is the host transform (``transforms.transform_record``: PIL's resize, numpy's
nearest rule and crops) on the real COCO sample, with the instance masks from the instances JSON
(overlapping: run lengths on the wire) and from the panoptic PNG (the instance map); the wire
made by the TF transform equals the host's numpy one; the run-length and label-map ops against
numpy; the static-shape limits of the wire raise errors naming the file, or are skipped and
counted.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")  # imported before tensorflow (conftest too)

from configs import base  # noqa: E402
from oanet_jax.data import (  # noqa: E402
    coco_panoptic,
    device_transform,
    pipeline,
    spec,
    tf_transforms,
    transforms,
)
from oanet_jax.ops import masks as mask_ops  # noqa: E402


def _config(sample, instances: bool):
    c = base.get_config()
    d = c.data
    d.root = str(sample)
    d.train.image_dir = d.eval.image_dir = "input_images"
    d.train.panoptic_json = d.eval.panoptic_json = "panoptic_examples.json"
    d.train.panoptic_dir = d.eval.panoptic_dir = "panoptic_examples"
    inst = "panoptic_coco_detection_format.json" if instances else ""
    d.train.instances_json = d.eval.instances_json = inst
    d.max_size = 400
    d.image_size = (416, 416)
    d.max_instances = 40
    d.mask_size = 24
    return c


def _batch(examples: list[dict]) -> dict:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


@pytest.mark.parametrize("instances", [True, False], ids=["runs", "instance_map"])
def test_finished_wire_equals_host_transform(coco_sample_dir, instances):
    c = _config(coco_sample_dir, instances)
    reader = pipeline.make_reader(c.data, "train")
    cfg = transforms.TransformConfig.from_config(c.data).with_source_size(
        reader.largest_image_shape()
    )
    assert cfg.source_size == (448, 640)  # 427 x 640 and 360 x 640, rounded up to 32
    plans = [(0, 240, False), (1, 300, True), (0, 400, True), (1, 200, False)]
    records = [reader.read(i) for i in range(len(reader))]
    if instances:  # the sample's detection-format masks come from its PNG: make two overlap
        for rec in records:
            rec["masks"][1] |= rec["masks"][0]
    wires = [
        transforms.wire_from_record(records[i], cfg, short_size=s, flip=f) for i, s, f in plans
    ]
    for (i, _, _), w in zip(plans, wires, strict=True):
        overlapping = bool((w["run_start"] >= 0).any())
        assert overlapping == instances  # the instances JSON's masks overlap; segments do not
        assert (
            not w["instance_map"].any()
            if instances
            else w["instance_map"].max() == len(records[i]["classes"])
        )
    finished = device_transform.finish_numpy(_batch(wires), cfg)
    spec.validate(finished, cfg, len(plans), train=False)
    for k, (i, size, flip) in enumerate(plans):
        ref = transforms.transform_record(records[i], cfg, short_size=size, flip=flip)
        for key in spec.KEYS:
            got = finished[key][k]
            if key == "image":  # one rounding (ours) vs PIL's two fixed-point passes
                assert np.abs(got.astype(int) - ref[key].astype(int)).max() <= 1
            elif key in ("masks", "boxes"):  # float32 sample positions vs the host's float64
                np.testing.assert_allclose(got, ref[key], atol=1e-4, err_msg=key)
            else:
                np.testing.assert_array_equal(got, ref[key], err_msg=key)


@pytest.mark.parametrize("instances", [True, False], ids=["runs", "instance_map"])
def test_tf_wire_equals_numpy_wire(coco_sample_dir, instances):
    import tensorflow as tf

    c = _config(coco_sample_dir, instances)
    reader = pipeline.make_reader(c.data, "train")
    cfg = transforms.TransformConfig.from_config(c.data).with_source_size(
        reader.largest_image_shape()
    )
    for index, flip in ((0, True), (1, False)):
        meta = pipeline._record_meta(reader.read_meta(index), index, cfg, 300, flip)
        m = {
            k: tf.constant(v)
            for k, v in zip(tf_transforms.META_KEYS, pipeline._meta_list(meta), strict=True)
        }
        ex = tf_transforms.transform_example(m, cfg, lambda *a: np.bool_(True), lambda i: True)
        record = reader.read(index)
        want = transforms.wire_from_record(record, cfg, short_size=300, flip=flip)
        got = {}
        for key in spec.WIRE_KEYS:  # padded as padded_batch pads
            value = ex[key].numpy()
            full = np.full_like(want[key], spec.wire_padding_example(cfg)[key].flat[0])
            full[tuple(slice(0, d) for d in value.shape)] = value
            got[key] = full
        if instances:  # TF ships the instances JSON's runs; they decode to the record's masks
            n = len(record["classes"])
            h, w = record["masks"].shape[1:]
            rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            decoded = mask_ops.mask_value_from_runs(
                jnp.asarray(got["run_ends"]),
                jnp.asarray(got["run_start"][:n]),
                np.broadcast_to(rows, (n, h, w)).astype(np.int32),
                np.broadcast_to(cols, (n, h, w)).astype(np.int32),
                h,
                w,
            )
            np.testing.assert_array_equal(np.asarray(decoded), record["masks"].astype(bool))
            assert not got["boxes_from_map"] and not got["instance_map"].any()
            skip = ("run_ends", "run_start", "instance_map", "boxes_from_map")
        else:  # the PNG's instance map; boxes made on the device from it
            assert got["boxes_from_map"] and (got["run_start"] == -1).all()
            skip = ("boxes", "boxes_from_map")
        for key in spec.WIRE_KEYS:
            if key not in skip:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_mask_value_from_runs_and_boxes_from_label_map():
    rng = np.random.default_rng(0)
    h, w, n = 13, 17, 4
    masks = rng.random((n, h, w)) < 0.3
    masks[2] = False  # an empty mask
    masks[3, 0, 0] = True  # starts with a one: a zero-length first run
    lengths, counts = transforms.mask_run_lengths(masks)
    assert counts.sum() == lengths.size and np.all(
        np.add.reduceat(lengths, np.r_[0, np.cumsum(counts)[:-1]]) == h * w
    )
    ends = np.full(lengths.size + 7, spec.RUN_END_PAD, np.int32)
    ends[: lengths.size] = np.cumsum(lengths)
    start = (np.cumsum(counts) - counts).astype(np.int32)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    rows = np.broadcast_to(rows, (n, h, w)).astype(np.int32)
    cols = np.broadcast_to(cols, (n, h, w)).astype(np.int32)
    got = mask_ops.mask_value_from_runs(jnp.asarray(ends), jnp.asarray(start), rows, cols, h, w)
    np.testing.assert_array_equal(np.asarray(got), masks)

    label = np.zeros((h + 3, w + 5), np.uint8)  # a canvas larger than the map
    regions = [(2, 5, 3, 9), (0, 1, 0, 17), (7, 13, 12, 14)]
    for k, (y1, y2, x1, x2) in enumerate(regions, start=1):
        label[y1:y2, x1:x2] = k
    label[h:, :] = 1  # outside the valid region: ignored
    boxes = mask_ops.boxes_from_label_map(jnp.asarray(label), 5, h, w)
    want = np.zeros((5, 4), np.float32)
    for k, (y1, y2, x1, x2) in enumerate(regions):
        want[k] = (x1, y1, x2, y2)
    np.testing.assert_array_equal(np.asarray(boxes), want)  # absent labels 4, 5: zeros
    full = np.stack([label[:h, :w] == k for k in range(1, 6)])
    np.testing.assert_array_equal(np.asarray(boxes), np.asarray(mask_ops.masks_to_boxes(full)))


def test_padding_example_finishes_to_padding(coco_sample_dir):
    cfg = transforms.TransformConfig(
        image_size=(64, 64), max_instances=5, mask_size=8, max_size=64, source_size=(32, 48)
    )
    pad = spec.wire_padding_example(cfg)
    out = device_transform.finish_numpy(_batch([pad, pad]), cfg)
    want = spec.padding_example(cfg)
    for key in spec.KEYS:
        np.testing.assert_array_equal(out[key][1], want[key], err_msg=key)
    jax.tree.map(lambda x: np.testing.assert_(np.all(np.isfinite(x.astype(float)))), out)


@pytest.mark.parametrize("limit", ["source_size", "max_mask_runs"])
def test_wire_limits_name_the_file_or_are_skipped(coco_sample_dir, limit):
    c = _config(coco_sample_dir, instances=True)
    if limit == "source_size":
        c.data.source_size = (400, 640)  # the first image is 427 high
    else:
        c.data.max_mask_runs = 100
    c.data.skip_bad_records = False
    with pytest.raises(coco_panoptic.DataError) as info:
        next(pipeline.numpy_batches(c, "eval", training=False, batch_size=2, seed=0))
    assert info.value.reason == coco_panoptic.WIRE_LIMIT
    assert f"data.{limit}" in str(info.value) and ".jpg" in str(info.value)
    c.data.skip_bad_records = True
    it = pipeline.numpy_batches(c, "eval", training=False, batch_size=2, seed=0)
    batch = next(it)
    assert not batch["example_valid"].all()
    assert it.skipped_records().get(coco_panoptic.WIRE_LIMIT, 0) >= 1


def test_slot_tables_are_collision_free():
    rng = np.random.default_rng(3)
    for k in (1, 5, 60, 250):
        ids = np.concatenate([[0], np.sort(rng.choice(1 << 24, k, replace=False))]).astype(np.int32)
        classes = rng.integers(0, 133, k + 1).astype(np.uint8)
        t = tf_transforms.slot_tables(ids, classes, np.arange(1, min(k, 100) + 1, dtype=np.int32))
        a, shift = np.uint64(t["hash_multiplier"]), np.uint64(t["hash_shift"])
        slots = (((ids.astype(np.uint64) * a) & np.uint64(0xFFFFFFFF)) >> shift).astype(int)
        np.testing.assert_array_equal(slots, t["table_slots"])
        np.testing.assert_array_equal(t["slot_ids"][slots], ids)
        np.testing.assert_array_equal(t["slot_classes"][slots], classes)
        assert len(set(slots.tolist())) == k + 1
        assert (t["slot_ids"] >= 0).sum() == k + 1  # every other slot empty (-1)


def test_config_dataclass_has_wire_fields():
    cfg = transforms.TransformConfig.from_config(base.get_config().data)
    assert cfg.source_size == (0, 0) and cfg.max_mask_runs == 32768
    resolved = cfg.with_source_size((427, 640))
    assert resolved.source_size == (448, 640)
    fixed = dataclasses.replace(cfg, source_size=(512, 640)).with_source_size((427, 640))
    assert fixed.source_size == (512, 640)
