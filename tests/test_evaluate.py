"""Evaluation, panoptic visualisation and scripts/predict.py.

* End to end: `evaluate` on a tiny synthetic split (48 x 56 images, resized to 55 x 64 inside the
  64 x 64 padding, so the crop/resize back to the original size is exercised) with a freshly
  initialised tiny model (random weights of the model's structure, see
  `_fresh_variables`); the written prediction files are re-scored with panopticapi's own per-image
  worker and must give the reported PQ.
* Ground truth as prediction (real COCO sample, crowd segments included) through the same writing +
  PQ path: PQ 100; the same for stuff mIoU and for COCO AP of the ground truth instances.
* The panoptic -> instances conversion against panopticapi's converter output (COCO sample).
* `paste_mask` against torch's grid_sample; detection rescaling by hand; the stuff confusion matrix
  against a float64 loop.
* Visualisation: sizes, distinct colours, labels, outlines; scripts/predict.py on one image.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from oanet_jax import evaluate as ev
from oanet_jax.data import synthetic
from oanet_jax.data.coco_panoptic import CategoryTable
from oanet_jax.modeling.build import build_model
from oanet_jax.panoptic import io as pan_io
from oanet_jax.panoptic import pq
from oanet_jax.panoptic import visualize as vis

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = (48, 56)
NUM_VAL = 5  # eval batch 4: a second batch with 1 valid and 3 padding examples


# ----------------------------------------------------------------------------- fixtures


def _fresh_variables(model, config):
    """Random variables of the model's exact structure, without compiling `model.init`.

    `jax.eval_shape(model.init)` gives the variable tree (logical-partitioning boxes included);
    the leaves are filled from a seeded generator: conv/dense kernels He-normal (fan-in = all but
    the last axis), biases 0, norm scales 1. Compiling `model.init` of the whole network costs as
    much as compiling inference (~15-30 s on a shared 2-core CPU) and the evaluation needs only
    some fixed random network (its PQ is near 0 either way).
    """
    hp, wp = config.data.image_size
    dummy = {
        "image": jax.ShapeDtypeStruct((1, hp, wp, 3), jnp.float32),
        "image_shape": jax.ShapeDtypeStruct((1, 2), jnp.int32),
    }
    shapes = jax.eval_shape(lambda b: model.init({"params": jax.random.key(0)}, b), dummy)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        name = names[-2] if names[-1] == "value" else names[-1]  # inside a partitioning box
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape), leaf.dtype)
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """Synthetic data, the tiny config pointing at it, the model and fresh variables."""
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(str(root), num_images=1, num_val_images=NUM_VAL, seed=0, size=SIZE)
    config = tiny.get_config()
    config.data.root = str(root)
    model = build_model(config)
    variables = _fresh_variables(model, config)
    return config, model, variables, root


@pytest.fixture(scope="module")
def eval_run(tiny_setup, tmp_path_factory):
    config, model, variables, _ = tiny_setup
    config = copy.deepcopy(config)
    # No instances JSON: the AP ground truth is built from the panoptic thing segments.
    config.data.eval.instances_json = ""
    workdir = tmp_path_factory.mktemp("workdir")
    results = ev.evaluate(config, model, variables, str(workdir), step=7, progress=False)
    return config, workdir, results


# ----------------------------------------------------------------------------- end to end


def test_evaluate_writes_valid_coco_panoptic_and_all_metrics(eval_run):
    config, workdir, results = eval_run
    eval_dir = workdir / "eval_7"
    gt = ev.load_panoptic_ground_truth(config.data)
    assert results["num_images"] == NUM_VAL == len(gt.annotations)

    # Files.
    for name in ("results.json", "results.md", "instances_results.json"):
        assert (eval_dir / name).is_file(), name
    assert (eval_dir / "instances_gt_from_panoptic.json").is_file()
    events = list((workdir / "eval").glob("events.out.tfevents.*"))
    assert len(events) == 1
    import tensorflow as tf

    logged = {
        v.tag: (e.step, float(tf.make_ndarray(v.tensor)))
        for e in tf.compat.v1.train.summary_iterator(str(events[0]))
        for v in e.summary.value
    }
    assert logged["panoptic_srm/PQ"] == (7, pytest.approx(results["panoptic"]["srm"]["PQ"]))
    assert logged["segm/AP"] == (7, pytest.approx(results["segm"]["AP"]))
    assert logged["stuff/mIoU"] == (7, pytest.approx(results["stuff"]["mIoU"]))
    on_disk = json.loads((eval_dir / "results.json").read_text())
    assert on_disk["panoptic"].keys() == {"score", "srm"}

    pan_eval = pytest.importorskip("panopticapi.evaluation")
    categories = {c["id"]: c for c in gt.dataset["categories"]}
    for ordering in ("score", "srm"):
        pred_json = json.loads((eval_dir / f"panoptic_{ordering}.json").read_text())
        folder = eval_dir / f"panoptic_{ordering}"
        assert len(pred_json["annotations"]) == NUM_VAL
        # The random network's confident detections are pasted: the instance path is exercised.
        thing_ids = {c["id"] for c in gt.dataset["categories"] if c["isthing"]}
        assert any(
            s["category_id"] in thing_ids
            for a in pred_json["annotations"]
            for s in a["segments_info"]
        )
        assert pred_json["categories"] == gt.dataset["categories"]
        # Every PNG has the ORIGINAL image size and matches its segments_info exactly.
        for ann in pred_json["annotations"]:
            id_map = pan_io.read_panoptic_png(folder / ann["file_name"])
            assert id_map.shape == SIZE
            ids = set(np.unique(id_map).tolist()) - {0}
            assert ids == {s["id"] for s in ann["segments_info"]}
            for s in ann["segments_info"]:
                assert s["area"] == int(np.sum(id_map == s["id"]))
                assert s["category_id"] in categories
        # panopticapi's own per-image worker reads the files and gives the reported numbers.
        pairs = [
            (gt.annotations[a["image_id"]], a)
            for a in sorted(pred_json["annotations"], key=lambda a: a["image_id"])
        ]
        with contextlib.redirect_stdout(io.StringIO()):
            stat = pan_eval.pq_compute_single_core(
                0, copy.deepcopy(pairs), gt.folder, str(folder), categories
            )
        # The ground truth has things and stuff, so both groups have FN at least (no empty mean).
        ref, _ = stat.pq_average(categories, isthing=None)
        ref_th, _ = stat.pq_average(categories, isthing=True)
        ref_st, _ = stat.pq_average(categories, isthing=False)
        r = results["panoptic"][ordering]
        assert r["PQ"] == pytest.approx(100 * ref["pq"], abs=1e-9)
        assert r["SQ"] == pytest.approx(100 * ref["sq"], abs=1e-9)
        assert r["RQ"] == pytest.approx(100 * ref["rq"], abs=1e-9)
        assert r["PQ_th"] == pytest.approx(100 * ref_th["pq"], abs=1e-9)
        assert r["PQ_st"] == pytest.approx(100 * ref_st["pq"], abs=1e-9)
        for m in ev.PQ_METRICS:
            assert 0.0 <= r[m] <= 100.0
        assert set(r["per_class"]) == {c["name"] for c in gt.dataset["categories"]}
        # Our evaluator reads the same files.
        ours = pq.pq_compute(gt.json_path, str(eval_dir / f"panoptic_{ordering}.json"), gt.folder)
        assert 100 * ours["All"]["pq"] == pytest.approx(r["PQ"])

    for kind in ("bbox", "segm"):
        assert set(results[kind]) == set(ev.COCO_METRICS)
        assert all(v == -1.0 or 0.0 <= v <= 100.0 for v in results[kind].values())
    assert 0.0 <= results["stuff"]["mIoU"] <= 100.0
    assert results["stuff"]["n"] >= 1

    # Instance results: at the original resolution, dataset thing ids.
    inst = json.loads((eval_dir / "instances_results.json").read_text())
    thing_ids = {c["id"] for c in gt.dataset["categories"] if c["isthing"]}
    assert inst["bbox"] and len(inst["bbox"]) == len(inst["segm"])
    for r in inst["bbox"]:
        x, y, w, h = r["bbox"]
        assert r["category_id"] in thing_ids
        assert x >= 0 and y >= 0 and x + w <= SIZE[1] + 1e-6 and y + h <= SIZE[0] + 1e-6
    for r in inst["segm"]:
        assert r["segmentation"]["size"] == list(SIZE)

    md = (eval_dir / "results.md").read_text()
    assert "| score |" in md and "| srm |" in md and "Stuff mIoU" in md


# ----------------------------------------------------------------------------- ground truth


def _gt_as_merge_output(gt_map, segments_info, table, padded):
    """A padded 'merge output' (id map + segment arrays, contiguous ids) equal to the GT."""
    h, w = gt_map.shape
    big = np.zeros(padded, np.int32)
    big[:h, :w] = gt_map
    cats = [table.to_contiguous(s["category_id"]) for s in segments_info]
    segments = {
        "id": np.asarray([s["id"] for s in segments_info], np.int32),
        "category": np.asarray(cats, np.int32),
        "isthing": np.asarray([table.isthing[c] for c in cats]),
        "score": np.ones(len(cats), np.float32),
        "valid": np.asarray([np.any(gt_map == s["id"]) for s in segments_info]),
    }
    return big, segments


def test_ground_truth_as_prediction_scores_100(coco_sample_dir, tmp_path):
    gt_json = json.loads((coco_sample_dir / "panoptic_examples.json").read_text())
    gt_json["categories"] = json.loads(
        (coco_sample_dir / "panoptic_coco_categories.json").read_text()
    )
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(gt_json))
    gt_folder = coco_sample_dir / "panoptic_examples"
    table = CategoryTable.from_categories(gt_json["categories"])
    pred_folder = tmp_path / "pred"
    annotations = []
    stuff = ev.StuffConfusion(table.num_things, table.num_stuff)
    for ann in gt_json["annotations"]:
        gt_map = pan_io.read_panoptic_png(gt_folder / ann["file_name"])
        assert gt_map.max() > (1 << 16)  # real COCO ids use all three bytes
        padded, segments = _gt_as_merge_output(gt_map, ann["segments_info"], table, (700, 704))
        id_map, segs = ev.prediction_to_original(
            padded, segments, gt_map.shape, gt_map.shape, table
        )
        np.testing.assert_array_equal(id_map, gt_map)
        segs = pan_io.write_prediction(str(pred_folder), ann["file_name"], id_map, segs)
        annotations.append(
            {"image_id": ann["image_id"], "file_name": ann["file_name"], "segments_info": segs}
        )
        semantic = ev.semantic_from_panoptic(gt_map, ann["segments_info"], table)
        stuff_pred = np.where(
            semantic >= table.num_things, semantic.astype(np.int64) - table.num_things, -1
        )
        stuff.update(stuff_pred, semantic)
    pred_file = tmp_path / "pred.json"
    pan_io.write_predictions_json(str(pred_file), annotations, gt_json["categories"])
    result = pq.pq_compute(str(gt_file), str(pred_file), str(gt_folder), str(pred_folder))
    summary = ev.summarize_pq(result, table)
    assert summary["PQ"] == pytest.approx(100.0)
    assert summary["PQ_th"] == pytest.approx(100.0) and summary["PQ_st"] == pytest.approx(100.0)
    assert summary["n_th"] > 0 and summary["n_st"] > 0
    assert summary["per_class"]["person"]["PQ"] == pytest.approx(100.0)
    miou = stuff.result(table)
    assert miou["mIoU"] == pytest.approx(100.0) and miou["n"] > 0


def test_instances_from_panoptic_matches_panopticapi_converter(coco_sample_dir):
    from pycocotools import mask as mask_utils

    gt_json = json.loads((coco_sample_dir / "panoptic_examples.json").read_text())
    categories = json.loads((coco_sample_dir / "panoptic_coco_categories.json").read_text())
    gt_json["categories"] = categories
    ours = ev.instances_from_panoptic(gt_json, str(coco_sample_dir / "panoptic_examples"))
    ref = json.loads((coco_sample_dir / "panoptic_coco_detection_format.json").read_text())
    thing_ids = {c["id"] for c in categories if c["isthing"]}
    ref_things = [a for a in ref["annotations"] if a["category_id"] in thing_ids]
    assert len(ours["annotations"]) == len(ref_things) > 0
    assert sum(a["iscrowd"] for a in ours["annotations"]) > 0
    assert {c["id"] for c in ours["categories"]} == thing_ids
    for a, r in zip(ours["annotations"], ref_things, strict=True):
        for key in ("image_id", "category_id", "area", "bbox", "iscrowd"):
            assert a[key] == r[key], key
        np.testing.assert_array_equal(
            mask_utils.decode(a["segmentation"]), mask_utils.decode(r["segmentation"])
        )

    # The ground truth as results: AP 100 for boxes and masks.
    image_ids = [im["id"] for im in ours["images"]]
    crowdless = [a for a in ours["annotations"] if not a["iscrowd"]]
    boxes = [{**a, "score": 1.0} for a in crowdless]
    segms = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "segmentation": a["segmentation"],
            "score": 1.0,
        }
        for a in crowdless
    ]
    for iou_type, res in (("bbox", boxes), ("segm", segms)):
        ap = ev.coco_instance_ap(
            ours, [{k: v for k, v in r.items() if k != "id"} for r in res], image_ids, iou_type
        )
        assert ap["AP"] == pytest.approx(100.0) and ap["AP50"] == pytest.approx(100.0)
    assert ev.coco_instance_ap(ours, [], image_ids, "bbox")["AP"] == 0.0


# ----------------------------------------------------------------------------- host ops


def test_paste_mask_matches_torch_grid_sample():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    h, w, m = 37, 45, 28
    for _ in range(12):
        mask = rng.random((m, m)).astype(np.float32)
        x1, y1 = rng.uniform(-10, 40), rng.uniform(-10, 30)
        box = np.asarray([x1, y1, x1 + rng.uniform(0.5, 30), y1 + rng.uniform(0.5, 25)])
        ours = ev.paste_mask(mask, box, (h, w))
        ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
        gx = (xs - box[0]) / (box[2] - box[0]) * 2 - 1
        gy = (ys - box[1]) / (box[3] - box[1]) * 2 - 1
        grid = torch.from_numpy(np.stack([gx, gy], -1)[None]).double()
        ref = torch.nn.functional.grid_sample(
            torch.from_numpy(mask[None, None]).double(), grid, align_corners=False
        )[0, 0].numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert not ev.paste_mask(np.ones((m, m)), [5, 5, 5, 9], (h, w)).any()


def test_detections_to_coco_rescales_to_the_original_image():
    from pycocotools import mask as mask_utils

    table = CategoryTable.from_categories(synthetic.CATEGORIES)
    boxes = np.asarray([[10, 5, 30, 25], [0, 0, 4, 4], [1, 1, 3, 3]], np.float32)
    masks = np.ones((3, 28, 28), np.float32)
    bbox, segm = ev.detections_to_coco(
        42,
        boxes,
        np.asarray([0.9, 0.8, 0.7]),
        np.asarray([3, 1, 0]),
        np.asarray([True, True, False]),
        masks,
        (50, 100),
        (100, 200),
        table,
    )
    assert len(bbox) == len(segm) == 2
    assert bbox[0]["bbox"] == pytest.approx([20, 10, 40, 40])
    assert bbox[0]["category_id"] == synthetic.TIE and bbox[1]["category_id"] == synthetic.CAR
    assert bbox[0]["score"] == pytest.approx(0.9) and bbox[0]["image_id"] == 42
    decoded = mask_utils.decode(segm[0]["segmentation"])
    assert decoded.shape == (100, 200)
    expected = np.zeros((100, 200), np.uint8)
    expected[10:50, 20:60] = 1
    np.testing.assert_array_equal(decoded, expected)


def test_stuff_confusion_against_loop():
    rng = np.random.default_rng(1)
    num_things, num_stuff = 3, 4
    conf = ev.StuffConfusion(num_things, num_stuff)
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


# ----------------------------------------------------------------------------- visualisation


def test_render_panoptic_sizes_colours_labels_and_outlines():
    table = CategoryTable.from_categories(synthetic.CATEGORIES)
    image = np.full((40, 60, 3), 128, np.uint8)
    id_map = np.zeros((40, 60), np.int32)
    id_map[:, :] = 9  # sky
    id_map[5:20, 5:25] = 1  # person
    id_map[22:38, 30:55] = 2  # person
    id_map[0:4, 0:60] = 0  # void
    segments = [
        {"id": 1, "category_id": synthetic.PERSON, "score": 0.9},
        {"id": 2, "category_id": synthetic.PERSON, "score": 0.6},
        {"id": 9, "category_id": synthetic.SKY},
    ]
    colors = vis.segment_colors(segments, table)
    assert len(set(colors.values())) == 3
    assert colors[1] == tuple(table.colors[0])  # the first person keeps the category colour
    assert colors[9] == tuple(table.colors[table.to_contiguous(synthetic.SKY)])

    plain = vis.render_panoptic(image, id_map, segments, table, labels=False, outlines=False)
    assert plain.shape == (40, 60, 3) and plain.dtype == np.uint8
    interior = {
        sid: tuple(plain[y, x]) for sid, (y, x) in {1: (12, 15), 2: (30, 42), 9: (30, 10)}.items()
    }
    assert len(set(interior.values())) == 3
    assert tuple(plain[1, 1]) == (58, 58, 58)  # void: the image dimmed
    expected = np.round(128 * 0.45 + np.asarray(colors[1]) * 0.55)
    np.testing.assert_allclose(plain[12, 15], expected, atol=1)

    full = vis.render_panoptic(image, id_map, segments, table, scale=3, title="score order")
    assert full.shape[1:] == (180, 3) and full.shape[0] > 120
    body = full[full.shape[0] - 120 :]
    assert tuple(body[3 * 5, 3 * 10]) == vis.THING_OUTLINE  # top edge of person 1
    labelled = vis.render_panoptic(image, id_map, segments, table, scale=3, outlines=False)
    unlabelled = vis.render_panoptic(
        image, id_map, segments, table, scale=3, outlines=False, labels=False
    )
    assert np.any(labelled != unlabelled)

    diff = vis.difference_panel(image, id_map, np.where(id_map == 2, 9, id_map))
    assert tuple(diff[30, 42]) != tuple(diff[12, 15])
    both = vis.side_by_side([full, diff], gap=5)
    assert both.shape == (full.shape[0], 180 + 5 + 60, 3)


# ----------------------------------------------------------------------------- predict.py


def test_predict_script_on_one_image(tiny_setup, tmp_path):
    from oanet_jax.train.checkpoint import TrainCheckpointManager

    config, _, variables, root = tiny_setup
    workdir = tmp_path / "run"
    # As the trainer stores them: unboxed from their logical-partitioning metadata.
    state = {"params": nn.meta.unbox(variables["params"]), "step": jnp.asarray(5, jnp.int32)}
    with TrainCheckpointManager(str(workdir), every_steps=1, keep=1, async_save=False) as mgr:
        mgr.save(5, state, {"data_position": 5}, wait=True)
    image = sorted((root / "val" / "images").iterdir())[0]
    out = tmp_path / "out"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "predict.py"),
            f"--config={ROOT / 'configs' / 'tiny.py'}",
            f"--config.data.root={root}",
            f"--checkpoint={workdir / 'checkpoints' / '5'}",
            f"--out={out}",
            str(image),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    png = out / f"{image.stem}_panoptic.png"
    with Image.open(png) as im:
        width, height = im.size
    scale = vis.display_scale(SIZE)
    assert width == 3 * SIZE[1] * scale + 2 * 6  # score | srm | changed pixels
    assert height > SIZE[0] * scale
    segments = json.loads((out / f"{image.stem}_segments.json").read_text())
    assert set(segments) == {"score", "srm"}
    assert all(s["category_id"] in {c["id"] for c in synthetic.CATEGORIES} for s in segments["srm"])
