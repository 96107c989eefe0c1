"""The evaluation loop: infer each eval batch, hand it to every evaluator, report.

`EvalRunner` holds what repeated evaluations share: the ground truth (JSON loaded and PNGs decoded
once, see `ground_truth`), the evaluators, the eval dataset and the compiled inference function.
Three entry points use it:

* ``evaluate_params(config, variables, step, out_dir)`` from the training loop, with the live
  params; it keeps one cached runner per config, so the second evaluation compiles and decodes
  nothing.
* ``evaluate(config, model, variables, workdir, step=...)``: one evaluation, outputs in
  ``workdir/eval_<step>/`` and scalars in ``workdir/eval``.
* ``evaluate_checkpoint(config, workdir)``: the same from a training checkpoint (the CLI).

Per batch: `inference.InferenceFn` (asynchronous) on batch n + 1 overlaps the host work of batch
n: ``process(inputs, outputs)`` of each evaluator with host numpy arrays. Then each evaluator's
``evaluate()`` dict is merged into the results (detectron2's ``DatasetEvaluators``), and
`report.write_report` writes ``results.json``, ``results.md`` and the scalars.

Evaluation is single-process: the whole split is read on this host (``process_count=1``); the
batch is split over the local devices. On a multi-host run, call it from one process (as
evaluation during training does, `oanet_jax.train.periodic_eval`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from absl import logging

from oanet_jax.common.metric_writer import MetricWriter
from oanet_jax.data import device_transform, pipeline, spec
from oanet_jax.data.transforms import TransformConfig
from oanet_jax.eval import ground_truth as gt_lib
from oanet_jax.eval.inference import InferenceFn, Postprocess, make_inference_fn
from oanet_jax.eval.instances import InstancesEvaluator
from oanet_jax.eval.panoptic import DevicePQ, PanopticEvaluator
from oanet_jax.eval.report import write_report
from oanet_jax.eval.semantic import SemanticEvaluator
from oanet_jax.panoptic.pq_device import DevicePQAccumulator

__all__ = [
    "EvalRunner",
    "Evaluator",
    "build_evaluators",
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_params",
    "get_runner",
]

_META_KEYS = ("image_id", "image_shape", "orig_shape", "example_valid")


class Evaluator(Protocol):
    """detectron2's ``DatasetEvaluator`` interface."""

    name: str
    output_dir: str | None
    files: dict[str, str]

    def reset(self) -> None: ...

    def process(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None: ...

    def evaluate(self) -> dict[str, Any]: ...


def build_evaluators(
    config: Any,
    ground_truth: gt_lib.PanopticGroundTruth,
    orderings: Sequence[str],
    *,
    device_accumulator: Callable[[], DevicePQAccumulator] | None = None,
) -> list[Evaluator]:
    """The panoptic (PQ), instances (AP) and semantic (stuff mIoU) evaluators of a config.

    Args:
      config: full config (``data.eval.instances_json``, ``model.test.mask_threshold``,
        ``eval.write_predictions``).
      ground_truth: shared by the three (each PNG decoded once).
      orderings: merge orderings.
      device_accumulator: host accumulator factory of the on-device PQ statistics (see
        `PanopticEvaluator`); None: PQ on the host.

    Returns:
      [PanopticEvaluator, InstancesEvaluator, SemanticEvaluator].
    """
    write = bool(config.eval.get("write_predictions", False))
    return [
        PanopticEvaluator(
            ground_truth,
            orderings,
            write_predictions=write,
            device_accumulator=device_accumulator,
        ),
        InstancesEvaluator(
            ground_truth,
            instances_json=gt_lib.load_instances_json(config.data),
            mask_threshold=float(config.model.test.mask_threshold),
            write_files=write,
        ),
        SemanticEvaluator(ground_truth),
    ]


def _as_variables(params_or_variables: Any) -> Any:
    """{'params': ...} from either the variables dict or the bare params tree."""
    if isinstance(params_or_variables, Mapping) and "params" in params_or_variables:
        return params_or_variables
    return {"params": params_or_variables}


class EvalRunner:
    """Everything repeated evaluations share (see the module docstring).

    Attributes:
      config: the config.
      ground_truth: the eval split's `PanopticGroundTruth` (decoded-image cache).
      orderings: merge orderings.
      evaluators: the evaluators (replaceable between runs).
      infer: the compiled inference function.
      num_images: images per evaluation (0 = the whole split).
    """

    def __init__(
        self,
        config: Any,
        model: Any = None,
        *,
        orderings: Sequence[str] | None = None,
        evaluators: Sequence[Evaluator] | None = None,
        num_images: int | None = None,
        ground_truth: gt_lib.PanopticGroundTruth | None = None,
        postprocess: Postprocess | None = None,
        batch_keys: Sequence[str] = (),
        device_accumulator: Callable[[], DevicePQAccumulator] | None = None,
    ):
        """Loads the ground truth and builds the evaluators and the inference function.

        Args:
          config: full config.
          model: the OANet module (default `build_model(config)`).
          orderings: merge orderings (default ``config.eval.orderings``).
          evaluators: default `build_evaluators`.
          num_images: images per evaluation (default ``config.eval.num_images``; 0 = all).
          ground_truth: default `ground_truth.load_panoptic_ground_truth(config.data)`.
          postprocess, batch_keys: on-device additions to the inference (`make_inference_fn`),
            e.g. the PQ statistics of ``config.eval.pq_backend = 'device'`` ('pq_stats').
          device_accumulator: their host accumulator (`build_evaluators`).

        Raises:
          FileNotFoundError: ground-truth files missing. ValueError: the ground truth's
            categories do not match the model's.
        """
        if model is None:
            from oanet_jax.modeling.build import build_model

            model = build_model(config)
        self.config = config
        self.ground_truth = ground_truth or gt_lib.load_panoptic_ground_truth(config.data)
        table = self.ground_truth.table
        things, stuff = int(config.model.num_thing_classes), int(config.model.num_stuff_classes)
        if (table.num_things, table.num_stuff) != (things, stuff):
            raise ValueError(
                f"the ground truth {self.ground_truth.json_path} has {table.num_things} thing / "
                f"{table.num_stuff} stuff categories, the model {things} / {stuff}"
            )
        self.orderings = tuple(orderings or config.eval.orderings)
        backend = str(config.eval.pq_backend)
        if backend not in ("host", "device"):
            raise ValueError(f"eval.pq_backend must be 'host' or 'device', got {backend!r}")
        self.device_pq = None
        if backend == "device" and postprocess is None:
            self.device_pq = DevicePQ(self.ground_truth, self.orderings)
            postprocess = self.device_pq.postprocess
            batch_keys = tuple(batch_keys) + DevicePQ.keys
            device_accumulator = self.device_pq.accumulator
        self.evaluators = list(
            evaluators
            or build_evaluators(
                config, self.ground_truth, self.orderings, device_accumulator=device_accumulator
            )
        )
        if num_images is None:
            num_images = int(config.eval.get("num_images", 0))
        self.num_images = int(num_images)
        self.batch_size = int(config.eval.batch_size)
        self.infer: InferenceFn = make_inference_fn(
            model,
            config,
            self.orderings,
            batch_size=self.batch_size,
            postprocess=postprocess,
            batch_keys=batch_keys,
        )
        self._dataset = None
        self._control: pipeline.PipelineControl | None = None
        self._finish = device_transform.make_finisher(
            TransformConfig.from_config(config.data), self.infer.data, keys=("image",)
        )

    def _batches(self) -> pipeline.NumpyBatches:
        """A pass over the eval split; a bad record raises the pipeline's own error (a
        ``DataError`` naming the file and the record), not TensorFlow's wrapper."""
        if self._dataset is None:
            self._control = pipeline.PipelineControl(
                "eval", bool(self.config.data.skip_bad_records)
            )
            self._dataset = pipeline.build_dataset(
                self.config,
                "eval",
                training=False,
                batch_size=self.batch_size,
                seed=int(self.config.seed),
                process_index=0,
                process_count=1,
                control=self._control,
            )
        return pipeline.NumpyBatches(self._dataset, self._control)

    def run(
        self,
        variables: Any,
        step: int,
        out_dir: str,
        *,
        writer: MetricWriter | None = None,
        max_batches: int | None = None,
        progress: bool = False,
    ) -> dict[str, Any]:
        """One evaluation.

        Args:
          variables: {'params', ...} or the bare params tree (e.g. the train state's).
          step: the step the results belong to.
          out_dir: this evaluation's folder (results.json, results.md, predictions if asked).
          writer: scalar writer (None: no scalars).
          max_batches: stop after this many batches (on top of `num_images`).
          progress: show a progress bar.

        Returns:
          {'step', 'num_images', 'panoptic': {ordering: `summarize_pq` dict}, 'bbox': {AP...},
          'segm': {AP...}, 'stuff': {'mIoU', 'n', 'per_class'}, 'seconds', 'images_per_second',
          'files': {name: path}}; metrics in percent.
        """
        from tqdm import tqdm

        start = time.perf_counter()
        os.makedirs(out_dir, exist_ok=True)
        for ev in self.evaluators:
            ev.output_dir = out_dir
            ev.reset()
        total = len(self.ground_truth.annotations)
        limit = min(self.num_images, total) if self.num_images > 0 else total
        num_batches = -(-limit // self.batch_size)
        if max_batches is not None:
            num_batches = min(num_batches, int(max_batches))
        variables = self.infer.put_variables(_as_variables(variables))

        seen = 0

        def consume(meta: dict[str, np.ndarray], out: Any) -> None:
            nonlocal seen
            valid = np.asarray(meta["example_valid"], bool)
            position = seen + np.cumsum(valid) - 1  # index of each valid example in the split
            meta["example_valid"] = valid & (position < limit)
            seen += int(meta["example_valid"].sum())
            out = jax.device_get(out)
            for ev in self.evaluators:
                ev.process(meta, out)

        pending = None
        bar = tqdm(total=num_batches, desc=f"eval step {step}", unit="batch", disable=not progress)
        for index, batch in enumerate(self._batches()):
            if index >= num_batches:
                break
            if spec.is_wire(batch):  # the image finished on the device, where inference runs
                # Placed on the (local) eval mesh first: a multi-process runtime takes numpy
                # inputs of a jit as global arrays.
                wire = {k: batch[k] for k in spec.WIRE_DEVICE_KEYS}
                batch = {**batch, **self._finish(jax.device_put(wire, self.infer.data))}
            if self.device_pq is not None:
                batch = {**batch, **self.device_pq.batch_arrays(batch)}
            out = self.infer(variables, batch)  # asynchronous: the host work below overlaps it
            if pending is not None:
                consume(*pending)
                bar.update(1)
            pending = ({k: batch[k] for k in _META_KEYS}, out)
        if pending is not None:
            consume(*pending)
            bar.update(1)
        bar.close()
        if not seen:
            raise ValueError(f"no valid example in the eval split ({self.ground_truth.json_path})")

        results: dict[str, Any] = {"step": int(step), "num_images": seen}
        files: dict[str, str] = {}
        for ev in self.evaluators:
            for key, value in ev.evaluate().items():
                if key in results:
                    raise ValueError(
                        f"evaluator {ev.name!r} returns {key!r}, already in the results"
                    )
                results[key] = value
            files.update(ev.files)
        seconds = time.perf_counter() - start
        results["seconds"] = seconds
        results["images_per_second"] = seen / seconds
        results["files"] = files
        write_report(results, out_dir, writer)
        _log_summary(results)
        return results


def _log_summary(results: Mapping[str, Any]) -> None:
    step = results["step"]
    for o, r in results.get("panoptic", {}).items():
        logging.info(
            "eval step %d, %s ordering: PQ %.1f (things %.1f, stuff %.1f)",
            step,
            o,
            r["PQ"],
            r["PQ_th"],
            r["PQ_st"],
        )
    if {"bbox", "segm", "stuff"} <= set(results):
        logging.info(
            "eval step %d: box AP %.1f, mask AP %.1f, stuff mIoU %.1f; %d images in %.1f s",
            step,
            results["bbox"]["AP"],
            results["segm"]["AP"],
            results["stuff"]["mIoU"],
            results["num_images"],
            results["seconds"],
        )


_RUNNER: dict[str, Any] = {"key": None, "runner": None}


def get_runner(config: Any, model: Any = None) -> EvalRunner:
    """The cached `EvalRunner` of `config` (rebuilt when the config changes; one is kept).

    Args:
      config: full config; its JSON is the cache key.
      model: the OANet module for a new runner (default `build_model(config)`).
    """
    key = config.to_json_best_effort(sort_keys=True)
    if _RUNNER["key"] != key:
        _RUNNER["runner"] = None  # free the previous one first
        _RUNNER["runner"] = EvalRunner(config, model)
        _RUNNER["key"] = key
    return _RUNNER["runner"]


def evaluate_params(
    config: Any,
    variables: Any,
    step: int,
    out_dir: str,
    evaluators: Sequence[Evaluator] | None = None,
    *,
    model: Any = None,
    writer: MetricWriter | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluation during training: the live params, cached ground truth and compiled inference.

    Evaluates the first ``config.eval.num_images`` images (0 = all) of the eval split.

    Args:
      config: full config.
      variables: the train state's params (bare tree) or {'params', ...}.
      step: the training step.
      out_dir: this evaluation's folder (e.g. ``<workdir>/eval_<step>``).
      evaluators: replaces the cached runner's evaluators (default: those of the config).
      model: the OANet module (default `build_model(config)`; only used on the first call).
      writer: the training's scalar writer (None: no scalars).
      progress: show a progress bar.

    Returns:
      `EvalRunner.run`'s results.
    """
    runner = get_runner(config, model)
    if evaluators is not None:
        runner.evaluators = list(evaluators)
    return runner.run(variables, step, out_dir, writer=writer, progress=progress)


def evaluate(
    config: Any,
    model: Any,
    variables: Any,
    workdir: str,
    *,
    orderings: Sequence[str] | None = None,
    max_batches: int | None = None,
    step: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """One evaluation: outputs in ``workdir/eval_<step>/``, scalars in ``workdir/eval``.

    Args:
      config: full config (``data``, ``model``, ``eval``).
      model: the OANet module (`build_model(config)`).
      variables: {'params', ...} (e.g. from `train.checkpoint.restore_variables`).
      workdir: the run's work directory.
      orderings: merge orderings (default ``config.eval.orderings``).
      max_batches: stop after this many batches (default: ``config.eval.num_images`` or all).
      step: the checkpoint step (names the output folder and the scalar step).
      progress: show a progress bar.

    Returns:
      `EvalRunner.run`'s results.
    """
    runner = EvalRunner(config, model, orderings=orderings)
    eval_dir = os.path.join(workdir, f"eval_{int(step)}")
    logdir = os.path.join(workdir, "eval")
    with MetricWriter(os.path.join(logdir, "metrics.jsonl"), logdir) as writer:
        return runner.run(
            variables, step, eval_dir, writer=writer, max_batches=max_batches, progress=progress
        )


def evaluate_checkpoint(
    config: Any,
    workdir: str,
    *,
    checkpoint: int | None = None,
    best: bool = False,
    orderings: Sequence[str] | None = None,
    max_batches: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`evaluate` of a training checkpoint (default: the latest readable one of `workdir`;
    ``best``: the one kept in ``checkpoints_best`` by evaluation during training).

    Raises:
      ConfigError: the config breaks a rule of `oanet_jax.config_check` (checked first).
      CheckpointMismatchError: the checkpoint is of another architecture than the config's.
    """
    from oanet_jax.config_check import validate_config
    from oanet_jax.modeling.build import build_model
    from oanet_jax.train.checkpoint import restore_variables
    from oanet_jax.train.state import abstract_variables

    validate_config(config, "eval")
    model = build_model(config)
    variables, step = restore_variables(
        workdir, checkpoint, best=best, expected=abstract_variables(config, model)
    )
    return evaluate(
        config,
        model,
        variables,
        workdir,
        orderings=orderings,
        max_batches=max_batches,
        step=step,
        progress=progress,
    )
