"""The study command end to end at the tiny preset: runs, resume/skip, the report's contents."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from oanet_jax.modeling.build import resolve_srm_train_masks
from oanet_jax.study import main as study_main
from oanet_jax.study import plan, report, worker


def test_plan_arms_build_configs(tmp_path):
    """Every arm's overrides name real config fields and reach the config."""
    for preset in plan.PRESETS.values():
        for arm in plan.ARMS:
            c = worker.build_config(preset, arm, 3, str(tmp_path))
            assert c.seed == 3
            assert c.data.root == worker.data_root(str(tmp_path), arm.setting, 3)
            knobs = plan.SETTINGS[arm.setting]
            assert c.data.synthetic_near_prob == knobs.near_prob
            for path, value in arm.overrides:
                node = c
                for p in path.split("."):
                    node = node[p]
                assert node == value
    tiny = plan.PRESETS["tiny"]
    pano = worker.build_config(tiny, plan.arm_by_name("pano"), 0, str(tmp_path))
    assert resolve_srm_train_masks(pano)[0] == "predicted"  # no instances JSON
    full = worker.build_config(tiny, plan.arm_by_name("full_gt"), 0, str(tmp_path))
    assert resolve_srm_train_masks(full)[0] == "gt"
    bad = plan.Arm("bad", "", (("model.no_such_field", 1),))
    with pytest.raises(KeyError, match="model.no_such_field"):
        worker.build_config(plan.PRESETS["tiny"], bad, 0, str(tmp_path))
    with pytest.raises(ValueError, match="unknown study arm"):
        plan.arm_by_name("nope")


def test_contact_share_by_hand():
    import numpy as np

    ids = np.zeros((4, 6), np.int64)
    ids[:, :2], ids[:, 2:4], ids[:, 4:] = 1, 2, 3
    # 1 (person) touches 2 (tie); 2 touches 3 (another person): all three touch another class.
    assert report.contact_share(ids, {1: 1, 2: 5, 3: 1}) == (3, 3)
    # Same class neighbours do not count; 0 (void/stuff) is not a thing.
    assert report.contact_share(ids, {1: 1, 2: 1}) == (0, 2)


def test_hidden_share_by_hand():
    instances = {
        "annotations": [
            {"id": 1, "image_id": 7, "area": 100, "iscrowd": 0},  # shows 49: hidden
            {"id": 2, "image_id": 7, "area": 100, "iscrowd": 0},  # shows 50: not hidden
            {"id": 3, "image_id": 7, "area": 40, "iscrowd": 0},  # no segment: fully hidden
            {"id": 1, "image_id": 8, "area": 10, "iscrowd": 0},  # same id, other image: shows 10
            {"id": 4, "image_id": 8, "area": 90, "iscrowd": 1},  # crowd: not counted
        ]
    }
    panoptic = {
        "annotations": [
            {"image_id": 7, "segments_info": [{"id": 1, "area": 49}, {"id": 2, "area": 50}]},
            {"image_id": 8, "segments_info": [{"id": 1, "area": 10}]},
        ]
    }
    assert report.hidden_share(instances, panoptic) == (2, 4)


