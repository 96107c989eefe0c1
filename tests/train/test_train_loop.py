"""Tests of oanet_jax/train/loop.py and scripts/train.py.

Fast tests: the loop's helpers (signal flag, metrics log truncation, TensorBoard events, sample
batch vs the real pipeline, synthetic data generation).

Slow tests (``-m slow``) train the tiny config in real subprocesses (``scripts/train.py``):

* exact resume: run A trains NUM_STEPS steps uninterrupted; run B is killed with SIGTERM once its
  metrics.jsonl reaches step KILL_AFTER (it must save a checkpoint and exit 0), then resumed to
  NUM_STEPS by the same command. Per-step losses and the final checkpoint (params, batch_stats,
  opt_state, rng, step) must be bitwise identical. Then a copy of A's run with its latest
  checkpoint truncated resumes from the previous checkpoint and must reach the same final state.
* non-finite handling: a NaN image injected at step NAN_STEP of the real pipeline's stream
  ('error': NonFiniteLossError naming the step; 'skip': update skipped and counted).

Subprocesses run with ONE CPU device (``--xla_force_host_platform_device_count=1``; the 8-device
compile of the model is ~2x slower on the shared 2-core machine; sharded restore onto 8 devices is
tested in test_checkpoint.py) and share a JAX persistent compilation cache in a temporary folder,
so only the first run compiles (identical programs: this does not affect what is compared, the
state and the data position of a resumed run).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from subprocess_env import subprocess_env

from oanet_jax.train import checkpoint as ckpt_lib
from oanet_jax.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[2]
NUM_STEPS = 12  # run A; B is killed at KILL_AFTER <= step < NUM_STEPS and resumed
KILL_AFTER = 3
EVERY = 2  # checkpoint.every_steps
NAN_STEP = 3  # 1-based step whose batch carries a NaN image
LOSS_KEYS = ("rpn_cls", "rpn_box", "cls", "box", "mask", "seg", "srm", "total", "lr", "grad_norm")


# -------------------------------------------------------------------------------- fast tests


def test_stop_signal_sets_flag_and_restores_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with loop.StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not stop.requested and time.time() < deadline:
            time.sleep(0.01)
        assert stop.requested and stop.signal_name == "SIGTERM"
        # After the first signal the previous handler is back (a second one acts as usual).
        assert signal.getsignal(signal.SIGTERM) == previous
    assert signal.getsignal(signal.SIGTERM) == previous
    with loop.StopSignal() as stop:
        assert signal.getsignal(signal.SIGINT) == stop._handler
    assert signal.getsignal(signal.SIGINT) != stop._handler


def test_truncate_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "total": float(s)}) for s in range(1, 7)]
    path.write_text("\n".join(lines) + '\n{"step": 7, "tot')  # last line cut by a kill
    assert loop._truncate_metrics(str(path), 4) == 3
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert loop._truncate_metrics(str(path), 4) == 0
    assert loop._truncate_metrics(str(tmp_path / "missing.jsonl"), 4) == 0


def test_zeros_batch_matches_pipeline(tmp_path):
    from configs import tiny
    from oanet_jax.data import device_transform, pipeline, spec

    config = tiny.get_config()
    config.data.root = str(tmp_path / "data")
    assert loop.maybe_generate_synthetic(config)  # root missing: generated
    assert not loop.maybe_generate_synthetic(config)  # exists: left alone
    assert os.path.isfile(tmp_path / "data" / "train" / "panoptic.json")
    ds = pipeline.build_dataset(config, "train", training=True, batch_size=2, seed=0)
    wire = next(ds.as_numpy_iterator())
    assert spec.is_wire(wire)  # the pipeline ships the wire format; the device finishes it
    real = device_transform.finish_numpy(wire, config.data)
    spec.validate(real, config.data, 2, train=False)
    sample = spec.zeros_batch(config.data, 2)  # what train_and_evaluate initialises with
    assert set(sample) == set(spec.TRAIN_KEYS)
    for k, v in sample.items():
        assert v.shape == real[k].shape and v.dtype == real[k].dtype, k


# -------------------------------------------------------------------------------- slow tests


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return subprocess_env(1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    from oanet_jax.data import synthetic

    root = tmp_path_factory.mktemp("tiny_data") / "data"
    synthetic.generate(str(root), 16, 8, 0, (64, 64))
    return str(root)


def _train_cmd(workdir, data_root, num_steps=NUM_STEPS):
    return [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "--config",
        str(ROOT / "configs" / "tiny.py"),
        "--workdir",
        str(workdir),
        f"--config.data.root={data_root}",
        f"--config.train.num_steps={num_steps}",
        "--config.train.log_every_steps=1",
        f"--config.checkpoint.every_steps={EVERY}",
        "--config.checkpoint.keep=3",
    ]


def _run(cmd, env, log, timeout=600):
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode, pathlib.Path(log).read_text()


def _metrics(workdir) -> list[dict]:
    path = pathlib.Path(workdir) / loop.METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            out.append(json.loads(line))
    return out


def _full_state(workdir, step):
    """Every array of checkpoint `step` (params, batch_stats, opt_state, rng, step) as numpy."""
    import jax
    import orbax.checkpoint as ocp

    path = pathlib.Path(workdir) / ckpt_lib.CHECKPOINT_DIR / str(step) / ckpt_lib.STATE_ITEM
    with ocp.PyTreeCheckpointer() as c:
        meta = c.metadata(str(path))
        meta = getattr(meta, "item_metadata", meta)
        # Host numpy arrays: the restore names its target type, so orbax does not fall back to
        # the saving topology's shardings.
        as_numpy = jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
            dict(meta),
            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
        )
        tree = c.restore(str(path), restore_args=as_numpy)
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _assert_same_state(a, b):
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(x, y, err_msg=str(path))


def _assert_same_losses(ma, mb, steps):
    by_a = {m["step"]: m for m in ma}
    by_b = {m["step"]: m for m in mb}
    for s in steps:
        for k in LOSS_KEYS:
            assert by_a[s][k] == by_b[s][k], (s, k, by_a[s][k], by_b[s][k])  # bitwise (float64
            # repr of the float32 values round-trips exactly through JSON)


@pytest.mark.slow
def test_resume_after_sigterm_is_exact(tmp_path, env, data_root):
    # Run A: uninterrupted.
    run_a = tmp_path / "A"
    rc, out = _run(_train_cmd(run_a, data_root), env, tmp_path / "A.log")
    assert rc == 0, out[-3000:]
    assert "Training finished at step 12/12" in out
    ma = _metrics(run_a)
    assert [m["step"] for m in ma] == list(range(1, NUM_STEPS + 1))
    assert all(np.isfinite(m["total"]) for m in ma)
    assert ckpt_lib.steps_in(str(run_a)) == [8, 10, 12]  # every 2, keep 3

    # Run B: SIGTERM once step >= KILL_AFTER is logged; it saves and exits with status 0.
    run_b = tmp_path / "B"
    with open(tmp_path / "B1.log", "w") as f:
        proc = subprocess.Popen(
            _train_cmd(run_b, data_root), env=env, stdout=f, stderr=subprocess.STDOUT
        )
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if any(m["step"] >= KILL_AFTER for m in _metrics(run_b)):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "run B ended before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    out = (tmp_path / "B1.log").read_text()
    assert rc == 0, out[-3000:]
    assert "Received SIGTERM" in out and "Stopped by SIGTERM" in out
    mb1 = _metrics(run_b)
    stopped = mb1[-1]["step"]
    assert KILL_AFTER <= stopped < NUM_STEPS, f"stopped at {stopped}"
    assert ckpt_lib.steps_in(str(run_b))[-1] == stopped  # saved at the current step
    meta = json.loads((run_b / "checkpoints" / str(stopped) / "metadata" / "metadata").read_text())
    assert meta["step"] == stopped and meta["data_position"] == stopped

    # Resume B with the same command.
    rc, out = _run(_train_cmd(run_b, data_root), env, tmp_path / "B2.log")
    assert rc == 0, out[-3000:]
    assert f"Resuming from checkpoint step {stopped}" in out
    mb = _metrics(run_b)
    assert [m["step"] for m in mb] == list(range(1, NUM_STEPS + 1))
    _assert_same_losses(ma, mb, range(1, NUM_STEPS + 1))
    _assert_same_state(_full_state(run_a, NUM_STEPS), _full_state(run_b, NUM_STEPS))

    # Run C: a copy of A with its latest checkpoint truncated resumes from the previous one.
    run_c = tmp_path / "C"
    shutil.copytree(run_a, run_c)
    for f in glob.glob(str(run_c / "checkpoints" / "12" / "state" / "**" / "*"), recursive=True):
        if os.path.isfile(f) and os.sep + "d" + os.sep in f:
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
    rc, out = _run(_train_cmd(run_c, data_root), env, tmp_path / "C.log")
    assert rc == 0, out[-3000:]
    assert "Checkpoint at step 12" in out and "unreadable" in out
    assert "Resuming from checkpoint step 10" in out
    assert os.path.isdir(run_c / ckpt_lib.CORRUPT_DIR / "12")
    _assert_same_losses(ma, _metrics(run_c), range(1, NUM_STEPS + 1))
    _assert_same_state(_full_state(run_a, NUM_STEPS), _full_state(run_c, NUM_STEPS))


_NAN_SCRIPT = """
import json, sys
from configs import tiny
from oanet_jax.data import device_transform
from oanet_jax.train import loop, step as step_lib
mode, workdir, data_root, nan_step = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
config = tiny.get_config()
config.data.root = data_root
config.train.num_steps = nan_step + 1
config.train.log_every_steps = 1
config.train.on_nonfinite = mode
config.checkpoint.every_steps = 1 if mode == "skip" else 2
config.checkpoint.keep = 10

