"""Command line: evaluate a checkpoint on the eval split (PQ per ordering, box/mask AP, mIoU).

Example:

    python scripts/evaluate.py --config configs/synthetic.py --workdir runs/synthetic
    python scripts/evaluate.py --config configs/synthetic.py --workdir runs/synthetic \
        --checkpoint 1000 --config.eval.batch_size=4 --config.eval.write_predictions=True
    python scripts/evaluate.py --config configs/synthetic.py --workdir runs/synthetic --best

Outputs go to ``<workdir>/eval_<step>/`` (results.json, results.md; with
``eval.write_predictions`` the prediction PNGs and JSONs per ordering) and scalars to
``<workdir>/eval``; the Markdown report is printed. orbax/absl INFO lines are hidden; ``-v 0``
shows them (``-v 1``: debug too).
"""

from __future__ import annotations

from typing import Any

from absl import app, flags
from ml_collections import config_flags

from oanet_jax.common.console import setup_console

__all__ = ["main"]


def _define_flags() -> dict[str, Any]:
    """The CLI flags, defined on the `main` call (importing this module defines none)."""
    f = {
        "config": config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py)."),
        "workdir": flags.DEFINE_string(
            "workdir", None, "Training work directory (has checkpoints/)."
        ),
        "checkpoint": flags.DEFINE_integer(
            "checkpoint", None, "Checkpoint step (default: the latest)."
        ),
        "best": flags.DEFINE_bool(
            "best",
            False,
            "Evaluate the best checkpoint (checkpoints_best, kept by evaluation during training).",
        ),
        "max_batches": flags.DEFINE_integer(
            "max_batches", None, "Evaluate only this many batches."
        ),
        "orderings": flags.DEFINE_list("orderings", None, "Merge orderings (default config.eval)."),
    }
    flags.mark_flags_as_required(["config", "workdir"])
    return f


def _run(argv: list[str], f: dict[str, Any]) -> None:
    """Restores the checkpoint, evaluates and prints the Markdown report."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    setup_console()
    import jax

    from oanet_jax.eval.evaluator import evaluate_checkpoint
    from oanet_jax.eval.report import results_markdown

    jax.config.parse_flags_with_absl()
    config = f["config"].value
    results = evaluate_checkpoint(
        config,
        f["workdir"].value,
        checkpoint=f["checkpoint"].value,
        best=f["best"].value,
        orderings=tuple(f["orderings"].value or config.eval.orderings),
        max_batches=f["max_batches"].value,
    )
    print(results_markdown(results))


def main(argv: list[str] | None = None) -> None:
    """Entry point: parses the flags (``argv`` default ``sys.argv``) and evaluates."""
    setup_console()
    f = _define_flags()
    app.run(lambda args: _run(args, f), argv=argv)
