"""The benchmark helpers run and their correctness checks hold (tiny sizes; no timing asserts)."""

import numpy as np
import pytest

pytest.importorskip("torchvision")

from configs import base  # noqa: E402
from oanet_jax.bench import ops, timing, train  # noqa: E402
from oanet_jax.data import spec as data_spec  # noqa: E402


def test_timing_helpers_count_calls():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
            return name

        return fn

    t = timing.time_fn(make("a"), warmup=2, repeats=3)
    assert calls["a"] == 5 and t["repeats"] == 3 and len(t["times_s"]) == 3
    assert t["min_s"] <= t["median_s"] <= t["max_s"] and t["first_s"] is not None
    both = timing.time_interleaved({"a": make("a"), "b": make("b")}, warmup=1, repeats=2)
    assert calls == {"a": 8, "b": 3} and set(both) == {"a", "b"}


def test_ops_section_small_matches_torchvision():
    r = ops.nms(num_boxes=300, repeats=1, max_output=50)
    assert r["matches"]
    res = ops.roi_align(
        num_boxes=16, image_size=128, channels=8, output_sizes=(7,), sampling_ratios=(2,), repeats=1
    )
    assert res["cases"]["7x7_sr2"]["max_abs_diff"] < 1e-5


def test_train_section_batch_follows_the_spec_and_matches_torchvision_targets():
    config = base.get_config()
    config.data.image_size = (128, 128)
    config.train.batch_size = 2
    ours, images, targets = train.make_batch(config, num_instances=3)
    data_spec.validate(ours, config.data, 2, train=True)
    assert ours["valid"].sum(1).tolist() == [3, 3] and len(images) == len(targets) == 2
    for b, target in enumerate(targets):
        np.testing.assert_array_equal(target["boxes"].numpy(), ours["boxes"][b, :3])
        np.testing.assert_array_equal(target["labels"].numpy(), ours["classes"][b, :3] + 1)
        assert target["masks"].shape == (3, 128, 128) and target["masks"].sum() > 0
        assert tuple(images[b].shape) == (3, 128, 128) and float(images[b].max()) <= 1.0


def test_input_section_tiny(coco_sample_dir):
    """The input section end to end at tiny sizes: both mask sources, the bare decode, bytes."""
    from oanet_jax.bench import input as input_bench

    data = dict(
        image_size=(128, 128), min_size_train=(96,), max_size=128, max_instances=40, mask_size=8
    )
    r = input_bench.run(
        copies=2,
        batch_size=2,
        batches_per_call=1,
        repeats=1,
        warmup_batches=1,
        data=data,
        sample=coco_sample_dir,
    )
    assert r["images"] == 4 and r["cores"] >= 1
    for name in ("stream_instances_json", "stream_png"):
        s = r[name]
        assert s["images_per_s"] > 0 and s["ratio_to_bare_decode"] > 0
        assert s["images_per_s_per_core"] == pytest.approx(s["images_per_s"] / r["cores"])
    assert r["bare_decode_images_per_s"] > 0
    assert r["bytes_per_image_uint8"] == 128 * 128 * 3
    assert r["bytes_per_image_float32_before"] == 4 * 128 * 128 * 3
    assert r["bytes_per_example"]["image"] == r["bytes_per_image_uint8"]
    assert "image" in r["check_batch_keys"]
