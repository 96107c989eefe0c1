"""Checkpointing of the training state with orbax-checkpoint.

Layout under the work directory::

    workdir/checkpoints/<step>/state/      the TrainState pytree (params, batch_stats, opt_state,
                                           step, rng key data), orbax PyTree (OCDBT) format
    workdir/checkpoints/<step>/metadata/   a JSON item: step, data seed, data position (number of
                                           training batches consumed), global batch size, time
    workdir/checkpoints_corrupt/<step>/    checkpoints found unreadable at restore, moved aside
    workdir/checkpoints_best/<step>/       the best checkpoint by an evaluation metric (srm/PQ
                                           by default), kept besides the last ``keep`` periodic
                                           ones; its metadata holds the metric (``best_metric``,
                                           ``best_value``)

Checkpoint ``<step>`` holds the state after ``step`` optimizer updates; a run resumed from it reads
the input stream from batch ``data_position`` (== ``step``), so it sees exactly the batches that the
uninterrupted run would have seen.

Saves go through an ``orbax.checkpoint.CheckpointManager``: asynchronous when configured (the
device-to-host copy blocks, the file writes run in a background thread and the next save or
:meth:`TrainCheckpointManager.wait_until_finished` waits for them), at most ``keep`` checkpoints are
kept, and unfinished temporary directories of a killed save are removed when the manager opens.

Restore: :meth:`TrainCheckpointManager.restore` tries the latest step first. A checkpoint whose
files are missing, truncated or corrupted (orbax / tensorstore raise on read: OCDBT data files are
checksummed) is reported with a one-line absl warning naming the step and the gist of the error
(:func:`short_error`; TensorStore's full text is logged at debug level), moved to
``checkpoints_corrupt/`` (so a later save of the same step cannot collide with it) and the previous
step is tried. A checkpoint that is readable but does not match the expected state (other shapes:
the config changed) is NOT treated as corrupt: :class:`CheckpointMismatchError` is raised.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"
BEST_DIR = "checkpoints_best"
STATE_ITEM = "state"
METADATA_ITEM = "metadata"


class CheckpointMismatchError(ValueError):
    """A readable checkpoint whose arrays do not match the expected state (shape/dtype/keys)."""


class NoReadableCheckpointError(RuntimeError):
    """Checkpoints exist but none of them could be read."""


def _item_handlers() -> dict[str, Any]:
    return {
        STATE_ITEM: ocp.PyTreeCheckpointHandler(),
        METADATA_ITEM: ocp.JsonCheckpointHandler(),
    }


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat_specs(tree: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    """{path: (shape, dtype)} of the array leaves of a state / abstract state / orbax metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, leaf in leaves:
        if leaf is None:
            continue
        out[tuple(_key_str(k) for k in path)] = (tuple(leaf.shape), str(leaf.dtype))
    return out


def abstract_state(state_shapes: Any, shardings: Any) -> Any:
    """Restore target: ``jax.ShapeDtypeStruct`` leaves carrying the target shardings.

    Args:
        state_shapes: pytree of arrays or ShapeDtypeStructs (e.g. an initialised TrainState).
        shardings: matching pytree of ``jax.sharding.Sharding`` (a prefix tree is not allowed).

    Returns:
        The same pytree structure with ``ShapeDtypeStruct(shape, dtype, sharding=...)`` leaves, so
        that a restore lands directly sharded on the mesh.
    """
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shapes, shardings
    )


def compare_specs(expected: Any, saved: Any) -> list[str]:
    """Differences between the array leaves of two pytrees (paths, shapes, dtypes).

    Args:
        expected: the state (or abstract state) the caller wants to restore into.
        saved: the checkpoint's tree metadata (``ArrayMetadata`` leaves) or another state.

    Returns:
        Human-readable differences (empty when they agree); at most 10 are listed.
    """
    a, b = _flat_specs(expected), _flat_specs(saved)
    problems = []
    for path in sorted(set(a) | set(b)):
        name = "/".join(path)
        if path not in b:
            problems.append(f"{name}: missing in the checkpoint")
        elif path not in a:
            problems.append(f"{name}: in the checkpoint but not in the state")
        elif a[path] != b[path]:
            problems.append(f"{name}: expected {a[path]}, checkpoint has {b[path]}")
    if len(problems) > 10:
        problems = problems[:10] + [f"... and {len(problems) - 10} more"]
    return problems


