"""The benchmark helpers run and their correctness checks hold (tiny sizes; no timing asserts)."""

import pytest

pytest.importorskip("torchvision")

from oanet_jax.bench import ops, timing  # noqa: E402


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
