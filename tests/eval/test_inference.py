"""The jitted inference: one stuff argmax shared by every merge ordering (counted in the jaxpr)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from oanet_jax.eval.inference import make_inference_fn


def _count(jaxpr, name: str) -> int:
    """Occurrences of primitive `name` in a closed jaxpr, sub-jaxprs (jit, scan, map) included."""
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == name
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", None)
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += _count(sub.jaxpr, name)
                elif inner is not None and hasattr(inner, "eqns"):
                    total += _count(inner, name)
                elif hasattr(sub, "eqns"):
                    total += _count(sub, name)
    return total


def test_stuff_argmax_is_shared_by_the_orderings(tiny_setup):
    config, model, variables, _ = tiny_setup
    hp, wp = config.data.image_size
    batch = {
        "image": jnp.zeros((2, hp, wp, 3), jnp.uint8),
        "image_shape": jnp.asarray([[hp, wp], [40, 50]], jnp.int32),
        "orig_shape": jnp.asarray([[hp, wp], [80, 100]], jnp.int32),  # eval.stuff_area_pixels
    }
    counts = {}
    for orderings in (("score",), ("score", "srm")):
        infer = make_inference_fn(model, config, orderings, batch_size=2)
        assert infer.orderings == orderings
        jaxpr = jax.make_jaxpr(infer._jitted)(variables, batch)
        counts[orderings] = _count(jaxpr.jaxpr, "argmax")
        scans = _count(jaxpr.jaxpr, "scan")
        assert scans >= len(orderings)  # one instance-pasting scan per merge, at least
    assert counts[("score",)] == counts[("score", "srm")] > 0
