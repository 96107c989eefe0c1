"""Evaluation of OANet: detectron2-style evaluators (``reset / process / evaluate``).

* `inference`: the jitted forward pass + panoptic merge of every ordering (one stuff argmax).
* `ground_truth`: the eval split's panoptic JSON, PNGs decoded once for every metric.
* `panoptic` (PQ per ordering, in memory), `instances` (COCO box / mask AP), `semantic` (stuff
  mIoU): one evaluator each.
* `report`: results.json, results.md, scalars. `evaluator`: the loop and its entry points
  (`evaluate_params` during training, `evaluate`, `evaluate_checkpoint`). `main`: the CLI.

The entry points below are imported on first use (PEP 562), so that importing a submodule such
as `oanet_jax.eval.inference` does not import the input pipeline (TensorFlow) or pycocotools:
the accelerator benchmark runs on machines that have neither.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["EvalRunner", "build_evaluators", "evaluate", "evaluate_checkpoint", "evaluate_params"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("oanet_jax.eval.evaluator"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
