"""Shared checks of the data tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest


def _check_padding(ex: dict) -> None:
    """Unbatched example: image 0 and semantic 255 outside image_shape, zero rows past valid."""
    h, w = (int(v) for v in ex["image_shape"])
    assert np.all(ex["image"][h:] == 0) and np.all(ex["image"][:, w:] == 0)
    assert np.all(ex["semantic"][h:] == 255) and np.all(ex["semantic"][:, w:] == 255)
    n = int(ex["valid"].sum())
    assert np.all(ex["valid"][:n]) and not np.any(ex["valid"][n:])  # valid rows first
    for k in ("boxes", "classes", "is_crowd", "masks"):
        assert not np.any(ex[k][n:]), k
    assert np.all(ex["masks"] >= 0) and np.all(ex["masks"] <= 1)


@pytest.fixture
def check_padding() -> Callable[[dict], None]:
    """The padding check of one unbatched example (see :func:`_check_padding`)."""
    return _check_padding
