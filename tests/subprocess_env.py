"""The environment of the tests' training subprocesses (one helper for every test file).

CPU only, ``num_devices`` fake devices, and the suite's persistent compilation cache
(``JAX_COMPILATION_CACHE_DIR``, set by ``tests/conftest.py``) with every program cached, so a
program compiled by one subprocess (or one test file) is loaded, not compiled, by the next.
"""

from __future__ import annotations

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def subprocess_env(num_devices: int, xla_flags: str = "") -> dict[str, str]:
    """``os.environ`` plus the settings of a training subprocess.

    Args:
      num_devices: fake CPU devices of the subprocess.
      xla_flags: further XLA flags.

    Returns:
      The environment dict for ``subprocess.run`` / ``Popen``.
    """
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} {xla_flags}".strip(),
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="",
        JAX_PLATFORMS="cpu",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=str(ROOT),
    )
