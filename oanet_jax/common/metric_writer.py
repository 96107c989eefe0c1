"""The one scalar writer: a JSON-lines file and TensorBoard event files.

Training (`train/loop.py`) and evaluation (`eval/report.py`) both write through `MetricWriter`,
so every scalar the project logs lands in the same two places with the same tags.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

__all__ = ["MetricWriter"]


class MetricWriter:
    """Appends `{step, **scalars}` records to a JSON-lines file and writes TensorBoard scalars.

    Writes nothing when `enabled` is False (processes other than 0 in multi-host training).
    Non-finite values are written as the JSON literals NaN / Infinity (Python's json reads them).
    """

    def __init__(self, jsonl_path: str | None, tb_dir: str | None, *, enabled: bool = True):
        """Opens the writers.

        Args:
          jsonl_path: JSON-lines file appended to (None: no JSON lines).
          tb_dir: TensorBoard event folder (None: no event files).
          enabled: False makes every call a no-op.
        """
        self.enabled = enabled
        self.jsonl_path = jsonl_path
        self.tb_dir = tb_dir
        self._file = None
        self._tb = None
        if not enabled:
            return
        if jsonl_path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            self._file = open(jsonl_path, "a")  # noqa: SIM115 - closed in close()
        if tb_dir is not None:
            import tensorflow as tf

            self._tb = tf.summary.create_file_writer(tb_dir)

    def write(self, step: int, scalars: Mapping[str, float], *, prefix: str = "") -> None:
        """Writes one record of scalars at `step`.

        Args:
          step: the training step the values belong to.
          scalars: {name: value}; names may contain '/' (TensorBoard groups by the first part).
          prefix: prepended to every TensorBoard tag (e.g. 'train/'); the JSON keys are the names.
        """
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        if self._file is not None:
            self._file.write(json.dumps({"step": int(step), **values}) + "\n")
            self._file.flush()
        if self._tb is not None:
            import tensorflow as tf

            with self._tb.as_default(step=int(step)):
                for k, v in values.items():
                    tf.summary.scalar(prefix + k, v if math.isfinite(v) else float("nan"))
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes both writers (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
