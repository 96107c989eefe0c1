"""`oanet-study`: the paper's claims on the synthetic benchmark, one command, resumable.

Usage::

    oanet-study --out workdir/study [--preset full] [--arms full_gt,pano] [--seeds 0,1,2]
        [--results docs/RESULTS.md] [--figures docs/figures] [--record docs/study/full]
        [--fresh] [--budget MINUTES] [--dry-run] [--report-only]

For every (arm, seed) of the plan (`oanet_jax.study.plan`), in order: the dataset of the arm's
benchmark setting and seed is generated once (``OUT/data/<setting>-seed<k>``, with its generator
statistics in ``OUT/data/<setting>-seed<k>.stats.json``), then the run trains and evaluates in its
own process (`oanet_jax.study.worker`, log in ``OUT/runs/<arm>/seed<k>/log.txt``). A run with a
``result.json`` is finished and skipped on a rerun; a killed run resumes from its last
checkpoint. After every run the report (`oanet_jax.study.report`) is rewritten from all finished
runs, so it always shows what has been measured; a failed run is reported with its log and the
study goes on (exit status 1 at the end).

The record (``--record``, by default ``docs/study/<preset>/<arm>/seed<k>.json``, in the
repository) keeps a copy of every finished run's ``result.json``. A run that is recorded but not
finished under ``--out`` (a fresh clone, another machine) is restored from its record and counts
as finished, so the study accumulates over sessions that each run some of it (the whole 'full'
preset takes longer than one sitting on a 2-core CPU); its dataset is drawn again from its seed
for the report's statistics and figures. ``--fresh`` ignores the record: every run not finished
under ``--out`` is trained again, and its new result overwrites the record. ``--budget MINUTES``
fits a sitting: no run is started that would end after them (by the median time of the runs so
far, `expected_seconds`); the report is written and the same command later goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from oanet_jax.study import plan, report, worker

__all__ = ["ensure_data", "expected_seconds", "main", "record_path", "restore_records"]


def ensure_data(out: str, preset: plan.Preset, setting: str, seed: int) -> str:
    """Generates the dataset of (setting, seed) at the preset's size unless it exists.

    Returns:
      the data root.
    """
    from oanet_jax.common.files import write_json
    from oanet_jax.data import synthetic

    root = worker.data_root(out, setting, seed)
    stats_path = root + ".stats.json"
    if os.path.isdir(root) and os.path.exists(stats_path):
        return root
    config = worker.build_config(preset, plan.Arm("data", "", setting=setting), seed, out)
    d = config.data
    tmp = root + ".tmp"
    stats = synthetic.generate(
        tmp,
        int(d.synthetic_num_images),
        int(d.synthetic_num_val_images),
        int(seed),
        tuple(int(v) for v in d.synthetic_size),
        knobs=plan.SETTINGS[setting],
    )
    if os.path.isdir(root):  # a copy without statistics (e.g. written by the training loop)
        shutil.rmtree(root)
    os.replace(tmp, root)
    write_json(stats_path, stats, indent=1)
    return root


def record_path(record: str, arm: plan.Arm, seed: int) -> str:
    """Where the record keeps the result of (arm, seed)."""
    return os.path.join(record, arm.name, f"seed{int(seed)}.json")


def restore_records(
    out: str, preset: plan.Preset, record: str, todo: list[tuple[plan.Arm, int]]
) -> list[tuple[plan.Arm, int]]:
    """Copies the recorded results of runs not finished under `out` into their run folders.

    A record of another preset, arm or seed, or of a model before the run's last step, is refused
    (ValueError naming the file): its numbers would be reported as this run's.

    Returns:
      the restored (arm, seed) pairs.
    """
    restored = []
    for arm, seed in todo:
        src = record_path(record, arm, seed)
        dst = os.path.join(worker.run_dir(out, arm, seed), worker.RESULT_FILE)
        if os.path.exists(dst) or not os.path.exists(src):
            continue
        with open(src) as f:
            r = json.load(f)
        if (r.get("preset"), r.get("arm"), r.get("seed")) != (preset.name, arm.name, seed):
            raise ValueError(
                f"{src}: records preset {r.get('preset')!r}, arm {r.get('arm')!r}, seed "
                f"{r.get('seed')!r}, not {preset.name!r}, {arm.name!r}, {seed}"
            )
        steps = int(worker.build_config(preset, arm, seed, out).train.num_steps)
        if r.get("step") != steps:
            raise ValueError(
                f"{src}: records a model of step {r.get('step')}, the run trains {steps} steps "
                "(an interrupted run recorded as finished?)"
            )
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(src, dst)
        restored.append((arm, seed))
    return restored


def _record(out: str, record: str, arm: plan.Arm, seed: int) -> None:
    """Copies a finished run's result into the record."""
    dst = record_path(record, arm, seed)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(os.path.join(worker.run_dir(out, arm, seed), worker.RESULT_FILE), dst)


