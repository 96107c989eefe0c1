"""The benchmark helpers run and their correctness checks hold (tiny sizes; no timing asserts)."""

import numpy as np
import pytest

pytest.importorskip("torchvision")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import base, tiny  # noqa: E402
from oanet_jax.bench import flops, ops, timing, train  # noqa: E402
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


def test_flops_xla_counts_a_switch_as_its_dearest_branch():
    """Why the flops section forces the bucket: a conditional costs as its dearest branch."""
    r = flops.toy_switch_flops(sizes=(2, 4, 8), width=16)
    assert r["branches"][0] < r["branches"][1] < r["branches"][2]
    assert r["switch"] == pytest.approx(max(r["branches"]), abs=2) and r["counts"] == "max"


def test_flops_by_module_groups_forward_and_backward_by_name_stack():
    class Toy(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(8, use_bias=False, name="backbone")(x)
            return nn.Dense(4, use_bias=False, name="mask_head")(jnp.tanh(x))

    model = Toy()
    x = jnp.ones((3, 5))
    params = model.init(jax.random.key(0), x)

    def loss(p):
        return jnp.sum(model.apply(p, x) ** 2) + jnp.sum(x @ jnp.ones((5, 2)))  # + one outside

    got = flops.module_flops(jax.grad(loss), params)
    assert got["backbone"]["forward"] == 2 * 3 * 5 * 8
    assert got["mask_head"]["forward"] == 2 * 3 * 8 * 4
    assert got["backbone"]["backward"] == 2 * 3 * 5 * 8  # the kernel's gradient (x needs none)
    assert got["mask_head"]["backward"] == 2 * (2 * 3 * 8 * 4)  # kernel and input gradients
    assert got["other"] == {"forward": 2 * 3 * 5 * 2, "backward": 0.0}
    assert got["stuff_head"] == {"forward": 0.0, "backward": 0.0}


@pytest.mark.slow  # a ResNet-50 Mask R-CNN step at 128x128: 99 s on the loaded 2-core machine
def test_flops_torchvision_counts_forward_backward_and_mask_rois():
    config = base.get_config()
    config.data.image_size = (128, 128)
    config.train.batch_size = 1
    _, images, targets = train.make_batch(config, num_instances=2)
    r = flops.torchvision_flops(images, targets, 128)
    assert r["forward"] > 0 and r["backward"] > r["forward"]
    assert r["total"] == r["forward"] + r["backward"]
    assert r["forward_by_module"]["backbone"] > 0 and r["forward_by_module"]["mask_head"] > 0
    assert len(r["mask_rois"]) == 1 and r["mask_rois"][0] >= 2  # the GT boxes at least


@pytest.mark.slow  # init, a forward and two train-step compilations: minutes on 2 cores
def test_flops_section_tiny_bucket_below_unbucketed():
    config = tiny.get_config()
    config.data.image_size = (128, 128)
    config.train.batch_size = 2
    config.model.roi.batch_size_per_image = 64  # F = 16 mask slots
    config.model.mask_head.train_buckets = (4, 8)
    r = flops.count(config, num_instances=2, torchvision_side=False)
    assert r["buckets"] == [4, 8, 16]
    assert max(r["foreground_rois_per_image"]) <= r["bucket_taken"] < 16
    taken, full = r["ours_taken"], r["ours_unbucketed"]
    assert 0 < taken["flops_per_image"] < full["flops_per_image"]
    mask = [v["by_module_per_image"]["mask_head"] for v in (taken, full)]
    assert 0 < mask[0]["forward"] < mask[1]["forward"]
    # The other modules do the same work whatever the bucket.
    for g in ("backbone", "fpn", "rpn", "box_head", "stuff_head", "srm"):
        assert taken["by_module_per_image"][g]["forward"] > 0
        for d in ("forward", "backward"):
            assert taken["by_module_per_image"][g][d] == full["by_module_per_image"][g][d]
    assert r["xla_conditional"]["counts"] == "max"


def test_input_section_tiny(coco_sample_dir):
    """The input section end to end at tiny sizes: both mask sources, the bare decode, bytes."""
    from oanet_jax.bench import input as input_bench

    data = dict(
        image_size=(128, 128), min_size_train=(96,), max_size=128, max_instances=40, mask_size=8
    )
    r = input_bench.run(
        copies=3,
        batch_size=2,
        batches_per_call=1,
        repeats=1,
        warmup_batches=1,
        data=data,
        sample=coco_sample_dir,
    )
    assert r["images"] == 6 and r["cores"] >= 1
    for name in ("stream_instances_json", "stream_png"):
        s = r[name]
        assert s["images_per_s"] > 0 and s["ratio_to_bare_decode"] > 0
        assert s["images_per_s_per_core"] == pytest.approx(s["images_per_s"] / r["cores"])
        # 3 batches per epoch: 1 warm-up + 1 timed inside the first epoch, then a cached epoch.
        assert s["first_epoch"] and s["cached_epoch"]["repeats"] == 1
        assert s["cached_epoch"]["ratio_to_bare_decode"] > 0
    assert r["bare_decode_images_per_s"] > 0
    # The wire ships the source-size canvas (the sample's largest image, 427 x 640, rounded up
    # to 448 x 640); the finished batch is the 128 x 128 spec.
    assert r["bytes_per_image_uint8"] == 448 * 640 * 3
    assert r["bytes_per_image_float32_before"] == 4 * 128 * 128 * 3
    assert r["bytes_per_example"]["image"] == r["bytes_per_image_uint8"]
    assert "image" in r["check_batch_keys"] and "run_ends" in r["check_batch_keys"]
