"""Evaluation during training (flax examples' ``train_and_evaluate`` that really evaluates).

Every ``config.eval.every_steps`` steps (0 = never) and, when ``config.eval.at_end``, after the
last step, the live parameters are evaluated on the eval split (its first ``config.eval.num_images``
images; 0 = all) by `oanet_jax.eval.evaluator.evaluate_params`, whose runner keeps the decoded
ground truth and the compiled inference across evaluations. Per evaluation:

* ``workdir/eval_<step>/results.{json,md}`` (PQ per ordering, box/mask AP, stuff mIoU);
* the scalars in the training's ``metrics.jsonl`` and TensorBoard events, tagged ``eval/...``
  (``eval/panoptic_srm/PQ``, ``eval/bbox/AP``, ...), at the training step;
* the state is saved to ``workdir/checkpoints_best`` when ``config.eval.best_metric``
  (``'<ordering>/<metric>'``, ``'srm/PQ'`` by default) beats the best so far (orbax
  ``best_fn``; one checkpoint kept there, besides the periodic ones). `oanet-evaluate
  --checkpoint best` evaluates it.

Several processes: every process gathers the live variables to its host
(`sharding.gather_to_host`), process 0 evaluates them on its own devices as one process would
(`evaluate_params`: the whole eval split read there, the same results as `oanet-evaluate` of the
checkpoint) while the others wait at a barrier, and the results reach every process
(`sharding.broadcast_from_main`), so that all of them take the same best-checkpoint decision and
save it together (orbax multi-process). The evaluation's time is not divided over the hosts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax

from oanet_jax.common.metric_writer import MetricWriter
from oanet_jax.train import checkpoint as ckpt_lib
from oanet_jax.train import sharding as sharding_lib

__all__ = ["PeriodicEvaluation"]


class PeriodicEvaluation:
    """When to evaluate, the evaluation itself, its scalars and the best checkpoint.

    Attributes:
      enabled: False when no evaluation is configured.
      last: the results of the latest evaluation (None before the first).
    """

    def __init__(self, config: Any, workdir: str, model: Any, writer: MetricWriter):
        """Sets up from ``config.eval`` (every_steps, at_end, best_metric).

        Args:
          config: full config.
          workdir: the run's work directory.
          model: the OANet module being trained (shared with the evaluation).
          writer: the training's scalar writer.
        """
        e = config.eval
        self.config = config
        self.workdir = workdir
        self.model = model
        self.writer = writer
        self.every = int(e.every_steps)
        self.at_end = bool(e.at_end)
        self.metric = str(e.best_metric)
        self.ordering, _, self.key = self.metric.partition("/")
        if self.ordering not in tuple(e.orderings) or not self.key:
            raise ValueError(
                f"eval.best_metric {self.metric!r} must be '<ordering>/<metric>' with an ordering "
                f"of eval.orderings {tuple(e.orderings)}, e.g. 'srm/PQ'"
            )
        self.enabled = self.every > 0 or self.at_end
        self.best_manager = (
            ckpt_lib.TrainCheckpointManager.best_from_config(config, workdir)
            if self.enabled
            else None
        )
        self.last: dict[str, Any] | None = None
        self._done: set[int] = set()

    def due(self, step: int, *, final: bool = False) -> bool:
        """Whether to evaluate after `step` (``final``: the last step of the run)."""
        if not self.enabled or step <= 0 or step in self._done:
            return False
        if final and self.at_end:  # not again on a rerun; process 0's workdir decides for all
            done = os.path.exists(self._dir(step, "results.json"))
            return not sharding_lib.broadcast_from_main(done, f"eval_done_{step}")
        return self.every > 0 and step % self.every == 0

    def _dir(self, step: int, *names: str) -> str:
        return os.path.join(self.workdir, f"eval_{step}", *names)

    def run(self, step: int, state: Any, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """Evaluates `state`'s variables, logs the scalars, keeps the best checkpoint.

        Args:
          step: the training step of `state`.
          state: the TrainState (its params and batch_stats are evaluated).
          metadata: the checkpoint metadata of this step (for the best checkpoint).

        Returns:
          `evaluate_params`'s results, plus 'best' ({'step', 'value', 'metric'}) and 'saved_best'.
        """
        from oanet_jax.eval.report import result_scalars

        variables = {"params": state.params, "batch_stats": state.batch_stats}
        if jax.process_count() > 1:
            results = self._evaluate_on_main(step, variables)
        else:
            results = self._evaluate(step, variables)
        self.writer.write(step, {f"eval/{k}": v for k, v in result_scalars(results).items()})
        value = float(results["panoptic"][self.ordering][self.key])
        saved = self.best_manager.save_if_best(step, state, metadata, value)
        best = self.best_manager.best() if not saved else (step, value)
        results["saved_best"] = saved
        results["best"] = (
            {"step": best[0], "value": best[1], "metric": self.metric} if best else None
        )
        self._done.add(step)
        self.last = results
        return results

    def _evaluate(self, step: int, variables: Any) -> dict[str, Any]:
        from oanet_jax.eval.evaluator import evaluate_params

        return evaluate_params(self.config, variables, step, self._dir(step), model=self.model)

    def _evaluate_on_main(self, step: int, variables: Any) -> dict[str, Any]:
        """Several processes: process 0 evaluates, every process gets its results (or its error,
        so that none waits for results that will not come)."""
        variables = sharding_lib.gather_to_host(variables)
        results, error = None, None
        if jax.process_index() == 0:
            try:
                results = self._evaluate(step, variables)
            except Exception as e:  # noqa: BLE001 - re-raised below, after the others heard
                error = e
        failure = f"{type(error).__name__}: {error}" if error is not None else None
        results, failure = sharding_lib.broadcast_from_main((results, failure), f"eval_{step}")
        if error is not None:
            raise error
        if failure is not None:
            raise RuntimeError(f"the evaluation at step {step} failed on process 0: {failure}")
        return results

    def summary(self, results: Mapping[str, Any]) -> str:
        """One console line of an evaluation's results."""
        pq = ", ".join(f"{o} {r['PQ']:.1f}" for o, r in results["panoptic"].items())
        line = f"eval step {results['step']}: PQ {pq}"
        if "bbox" in results and "segm" in results:
            line += f"; box AP {results['bbox']['AP']:.1f}, mask AP {results['segm']['AP']:.1f}"
        if "stuff" in results:
            line += f"; stuff mIoU {results['stuff']['mIoU']:.1f}"
        best = results.get("best")
        if best:
            line += f"; best {best['metric']} {best['value']:.1f} (step {best['step']})"
        return line

    def close(self) -> None:
        """Waits for a pending best-checkpoint save and releases the manager."""
        if self.best_manager is not None:
            self.best_manager.close()
