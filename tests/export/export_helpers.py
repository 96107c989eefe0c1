"""Constants and helpers of the export tests (a plain module: `conftest` names collide).

Two tiny synthetic splits: the config's, 64 x 64 images (the exported padded size: no resize, so
the predictor's PIL resize and the eval pipeline's TF resize, which differ by one level in some
pixels, give the same input and the PQs can be compared exactly); and 48 x 56 images, resized to
55 x 64 inside the padding, for the round trip and the predictor's inverse mapping. 5 images with
the exported batch of 2 give a last batch with one padding example.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import numpy as np

from oanet_jax.data import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[2]
SIZE = (48, 56)  # the resized split
EXPORT_SIZE = (64, 64)  # the config's split and the padded size
NUM_VAL = 5
BATCH = 2
ORDERING = "srm"
STEP = 5


def subprocess_env() -> dict[str, str]:
    """A fresh process on one CPU device, importing this checkout."""
    return {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


@dataclasses.dataclass
class ExportSetup:
    """The tiny run and its exported artifact.

    Attributes:
      config: the tiny config pointing at the synthetic split.
      model: the OANet module.
      variables: its (fresh, random) variables, as saved in the checkpoint.
      data_root: the config's synthetic split (EXPORT_SIZE images).
      resized_root: the SIZE split.
      workdir: the training work directory with the checkpoint of step `STEP`.
      artifact: the `jax` artifact folder (batch `BATCH`, ordering `ORDERING`, cpu).
      inputs: the exported function's inputs for two `resized_root` validation images:
        'images' uint8 [2, 64, 64, 3], 'image_shapes' and 'orig_shapes' int32 [2, 2].
    """

    config: Any
    model: Any
    variables: Any
    data_root: pathlib.Path
    resized_root: pathlib.Path
    workdir: pathlib.Path
    artifact: pathlib.Path
    inputs: dict[str, np.ndarray]


def assert_same_panoptic(outputs: dict[str, np.ndarray], reference: dict[str, Any]) -> None:
    """An exported function's outputs equal the in-process merge: id maps and segment tables
    exactly, scores to 1e-5."""
    seg = reference["segments"]
    np.testing.assert_array_equal(np.asarray(outputs["id_map"]), reference["id_map"])
    np.testing.assert_array_equal(np.asarray(outputs["segment_id"]), seg["id"])
    np.testing.assert_array_equal(np.asarray(outputs["category"]), seg["category"])
    np.testing.assert_array_equal(np.asarray(outputs["isthing"]), seg["isthing"])
    np.testing.assert_array_equal(np.asarray(outputs["area"]), seg["area"])
    np.testing.assert_array_equal(np.asarray(outputs["valid"]), seg["valid"])
    np.testing.assert_allclose(np.asarray(outputs["score"]), seg["score"], rtol=0, atol=1e-5)
    # A non-trivial comparison: things and stuff are both in the maps.
    assert np.any(seg["valid"] & seg["isthing"]) and np.any(seg["valid"] & ~seg["isthing"])
    table = {c["id"] for c in synthetic.CATEGORIES}
    assert set(np.asarray(outputs["category_id"]).ravel().tolist()) <= table
