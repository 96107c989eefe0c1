"""Shared fixtures of the evaluation tests: a tiny synthetic split and a fresh tiny model.

The split has 48 x 56 images, resized to 55 x 64 inside the 64 x 64 padding, so the crop/resize
back to the original size is exercised; NUM_VAL = 5 with eval batch 4 gives a second batch with 1
valid and 3 padding examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from eval_setup import NUM_VAL, SIZE  # noqa: F401  (re-exported for the fixtures)

from configs import tiny
from oanet_jax.data import synthetic
from oanet_jax.modeling.build import build_model


def fresh_variables(model, config):
    """Random variables of the model's exact structure, without compiling `model.init`.

    `jax.eval_shape(model.init)` gives the variable tree (logical-partitioning boxes included);
    the leaves are filled from a seeded generator: conv/dense kernels He-normal (fan-in = all but
    the last axis), biases 0, norm scales 1. Compiling `model.init` of the whole network costs as
    much as compiling inference (~15-30 s on a shared 2-core CPU) and the evaluation needs only
    some fixed random network (its PQ is near 0 either way).
    """
    hp, wp = config.data.image_size
    dummy = {
        "image": jax.ShapeDtypeStruct((1, hp, wp, 3), jnp.uint8),
        "image_shape": jax.ShapeDtypeStruct((1, 2), jnp.int32),
    }
    shapes = jax.eval_shape(lambda b: model.init({"params": jax.random.key(0)}, b), dummy)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        name = names[-2] if names[-1] == "value" else names[-1]  # inside a partitioning box
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape), leaf.dtype)
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


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