def data_fn(config, *, batch_size, seed, start_step):
    # The real pipeline's stream, with a NaN pixel in the batch of step `nan_step` (1-based).
    for i, batch in enumerate(loop.train_batches(
            config, batch_size=batch_size, seed=seed, start_step=start_step)):
        if start_step + i + 1 == nan_step:
            # uint8 images cannot hold a NaN (the losses mask every other input): the batch
            # finished on the host, with a float32 image, which the model takes as already
            # normalised (one more trace).
            batch = device_transform.finish_numpy(batch, config.data)
            batch = dict(batch, image=batch["image"].astype("float32"))
            batch["image"][0, 5, 7, 1] = float("nan")
        yield batch

try:
    result = loop.train_and_evaluate(config, workdir, data_fn=data_fn)
except step_lib.NonFiniteLossError as e:
    print("RESULT " + json.dumps({"error": str(e), "error_step": e.step}))
    sys.exit(3)
print("RESULT " + json.dumps({k: result[k] for k in ("step", "nonfinite_skipped")}))
"""


def _result(out: str) -> dict:
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    assert lines, out[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.slow
def test_nonfinite_error_and_skip(tmp_path, env, data_root):
    # 'error': NonFiniteLossError naming the step; nothing after it is checkpointed.
    work = tmp_path / "error"
    cmd = [sys.executable, "-c", _NAN_SCRIPT, "error", str(work), data_root, str(NAN_STEP)]
    rc, out = _run(cmd, env, tmp_path / "error.log")
    assert rc == 3, out[-3000:]
    res = _result(out)
    assert res["error_step"] == NAN_STEP
    assert f"Non-finite loss at step {NAN_STEP}" in res["error"] and "total=nan" in res["error"]
    assert ckpt_lib.steps_in(str(work)) == [2]
    assert [m["step"] for m in _metrics(work)] == [1, 2]

    # 'skip': the update of NAN_STEP is skipped (params and optimizer state unchanged, the step
    # counter advances), counted, and training goes on.
    work = tmp_path / "skip"
    cmd = [sys.executable, "-c", _NAN_SCRIPT, "skip", str(work), data_root, str(NAN_STEP)]
    rc, out = _run(cmd, env, tmp_path / "skip.log")
    assert rc == 0, out[-3000:]
    res = _result(out)
    assert res == {"step": NAN_STEP + 1, "nonfinite_skipped": 1}
    metrics = {m["step"]: m for m in _metrics(work)}
    assert metrics[NAN_STEP]["nonfinite_skipped"] == 1 and np.isnan(metrics[NAN_STEP]["total"])
    assert metrics[NAN_STEP + 1]["nonfinite_skipped_total"] == 1
    for s in (1, 2, NAN_STEP + 1):
        assert metrics[s]["nonfinite_skipped"] == 0 and np.isfinite(metrics[s]["total"])
    before, after = _full_state(work, NAN_STEP - 1), _full_state(work, NAN_STEP)
    for (path, x), (_, y) in zip(before, after, strict=True):
        if "step" in str(path[0]):
            assert int(y) == int(x) + 1
        elif "rng" not in str(path[0]):
            np.testing.assert_array_equal(x, y, err_msg=str(path))
    later = _full_state(work, NAN_STEP + 1)
    params = [(x, y) for (p, x), (_, y) in zip(after, later, strict=True) if "params" in str(p)]
    assert any(not np.array_equal(x, y) for x, y in params)  # the next step updates again


def test_train_and_evaluate_evaluates_and_keeps_the_best(tmp_path, data_root):
    """Evaluation every 2 steps and at the end: results, eval scalars, the best checkpoint."""
    from configs import tiny

    config = tiny.get_config()
    config.data.root = data_root
    config.train.num_steps = 4
    config.checkpoint.every_steps = 3
    config.eval.every_steps = 2
    config.eval.at_end = True
    config.eval.num_images = 4
    workdir = tmp_path / "w"
    result = loop.train_and_evaluate(config, str(workdir))
    assert result["step"] == 4 and result["eval"]["step"] == 4
    assert result["eval"]["num_images"] == 4
    for step in (2, 4):
        saved = json.loads((workdir / f"eval_{step}" / "results.json").read_text())
        assert saved["step"] == step and set(saved["panoptic"]) == {"score", "srm"}
    evals = {m["step"]: m for m in _metrics(workdir) if "eval/panoptic_score/PQ" in m}
    assert sorted(evals) == [2, 4]  # step 4 once: the final evaluation is the periodic one
    for m in evals.values():
        assert {"eval/panoptic_srm/PQ", "eval/bbox/AP", "eval/segm/AP", "eval/stuff/mIoU"} <= set(m)
    # The best checkpoint: the first step with the highest PQ of the SRM ordering (srm/PQ).
    pq = {s: m["eval/panoptic_srm/PQ"] for s, m in evals.items()}
    best = max(pq, key=lambda s: (pq[s], -s))
    assert ckpt_lib.steps_in(str(workdir)) == [3, 4]
    best_dir = workdir / ckpt_lib.BEST_DIR
    assert sorted(int(p.name) for p in best_dir.iterdir() if p.name.isdigit()) == [best]
    assert result["eval"]["best"] == {"step": best, "value": pq[best], "metric": "srm/PQ"}
    _, step = ckpt_lib.restore_variables(str(workdir), best=True)
    assert step == best
    # A rerun of the finished job trains nothing and does not evaluate step 4 again.
    again = loop.train_and_evaluate(config, str(workdir))
    assert again["step"] == 4 and again["eval"] is None
