"""Stuff mIoU: the confusion matrix against a float64 loop."""

from __future__ import annotations

import numpy as np
import pytest

from oanet_jax.data.coco_panoptic import CategoryTable
from oanet_jax.eval.semantic import StuffConfusion


def test_stuff_confusion_against_loop():
    rng = np.random.default_rng(1)
    num_things, num_stuff = 3, 4
    conf = StuffConfusion(num_things, num_stuff)
    inter = np.zeros(num_stuff)
    union = np.zeros(num_stuff)
    gt_count = np.zeros(num_stuff)
    for _ in range(3):
        gt = rng.choice(np.r_[np.arange(num_things + num_stuff - 1), 255], (20, 30)).astype(
            np.uint8
        )  # the last stuff class never appears in the ground truth
        pred = rng.integers(-1, num_stuff, (20, 30))
        conf.update(pred, gt)
        for s in range(num_stuff):
            g = gt.astype(int) == num_things + s
            stuff_px = (gt >= num_things) & (gt != 255)
            p = (pred == s) & stuff_px
            inter[s] += np.sum(g & p)
            union[s] += np.sum(g | p)
            gt_count[s] += g.sum()
    table = CategoryTable(
        dataset_ids=tuple(range(1, 8)),
        names=tuple("abcdefg"),
        colors=((0, 0, 0),) * 7,
        isthing=(True,) * 3 + (False,) * 4,
    )
    res = conf.result(table)
    present = gt_count > 0
    assert res["n"] == 3 and set(res["per_class"]) == {"d", "e", "f"}
    assert res["mIoU"] == pytest.approx(100 * np.mean(inter[present] / union[present]))
