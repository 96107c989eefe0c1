"""`oanet-train`: trains (and evaluates) OANet from an ml_collections config file.

Usage::

    oanet-train --config configs/synthetic.py --workdir workdir/synthetic \
        [--config.train.num_steps=20 --config.train.batch_size=8 ...]

Rerunning the same command resumes from the latest checkpoint in --workdir. SIGTERM / Ctrl-C save a
checkpoint at the current step and exit with status 0. With the synthetic configs the dataset is
generated at `config.data.root` if it does not exist. With ``config.eval.every_steps`` /
``config.eval.at_end`` it also evaluates (see `oanet_jax.train.periodic_eval`). orbax/absl INFO
lines are hidden; ``-v 0`` shows them. Does not import torch.

A bad record of the training data (``DataError``, or ``AllRecordsSkippedError`` when
``data.skip_bad_records`` dropped a whole pass) ends the run with its message first, one line of
context and exit status 1; the traceback is logged at debug level (``-v 1``).
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from oanet_jax.common.console import setup_console

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder: checkpoints, metrics, events.")
flags.mark_flags_as_required(["config", "workdir"])


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    setup_console()
    from oanet_jax.data.coco_panoptic import AllRecordsSkippedError, DataError
    from oanet_jax.train import loop

    try:
        loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (DataError, AllRecordsSkippedError) as e:
        logging.debug("Training stopped by a data error", exc_info=True)
        raise SystemExit(error_text(e)) from None


def error_text(err: BaseException) -> str:
    """``Type: message`` and the exception's notes, one per line (what the user reads)."""
    return "\n".join([f"{type(err).__name__}: {err}", *getattr(err, "__notes__", ())])


def main() -> None:
    """Console entry point (absl parses sys.argv)."""
    # Quiet TensorFlow's C++ logging (the input pipeline imports it); the caller's values win.
    # TensorFlow only moves numpy data here: its oneDNN kernels (and their banner) are not needed.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    setup_console()
    app.run(_main)


if __name__ == "__main__":
    main()
