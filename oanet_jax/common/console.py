"""Console logging of the command-line tools: quiet by default, ``-v`` brings the INFO lines back.

The evaluation, prediction (and training) CLIs print their result; the INFO lines of orbax
(checkpoint restore), absl, jax and TensorFlow would bury it. `setup_console` keeps WARNING and
above by default and follows absl's own ``--verbosity`` / ``-v`` flag (absl levels: -1 WARNING,
0 INFO, 1 DEBUG), so ``-v 0`` shows every INFO line again and ``-v 1`` adds DEBUG. Call it
before ``app.run`` (flag default) and again inside ``main`` (after flags are parsed) to apply the
level to Python loggers that do not go through absl.
"""

from __future__ import annotations

import logging as py_logging
import os

from absl import flags
from absl import logging as absl_logging

__all__ = ["QUIET_LOGGERS", "setup_console"]

# Python loggers that log INFO lines of their own (outside the absl logger).
QUIET_LOGGERS = ("orbax", "jax", "tensorflow", "etils")

_ABSL_TO_PY = {-1: py_logging.WARNING, 0: py_logging.INFO, 1: py_logging.DEBUG}


def setup_console(verbosity: int | None = None) -> int:
    """Applies the console verbosity (see the module docstring).

    Args:
      verbosity: absl level (-1 WARNING, 0 INFO, >= 1 DEBUG). None: the ``--verbosity`` flag
        when flags are parsed, else its default (made -1, WARNING, here).

    Returns:
      The level applied.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO/WARNING lines
    if verbosity is None:
        if flags.FLAGS.is_parsed():
            verbosity = int(flags.FLAGS.verbosity)
        else:
            flags.FLAGS.set_default("verbosity", -1)
            verbosity = -1
    verbosity = int(verbosity)
    absl_logging.set_verbosity(verbosity)  # the absl logger (orbax and our own INFO lines)
    level = _ABSL_TO_PY[max(-1, min(verbosity, 1))]
    for name in QUIET_LOGGERS:
        py_logging.getLogger(name).setLevel(level)
    return verbosity
