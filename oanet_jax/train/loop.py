"""The training loop: ``train_and_evaluate(config, workdir)`` (flax-examples style, thin).

One call trains from the latest checkpoint in ``workdir`` (or from scratch) to
``config.train.num_steps``:

1. ``jax.distributed`` (when configured), the device mesh, the model (one console line says what
   the SRM is trained on: `oanet_jax.modeling.build.resolve_srm_train_masks`) and the train
   state, restored from ``workdir/checkpoints`` when one exists (sharded on restore; see
   :mod:`oanet_jax.train.checkpoint`).
2. The input pipeline from ``start_step`` = the restored step with the data seed stored in the
   checkpoint, so a resumed run sees exactly the batches the uninterrupted run would have seen.
3. The jitted train step (state donated) and, one step behind (so that the host never waits for
   the step it just dispatched), the host-side bookkeeping of each step's metrics: the non-finite
   check (``train.on_nonfinite``: 'error' raises :class:`NonFiniteLossError` naming the step and
   the loss terms, 'skip' counts the skipped updates), logging and the progress bar.
4. Every ``train.log_every_steps`` steps (and at the last step) one line in
   ``workdir/metrics.jsonl`` and TensorBoard scalars in ``workdir/tensorboard``: every loss term,
   total, lr, grad norm (means over the steps since the previous line), ``images_per_sec`` and
   ``step_time`` (wall seconds per step over the same steps; the first line includes compilation).
5. Checkpoints every ``checkpoint.every_steps`` and at the end. SIGTERM / SIGINT set a flag; the
   loop finishes the step in flight, saves a checkpoint at the current step synchronously
   (waiting for pending asynchronous saves), prints the report and returns normally, so the
   process exits with status 0. A second signal gets the default behaviour.
6. Evaluation every ``eval.every_steps`` and after the last step (``eval.at_end``), with the best
   checkpoint by PQ kept in ``workdir/checkpoints_best`` (:mod:`oanet_jax.train.periodic_eval`).

Step numbering: "step k" is the k-th optimizer update; the state after it has ``state.step == k``
and it consumed training batch ``k - 1`` (0-based). ``metrics.jsonl`` lines, checkpoints and
errors all use this k.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from oanet_jax.common.metric_writer import MetricWriter
from oanet_jax.data import spec as data_spec
from oanet_jax.train import checkpoint as ckpt_lib
from oanet_jax.train.periodic_eval import PeriodicEvaluation

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Metrics that are flags / counters, not averaged loss values.
_FLAG_KEYS = ("nonfinite", "skipped")
LOSS_TERMS = ("rpn_cls", "rpn_box", "cls", "box", "mask", "seg", "srm")


# ---------------------------------------------------------------------------------- helpers


def maybe_generate_synthetic(config: ml_collections.ConfigDict) -> bool:
    """Generates the synthetic dataset at ``config.data.root`` if it is missing.

    Only for configs that describe the synthetic dataset (``config.data.synthetic_num_images``
    exists) and only when ``data.root`` does not exist; process 0 writes, the others wait.

    Returns:
        True if the dataset was generated.
    """
    d = config.data
    if "synthetic_num_images" not in d or d.source != "coco_panoptic" or os.path.exists(d.root):
        return False
    from oanet_jax.data import synthetic

    size = tuple(int(v) for v in d.get("synthetic_size", d.image_size))
    num_val = int(d.get("synthetic_num_val_images", max(1, int(d.synthetic_num_images) // 10)))
    if jax.process_index() == 0:
        print(
            f"Data root {d.root} does not exist: generating the synthetic dataset there "
            f"({d.synthetic_num_images} train + {num_val} val images of {size[0]}x{size[1]}, "
            f"seed {config.seed}).",
            flush=True,
        )
        t0 = time.time()
        tmp = f"{d.root.rstrip('/')}.tmp-{os.getpid()}"
        synthetic.generate(tmp, int(d.synthetic_num_images), num_val, int(config.seed), size)
        os.replace(tmp, d.root)  # atomic: a killed generation leaves no half-written root
        print(f"Synthetic dataset written to {d.root} in {time.time() - t0:.1f} s.", flush=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("oanet_generate_synthetic")
    return True


class StopSignal:
    """Context manager: SIGTERM / SIGINT set :attr:`requested` instead of killing the process.

    The first signal is recorded (and logged); the previous handlers are then restored, so a
    second signal behaves as usual (e.g. a second Ctrl-C raises KeyboardInterrupt). Outside the
    main thread (signals cannot be installed there) it is inert.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        del frame
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logging.warning("Received %s: will save a checkpoint and stop.", self.signal_name)
        print(
            f"\nReceived {self.signal_name}: finishing the current step, saving a checkpoint, "
            "stopping.",
            file=sys.stderr,
            flush=True,
        )
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()


