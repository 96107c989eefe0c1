"""The `jax` artifact end to end: written by ``scripts/export.py`` from a checkpoint, loaded in a
fresh process that imports no flax, model, training code or TensorFlow, equal to the in-process
model; the predictor (``oanet-predict`` given the artifact, in the same fresh process) writes
COCO panoptic PNG + JSON that score the PQ `evaluate` gives from the checkpoint."""

from __future__ import annotations

import copy
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from export_helpers import (
    BATCH,
    EXPORT_SIZE,
    NUM_VAL,
    ORDERING,
    SIZE,
    STEP,
    assert_same_panoptic,
    subprocess_env,
)

from oanet_jax import export
from oanet_jax.data import synthetic
from oanet_jax.eval.ground_truth import load_panoptic_ground_truth
from oanet_jax.panoptic import io as pan_io
from oanet_jax.panoptic import pq

pytestmark = pytest.mark.slow

FORBIDDEN = ("flax", "oanet_jax.modeling", "oanet_jax.train", "tensorflow")

# Runs in a fresh interpreter: load, call, record what is imported, then the predictor.
FRESH_PROCESS = f"""
import json, sys
import numpy as np
from oanet_jax import export
from oanet_jax.data import synthetic

artifact, inputs, out_npz, images_json, pred_dir, resized_json, resized_dir = sys.argv[1:8]
forbidden = {FORBIDDEN!r}

def imported():
    return sorted(m for m in forbidden if any(k == m or k.startswith(m + ".") for k in sys.modules))

model = export.load(artifact)
x = np.load(inputs)
out = model(x["images"], x["image_shapes"], x["orig_shapes"])
np.savez(out_npz, **out)
after_call = imported()
from oanet_jax import predict
with open(images_json) as f:
    images = json.load(f)
try:  # the command line, given the artifact instead of a checkpoint
    predict.main(["predict", f"--checkpoint={{artifact}}", f"--out={{pred_dir}}", *images])
except SystemExit as e:
    assert not e.code, e.code
with open(resized_json) as f:
    resized = json.load(f)
resized_pred = predict.predict_exported(model, resized, resized_dir, overlays=False)[0]
print(json.dumps({{"after_call": after_call, "after_predict": imported(),
                  "platforms": list(model.platforms), "resized_json": resized_pred}}))
"""


@pytest.fixture(scope="module")
def fresh_run(export_setup, tmp_path_factory):
    s = export_setup
    tmp = tmp_path_factory.mktemp("fresh")
    np.savez(tmp / "inputs.npz", **s.inputs)
    images = sorted(str(p) for p in (s.data_root / "val" / "images").iterdir())
    (tmp / "images.json").write_text(json.dumps(images))
    resized = sorted(str(p) for p in (s.resized_root / "val" / "images").iterdir())
    (tmp / "resized.json").write_text(json.dumps(resized))
    script = tmp / "fresh.py"
    script.write_text(FRESH_PROCESS)
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            str(s.artifact),
            str(tmp / "inputs.npz"),
            str(tmp / "out.npz"),
            str(tmp / "images.json"),
            str(tmp / "pred"),
            str(tmp / "resized.json"),
            str(tmp / "pred_resized"),
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    *printed, last = proc.stdout.strip().splitlines()
    report = json.loads(last)
    report["overlays"], report["json"] = printed[:-1], printed[-1]
    with np.load(tmp / "out.npz") as npz:
        outputs = {k: npz[k] for k in npz.files}
    return report, outputs


def test_manifest_states_the_artifact(export_setup):
    manifest = json.loads((export_setup.artifact / export.MANIFEST).read_text())
    assert manifest["inputs"]["images"] == {"shape": [BATCH, 64, 64, 3], "dtype": "uint8"}
    assert manifest["platforms"] == ["cpu"] and manifest["ordering"] == ORDERING
    assert manifest["source"]["step"] == STEP
    isthing = [c["isthing"] for c in manifest["categories"]]
    assert isthing == sorted(isthing, reverse=True)  # things first: contiguous ids
    assert {c["id"] for c in manifest["categories"]} == {c["id"] for c in synthetic.CATEGORIES}
    assert manifest["normalization"]["channel_order"] == "BGR"
    assert manifest["config"]["data"]["image_size"] == [64, 64]
    assert {"jax", "jaxlib", "flax", "python"} <= set(manifest["versions"])
    with np.load(export_setup.artifact / export.PARAMS_FILE) as npz:
        assert len(npz.files) == len(manifest["params"]) > 10
        first = manifest["params"][0]
        assert list(npz["00000"].shape) == first["shape"] and first["path"].startswith("['params']")