def check_architecture(expected: Any, saved: Any, checkpoint: str, against: str) -> None:
    """The architecture check shared by training, evaluation, prediction and export.

    Args:
        expected: the tree the config's model needs (a state, or ``{'params', 'batch_stats'}``
            of ``ShapeDtypeStruct``s, e.g. `oanet_jax.train.state.abstract_variables`).
        saved: the checkpoint's tree metadata (or another tree of arrays).
        checkpoint: the checkpoint's path, for the message.
        against: what `expected` is, for the message (e.g. 'the training state').

    Raises:
        CheckpointMismatchError: naming the checkpoint and up to 10 differing paths (missing,
            extra, or another shape/dtype), with the hint that the config differs from the one
            the checkpoint was trained with.
    """
    problems = compare_specs(expected, saved)
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint} does not match {against} (was it trained with another "
            "config, e.g. another model.backbone or class count?):\n  " + "\n  ".join(problems)
        )


class TrainCheckpointManager:
    """Periodic, keep-N, optionally asynchronous checkpoints of a TrainState plus JSON metadata.

    Thin wrapper of ``orbax.checkpoint.CheckpointManager`` (items ``state`` and ``metadata``) that
    adds the corrupt-checkpoint fallback of the module docstring. All processes must call
    :meth:`save` and :meth:`restore` (orbax synchronises them); only process 0 moves corrupt
    checkpoints aside.
    """

    def __init__(
        self,
        workdir: str,
        *,
        every_steps: int,
        keep: int,
        async_save: bool = True,
        read_only: bool = False,
        subdir: str = CHECKPOINT_DIR,
        best_metric: str | None = None,
    ):
        """Opens (creating unless ``read_only``) ``workdir/<subdir>``.

        Args:
            workdir: the run's work directory.
            every_steps: :meth:`should_save` is True at multiples of it (<= 0: never).
            keep: number of checkpoints kept (<= 0 keeps all); with ``best_metric``, the ``keep``
                best by that metric (orbax ``best_fn``, higher is better).
            async_save: write files in a background thread.
            read_only: never write or delete (evaluation / export).
            subdir: folder under ``workdir`` (``checkpoints`` or ``checkpoints_best``).
            best_metric: rank checkpoints by this entry of the ``metrics`` given to :meth:`save`
                (checkpoints saved without it are not kept).
        """
        self.workdir = os.path.abspath(workdir)
        self.subdir = subdir
        self.best_metric = best_metric
        self.every_steps = int(every_steps)
        self.keep = int(keep)
        self.async_save = bool(async_save)
        self.read_only = bool(read_only)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep if self.keep > 0 else None,
            enable_async_checkpointing=self.async_save,
            create=not self.read_only,
            cleanup_tmp_directories=not self.read_only,
            read_only=self.read_only,
            best_fn=(lambda m: float(m[best_metric])) if best_metric else None,
            best_mode="max",
            keep_checkpoints_without_metrics=best_metric is None,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=_item_handlers()
        )

    @classmethod
    def from_config(cls, config: Any, workdir: str, **kwargs: Any) -> TrainCheckpointManager:
        """Builds the manager from ``config.checkpoint`` (every_steps, keep, async_save)."""
        c = config.checkpoint
        return cls(
            workdir,
            every_steps=int(c.every_steps),
            keep=int(c.keep),
            async_save=bool(c.get("async_save", True)),
            **kwargs,
        )

    @classmethod
    def best_from_config(cls, config: Any, workdir: str) -> TrainCheckpointManager:
        """The manager of ``workdir/checkpoints_best``: the single best checkpoint by
        ``config.eval.best_metric`` (e.g. ``'srm/PQ'``)."""
        return cls(
            workdir,
            every_steps=0,
            keep=1,
            async_save=bool(config.checkpoint.async_save),
            subdir=BEST_DIR,
            best_metric=str(config.eval.best_metric),
        )

    @property
    def directory(self) -> str:
        """``workdir/<subdir>`` (``workdir/checkpoints`` by default)."""
        return os.path.join(self.workdir, self.subdir)

    @property
    def corrupt_directory(self) -> str:
        """``workdir/checkpoints_corrupt`` (where unreadable checkpoints are moved)."""
        return os.path.join(self.workdir, CORRUPT_DIR)

    def all_steps(self) -> list[int]:
        """Steps with a finished checkpoint, ascending."""
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest checkpointed step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best(self) -> tuple[int, float] | None:
        """(step, metric value) of the best checkpoint kept, or None (``best_metric`` managers)."""
        steps = self.all_steps()
        if not steps or self.best_metric is None:
            return None
        step = self._manager.best_step()
        if step is None:
            return None
        return int(step), float(self.read_metadata(int(step))["best_value"])

    def save_if_best(
        self, step: int, state: Any, metadata: Mapping[str, Any], value: float
    ) -> bool:
        """Saves ``state`` when ``value`` of ``best_metric`` beats the best kept so far.

        Args:
            step: the step of ``state``.
            state: the TrainState.
            metadata: JSON-serialisable dict (``best_metric`` and ``best_value`` are added).
            value: the metric of this step (higher is better; NaN never saves).

        Returns:
            True when a checkpoint was saved (it is now the best one; orbax deletes the older).
        """
        if self.best_metric is None:
            raise RuntimeError("save_if_best needs a manager with best_metric")
        current = self.best()
        if math.isnan(value) or (current is not None and value <= current[1]):
            return False
        meta = {**metadata, "best_metric": self.best_metric, "best_value": float(value)}
        return self.save(step, state, meta, metrics={self.best_metric: float(value)})

    def should_save(self, step: int) -> bool:
        """True at multiples of ``every_steps`` (periodic checkpoints)."""
        return self.every_steps > 0 and step > 0 and step % self.every_steps == 0

    def save(
        self,
        step: int,
        state: Any,
        metadata: Mapping[str, Any],
        *,
        wait: bool = False,
        metrics: Mapping[str, float] | None = None,
    ) -> bool:
        """Saves ``state`` and ``metadata`` as checkpoint ``step`` (skipped if it exists).

        Args:
            step: number of optimizer updates in ``state``.
            state: the TrainState (sharded jax arrays). With async saves the device-to-host
                copy happens before this returns, so the caller may donate the buffers afterwards.
            metadata: JSON-serialisable dict (the ``step`` key is set to ``step``).
            wait: block until the files are written (and the checkpoint is committed).
            metrics: scalars orbax ranks checkpoints by (``best_metric`` managers).

        Returns:
            True if a save was started, False if checkpoint ``step`` already exists.
        """
        if self.read_only:
            raise RuntimeError("checkpoint manager is read-only")
        if step in self._manager.all_steps():
            logging.info("Checkpoint for step %d already exists; not saving it again.", step)
            if wait:
                self.wait_until_finished()
            return False
        meta = dict(metadata)
        meta["step"] = int(step)
        meta.setdefault("time", time.time())
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.PyTreeSave(state),
                    METADATA_ITEM: ocp.args.JsonSave(meta),
                }
            ),
            metrics=dict(metrics) if metrics is not None else None,
            force=True,
        )
        if wait:
            self.wait_until_finished()
        return True

    def wait_until_finished(self) -> None:
        """Blocks until every pending asynchronous save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()

    def __enter__(self) -> TrainCheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -------------------------------------------------------------------------------- restore

    def read_metadata(self, step: int) -> dict[str, Any]:
        """The JSON metadata item of checkpoint ``step``."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()})
        )
        return dict(restored[METADATA_ITEM])

    def _restore_step(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        try:
            saved_tree = self._manager.item_metadata(step)[STATE_ITEM]
            if saved_tree is None:
                raise FileNotFoundError(f"no '{STATE_ITEM}' item metadata")
            saved_tree = getattr(saved_tree, "tree", saved_tree)
        except Exception as e:  # noqa: BLE001 - any failure to read the metadata is corruption
            raise _Corrupt(e) from e
        check_architecture(target, saved_tree, f"{self.directory}/{step}", "the training state")
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE_ITEM: ocp.args.PyTreeRestore(
                            item=target,
                            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                        ),
                        METADATA_ITEM: ocp.args.JsonRestore(),
                    }
                ),
            )
            state, meta = restored[STATE_ITEM], dict(restored[METADATA_ITEM])
            if int(meta.get("step", -1)) != step:
                raise ValueError(f"metadata names step {meta.get('step')}, directory is {step}")
            state_step = getattr(state, "step", None)
            if state_step is not None and int(jax.device_get(state_step)) != step:
                raise ValueError(f"state.step is {int(jax.device_get(state_step))}, not {step}")
        except Exception as e:  # noqa: BLE001 - unreadable data files, truncated JSON, ...
            raise _Corrupt(e) from e
        return state, meta

    def _quarantine(self, step: int) -> str:
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.corrupt_directory, str(step))
        if jax.process_index() == 0 and not self.read_only and os.path.exists(src):
            os.makedirs(self.corrupt_directory, exist_ok=True)
            if os.path.exists(dst):
                dst = f"{dst}.{int(time.time())}"
            shutil.move(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"oanet_quarantine_{step}")
        self._manager.reload()
        return dst

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
        """Restores the latest readable checkpoint (or ``step``) into ``target``'s structure.

        Args:
            target: abstract state (see :func:`abstract_state`): the pytree structure to restore
                into, with ``ShapeDtypeStruct`` leaves whose shardings say where the arrays land.
            step: a specific step (no fallback), or None for the latest readable one.

        Returns:
            ``(state, metadata)``, or None when there is no checkpoint at all.

        Raises:
            CheckpointMismatchError: a readable checkpoint with other shapes/keys than ``target``.
            NoReadableCheckpointError: checkpoints exist but every one is corrupt (they have been
                moved to ``checkpoints_corrupt/``), or the requested ``step`` is unreadable.
        """
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}")
            steps = [step]
        if not steps:
            return None
        failures = []
        for s in reversed(steps):
            try:
                return self._restore_step(s, target)
            except _Corrupt as c:
                err = c.error
                path = os.path.join(self.directory, str(s))
                if step is None and not self.read_only:
                    action = f"moved it to {self._quarantine(s)}; trying the previous checkpoint"
                elif step is None:
                    action = "trying the previous checkpoint"
                else:
                    action = "it was requested explicitly, so there is no fallback"
                logging.warning(
                    "Checkpoint at step %d (%s) is unreadable (%s); %s.",
                    s,
                    path,
                    short_error(err),
                    action,
                )
                logging.debug("Checkpoint at step %d: full error", s, exc_info=err)
                failures.append(f"step {s}: {short_error(err)}")
        raise NoReadableCheckpointError(
            f"no readable checkpoint in {self.directory}:\n  " + "\n  ".join(failures)
        )