def _any_process(flag: bool) -> bool:
    """True if ``flag`` is True on any process (all processes must call it at the same step)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def _truncate_metrics(path: str, last_step: int) -> int:
    """Drops lines with ``step > last_step`` (written after the checkpoint a run resumes from)."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill: dropped
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return len(lines) - len(kept)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


class _Accumulator:
    """Sums of per-step host metrics between two log lines."""

    def __init__(self) -> None:
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.start = now

    def add(self, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1

    def summary(self, now: float, global_batch: int, last: Mapping[str, float]) -> dict:
        n = max(self.count, 1)
        out = {k: v / n for k, v in self.sums.items() if k not in _FLAG_KEYS and k != "lr"}
        if "lr" in last:
            out["lr"] = float(last["lr"])  # the learning rate of the logged step itself
        for k in _FLAG_KEYS:
            if k in self.sums:
                out[k] = self.sums[k]  # counts over the interval
        elapsed = max(now - self.start, 1e-9)
        out["step_time"] = elapsed / n
        out["images_per_sec"] = global_batch * n / elapsed
        return out


def _host_metrics(metrics: Any) -> dict[str, float]:
    """Device metrics dict -> {name: python float} of its scalar entries."""
    host = jax.device_get(metrics)
    out = {}
    for k, v in host.items():
        if k == "step":  # the step index of train_step's metrics; the loop numbers steps itself
            continue
        arr = np.asarray(v)
        if arr.size == 1:
            out[k] = float(arr.reshape(()))
    return out


def _is_nonfinite(m: Mapping[str, float]) -> bool:
    if "nonfinite" in m:
        return bool(m["nonfinite"])
    return not math.isfinite(m.get("total", 0.0))


def train_batches(
    config: ml_collections.ConfigDict, *, batch_size: int, seed: int, start_step: int
) -> Iterator[dict[str, np.ndarray]]:
    """The default training stream: ``pipeline.build_dataset(config, 'train', ...)`` as numpy.

    Args:
        config: full config.
        batch_size: per-host batch B.
        seed: data seed.
        start_step: batches already consumed; the stream starts at batch ``start_step``.

    Returns:
        Iterator of per-host batch dicts (see :mod:`oanet_jax.data.pipeline`).
    """
    from oanet_jax.data import pipeline

    ds = pipeline.build_dataset(
        config, "train", training=True, batch_size=batch_size, seed=seed, start_step=start_step
    )
    return ds.as_numpy_iterator()


# ------------------------------------------------------------------------------ main entry


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    data_fn: Callable[..., Iterator[Mapping[str, np.ndarray]]] | None = None,
) -> dict[str, Any]:
    """Trains (resuming from ``workdir`` when possible) and returns the final metrics.

    See the module docstring for what is written where.

    Args:
        config: full config (configs/*.py).
        workdir: output folder (checkpoints, metrics.jsonl, TensorBoard events).
        data_fn: the training stream, called as ``data_fn(config, batch_size=B_host, seed=s,
            start_step=k)``; it must yield per-host batch dicts (at least the keys of
            :data:`oanet_jax.data.spec.TRAIN_KEYS`, numpy, leading dim B_host) starting at batch
            ``k`` of the stream of seed ``s`` (exact resume depends on it). Default
            :func:`train_batches`.

    Returns:
        Dict: ``step`` (the last completed step), the means of the last log interval (every loss
        term, ``total``, ``grad_norm``, ``lr``, ``step_time``, ``images_per_sec``),
        ``skipped_steps`` (non-finite steps skipped in this run), ``stopped_by`` (signal name or
        None), ``checkpoint_dir``, ``metrics_file``, ``tensorboard_dir``, ``eval`` (the results
        of the last evaluation during training, see `periodic_eval`; None without one).

    Raises:
        NonFiniteLossError: a non-finite loss with ``train.on_nonfinite == 'error'`` (pending
            checkpoints are committed first).
    """
    from oanet_jax.modeling.build import build_model, resolve_srm_train_masks
    from oanet_jax.train import sharding as sharding_lib
    from oanet_jax.train import state as state_lib
    from oanet_jax.train import step as step_lib

    sharding_lib.maybe_initialize_distributed(config.sharding)
    try:  # keep TensorFlow (input pipeline, summaries) off the accelerators
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):
        pass

    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(workdir, exist_ok=True)
    maybe_generate_synthetic(config)

    t = config.train
    num_steps = int(t.num_steps)
    global_batch = int(t.batch_size)
    if global_batch % jax.process_count():
        raise ValueError(
            f"train.batch_size {global_batch} is not divisible by {jax.process_count()} processes"
        )
    host_batch = global_batch // jax.process_count()
    on_nonfinite = str(t.get("on_nonfinite", "error"))
    if on_nonfinite not in ("error", "skip"):
        raise ValueError(f"train.on_nonfinite must be 'error' or 'skip', got {on_nonfinite!r}")
    log_every = max(1, int(t.log_every_steps))

    mesh = sharding_lib.make_mesh(config.sharding)
    model = build_model(config)
    if is_main:  # one line: which SRM training is in use, and why
        print(resolve_srm_train_masks(config)[1], flush=True)
    state, state_sharding = state_lib.create_train_state(
        config, model, mesh, data_spec.zeros_batch(config.data, global_batch)
    )
    manager = ckpt_lib.TrainCheckpointManager.from_config(config, workdir)
    data_seed = int(config.seed)
    start_step = 0
    restored = manager.restore(ckpt_lib.abstract_state(state, state_sharding))
    if restored is None and t.get("init_checkpoint", ""):
        state = ckpt_lib.init_from_pretrained(state, state_sharding, t.init_checkpoint)
    if restored is not None:
        state, meta = restored
        start_step = int(meta["step"])
        position = int(meta.get("data_position", start_step))
        if int(meta.get("data_seed", data_seed)) != data_seed:
            logging.warning(
                "config.seed %d differs from the checkpoint's data seed %s: continuing the "
                "checkpoint's data stream.",
                data_seed,
                meta.get("data_seed"),
            )
            data_seed = int(meta["data_seed"])
        if int(meta.get("global_batch_size", global_batch)) != global_batch:
            logging.warning(
                "train.batch_size changed from %s to %d: the resumed data stream differs from "
                "the original run's.",
                meta.get("global_batch_size"),
                global_batch,
            )
        if position != start_step:
            logging.warning("data position %d != step %d in the checkpoint", position, start_step)
        logging.info("Restored checkpoint at step %d from %s", start_step, manager.directory)
        if is_main:
            print(f"Resuming from checkpoint step {start_step} ({manager.directory}).", flush=True)
    else:
        position = 0

    metrics_path = os.path.join(workdir, METRICS_FILE)
    if is_main:
        dropped = _truncate_metrics(metrics_path, start_step)
        if dropped:
            logging.info("Dropped %d metrics.jsonl lines after step %d", dropped, start_step)
    writer = MetricWriter(metrics_path, os.path.join(workdir, TENSORBOARD_DIR), enabled=is_main)

    def metadata(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "data_seed": data_seed,
            "data_position": position + (step - start_step),
            "global_batch_size": global_batch,
            "process_count": jax.process_count(),
        }

    train_step = step_lib.jit_train_step(model, config, mesh, state_sharding)

    from tqdm import tqdm

    evaluation = PeriodicEvaluation(config, workdir, model, writer)

    def report_eval(results: Mapping[str, Any]) -> None:
        if is_main:
            tqdm.write(evaluation.summary(results), file=sys.stderr)

    step = start_step
    skipped = 0
    last_logged: dict[str, float] = {}
    stopped_by = None
    accum = _Accumulator()
    pending: tuple[int, Any] | None = None
    progress = tqdm(
        total=num_steps,
        initial=start_step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=not is_main,
        file=sys.stderr,
    )

    def process(item: tuple[int, Any]) -> None:
        """Host bookkeeping of step ``k``: non-finite check, accumulation, logging."""
        nonlocal skipped, last_logged
        k, device_metrics = item
        m = _host_metrics(device_metrics)
        if _is_nonfinite(m):
            terms = {n: m[n] for n in (*LOSS_TERMS, "total", "grad_norm") if n in m}
            if on_nonfinite == "error":
                raise step_lib.NonFiniteLossError(k, terms)
            skipped += 1
            logging.warning(
                "Non-finite loss at step %d (%s): update skipped (%d skipped so far).",
                k,
                ", ".join(f"{n}={v}" for n, v in terms.items()),
                skipped,
            )
        m.setdefault("skipped", 0.0)
        accum.add(m)
        progress.update(1)
        if k % log_every == 0 or k == num_steps:
            now = time.perf_counter()
            summary = accum.summary(now, global_batch, m)
            summary["skipped_total"] = float(skipped)
            writer.write(k, summary, prefix="train/")
            accum.reset(now)
            last_logged = summary
            progress.set_postfix(
                loss=_fmt(summary.get("total", float("nan"))), lr=f"{summary.get('lr', 0):.3g}"
            )

    try:
        with StopSignal() as stop:
            if step < num_steps:
                batches = iter(
                    (data_fn or train_batches)(
                        config, batch_size=host_batch, seed=data_seed, start_step=position
                    )
                )
            accum.reset(time.perf_counter())
            while step < num_steps:
                if _any_process(stop.requested):
                    stopped_by = stop.signal_name or "signal"
                    break
                host_batch_np = next(batches)
                batch = sharding_lib.shard_batch(
                    {key: host_batch_np[key] for key in data_spec.TRAIN_KEYS}, mesh
                )
                state, device_metrics = train_step(state, batch)
                step += 1
                if pending is not None:
                    process(pending)  # step - 1, while `step` runs
                pending = (step, device_metrics)
                if manager.should_save(step) or evaluation.due(step):
                    process(pending)  # never checkpoint an unchecked (possibly non-finite) step
                    pending = None
                    if manager.should_save(step):
                        manager.save(step, state, metadata(step))
                    if evaluation.due(step):
                        report_eval(evaluation.run(step, state, metadata(step)))
            if pending is not None:
                process(pending)
                pending = None
            # Final / on-signal checkpoint (skipped if this step is already saved), synchronous.
            manager.save(step, state, metadata(step), wait=True)
            if stopped_by is None and evaluation.due(step, final=True):
                report_eval(evaluation.run(step, state, metadata(step)))
    finally:
        progress.close()
        writer.close()
        evaluation.close()
        try:
            manager.close()  # waits for pending async saves, also on errors
        except Exception as e:  # noqa: BLE001 - do not mask the original error
            logging.error("Closing the checkpoint manager failed: %s", e)

    result: dict[str, Any] = {
        "step": step,
        **last_logged,
        "skipped_steps": skipped,
        "stopped_by": stopped_by,
        "checkpoint_dir": manager.directory,
        "metrics_file": metrics_path,
        "tensorboard_dir": writer.tb_dir,
        "eval": evaluation.last,
    }
    if is_main:
        print(_report(result, num_steps, manager), flush=True)
    return result


