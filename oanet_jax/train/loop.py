"""The training loop: ``train_and_evaluate(config, workdir)`` (flax-examples style, thin).

One call trains from the latest checkpoint in ``workdir`` (or from scratch) to
``config.train.num_steps``:

1. ``jax.distributed`` (when configured), the device mesh, the model (one console line says what
   the SRM is trained on: `oanet_jax.modeling.build.resolve_srm_train_masks`) and the train
   state, restored from ``workdir/checkpoints`` when one exists (sharded on restore; see
   :mod:`oanet_jax.train.checkpoint`). A new run of ``model.norm='frozen_bn'`` without
   ``train.init_checkpoint`` is refused first (:func:`check_norm_init`).
2. The input pipeline from ``start_step`` = the restored step with the data seed stored in the
   checkpoint, so a resumed run sees exactly the batches the uninterrupted run would have seen.
   The batches come from a daemon thread (:class:`_BatchFetcher`), so that the main thread
   never blocks in the input pipeline. They arrive in the wire format (images at their source
   size) and are finished on the device (resize, flip, padding, mask crops:
   :mod:`oanet_jax.data.device_transform`) before the step; a ``data_fn`` may also yield batches
   of the batch spec, which go to the step as they are. A bad record raises the pipeline's
   ``DataError`` (file and record first, one line of context, the ``data.skip_bad_records``
   hint); with skipping on, a full pass that yields nothing raises ``AllRecordsSkippedError``.
3. The jitted train step (state donated) and, one step behind (so that the host never waits for
   the step it just dispatched), the host-side bookkeeping of each step's metrics
   (:class:`_StepLog`): the non-finite check (``train.on_nonfinite``: 'error' raises
   :class:`NonFiniteLossError` naming the step and the loss terms, 'skip' counts the skipped
   updates), logging and the progress bar.
4. Every ``train.log_every_steps`` steps (and at the last step) one line in
   ``workdir/metrics.jsonl`` and TensorBoard scalars in ``workdir/tensorboard``: every loss term,
   total, lr, grad norm (means over the steps since the previous line, ``interval_steps`` of
   them), ``images_per_sec`` and ``step_time`` (wall seconds per step over the same steps; the
   first line includes compilation), ``nonfinite_skipped`` / ``nonfinite_skipped_total``
   (non-finite steps skipped in the interval / in all), and with the default stream
   ``skipped_records/<reason>`` / ``skipped_records_total`` (distinct bad records this process
   skipped so far with ``data.skip_bad_records``). The open interval is stored with every
   checkpoint, so a resumed run logs exactly the lines (and values) an uninterrupted run logs.
5. Checkpoints every ``checkpoint.every_steps`` and at the end. SIGTERM / SIGINT set a flag; the
   loop finishes the step in flight (or stops waiting for the input pipeline), writes the open
   interval as a line marked ``partial`` (dropped by the resumed run, which logs the interval
   in full), saves a checkpoint at the current step synchronously (waiting for pending
   asynchronous saves), prints the report (the losses of that last interval) and returns
   normally, so the process exits with status 0. A second signal gets the default behaviour.
   With several processes the stop is agreed at a step boundary (all processes stop at the
   same step), so a process blocked in its input pipeline answers once its batch arrives.
6. Evaluation every ``eval.every_steps`` and after the last step (``eval.at_end``), with the best
   checkpoint by PQ kept in ``workdir/checkpoints_best`` (:mod:`oanet_jax.train.periodic_eval`).

Step numbering: "step k" is the k-th optimizer update; the state after it has ``state.step == k``
and it consumed training batch ``k - 1`` (0-based). ``metrics.jsonl`` lines, checkpoints and
errors all use this k.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import queue
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
from oanet_jax.config_check import announce_synthetic_generation, validate_config
from oanet_jax.data import device_transform
from oanet_jax.data import spec as data_spec
from oanet_jax.data.transforms import TransformConfig
from oanet_jax.train import checkpoint as ckpt_lib
from oanet_jax.train.periodic_eval import PeriodicEvaluation

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Metrics that are flags / counters, not averaged loss values.
_FLAG_KEYS = ("nonfinite", "nonfinite_skipped")
# metrics.jsonl keys: records dropped by data.skip_bad_records (``skipped_records/<reason>``,
# ``skipped_records_total``), never to be confused with the non-finite steps above.
SKIPPED_RECORDS_KEY = "skipped_records"
PARTIAL_KEY = "partial"  # 1 on a line written at a stop: its interval is not complete
INTERVAL_KEY = "interval_steps"  # the number of steps a line averages
LOG_INTERVAL_KEY = "log_interval"  # checkpoint metadata: the open log interval
LOSS_TERMS = ("rpn_cls", "rpn_box", "cls", "box", "mask", "seg", "srm")


# ---------------------------------------------------------------------------------- helpers


def maybe_generate_synthetic(config: ml_collections.ConfigDict) -> bool:
    """Generates the synthetic dataset at ``config.data.root`` if this process does not see it.

    Only for configs that describe the synthetic dataset (``config.data.synthetic_num_images``
    exists) and only when ``data.root`` does not exist. No shared filesystem is assumed: every
    process that does not see the root writes the dataset itself (it is byte-identical for the
    same config, see :func:`oanet_jax.data.synthetic.generate`), into a temporary folder unique to
    the host and process, renamed into place atomically. On a shared filesystem several processes
    may generate at once; the first rename wins and the others delete their copy. No process
    waits for another, so there is nothing to time out.

    Returns:
        True if this process generated the dataset (False if it existed or another process's
        copy was renamed into place first).
    """
    d = config.data
    if "synthetic_num_images" not in d or d.source != "coco_panoptic" or os.path.exists(d.root):
        return False
    import shutil
    import socket

    from oanet_jax.data import synthetic

    size = tuple(int(v) for v in d.get("synthetic_size", d.image_size))
    num_val = int(d.get("synthetic_num_val_images", max(1, int(d.synthetic_num_images) // 10)))
    if jax.process_count() > 1:
        print(
            f"Data root {d.root} does not exist for process {jax.process_index()}: generating "
            "its own copy of the synthetic dataset.",
            flush=True,
        )
    announce_synthetic_generation(d.root, int(d.synthetic_num_images), num_val, size)
    t0 = time.time()
    tmp = f"{d.root.rstrip('/')}.tmp-{socket.gethostname()}-{jax.process_index()}-{os.getpid()}"
    synthetic.generate(
        tmp,
        int(d.synthetic_num_images),
        num_val,
        int(config.seed),
        size,
        knobs=synthetic.Knobs.from_config(d),
    )
    try:
        os.replace(tmp, d.root)  # atomic: a killed generation leaves no half-written root
    except OSError:
        if not os.path.isdir(d.root):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process's identical copy came first
        print(f"Synthetic dataset at {d.root} was written by another process.", flush=True)
        return False
    print(f"Synthetic dataset written to {d.root} in {time.time() - t0:.1f} s.", flush=True)
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


def _truncate_metrics(path: str, last_step: int, *, drop_partial_at: int | None = None) -> int:
    """Drops lines with ``step > last_step`` (written after the checkpoint a run resumes from).

    Args:
        path: metrics.jsonl.
        last_step: the step the run resumes from.
        drop_partial_at: also drop the ``partial`` training line of this step (written at a
            stop; the resumed run logs that interval in full because the checkpoint holds it).

    Returns:
        The number of lines dropped.
    """
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill: dropped
        if step > last_step or (step == drop_partial_at and record.get(PARTIAL_KEY)):
            continue
        kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return len(lines) - len(kept)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


class _Accumulator:
    """Sums of per-step host metrics between two log lines (saved with each checkpoint)."""

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

    def state_dict(self, now: float) -> dict[str, Any]:
        """JSON-serialisable state: the sums, the step count and the wall time so far."""
        return {"sums": dict(self.sums), "count": self.count, "elapsed": now - self.start}

    def load(self, state: Mapping[str, Any], now: float) -> None:
        """Continues the interval of :meth:`state_dict` (sums add up exactly as uninterrupted)."""
        self.sums = {str(k): float(v) for k, v in state["sums"].items()}
        self.count = int(state["count"])
        self.start = now - float(state["elapsed"])

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
        out[INTERVAL_KEY] = float(self.count)
        return out


class _StepLog:
    """Host bookkeeping of each step: non-finite check, the log interval, metrics.jsonl lines.

    Every ``log_every`` steps (and at the last step) one line: the means of the interval (see
    :class:`_Accumulator`), ``nonfinite_skipped_total`` and, when the data source reports them,
    the records it skipped (``skipped_records/<reason>``, ``skipped_records_total``: distinct
    records skipped by this process's input pipeline so far). The open interval travels with
    each checkpoint (:meth:`checkpoint_state`), so a resumed run logs it in full; a stop writes
    it as a line marked ``partial`` (:meth:`write_partial`), which the resumed run drops.
    """

    def __init__(
        self,
        writer: MetricWriter,
        progress: Any,
        *,
        log_every: int,
        num_steps: int,
        global_batch: int,
        on_nonfinite: str,
    ) -> None:
        self.writer = writer
        self.progress = progress
        self.log_every = log_every
        self.num_steps = num_steps
        self.global_batch = global_batch
        self.on_nonfinite = on_nonfinite
        self.accum = _Accumulator()
        self.nonfinite_skipped = 0
        self.skipped_records: Callable[[], dict[str, int]] | None = None
        self.last: dict[str, float] = {}
        self.last_step: int | None = None
        self._partial_next = False
        self._step_metrics: dict[str, float] = {}  # the last processed step's (for its lr)
        self._elapsed_before = 0.0

    def resume(self, meta: Mapping[str, Any], start_step: int) -> bool:
        """Continues the open interval stored in checkpoint metadata ``meta``, if it is there.

        Returns:
            True if the interval was restored (else the next line is marked ``partial`` when
            ``start_step`` is not at a line boundary).
        """
        self.nonfinite_skipped = int(meta.get("nonfinite_skipped_total", 0))
        interval = meta.get(LOG_INTERVAL_KEY)
        if interval is not None:
            self.accum.load(interval, time.perf_counter())
            self._elapsed_before = float(interval["elapsed"])
            return True
        # A checkpoint without it (an older run): the next line averages fewer steps; say so.
        self._partial_next = start_step % self.log_every != 0
        return False

    def start_clock(self) -> None:
        """Times the interval from now (plus the wall time it had before a resume)."""
        self.accum.start = time.perf_counter() - self._elapsed_before

    def checkpoint_state(self) -> dict[str, Any]:
        """Metadata to store with a checkpoint: the open interval and the non-finite total."""
        return {
            LOG_INTERVAL_KEY: self.accum.state_dict(time.perf_counter()),
            "nonfinite_skipped_total": self.nonfinite_skipped,
        }

    def process(self, k: int, device_metrics: Any) -> None:
        """Step ``k``'s metrics: non-finite check, accumulation, the log line when due.

        Raises:
            NonFiniteLossError: a non-finite step with ``on_nonfinite == 'error'``.
        """
        from oanet_jax.train import step as step_lib

        m = _host_metrics(device_metrics)
        if _is_nonfinite(m):
            terms = {n: m[n] for n in (*LOSS_TERMS, "total", "grad_norm") if n in m}
            if self.on_nonfinite == "error":
                raise step_lib.NonFiniteLossError(k, terms)
            self.nonfinite_skipped += 1
            logging.warning(
                "Non-finite loss at step %d (%s): update skipped (%d skipped so far).",
                k,
                ", ".join(f"{n}={v}" for n, v in terms.items()),
                self.nonfinite_skipped,
            )
        m.setdefault("nonfinite_skipped", 0.0)
        self.accum.add(m)
        self._step_metrics = m
        self.progress.update(1)
        if k % self.log_every == 0 or k == self.num_steps:
            self._write(k, partial=self._partial_next, reset=True)
            self._partial_next = False

    def write_partial(self, k: int) -> None:
        """At a stop: the open interval (steps since the last line) as a ``partial`` line."""
        if self.accum.count and self._step_metrics and self.last_step != k:
            self._write(k, partial=True, reset=False)

    def _write(self, k: int, *, partial: bool, reset: bool) -> None:
        now = time.perf_counter()
        summary = self.accum.summary(now, self.global_batch, self._step_metrics)
        summary["nonfinite_skipped_total"] = float(self.nonfinite_skipped)
        if self.skipped_records is not None:
            counts = self.skipped_records()
            for reason, count in counts.items():
                summary[f"{SKIPPED_RECORDS_KEY}/{reason}"] = float(count)
            summary[f"{SKIPPED_RECORDS_KEY}_total"] = float(sum(counts.values()))
        if partial:
            summary[PARTIAL_KEY] = 1.0
        self.writer.write(k, summary, prefix="train/")
        if reset:
            self.accum.reset(now)
        self.last, self.last_step = summary, k
        self.progress.set_postfix(
            loss=_fmt(summary.get("total", float("nan"))), lr=f"{summary.get('lr', 0):.3g}"
        )


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
    """The default training stream: ``pipeline.numpy_batches(config, 'train', ...)``.

    Args:
        config: full config.
        batch_size: per-host batch B.
        seed: data seed.
        start_step: batches already consumed; the stream starts at batch ``start_step``.

    Returns:
        Iterator of per-host batch dicts (see :mod:`oanet_jax.data.pipeline`); it reports the
        records it skipped (``skipped_records()``) and raises the pipeline's own errors (a
        ``DataError`` naming file and record) rather than TensorFlow's wrapper.
    """
    from oanet_jax.data import pipeline

    return pipeline.numpy_batches(
        config, "train", training=True, batch_size=batch_size, seed=seed, start_step=start_step
    )


class _BatchFetcher:
    """Takes batches from the training stream in a daemon thread.

    The main thread waits for the next batch in short slices, so a stop signal is honoured
    within a fraction of a second even while the input pipeline is busy (or never yields): a
    blocked ``next`` in the main thread would not even run Python's signal handler. Errors of
    the stream are re-raised in the main thread. :meth:`close` closes the stream when it can be
    closed (``close()``, e.g. :class:`oanet_jax.data.pipeline.NumpyBatches`) and lets the thread
    end; a stream blocked for good is left to its daemon thread.
    """

    _END = object()

    def __init__(self, iterator: Iterator[Mapping[str, np.ndarray]]) -> None:
        self.iterator = iterator
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="oanet-train-batches", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                item: Any = next(self.iterator)
            except StopIteration:
                item = self._END
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                item = e
            while not self._closed.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item is self._END or isinstance(item, BaseException):
                return

    def get(self, stop: Callable[[], bool]) -> Mapping[str, np.ndarray] | None:
        """The next batch, or None once ``stop()`` is true while waiting for it.

        Raises:
            StopIteration: the stream ended.
            Exception: whatever the stream raised.
        """
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if stop():
                    return None
                continue
            if item is self._END:
                raise StopIteration("the training stream ended")
            if isinstance(item, BaseException):
                raise item
            return item

    def close(self, timeout: float = 3.0) -> None:
        """Stops the thread (closing the stream when it can be) and waits up to ``timeout``."""
        self._closed.set()
        close = getattr(self.iterator, "close", None)
        if callable(close) and not inspect.isgenerator(self.iterator):
            close()  # (a generator's close cannot interrupt the thread that runs it)
        self._thread.join(timeout)


def check_norm_init(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses FrozenBN trained from scratch (no ``train.init_checkpoint``, nothing to resume).

    Frozen batch norm keeps its statistics fixed; randomly initialised they are the identity,
    so a ResNet without pretrained weights has no normalisation at all and its activations and
    losses explode from the first step (on the COCO sample, ResNet-18 at 640x640: classification
    loss ~7e3, gradient norm ~1e5). That run can only waste compute, so it is refused before
    anything is built; resuming a run (a checkpoint in ``workdir``) is always allowed.

    Raises:
        ValueError: naming ``train.init_checkpoint`` and ``model.norm`` as the ways out.
    """
    if str(config.model.norm) != "frozen_bn" or config.train.get("init_checkpoint", ""):
        return
    if ckpt_lib.steps_in(workdir):
        return
    raise ValueError(
        "model.norm='frozen_bn' without train.init_checkpoint: frozen batch-norm statistics of "
        "a randomly initialised backbone are the identity, so training from scratch diverges "
        "(losses in the thousands from the first step). Either set "
        "--config.train.init_checkpoint=DIR (pretrained weights converted with oanet-convert) "
        "or train the backbone with trainable normalisation: --config.model.norm=group_norm "
        "(or batch_norm)."
    )


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
            :func:`train_batches`. A stream with ``skipped_records()`` (as the default) has its
            skipped records logged; one with ``close()`` is closed at the end.

    Returns:
        Dict: ``step`` (the last completed step), the values of the last metrics line (every
        loss term, ``total``, ``grad_norm``, ``lr``, ``step_time``, ``images_per_sec``: means
        over its interval, ``interval_steps``; at a stop, the interval up to ``step``, marked
        ``partial``), ``logged_step`` (the step of that line), ``nonfinite_skipped`` (non-finite
        steps skipped, resumed runs included), ``skipped_records`` ({reason: count} of records
        skipped by ``data.skip_bad_records`` in this process; {} when none or unknown),
        ``stopped_by`` (signal name or None), ``checkpoint_dir``, ``metrics_file``,
        ``tensorboard_dir``, ``eval`` (the results of the last evaluation during training, see
        `periodic_eval`; None without one).

    Raises:
        ValueError: ``model.norm='frozen_bn'`` without ``train.init_checkpoint`` for a new run
            (:func:`check_norm_init`).
        NonFiniteLossError: a non-finite loss with ``train.on_nonfinite == 'error'`` (pending
            checkpoints are committed first).
        DataError: a bad record of the training data without ``data.skip_bad_records``.
        AllRecordsSkippedError: with it, a full pass over the data yielded no example.
    """
    from oanet_jax.modeling.build import build_model, resolve_srm_train_masks
    from oanet_jax.train import sharding as sharding_lib
    from oanet_jax.train import state as state_lib
    from oanet_jax.train import step as step_lib

    sharding_lib.maybe_initialize_distributed(config.sharding)
    validate_config(config, "train")  # after distributed init: the mesh spans every process
    try:  # keep TensorFlow (input pipeline, summaries) off the accelerators
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):
        pass

    workdir = os.path.abspath(workdir)
    check_norm_init(config, workdir)
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(workdir, exist_ok=True)
    maybe_generate_synthetic(config)

    t = config.train
    num_steps = int(t.num_steps)
    global_batch = int(t.batch_size)
    on_nonfinite = str(t.get("on_nonfinite", "error"))
    if on_nonfinite not in ("error", "skip"):
        raise ValueError(f"train.on_nonfinite must be 'error' or 'skip', got {on_nonfinite!r}")
    log_every = max(1, int(t.log_every_steps))

    mesh = sharding_lib.make_mesh(config.sharding)
    host_batch = sharding_lib.host_batch_size(global_batch, mesh)
    model = build_model(config)
    if is_main:  # one line: which SRM training is in use, and why
        print(resolve_srm_train_masks(config)[1], flush=True)
    state, state_sharding = state_lib.create_train_state(
        config, model, mesh, data_spec.zeros_batch(config.data, global_batch)
    )
    sharding_lib.sync_processes("state_initialized")
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
    interval_restored = restored is not None and LOG_INTERVAL_KEY in restored[1]
    if is_main:
        # The lines after the checkpoint, and the partial line of the resumed step when its
        # interval continues from the checkpoint (the writer appends after this).
        dropped = _truncate_metrics(
            metrics_path, start_step, drop_partial_at=start_step if interval_restored else None
        )
        if dropped:
            logging.info("Dropped %d metrics.jsonl lines after step %d", dropped, start_step)
    writer = MetricWriter(metrics_path, os.path.join(workdir, TENSORBOARD_DIR), enabled=is_main)

    from tqdm import tqdm

    progress = tqdm(
        total=num_steps,
        initial=start_step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=not is_main,
        file=sys.stderr,
    )
    log = _StepLog(
        writer,
        progress,
        log_every=log_every,
        num_steps=num_steps,
        global_batch=global_batch,
        on_nonfinite=on_nonfinite,
    )
    if restored is not None:
        log.resume(restored[1], start_step)

    def metadata(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "data_seed": data_seed,
            "data_position": position + (step - start_step),
            "global_batch_size": global_batch,
            "process_count": jax.process_count(),
            **log.checkpoint_state(),
        }

    train_step = sharding_lib.sync_after_first_compile(
        step_lib.jit_train_step(model, config, mesh, state_sharding), "train_step"
    )
    evaluation = PeriodicEvaluation(config, workdir, model, writer)

    def report_eval(results: Mapping[str, Any]) -> None:
        if is_main:
            tqdm.write(evaluation.summary(results), file=sys.stderr)

    step = start_step
    stopped_by = None
    pending: tuple[int, Any] | None = None
    fetcher: _BatchFetcher | None = None
    single = jax.process_count() == 1
    finish = device_transform.make_finisher(
        TransformConfig.from_config(config.data), sharding_lib.batch_sharding(mesh)
    )

    def device_batch(host: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """The train keys on the mesh: a wire batch finished on the device, or a batch as is."""
        if data_spec.is_wire(host):
            wire = {key: host[key] for key in data_spec.WIRE_DEVICE_KEYS}
            return finish(sharding_lib.shard_batch(wire, mesh))
        return sharding_lib.shard_batch({key: host[key] for key in data_spec.TRAIN_KEYS}, mesh)

    try:
        with StopSignal() as stop:
            if step < num_steps:
                stream = (data_fn or train_batches)(
                    config, batch_size=host_batch, seed=data_seed, start_step=position
                )
                log.skipped_records = getattr(stream, "skipped_records", None)
                fetcher = _BatchFetcher(iter(stream))
            log.start_clock()
            while step < num_steps:
                if _any_process(stop.requested):
                    stopped_by = stop.signal_name or "signal"
                    break
                # Single process: a signal also ends the wait for a busy pipeline. Multi-host:
                # every process must stop at the same step, so it is honoured at the check above.
                host_batch_np = fetcher.get(lambda: single and stop.requested)
                if host_batch_np is None:
                    stopped_by = stop.signal_name or "signal"
                    break
                batch = device_batch(host_batch_np)
                state, device_metrics = train_step(state, batch)
                step += 1
                if pending is not None:
                    log.process(*pending)  # step - 1, while `step` runs
                pending = (step, device_metrics)
                if manager.should_save(step) or evaluation.due(step):
                    log.process(*pending)  # never checkpoint an unchecked (non-finite?) step
                    pending = None
                    if manager.should_save(step):
                        manager.save(step, state, metadata(step))
                    if evaluation.due(step):
                        report_eval(evaluation.run(step, state, metadata(step)))
            if pending is not None:
                log.process(*pending)
                pending = None
            if stopped_by is not None:
                log.write_partial(step)
            # Final / on-signal checkpoint (skipped if this step is already saved), synchronous.
            manager.save(step, state, metadata(step), wait=True)
            if stopped_by is None and evaluation.due(step, final=True):
                report_eval(evaluation.run(step, state, metadata(step)))
    finally:
        if fetcher is not None:
            fetcher.close()
        progress.close()
        writer.close()
        evaluation.close()
        try:
            manager.close()  # waits for pending async saves, also on errors
        except Exception as e:  # noqa: BLE001 - do not mask the original error
            logging.error("Closing the checkpoint manager failed: %s", e)

    result: dict[str, Any] = {
        "step": step,
        **log.last,
        "logged_step": log.last_step,
        "nonfinite_skipped": log.nonfinite_skipped,
        "skipped_records": log.skipped_records() if log.skipped_records else {},
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
        k, count = result["logged_step"], int(result.get(INTERVAL_KEY, 1))
        span = f"step {k}" if count == 1 else f"steps {k - count + 1}-{k}"
        partial = ""
        if result.get(PARTIAL_KEY):
            partial = ", an interval cut by the stop" if result["stopped_by"] else ", partial"
        lines.append(
            f"Losses at step {k} (mean over {span}{partial}): "
            + ", ".join(f"{n} {_fmt(float(result[n]))}" for n in losses)
        )
    if "step_time" in result:
        lines.append(
            f"Last interval: {result['step_time']:.3f} s/step, "
            f"{result['images_per_sec']:.2f} images/s, lr {result.get('lr', float('nan')):.4g}"
        )
    if result["nonfinite_skipped"]:
        lines.append(f"Skipped non-finite steps: {result['nonfinite_skipped']}")
    if result["skipped_records"]:
        counts = result["skipped_records"]
        lines.append(
            f"Skipped bad records (data.skip_bad_records): {sum(counts.values())} ("
            + ", ".join(f"{r}={c}" for r, c in counts.items())
            + "); each is logged with its file and record"
        )
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