def short_error(err: BaseException, limit: int = 200) -> str:
    """``Type: first line`` of an error, without TensorStore's spec dump, at most ``limit`` chars.

    orbax / TensorStore read errors carry the whole TensorStore spec (and nested causes, often
    hundreds of lines); the warning keeps the gist and the full text goes to debug logging.
    """
    text = str(err).strip()
    text = text.split("\n", 1)[0].split(" [tensorstore_spec=", 1)[0].split("[source locations=")[0]
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class _Corrupt(Exception):
    """Internal: wraps the error of an unreadable checkpoint."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def restore_variables(
    workdir: str,
    step: int | None = None,
    *,
    shardings: Any = None,
    best: bool = False,
    expected: Any = None,
) -> tuple[dict[str, Any], int]:
    """Restores the model variables (no optimizer state) for evaluation or export.

    Reads ``workdir/checkpoints`` (or ``workdir/checkpoints_best`` with ``best``) read-only: the
    latest readable step (an unreadable one is reported with a warning and the previous one used)
    or ``step``.

    Args:
        workdir: the training run's work directory.
        step: a specific step, or None for the latest readable checkpoint.
        best: read the best checkpoint (kept by evaluation during training) instead.
        shardings: optional pytree of shardings matching ``{'params': ..., 'batch_stats': ...}``
            (e.g. from ``create_train_state``); default: every array on the first local device.
        expected: the variables the config's model needs (``{'params', 'batch_stats'}``, e.g.
            `oanet_jax.train.state.abstract_variables`); a checkpoint of another architecture
            then raises `CheckpointMismatchError` (see `check_architecture`) before any array is
            read. None: no check.

    Returns:
        ``(variables, step)``: ``variables = {'params': ..., 'batch_stats': ...}`` of jax arrays,
        as the model's ``init`` returns them.

    Raises:
        FileNotFoundError: no checkpoint (or not the requested step).
        NoReadableCheckpointError: none of the candidate checkpoints could be read.
        CheckpointMismatchError: with `expected`, a readable checkpoint of another architecture.
    """
    manager = TrainCheckpointManager(
        workdir, every_steps=0, keep=0, read_only=True, subdir=BEST_DIR if best else CHECKPOINT_DIR
    )
    try:
        steps = manager.all_steps()
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint for step {step} in {manager.directory}")
            steps = [step]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
        failures = []
        for s in reversed(steps):
            try:
                return _restore_variables_step(manager, s, shardings, expected), s
            except CheckpointMismatchError:
                raise  # readable, but of another architecture: not a reason to fall back
            except Exception as e:  # noqa: BLE001 - report and try the previous one
                logging.warning(
                    "Checkpoint at step %d in %s is unreadable (%s); trying the previous one.",
                    s,
                    manager.directory,
                    short_error(e),
                )
                logging.debug("Checkpoint at step %d: full error", s, exc_info=e)
                failures.append(f"step {s}: {short_error(e)}")
        raise NoReadableCheckpointError(
            f"no readable checkpoint in {manager.directory}:\n  " + "\n  ".join(failures)
        )
    finally:
        manager.close()


def _restore_variables_step(
    manager: TrainCheckpointManager, step: int, shardings: Any, expected: Any
) -> dict[str, Any]:
    tree = manager._manager.item_metadata(step)[STATE_ITEM]
    if tree is None:
        raise FileNotFoundError(f"checkpoint {step} has no '{STATE_ITEM}' item")
    tree = getattr(tree, "tree", tree)
    saved = {"params": tree["params"], "batch_stats": tree.get("batch_stats", {}) or {}}
    if expected is not None:
        wanted = {
            "params": expected["params"],
            "batch_stats": expected.get("batch_stats", {}) or {},
        }
        where = os.path.join(manager.directory, str(step))
        check_architecture(wanted, saved, where, "the model of the config")
    if shardings is None:
        device = jax.local_devices()[0]
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), saved)
    target = abstract_state(saved, shardings)
    restored = manager._manager.restore(
        step,
        args=ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                )
            }
        ),
    )
    variables = restored[STATE_ITEM]
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def steps_in(workdir: str) -> Sequence[int]:
    """Finished checkpoint steps under ``workdir/checkpoints`` (ascending; [] if none)."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def restore_standard(path: str, sharding: jax.sharding.Sharding) -> Any:
    """A ``StandardCheckpointer`` checkpoint (`oanet-convert` output), every array on `sharding`.

    The restore names its target sharding (built from the checkpoint's own shapes and dtypes), so
    it does not depend on the devices the checkpoint was saved from: no orbax "Sharding info not
    provided" fallback to the saving topology, which fails on another one.

    Args:
      path: the checkpoint folder.
      sharding: where every array lands (e.g. replicated on the training mesh, or one device).

    Returns:
      The checkpoint's pytree of ``jax.Array``.
    """
    checkpointer = ocp.StandardCheckpointer()
    try:
        tree = checkpointer.metadata(os.path.abspath(path))
        tree = getattr(tree, "item_metadata", tree)
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
            dict(tree),
            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
        )
        return checkpointer.restore(os.path.abspath(path), target)
    finally:
        checkpointer.close()


