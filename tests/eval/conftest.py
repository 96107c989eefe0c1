"""Shared fixtures of the evaluation tests: a tiny synthetic split and a fresh tiny model.

The split has 48 x 56 images, resized to 55 x 64 inside the 64 x 64 padding, so the crop/resize
back to the original size is exercised; NUM_VAL = 5 with eval batch 4 gives a second batch with 1
valid and 3 padding examples.
"""

from __future__ import annotations

import pytest
from eval_setup import NUM_VAL, SIZE  # noqa: F401  (re-exported for the fixtures)
from tiny_model import fresh_variables

from configs import tiny
from oanet_jax.data import synthetic
from oanet_jax.modeling.build import build_model


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    """Synthetic data, the tiny config pointing at it, the model and fresh variables."""
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(str(root), num_images=1, num_val_images=NUM_VAL, seed=0, size=SIZE)
    config = tiny.get_config()
    config.data.root = str(root)
    model = build_model(config)
    variables = fresh_variables(model, config)
    return config, model, variables, root
