"""Mask-RoI buckets of the training forward pass (`config.model.mask_head.train_buckets`).

The bucket sizes and the on-device choice at their boundaries, then the acceptance test: on one
batch, the step's losses and gradients with the mask head on a bucket that the batch's positives
fill equal those of the unbucketed head (all F foreground slots, `OANet.train_mask_rois = F`,
the path before buckets). The switch under a data-sharded jit is exercised by the tiny config's
buckets in tests/train/test_sharding.py.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from oanet_jax import losses
from oanet_jax.data import spec as data_spec
from oanet_jax.modeling.build import build_model
from oanet_jax.modeling.oanet import choose_bucket, mask_buckets
from oanet_jax.train import state as state_lib

FAST_COMPILE = state_lib.CPU_FAST_COMPILE
BUCKETS = (16, 32, 64, 128)


def test_mask_buckets_are_cut_to_the_foreground_slots_and_end_with_them():
    assert mask_buckets(BUCKETS, 128) == BUCKETS
    assert mask_buckets((64, 16, 32), 128) == (16, 32, 64, 128)  # F always added, sorted
    assert mask_buckets(BUCKETS, 40) == (16, 32, 40)
    assert mask_buckets(BUCKETS, 4) == (4,)
    assert mask_buckets((), 128) == (128,)
    with pytest.raises(ValueError, match="train_buckets"):
        mask_buckets((0, 16), 128)


@pytest.mark.parametrize(
    "num_fg, size",
    [
        ((16, 3), 16),  # a bucket exactly filled
        ((17, 0), 32),  # one more: the next bucket
        ((0, 0), 16),  # no foreground: the smallest
        ((2, 33), 64),  # the batch's largest count decides
        ((64, 64), 64),
        ((65, 1), 128),
        ((128, 128), 128),  # F: the last bucket (no count exceeds F)
    ],
)
def test_choose_bucket_boundaries(num_fg, size):
    index = jax.jit(choose_bucket, static_argnums=1)(jnp.asarray(num_fg, jnp.int32), BUCKETS)
    assert index.dtype == jnp.int32 and index.shape == ()
    assert BUCKETS[int(index)] == size


# ---------------------------------------------------------------------- the network, tiny
def _config(train_buckets=(4, 8)):
    cfg = tiny.get_config()
    cfg.model.roi.batch_size_per_image = 64  # F = 16 foreground slots
    cfg.model.mask_head.train_buckets = train_buckets
    return cfg


def _batch(cfg, counts=(2, 3)) -> dict[str, np.ndarray]:
    """Two 64x64 images with `counts` ground-truth boxes (rectangle masks)."""
    batch = data_spec.zeros_batch(cfg.data, len(counts), train=True)
    rng = np.random.default_rng(0)
    batch["image"] = rng.uniform(0, 255, batch["image"].shape).astype(batch["image"].dtype)
    s = cfg.data.mask_size
    for b, n in enumerate(counts):
        xy = rng.uniform(0, 30, (n, 2))
        batch["boxes"][b, :n] = np.concatenate([xy, xy + rng.uniform(12, 30, (n, 2))], -1)
        batch["classes"][b, :n] = rng.integers(0, cfg.model.num_thing_classes, n)
        batch["valid"][b, :n] = True
        batch["masks"][b, :n, s // 4 : -s // 4, s // 8 : -s // 8] = 1
    batch["semantic"][:] = rng.integers(0, 7, batch["semantic"].shape)
    return batch


def _losses_and_grads(model, variables, batch):
    """(total, terms, outputs), grads of `losses.compute_losses` for one model, jitted."""

    def loss_fn(params):
        out = model.apply(
            {**variables, "params": params}, batch, train=True, rngs={"sampling": jax.random.key(1)}
        )
        total, terms = losses.compute_losses(out, batch)
        return total, (terms, out)

    fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST_COMPILE)
    (total, (terms, out)), grads = fn(variables["params"])
    return total, terms, out, grads


@pytest.mark.slow  # three tiny compilations: ~1 min on a quiet 2-core machine
def test_filled_bucket_gives_the_unbucketed_losses_and_gradients():
    cfg = _config()
    batch = _batch(cfg)
    f = 16
    model = build_model(cfg)
    init = jax.jit(
        lambda k: model.init({"params": k, "sampling": k}, batch, train=True),
        compiler_options=FAST_COMPILE,
    )
    variables = nn.meta.unbox(init(jax.random.key(0)))

    # Before buckets: the mask head on all F slots of each image.
    ref_total, ref_terms, ref_out, ref_grads = _losses_and_grads(
        model.clone(train_mask_rois=f), variables, batch
    )
    num_fg = np.asarray(ref_out["mask_num_fg"])
    largest = int(num_fg.max())
    # GT boxes are always foreground (appended to the proposals), and some room is left.
    assert (num_fg >= (2, 3)).all() and largest < f
    assert int(ref_out["mask_rois"]) == f and float(ref_terms["mask"]) > 0

    # A bucket the batch's largest count fills exactly, chosen by the switch among (largest, F).
    filled = build_model(_config(train_buckets=(largest,)))
    total, terms, out, grads = _losses_and_grads(filled, variables, batch)
    assert int(out["mask_rois"]) == largest
    np.testing.assert_array_equal(np.asarray(out["mask_num_fg"]), num_fg)
    for k, v in ref_terms.items():
        np.testing.assert_allclose(float(terms[k]), float(v), rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(float(total), float(ref_total), rtol=1e-6)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(grads["mask_head"]["predictor"]["kernel"])).max() > 0