def _restore_replicated(path: str, shardings: Any) -> Any:
    """The converted checkpoint at `path`, every array replicated on the mesh of `shardings`.

    On several hosts each process reads the arrays onto its devices of the training mesh.
    """
    mesh = next(
        s.mesh for s in jax.tree.leaves(shardings) if isinstance(s, jax.sharding.NamedSharding)
    )
    return restore_standard(path, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def init_from_pretrained(state: Any, state_sharding: Any, path: str) -> Any:
    """Overlays converted weights (`oanet-convert` output) on a fresh state.

    The checkpoint at `path` holds ``{'params': ..., 'batch_stats': ...}``: the whole OANet tree
    (from a torchvision Mask R-CNN) or only its ``'backbone'`` subtree (from an ImageNet ResNet).
    Every array it holds replaces the array at the same path of ``state.params`` /
    ``state.batch_stats`` (placed with that array's sharding); everything it does not hold keeps
    its fresh initialisation; a model with its own stuff-branch ResNet (``model.sharing='none'``,
    params under ``'stuff_backbone'``) gets the checkpoint's ``'backbone'`` there too. The
    optimizer state is fresh (zero momentum), as the step is 0.

    Args:
      state: the freshly created TrainState (step 0).
      state_sharding: its TrainState-shaped pytree of NamedShardings.
      path: folder of the converted orbax checkpoint.

    Returns:
      The state with the converted arrays in place.

    Raises:
      CheckpointMismatchError: a path of the checkpoint is not in the model, or its shape differs
        (all offending paths listed).
    """
    loaded = _restore_replicated(path, state_sharding)
    problems: list[str] = []
    counts = {"params": 0, "batch_stats": 0}

    def overlay(collection: str, target: Any, shardings: Any, source: Any, prefix: str) -> Any:
        if isinstance(source, Mapping):
            if not isinstance(target, Mapping):
                problems.append(f"{prefix}: a subtree in {path}, an array in the model")
                return target
            out = dict(target)
            for key, sub in source.items():
                if key not in target:
                    problems.append(f"{prefix}/{key}: in {path}, not in the model")
                    continue
                out[key] = overlay(collection, target[key], shardings[key], sub, f"{prefix}/{key}")
            return out
        if tuple(source.shape) != tuple(target.shape):
            problems.append(
                f"{prefix}: shape {tuple(source.shape)} in {path}, {target.shape} in model"
            )
            return target
        counts[collection] += 1
        return jax.device_put(jax.numpy.asarray(source, target.dtype), shardings)

    def source(collection: str, target: Any) -> Any:
        # model.sharing='none': the stuff branch's own ResNet starts from the same weights.
        src = loaded.get(collection, {})
        if "backbone" in src and "stuff_backbone" not in src and "stuff_backbone" in target:
            src = {**src, "stuff_backbone": src["backbone"]}
        return src

    params = overlay(
        "params",
        state.params,
        state_sharding.params,
        source("params", state.params),
        "params",
    )
    stats = overlay(
        "batch_stats",
        state.batch_stats,
        state_sharding.batch_stats,
        source("batch_stats", state.batch_stats),
        "batch_stats",
    )
    if problems:
        raise CheckpointMismatchError(f"{path} does not fit the model:\n  " + "\n  ".join(problems))
    logging.info(
        "Initialised %d params and %d batch_stats arrays from %s; the rest keep their init.",
        counts["params"],
        counts["batch_stats"],
        path,
    )
    return state.replace(params=params, batch_stats=stats)
