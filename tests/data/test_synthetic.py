"""Tests for the synthetic occlusion dataset, checked with panopticapi and pycocotools."""

from __future__ import annotations

import copy
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from oanet_jax.data import synthetic

panopticapi_evaluation = pytest.importorskip("panopticapi.evaluation")
pycocotools_coco = pytest.importorskip("pycocotools.coco")

ROOT = pathlib.Path(__file__).resolve().parents[2]
SIZE = (64, 64)


def _rgb2id(png: np.ndarray) -> np.ndarray:
    png = png.astype(np.int64)
    return png[..., 0] + 256 * png[..., 1] + 256 * 256 * png[..., 2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    stats = synthetic.generate(str(out), 24, 4, seed=3, size=SIZE)
    return out, stats


def test_layout_and_categories(dataset):
    out, stats = dataset
    cats = json.loads((out / "categories.json").read_text())
    things = sorted(c["id"] for c in cats if c["isthing"])
    stuff = sorted(c["id"] for c in cats if not c["isthing"])
    assert len(things) == 4 and len(stuff) == 3
    assert things != list(range(things[0], things[0] + 4))  # non-contiguous ids
    for split, n in (("train", 24), ("val", 4)):
        pan = json.loads((out / split / "panoptic.json").read_text())
        assert len(pan["images"]) == n == len(list((out / split / "images").iterdir()))
        assert len(list((out / split / "panoptic").iterdir())) == n
        assert pan["categories"] == cats
    assert stats["train"]["num_images"] == 24 and stats["val"]["num_images"] == 4


@pytest.mark.parametrize("split", ["train", "val"])
def test_pq_against_itself_is_100(dataset, split):
    out, _ = dataset
    gt_json = json.loads((out / split / "panoptic.json").read_text())
    pred_json = copy.deepcopy(gt_json)
    folder = str(out / split / "panoptic")
    categories = {c["id"]: c for c in gt_json["categories"]}
    pairs = list(zip(gt_json["annotations"], pred_json["annotations"], strict=True))
    stat = panopticapi_evaluation.pq_compute_single_core(0, pairs, folder, folder, categories)
    for isthing, n_expected in ((None, 7), (True, 4), (False, 3)):
        res, _ = stat.pq_average(categories, isthing=isthing)
        if split == "train":  # every class occurs in 24 images
            assert res["n"] == n_expected
        assert res["n"] > 0
        assert res["pq"] == pytest.approx(1.0)
    # panopticapi recomputed each predicted area from the PNG: it must equal the JSON area.
    for gt_ann, pred_ann in pairs:
        for g, p in zip(gt_ann["segments_info"], pred_ann["segments_info"], strict=True):
            assert int(p["area"]) == g["area"]


def test_panoptic_png_matches_json(dataset):
    out, _ = dataset
    pan = json.loads((out / "train" / "panoptic.json").read_text())
    num_void = 0
    for ann in pan["annotations"]:
        ids = _rgb2id(np.asarray(Image.open(out / "train" / "panoptic" / ann["file_name"])))
        segs = ann["segments_info"]
        assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in segs}
        num_void += int((ids == 0).sum())
        stuff_cats = [s["category_id"] for s in segs if s["category_id"] in synthetic.STUFF_IDS]
        assert len(stuff_cats) == len(set(stuff_cats))  # one segment per stuff class
        for s in segs:
            ys, xs = np.nonzero(ids == s["id"])
            assert s["area"] == len(ys)
            assert s["bbox"] == [
                xs.min(),
                ys.min(),
                xs.max() + 1 - xs.min(),
                ys.max() + 1 - ys.min(),
            ]
            assert s["iscrowd"] == 0
    assert num_void > 0  # void borders between stuff regions


@pytest.mark.parametrize("split", ["train", "val"])
def test_instances_json_with_pycocotools(dataset, split):
    out, _ = dataset
    coco = pycocotools_coco.COCO(str(out / split / "instances.json"))
    pan = json.loads((out / split / "panoptic.json").read_text())
    assert sorted(coco.getCatIds()) == sorted(synthetic.THING_IDS)
    num_instances = 0
    for ann_pan in pan["annotations"]:
        ids = _rgb2id(np.asarray(Image.open(out / split / "panoptic" / ann_pan["file_name"])))
        things = [s for s in ann_pan["segments_info"] if s["category_id"] in synthetic.THING_IDS]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[ann_pan["image_id"]]))
        assert sorted(a["id"] for a in anns) == sorted(s["id"] for s in things)
        by_id = {s["id"]: s for s in things}
        for a in anns:
            m = coco.annToMask(a).astype(bool)
            assert m.shape == ids.shape
            assert int(m.sum()) == a["area"]
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [
                xs.min(),
                ys.min(),
                xs.max() + 1 - xs.min(),
                ys.max() + 1 - ys.min(),
            ]
            assert a["iscrowd"] == 0 and a["category_id"] == by_id[a["id"]]["category_id"]
            visible = ids == a["id"]
            assert visible.any() and not (visible & ~m).any()  # amodal mask contains visible
            assert visible.sum() >= 0.3 * m.sum()
            num_instances += 1
    assert num_instances > 0
    assert len(coco.getAnnIds()) == num_instances