@pytest.mark.slow
def test_tiny_study_runs_skips_and_reports(tmp_path, capsys, monkeypatch):
    # The runs are subprocesses on one CPU device (the suite's fake device count is not theirs).
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    out, results, figures = tmp_path / "study", tmp_path / "RESULTS.md", tmp_path / "fig"
    record = tmp_path / "record"
    argv = ["--out", str(out), "--preset", "tiny", "--arms", "full_gt", "--seeds", "0",
            "--record", str(record), "--results", str(results),
            "--figures", str(figures)]  # fmt: skip
    assert study_main.main(argv) == 0
    text = results.read_text()
    full = json.loads((out / "runs" / "full_gt" / "seed0" / "result.json").read_text())
    assert full["step"] == 2 and set(full["eval"]["panoptic"]) == {"score", "srm"}
    assert full["eval"]["occlusion"]["images"] == 8
    assert full["srm_train_masks"] == "gt"
    assert full["commit"] == worker.code_version() and full["commit"][:12] in text
    assert full["machine"] == worker.machine() and f"on {full['machine']} (1 runs)" in text
    assert set(full["merge_variants"]) == set(worker.MERGE_VARIANTS)
    pq = full["eval"]["panoptic"]["score"]["PQ"]
    assert f"| baseline: full masks, score order | 1 | {pq:.1f} |" in text
    assert "Not run yet:" in text and "lambda_0.5 seed 0" in text
    not_run = "| visible masks, SRM trained on GT (seams only) | 0 |" + " not run |" * 5
    assert not_run + " - |" * 5 in text
    recorded = record / "full_gt" / "seed0.json"
    assert json.loads(recorded.read_text()) == full
    assert (figures / "study_curves.svg").exists()
    assert (out / "data" / "default-seed0.stats.json").exists()
    # A rerun skips the finished runs and rewrites the same report.
    mtime = os.path.getmtime(out / "runs" / "full_gt" / "seed0" / "result.json")
    capsys.readouterr()
    assert study_main.main(argv) == 0
    assert capsys.readouterr().out.count("done (skipped)") == 1
    assert os.path.getmtime(out / "runs" / "full_gt" / "seed0" / "result.json") == mtime
    assert results.read_text().split("\n", 3)[3] == text.split("\n", 3)[3]
    # --report-only writes the same report elsewhere and runs nothing.
    again = tmp_path / "again.md"
    argv_report = [*argv[:-4], "--results", str(again), "--figures", str(figures), "--report-only"]
    assert study_main.main(argv_report) == 0
    assert again.read_text().split("\n", 3)[3] == text.split("\n", 3)[3]
    # A fresh --out (a fresh clone) restores the recorded run instead of training it again.
    argv_new = [a if a != str(out) else str(tmp_path / "new") for a in argv]
    capsys.readouterr()
    assert study_main.main(argv_new) == 0
    printed = capsys.readouterr().out
    assert "restored from" in printed and "done (skipped)" in printed
    assert not (tmp_path / "new" / "runs" / "full_gt" / "seed0" / "checkpoints").exists()
    assert results.read_text().split("\n", 3)[3] == text.split("\n", 3)[3]
    # A record of another preset is refused, naming its file.
    other = json.loads(recorded.read_text())
    other["preset"] = "full"
    recorded.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="seed0.json: records preset 'full'"):
        study_main.main([a if a != str(out) else str(tmp_path / "newer") for a in argv])
    other.update(preset="tiny", step=1)
    recorded.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="seed0.json: records a model of step 1, the run trains 2"):
        study_main.main([a if a != str(out) else str(tmp_path / "newest") for a in argv])


def test_interrupted_training_is_not_a_finished_run(tmp_path, monkeypatch):
    """A run whose training a signal stopped early (checkpoint saved, status 0) writes no
    result.json, so the study reruns (resumes) it instead of reporting an unfinished model."""
    from oanet_jax.train import loop

    def stopped(config, workdir):
        return {"stopped_by": "SIGTERM", "step": 1, "metrics_file": ""}

    monkeypatch.setattr(loop, "train_and_evaluate", stopped)
    preset, arm = plan.PRESETS["tiny"], plan.arm_by_name("full_gt")
    with pytest.raises(worker.RunInterrupted, match="stopped by SIGTERM at step 1"):
        worker.run(preset, arm, 0, str(tmp_path))
    assert not os.path.exists(os.path.join(worker.run_dir(str(tmp_path), arm, 0), "result.json"))


def test_budget_starts_no_run_that_would_end_after_it(tmp_path, capsys):
    record = tmp_path / "record"
    tiny = plan.PRESETS["tiny"]
    assert study_main.expected_seconds(str(record), tiny, []) == 0.0  # nothing known
    for seed, seconds in ((1, 100.0), (0, 300.0)):  # lambda_0.5 is not among the runs below
        path = pathlib.Path(
            study_main.record_path(str(record), plan.arm_by_name("lambda_0.5"), seed)
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"seconds": seconds}))
    assert study_main.expected_seconds(str(record), tiny, []) == 200.0  # the record's median
    assert (
        study_main.expected_seconds(str(record), tiny, [30.0, 10.0, 20.0]) == 20.0
    )  # this sitting
    out, results = tmp_path / "study", tmp_path / "RESULTS.md"
    argv = ["--out", str(out), "--preset", "tiny", "--arms", "full_gt", "--seeds", "0,1",
            "--record", str(record), "--results", str(results),
            "--figures", str(tmp_path / "fig"), "--budget", "3"]  # fmt: skip
    assert study_main.main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "Budget of 3 min: 0.0 min spent, a run takes about 3.3; stopping before full_gt " in printed
    )
    assert "seed 0 (2 runs left" in printed
    assert not (out / "runs").exists()  # nothing was started
    assert "full_gt seed 0, full_gt seed 1" in results.read_text()  # the report says what is left
