"""The CLI console helper: quiet (WARNING) by default, absl's -v brings INFO / DEBUG back."""

from __future__ import annotations

import logging

from absl import logging as absl_logging

from oanet_jax.common.console import QUIET_LOGGERS, setup_console


def test_setup_console_levels():
    saved = absl_logging.get_verbosity(), {n: logging.getLogger(n).level for n in QUIET_LOGGERS}
    try:
        assert setup_console(-1) == -1
        assert absl_logging.get_verbosity() == absl_logging.WARNING
        assert not absl_logging.get_absl_logger().isEnabledFor(logging.INFO)
        assert logging.getLogger("orbax").level == logging.WARNING
        assert setup_console(0) == 0
        assert absl_logging.get_absl_logger().isEnabledFor(logging.INFO)
        assert logging.getLogger("orbax.checkpoint").getEffectiveLevel() == logging.INFO
        setup_console(1)
        assert logging.getLogger("jax").level == logging.DEBUG
    finally:
        absl_logging.set_verbosity(saved[0])
        for name, level in saved[1].items():
            logging.getLogger(name).setLevel(level)