def test_tie_on_top_of_person_on_disk(dataset):
    out, _ = dataset
    coco = pycocotools_coco.COCO(str(out / "train" / "instances.json"))
    pan = {
        a["image_id"]: a
        for a in json.loads((out / "train" / "panoptic.json").read_text())["annotations"]
    }
    checked = 0
    for img_id, ann_pan in pan.items():
        ids = _rgb2id(np.asarray(Image.open(out / "train" / "panoptic" / ann_pan["file_name"])))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
        ties = [a for a in anns if a["category_id"] == synthetic.TIE]
        persons = [a for a in anns if a["category_id"] == synthetic.PERSON]
        for t in ties:
            mt = coco.annToMask(t).astype(bool)
            hosts = [p for p in persons if not (mt & ~coco.annToMask(p).astype(bool)).any()]
            assert hosts, "a tie lies inside a person"
            for p in persons:
                both = mt & coco.annToMask(p).astype(bool)
                assert np.all(ids[both] == t["id"])
                checked += int(both.sum())
    assert checked > 0


@pytest.fixture(scope="module")
def many_examples() -> list[synthetic.SyntheticExample]:
    return [synthetic.generate_example(11, "train", i, SIZE) for i in range(200)]


def test_overlap_fraction_and_occlusion_rules(many_examples):
    flags = np.concatenate(
        [synthetic.overlap_flags(e.masks, e.instance_categories) for e in many_examples]
    )
    assert 0.2 <= flags.mean() <= 0.4
    tie_pixels = 0
    for e in many_examples:
        n = len(e.instance_ids)
        assert e.panoptic.dtype == np.int32 and e.masks.shape == (n, *SIZE)
        # Independent reference of the depth rule: at every pixel the visible instance is the
        # covering one with the largest key (is_tie, lowest row of its full mask, index).
        keys = np.asarray(
            [
                (int(c == synthetic.TIE), np.nonzero(m.any(axis=1))[0].max(), i)
                for i, (c, m) in enumerate(zip(e.instance_categories, e.masks, strict=True))
            ],
            np.float64,
        ).reshape(n, 3)
        score = keys[:, 0] * 1e6 + keys[:, 1] * 1e3 + keys[:, 2]
        covered = e.masks.any(axis=0)
        ranked = np.where(e.masks, score[:, None, None], -1.0)
        expected = np.asarray(e.instance_ids)[np.argmax(ranked, axis=0)] if n else None
        if n:
            np.testing.assert_array_equal(e.panoptic[covered], expected[covered])
        # Ties lie on top of persons wherever their full masks overlap.
        for i in np.flatnonzero(e.instance_categories == synthetic.TIE):
            for j in np.flatnonzero(e.instance_categories == synthetic.PERSON):
                both = e.masks[i] & e.masks[j]
                assert np.all(e.panoptic[both] == e.instance_ids[i])
                tie_pixels += int(both.sum())
    assert tie_pixels > 0


def test_class_frequencies_differ(many_examples):
    cats = np.concatenate([e.instance_categories for e in many_examples])
    counts = {c: int((cats == c).sum()) for c in synthetic.THING_IDS}
    total = sum(counts.values())
    assert counts[synthetic.TIE] < 0.12 * total  # the rare class
    assert counts[synthetic.PERSON] > 3 * counts[synthetic.TIE]
    assert counts[synthetic.PERSON] == max(counts.values())
    assert counts[synthetic.TIE] == min(counts.values()) > 0
    # Sizes differ too: persons are the largest, ties and balls small.
    area = {
        c: np.mean([m.sum() for e in many_examples for m in e.masks[e.instance_categories == c]])
        for c in synthetic.THING_IDS
    }
    assert area[synthetic.PERSON] > area[synthetic.CAR] > 3 * area[synthetic.BALL]
    assert area[synthetic.PERSON] > 5 * area[synthetic.TIE]


