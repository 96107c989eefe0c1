"""Files written atomically: a reader never sees half a file, a crash leaves the old one."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

__all__ = ["json_default", "write_json"]


def json_default(obj: Any) -> Any:
    """`json.dump` hook: numpy scalars and arrays become Python numbers and lists."""
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = None) -> None:
    """Writes `obj` as JSON to `path` atomically (temporary file in the same folder, then rename).

    Args:
      path: destination file; its folder is created when missing.
      obj: JSON-serialisable object (numpy scalars/arrays allowed, see `json_default`).
      indent: `json.dump` indent; None writes the compact form (no spaces after separators).
    """
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".json.tmp")
    separators = (",", ":") if indent is None else None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent, separators=separators, default=json_default)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
