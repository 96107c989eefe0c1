"""Random variables of a model without compiling its init (a plain module shared by the eval and
export tests: `conftest` names collide across test folders)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def fresh_variables(model: Any, config: Any) -> Any:
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