def _read_all(folder: pathlib.Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_determinism(tmp_path):
    synthetic.generate(str(tmp_path / "a"), 5, 2, seed=7, size=(48, 64))
    synthetic.generate(str(tmp_path / "b"), 5, 2, seed=7, size=(48, 64))
    synthetic.generate(str(tmp_path / "c"), 5, 2, seed=8, size=(48, 64))
    synthetic.generate(str(tmp_path / "d"), 3, 1, seed=7, size=(48, 64))
    a, b, c, d = (_read_all(tmp_path / k) for k in "abcd")
    assert a == b
    assert len(a) == len(c)
    differing = [k for k in a if k.endswith(".png") and a[k] != c[k]]
    assert len(differing) == len([k for k in a if k.endswith(".png")])
    # Images do not depend on the number of images generated.
    for k, v in d.items():
        if "images/" in k or "panoptic/" in k:
            assert a[k] == v
    img = np.asarray(Image.open(tmp_path / "a" / "train" / "images" / "000000000001.png"))
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8


def test_script_runs_from_repo_root(tmp_path):
    out = tmp_path / "s"
    cmd = [sys.executable, "scripts/make_synthetic.py", "--out", str(out), "--num-images", "3"]
    cmd += ["--seed", "1", "--size", "40", "56", "--format", "jpg"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert "overlapping another class" in res.stdout
    pan = json.loads((out / "val" / "panoptic.json").read_text())
    assert len(pan["images"]) == 1  # default max(1, N // 10)
    name = pan["images"][0]["file_name"]
    assert name.endswith(".jpg")
    assert Image.open(out / "val" / "images" / name).size == (56, 40)
    assert pan["images"][0]["id"] == synthetic.image_id("val", 0)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_format"):
        synthetic.generate(str(tmp_path), 1, 1, seed=0, image_format="gif")
    with pytest.raises(ValueError, match="split"):
        synthetic.generate_example(0, "test", 0)
    with pytest.raises(ValueError, match="seed"):
        synthetic.generate_example(-1, "train", 0)


def _overlap_share(knobs: synthetic.Knobs, n: int = 60) -> float:
    ex = [synthetic.generate_example(5, "train", i, SIZE, knobs) for i in range(n)]
    return float(np.concatenate([synthetic.overlap_flags(e.masks, e.instance_categories)
                                 for e in ex]).mean())  # fmt: skip


def test_knob_near_prob_sets_the_overlap_share():
    sparse = _overlap_share(synthetic.Knobs(near_prob=0.0))
    default = _overlap_share(synthetic.Knobs())
    dense = _overlap_share(synthetic.Knobs(near_prob=0.6))
    assert sparse < default < dense
    assert dense > 2 * sparse


def test_knob_defaults_draw_the_same_dataset():
    # Knobs() draws no extra random number: the examples equal those drawn without knobs.
    for i in range(5):
        a = synthetic.generate_example(2, "val", i, SIZE)
        b = synthetic.generate_example(2, "val", i, SIZE, synthetic.Knobs(0.18, 1.0))
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.panoptic, b.panoptic)


def test_knob_depth_consistency_breaks_the_depth_rule():
    """With depth_consistency 0 the visible instance in an overlap of two non-ties is often the
    one whose full mask ends higher in the image (never with the rule)."""

    def higher_on_top(knobs: synthetic.Knobs) -> tuple[int, int]:
        against = pairs = 0
        for i in range(80):
            e = synthetic.generate_example(9, "train", i, SIZE, knobs)
            for a in range(len(e.masks)):
                for b in range(len(e.masks)):
                    cats = e.instance_categories
                    if synthetic.TIE in (cats[a], cats[b]) or a == b:
                        continue
                    both = e.masks[a] & e.masks[b]
                    low_a = np.flatnonzero(e.masks[a].any(axis=1)).max()
                    low_b = np.flatnonzero(e.masks[b].any(axis=1)).max()
                    if not both.any() or low_a >= low_b:
                        continue
                    pairs += 1  # b reaches lower: the rule puts b on top
                    against += int((e.panoptic[both] == e.instance_ids[a]).mean() > 0.5)
        return against, pairs

    against, pairs = higher_on_top(synthetic.Knobs(near_prob=0.5))
    assert pairs > 10 and against == 0
    against, pairs = higher_on_top(synthetic.Knobs(near_prob=0.5, depth_consistency=0.0))
    assert pairs > 10 and against > 0.2 * pairs


def test_knobs_are_validated_and_recorded(tmp_path):
    with pytest.raises(ValueError, match="near_prob"):
        synthetic.Knobs(near_prob=1.5)
    with pytest.raises(ValueError, match="depth_consistency"):
        synthetic.Knobs(depth_consistency=-0.1)
    synthetic.generate(str(tmp_path), 2, 1, seed=1, size=SIZE, knobs=synthetic.Knobs(0.3, 0.7))
    info = json.loads((tmp_path / "val" / "panoptic.json").read_text())["info"]
    assert info["near_prob"] == 0.3 and info["depth_consistency"] == 0.7