def _run_one(out: str, preset: plan.Preset, arm: plan.Arm, seed: int) -> tuple[bool, float]:
    """Runs one (arm, seed) in a subprocess; returns (succeeded, seconds)."""
    workdir = worker.run_dir(out, arm, seed)
    os.makedirs(workdir, exist_ok=True)
    cmd = [
        sys.executable, "-m", "oanet_jax.study.worker", "--out", out,
        "--preset", preset.name, "--arm", arm.name, "--seed", str(seed),
    ]  # fmt: skip
    # Seeds of an arm compile the same programs: JAX's persistent cache loads them instead.
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(out, "jax_cache"))
    start = time.perf_counter()
    with open(os.path.join(workdir, "log.txt"), "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    return proc.returncode == 0, time.perf_counter() - start


def expected_seconds(record: str, preset: plan.Preset, this_sitting: list[float]) -> float:
    """How long the next run is expected to take: the median of the runs timed so far.

    The runs of this sitting when there are any (this machine, now), else the recorded runs of
    the preset (their ``seconds``), else 0 (nothing known: the budget alone decides).
    """
    times = list(this_sitting)
    if not times:
        for arm in plan.ARMS:
            for seed in preset.seeds:
                path = record_path(record, arm, seed)
                if os.path.exists(path):
                    with open(path) as f:
                        times.append(float(json.load(f).get("seconds", 0.0)))
    return float(statistics.median(times)) if times else 0.0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="workdir/study", help="runs and data (resumable)")
    p.add_argument("--preset", choices=sorted(plan.PRESETS), default="full")
    p.add_argument("--arms", default="", help="comma-separated arm names (default: all)")
    p.add_argument("--seeds", default="", help="comma-separated seeds (default: the preset's)")
    p.add_argument("--results", default="docs/RESULTS.md", help="the report written")
    p.add_argument("--figures", default="docs/figures", help="the report's figures")
    p.add_argument(
        "--record", default="", help="finished runs' results (default: docs/study/<preset>)"
    )
    p.add_argument(
        "--fresh", action="store_true", help="ignore the record: rerun what --out has not finished"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=0.0,
        help="minutes: start no run that would end after them (0: no limit; see expected_seconds)",
    )
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the report from the finished runs under --out; run nothing",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the study (see the module docstring); returns the exit status."""
    args = _parse(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    preset = plan.PRESETS[args.preset]
    arms = tuple(plan.arm_by_name(n) for n in args.arms.split(",") if n) if args.arms else plan.ARMS
    seeds = tuple(int(s) for s in args.seeds.split(",") if s) or None
    todo = plan.runs(preset, arms, seeds)
    out = os.path.abspath(args.out)
    record = args.record or os.path.join("docs", "study", preset.name)
    if args.dry_run:
        for arm, seed in todo:
            done = os.path.exists(os.path.join(worker.run_dir(out, arm, seed), worker.RESULT_FILE))
            kept = not args.fresh and os.path.exists(record_path(record, arm, seed))
            print(f"{arm.name} seed {seed}: {'done' if done else 'recorded' if kept else 'to run'}")
        return 0
    if not args.fresh:
        for arm, seed in restore_records(out, preset, record, todo):
            ensure_data(out, preset, arm.setting, seed)
            print(f"{arm.name} seed {seed}: restored from {record}", flush=True)
    for arm, seed in todo:  # finished here before the record existed (or under --fresh)
        finished = os.path.join(worker.run_dir(out, arm, seed), worker.RESULT_FILE)
        if os.path.exists(finished) and (
            args.fresh or not os.path.exists(record_path(record, arm, seed))
        ):
            _record(out, record, arm, seed)
    if args.report_only:
        report.write(out, preset, args.results, args.figures)
        print(f"Report {args.results} from the finished runs under {out}", flush=True)
        return 0
    failed, timed = [], []
    study_start = time.perf_counter()
    for k, (arm, seed) in enumerate(todo):
        workdir = worker.run_dir(out, arm, seed)
        if os.path.exists(os.path.join(workdir, worker.RESULT_FILE)):
            print(f"[{k + 1}/{len(todo)}] {arm.name} seed {seed}: done (skipped)", flush=True)
            continue
        elapsed = time.perf_counter() - study_start
        expected = expected_seconds(record, preset, timed)
        if args.budget > 0 and elapsed + expected > args.budget * 60:
            left = sum(
                not os.path.exists(os.path.join(worker.run_dir(out, a, s), worker.RESULT_FILE))
                for a, s in todo[k:]
            )
            print(
                f"Budget of {args.budget:g} min: {elapsed / 60:.1f} min spent, a run takes about "
                f"{expected / 60:.1f}; stopping before {arm.name} seed {seed} ({left} runs left: "
                "the same command goes on from there)",
                flush=True,
            )
            break
        ensure_data(out, preset, arm.setting, seed)
        ok, seconds = _run_one(out, preset, arm, seed)
        timed.append(seconds)
        if ok:
            _record(out, record, arm, seed)
            with open(os.path.join(workdir, worker.RESULT_FILE)) as f:
                pan = json.load(f)["eval"]["panoptic"]
            pq = ", ".join(f"PQ ({o}) {r['PQ']:.1f}" for o, r in pan.items())
            print(
                f"[{k + 1}/{len(todo)}] {arm.name} seed {seed}: {pq} ({seconds:.0f} s)", flush=True
            )
        else:
            failed.append((arm.name, seed))
            print(
                f"[{k + 1}/{len(todo)}] {arm.name} seed {seed}: FAILED after {seconds:.0f} s, "
                f"see {os.path.join(workdir, 'log.txt')}",
                flush=True,
            )
        report.write(out, preset, args.results, args.figures, failed=failed)
    report.write(out, preset, args.results, args.figures, failed=failed)
    print(
        f"Study: {len(todo)} runs ({len(failed)} failed) in "
        f"{(time.perf_counter() - study_start) / 60:.1f} min; report {args.results}",
        flush=True,
    )
    return 1 if failed else 0


def cli() -> None:
    """Console entry point."""
    raise SystemExit(main())


if __name__ == "__main__":
    cli()
