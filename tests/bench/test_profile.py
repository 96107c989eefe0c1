"""The profile section returns every part with positive FLOPs and times (tiny config, ours only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torchvision")

import torch  # noqa: E402

from configs import tiny  # noqa: E402
from oanet_jax.bench import profile  # noqa: E402


def test_cost_helpers_count_flops_and_converts():
    compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((8, 16)), jnp.ones((16, 4))).compile()
    cost = profile.xla_cost(compiled)
    assert cost["flops"] >= 2 * 8 * 16 * 4 and cost.get("peak_bytes", 1) > 0
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.ones(1, 3, 8, 8)
    assert profile.torch_flops(lambda: conv(x)) == 2 * 4 * 3 * 9 * 36
    text = (
        jax.jit(lambda a: (a.astype(jnp.int32) * 2).astype(jnp.bfloat16))
        .lower(jnp.ones((128, 128), jnp.uint8))
        .as_text()
    )
    out = profile.convert_ops(text)
    assert out["count"] == 2 and out["largest"][0]["to"] == "128x128xi32"
    assert (
        out["largest"][0]["bytes"] == 4 * 128 * 128 and out["largest"][1]["bytes"] == 2 * 128 * 128
    )


@pytest.mark.slow
def test_profile_section_tiny_returns_every_part():
    config = tiny.get_config()
    r = profile.run(
        batch=2,
        size=128,
        repeats=1,
        num_instances=3,
        config=config,
        plain=False,
        full_step=False,
        avoidable=False,
        torchvision_side=False,
    )
    assert tuple(r["parts"]) == profile.PARTS
    for name, part in r["parts"].items():
        assert part["ours_gflop"] > 0, name
        assert part["ours_ms"] > 0 and np.isfinite(part["ours_ms"]), name
    assert r["sum_of_parts"]["ours_gflop"] > 0
