"""Evaluation of OANet: detectron2-style evaluators (``reset / process / evaluate``).

* `inference`: the jitted forward pass + panoptic merge of every ordering (one stuff argmax).
* `ground_truth`: the eval split's panoptic JSON, PNGs decoded once for every metric.
* `panoptic` (PQ per ordering, in memory), `instances` (COCO box / mask AP), `semantic` (stuff
  mIoU): one evaluator each.
* `report`: results.json, results.md, scalars. `evaluator`: the loop and its entry points
  (`evaluate_params` during training, `evaluate`, `evaluate_checkpoint`). `main`: the CLI.
"""

from oanet_jax.eval.evaluator import (
    EvalRunner,
    build_evaluators,
    evaluate,
    evaluate_checkpoint,
    evaluate_params,
)

__all__ = ["EvalRunner", "build_evaluators", "evaluate", "evaluate_checkpoint", "evaluate_params"]
