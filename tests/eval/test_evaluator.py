"""The evaluation loop end to end on the tiny synthetic split, and the evaluator API.

* `evaluate` with ``write_predictions``: the written prediction files are re-scored with
  panopticapi's own per-image worker and must give the reported (in-memory) PQ; every metric,
  file and scalar is there.
* `evaluate_params` (evaluation during training): the ground truth is decoded once and the
  inference compiled once across calls; ``num_images`` limits the images; the bare params tree is
  accepted; the numbers equal `evaluate`'s.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json

import flax.linen as nn
import numpy as np
import pytest
from eval_setup import NUM_VAL, SIZE

from oanet_jax.eval import evaluator as ev_lib
from oanet_jax.eval.ground_truth import load_panoptic_ground_truth
from oanet_jax.eval.instances import COCO_METRICS
from oanet_jax.eval.panoptic import PQ_METRICS
from oanet_jax.panoptic import io as pan_io
from oanet_jax.panoptic import pq


@pytest.fixture(scope="module")
def eval_run(tiny_setup, tmp_path_factory):
    config, model, variables, _ = tiny_setup
    config = copy.deepcopy(config)
    # No instances JSON: the AP ground truth is built from the panoptic thing segments.
    config.data.eval.instances_json = ""
    config.eval.write_predictions = True
    workdir = tmp_path_factory.mktemp("workdir")
    results = ev_lib.evaluate(config, model, variables, str(workdir), step=7, progress=False)
    return config, workdir, results


def test_evaluate_writes_valid_coco_panoptic_and_all_metrics(eval_run):
    config, workdir, results = eval_run
    eval_dir = workdir / "eval_7"
    gt = load_panoptic_ground_truth(config.data)
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
    lines = (workdir / "eval" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 7
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
        for m in PQ_METRICS:
            assert 0.0 <= r[m] <= 100.0
        assert set(r["per_class"]) == {c["name"] for c in gt.dataset["categories"]}
        # Our file-based evaluator reads the same files.
        ours = pq.pq_compute(gt.json_path, str(eval_dir / f"panoptic_{ordering}.json"), gt.folder)
        assert 100 * ours["All"]["pq"] == pytest.approx(r["PQ"])

    for kind in ("bbox", "segm"):
        assert set(results[kind]) == set(COCO_METRICS)
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


def _metrics(results):
    return {k: v for k, v in results.items() if k in ("panoptic", "bbox", "segm", "stuff")}


def test_evaluate_params_caches_ground_truth_and_compilation(tiny_setup, eval_run, tmp_path):
    """Evaluation during training: a cached runner, the bare params tree, `num_images`."""
    _, model, variables, _ = tiny_setup
    config = copy.deepcopy(eval_run[0])
    config.eval.write_predictions = False
    params = nn.meta.unbox(variables["params"])  # as the train state holds them

    first = ev_lib.evaluate_params(config, params, 10, str(tmp_path / "a"), model=model)
    runner = ev_lib.get_runner(config)
    assert runner.ground_truth.decode_count == NUM_VAL  # shared by the three evaluators
    assert _metrics(first) == _metrics(eval_run[2])  # in memory == with files, same numbers
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["results.json", "results.md"]

    second = ev_lib.evaluate_params(config, params, 20, str(tmp_path / "b"))
    assert ev_lib.get_runner(config) is runner
    assert runner.ground_truth.decode_count == NUM_VAL  # nothing decoded again
    assert runner.infer._jitted._cache_size() == 1  # nothing compiled again
    assert _metrics(second) == _metrics(first) and second["step"] == 20

    # num_images: the first 3 images of the split (the first batch holds 4), from the config.
    config.eval.num_images = 3
    assert ev_lib.EvalRunner(config, model).num_images == 3  # builds, compiles nothing
    order = runner.evaluators[0].image_ids
    runner.num_images = 3
    limited = runner.run(params, 30, str(tmp_path / "c"))
    assert limited["num_images"] == 3
    assert [ev.image_ids for ev in runner.evaluators[:2]] == [order[:3]] * 2
    assert runner.ground_truth.decode_count == NUM_VAL
    assert runner.infer._jitted._cache_size() == 1


def test_device_pq_backend_equals_host(tiny_setup, tmp_path):
    """pq_backend 'device' (matching inside the jitted inference) == 'host', every PQ number."""
    config, model, variables, _ = tiny_setup
    results = {}
    for backend in ("host", "device"):
        config = copy.deepcopy(config)
        config.eval.pq_backend = backend
        runner = ev_lib.EvalRunner(config, model)
        assert (runner.device_pq is not None) == (backend == "device")
        results[backend] = runner.run(variables, 1, str(tmp_path / backend))
    host, device = results["host"]["panoptic"], results["device"]["panoptic"]
    assert set(host) == set(device) == {"score", "srm"}
    for ordering in host:
        h, d = host[ordering], device[ordering]
        assert h["n"] > 0  # categories with a TP, FP or FN: the comparison is not vacuous
        for key in (*PQ_METRICS, "n", "n_th", "n_st"):
            assert d[key] == pytest.approx(h[key], abs=1e-9), (ordering, key)
        for name, per_class in h["per_class"].items():
            for m in ("PQ", "SQ", "RQ"):
                assert d["per_class"][name][m] == pytest.approx(per_class[m], abs=1e-9)
    dev = runner.device_pq
    assert dev.canvas == SIZE and dev.max_segments >= 1
    assert runner.infer._jitted._cache_size() == 1  # the padded last batch did not recompile


def test_bad_eval_image_raises_data_error_naming_it(tiny_setup, tmp_path):
    """A corrupt image of the eval split stops the evaluation with the reader's DataError
    (file and record named, the skip hint), not TensorFlow's wrapper of it."""
    import shutil

    from oanet_jax.data.coco_panoptic import DataError

    config, model, variables, root = tiny_setup
    bad_root = tmp_path / "data"
    shutil.copytree(root, bad_root)
    name = sorted((bad_root / "val" / "images").iterdir())[1]
    name.write_bytes(name.read_bytes()[:40])
    config = copy.deepcopy(config)
    config.data.root = str(bad_root)
    runner = ev_lib.EvalRunner(config, model)
    with pytest.raises(DataError) as info:
        runner.run(variables, 1, str(tmp_path / "eval"))
    text = str(info.value) + " ".join(getattr(info.value, "__notes__", []))
    assert name.name in text and "skip_bad_records" in text, text