def test_fresh_process_imports_no_training_code_and_matches(fresh_run, reference_outputs):
    report, outputs = fresh_run
    assert report["after_call"] == [], report
    assert report["after_predict"] == [], report
    assert report["platforms"] == ["cpu"]
    assert_same_panoptic(outputs, reference_outputs)


def test_loaded_artifact_rejects_wrong_shape_before_xla(export_setup):
    model = export.load(str(export_setup.artifact))
    with pytest.raises(ValueError, match=r"exported shape \[B, Hp, Wp, 3\] = \(2, 64, 64, 3\)"):
        model(np.zeros((1, 64, 64, 3), np.uint8))


def test_predictor_maps_back_to_the_original_size(fresh_run):
    report, _ = fresh_run
    pred = json.loads(pathlib.Path(report["resized_json"]).read_text())
    assert len(pred["annotations"]) == NUM_VAL
    folder = report["resized_json"][: -len(".json")]
    for ann in pred["annotations"]:  # original size, consistent with segments_info
        id_map = pan_io.read_panoptic_png(f"{folder}/{ann['file_name']}")
        assert id_map.shape == SIZE
        assert set(np.unique(id_map).tolist()) - {0} == {g["id"] for g in ann["segments_info"]}
        for g in ann["segments_info"]:
            assert g["area"] == int(np.sum(id_map == g["id"]))


def test_predictor_png_json_give_evaluate_pq(export_setup, fresh_run):
    from oanet_jax.eval.evaluator import evaluate_checkpoint

    s = export_setup
    report, _ = fresh_run
    pred = json.loads(pathlib.Path(report["json"]).read_text())
    assert len(pred["annotations"]) == NUM_VAL == len(report["overlays"])
    assert all(pathlib.Path(p).is_file() for p in report["overlays"])

    config = copy.deepcopy(s.config)
    config.eval.write_predictions = True
    results = evaluate_checkpoint(config, str(s.workdir), orderings=(ORDERING,), progress=False)
    gt = load_panoptic_ground_truth(config.data)
    ours = pq.pq_compute(gt.json_path, report["json"], gt.folder)
    expected = results["panoptic"][ORDERING]
    assert 100 * ours["All"]["pq"] == pytest.approx(expected["PQ"], abs=1e-9)
    assert 100 * ours["Things"]["pq"] == pytest.approx(expected["PQ_th"], abs=1e-9)
    assert 100 * ours["Stuff"]["pq"] == pytest.approx(expected["PQ_st"], abs=1e-9)
    # Not two empty predictions: the same segments, things and stuff, in the same pixels. Not
    # bit for bit: `evaluate` runs batches of 4 split over 4 devices, the artifact batches of 2
    # on one, and XLA's float results differ in the last bits with the shapes (a mask
    # probability at the 0.5 threshold can flip a pixel): here 1 pixel of 5 x 4096.
    eval_json = s.workdir / f"eval_{STEP}" / f"panoptic_{ORDERING}.json"
    by_id = {a["image_id"]: a for a in json.loads(eval_json.read_text())["annotations"]}
    categories, differ = set(), 0
    for ann in pred["annotations"]:
        ref = by_id[ann["image_id"]]
        ours_map = pan_io.read_panoptic_png(pathlib.Path(report["json"][:-5]) / ann["file_name"])
        ref_map = pan_io.read_panoptic_png(eval_json.with_suffix("") / ref["file_name"])
        differ += int(np.sum(ours_map != ref_map))
        key = lambda g: (g["id"], g["category_id"])
        assert sorted(map(key, ann["segments_info"])) == sorted(map(key, ref["segments_info"]))
        categories |= {g["category_id"] for g in ann["segments_info"]}
    assert differ <= 0.001 * NUM_VAL * EXPORT_SIZE[0] * EXPORT_SIZE[1]
    thing_ids = {c["id"] for c in synthetic.CATEGORIES if c["isthing"]}
    assert categories & thing_ids and categories - thing_ids
