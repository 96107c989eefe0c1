"""Evaluates a checkpoint on the eval split: PQ (score and SRM orderings), box/mask AP, mIoU.

Example:

    python scripts/evaluate.py --config configs/synthetic.py --workdir runs/synthetic
    python scripts/evaluate.py --config configs/synthetic.py --workdir runs/synthetic \
        --checkpoint 1000 --config.eval.batch_size=4

Outputs go to ``<workdir>/eval_<step>/`` (prediction PNGs and JSONs per ordering, results.json,
results.md) and TensorBoard scalars to ``<workdir>/eval``; see ``oanet_jax/evaluate.py``.
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training work directory (has checkpoints/).")
_CHECKPOINT = flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: the latest).")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", None, "Evaluate only this many batches.")
_ORDERINGS = flags.DEFINE_list("orderings", None, "Merge orderings (default config.eval).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    """Restores the checkpoint, evaluates and prints the Markdown report."""
    del argv
    import jax

    from oanet_jax import evaluate as evaluate_lib
    from oanet_jax.modeling.build import build_model
    from oanet_jax.train.checkpoint import restore_variables

    jax.config.parse_flags_with_absl()
    config = _CONFIG.value
    variables, step = restore_variables(_WORKDIR.value, _CHECKPOINT.value)
    orderings = tuple(_ORDERINGS.value or config.eval.orderings)
    results = evaluate_lib.evaluate(
        config,
        build_model(config),
        variables,
        _WORKDIR.value,
        orderings=orderings,
        max_batches=_MAX_BATCHES.value,
        step=step,
    )
    print(evaluate_lib.results_markdown(results))


if __name__ == "__main__":
    app.run(main)
