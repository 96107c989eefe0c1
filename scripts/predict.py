"""Panoptic predictions of images, score order vs SRM order side by side.

Example:

    python scripts/predict.py --config configs/synthetic.py --checkpoint runs/synthetic \
        --out predictions data/synthetic/val/images/000001000001.png

``--checkpoint`` is a training work directory (latest checkpoint), its ``checkpoints/`` folder,
or one step's folder ``<workdir>/checkpoints/<step>``. For each IMAGE it writes
``<out>/<stem>_panoptic.png`` (panels: score-ordered merge, SRM-ordered merge, the pixels whose
segment changed) and ``<out>/<stem>_segments.json``.
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Work directory, its checkpoints/ folder, or checkpoints/<step>."
)
_OUT = flags.DEFINE_string("out", "predictions", "Output folder.")
_CATEGORIES = flags.DEFINE_string(
    "categories", None, "JSON with the category list (default: from the config's data files)."
)
_ORDERINGS = flags.DEFINE_list("orderings", None, "Merge orderings (default config.eval).")
flags.mark_flags_as_required(["config", "checkpoint"])


def resolve_checkpoint(path: str) -> tuple[str, int | None]:
    """(workdir, step or None for the latest) from a workdir, checkpoints/ or checkpoints/<step>."""
    p = pathlib.Path(path).resolve()
    if (p / "checkpoints").is_dir():
        return str(p), None
    if p.name == "checkpoints":
        return str(p.parent), None
    if p.name.isdigit() and p.parent.name == "checkpoints":
        return str(p.parent.parent), int(p.name)
    raise FileNotFoundError(
        f"{path} is neither a work directory with checkpoints/, a checkpoints/ folder, nor "
        "checkpoints/<step>"
    )


def main(argv: list[str]) -> None:
    """Restores the checkpoint and draws the predictions of the images given as arguments."""
    images = argv[1:]
    if not images:
        raise app.UsageError("give at least one IMAGE")
    import jax

    from oanet_jax import evaluate as evaluate_lib
    from oanet_jax.modeling.build import build_model
    from oanet_jax.train.checkpoint import restore_variables

    jax.config.parse_flags_with_absl()
    config = _CONFIG.value
    workdir, step = resolve_checkpoint(_CHECKPOINT.value)
    variables, step = restore_variables(workdir, step)
    logging.info("restored step %d from %s", step, workdir)
    table = evaluate_lib.load_category_table(config.data, _CATEGORIES.value)
    paths = evaluate_lib.predict_images(
        config,
        build_model(config),
        variables,
        images,
        _OUT.value,
        table=table,
        orderings=tuple(_ORDERINGS.value or config.eval.orderings),
    )
    for p in paths:
        print(p)


if __name__ == "__main__":
    app.run(main)
