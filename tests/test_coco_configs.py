"""The COCO configs build (jax.eval_shape at their real image size) and train one step small."""

import importlib

import jax
import numpy as np
import pytest

from oanet_jax.bench.train import make_batch
from oanet_jax.data import spec as data_spec
from oanet_jax.modeling.build import build_model
from oanet_jax.train import sharding, state, step


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, depth_blocks, train_step",
    # One real step of ResNet-101 adds minutes and nothing the ResNet-50 step does not check.
    [("coco_r50", 6, True), ("coco_r101", 23, False)],
)
def test_coco_config_builds_and_trains_one_step(name, depth_blocks, train_step):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.data.root == "data/coco" and config.train.num_steps == 100_000
    assert config.train.lr_decay_steps == (60_000, 80_000) and config.loss.seg_weight == 0.25
    model = build_model(config)
    # Shapes at the real padded size, without computing anything.
    full = data_spec.zeros_batch(config.data, 1, train=False)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), {k: full[k] for k in ("image", "image_shape")})
    )
    params = variables["params"]
    assert len(params["backbone"]["res4"]) == depth_blocks
    if not train_step:
        return
    # One real training step at a small size.
    config.data.image_size = (128, 128)
    config.data.max_instances = 4
    config.data.mask_size = 28
    config.train.batch_size = 1
    batch, _, _ = make_batch(config, num_instances=2)
    mesh = sharding.make_mesh(config.sharding, devices=jax.devices()[:1])
    train_state, shardings = state.create_train_state(config, model, mesh, batch)
    fn = step.jit_train_step(model, config, mesh, shardings)
    train_state, metrics = fn(train_state, sharding.shard_batch(batch, mesh))
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["total"]) and metrics["total"] > 0
    assert int(metrics["nonfinite_skipped"]) == 0