def _report(result: Mapping[str, Any], num_steps: int, manager: Any) -> str:
    """The final console report."""
    lines = []
    if result["stopped_by"]:
        lines.append(
            f"Stopped by {result['stopped_by']} at step {result['step']}/{num_steps}; "
            "checkpoint saved, rerun the same command to resume."
        )
    else:
        lines.append(f"Training finished at step {result['step']}/{num_steps}.")
    losses = [n for n in (*LOSS_TERMS, "total") if n in result]
    if losses:
        lines.append(
            "Final losses (mean over the last log interval): "
            + ", ".join(f"{n} {_fmt(float(result[n]))}" for n in losses)
        )
    if "step_time" in result:
        lines.append(
            f"Last interval: {result['step_time']:.3f} s/step, "
            f"{result['images_per_sec']:.2f} images/s, lr {result.get('lr', float('nan')):.4g}"
        )
    if result["skipped_steps"]:
        lines.append(f"Skipped non-finite steps: {result['skipped_steps']}")
    lines.append(f"Checkpoints: {result['checkpoint_dir']} (steps {manager.all_steps()})")
    if result.get("eval"):
        ev = result["eval"]
        lines.append(
            "Last evaluation: "
            + ", ".join(f"PQ ({o}) {r['PQ']:.1f}" for o, r in ev["panoptic"].items())
            + f"; results in {os.path.dirname(ev['files']['results_json'])}"
        )
        if ev.get("best"):
            b = ev["best"]
            lines.append(
                f"Best checkpoint: step {b['step']} ({b['metric']} {b['value']:.1f}) in "
                f"{os.path.join(os.path.dirname(result['checkpoint_dir']), ckpt_lib.BEST_DIR)}"
            )
    lines.append(f"Metrics: {result['metrics_file']}; TensorBoard: {result['tensorboard_dir']}")
    return "\n".join(lines)
