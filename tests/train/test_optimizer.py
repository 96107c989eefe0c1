"""Schedule and optimizer vs detectron2's formula (float64) and torch.optim.SGD."""

from __future__ import annotations

import bisect

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import base, tiny
from oanet_jax.modeling.build import build_model
from oanet_jax.train import optimizer as opt_lib

torch = pytest.importorskip("torch")


def _train_config(**overrides) -> ml_collections.ConfigDict:
    t = base.get_config().train
    for k, v in overrides.items():
        t[k] = v
    return t


def _d2_lr(step: int, t: ml_collections.ConfigDict) -> float:
    """detectron2 WarmupMultiStepLR (linear), float64."""
    base_lr = np.float64(t.base_lr)
    if t.warmup_steps > 0 and step < t.warmup_steps:
        f = np.float64(t.warmup_init_lr) / base_lr
        alpha = np.float64(step) / t.warmup_steps
        warm = f * (1 - alpha) + alpha
    else:
        warm = np.float64(1)
    return float(base_lr * warm * t.lr_decay_factor ** bisect.bisect_right(t.lr_decay_steps, step))


def test_schedule_matches_detectron2_formula_at_boundaries():
    t = _train_config()  # paper: 0.002 -> 0.02 over 2000, x0.1 at 60k, 80k
    sched = jax.jit(opt_lib.learning_rate_schedule(t))
    steps = [0, 1, 2, 999, 1000, 1998, 1999, 2000, 2001, 30000, 59999, 60000, 60001]
    steps += [79999, 80000, 80001, 99999, 100000]
    got = np.asarray(sched(jnp.asarray(steps)), np.float64)
    want = np.array([_d2_lr(s, t) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Spot values that follow from the paper's numbers.
    np.testing.assert_allclose(got[[0, 7, 11, 15]], [0.002, 0.02, 0.002, 0.0002], rtol=1e-6)
    # No warmup: base_lr from step 0.
    t0 = _train_config(warmup_steps=0, lr_decay_steps=(3,))
    got0 = np.asarray(opt_lib.learning_rate_schedule(t0)(jnp.arange(6)))
    np.testing.assert_allclose(got0, [_d2_lr(s, t0) for s in range(6)], rtol=1e-6)


def test_schedule_matches_torch_scheduler_composition():
    t = _train_config(base_lr=0.1, warmup_init_lr=0.01, warmup_steps=7, lr_decay_steps=(12, 20))
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    sgd = torch.optim.SGD([p], lr=t.base_lr)
    sched = torch.optim.lr_scheduler.ChainedScheduler(
        [
            torch.optim.lr_scheduler.LinearLR(
                sgd, start_factor=t.warmup_init_lr / t.base_lr, total_iters=t.warmup_steps
            ),
            torch.optim.lr_scheduler.MultiStepLR(sgd, list(t.lr_decay_steps), t.lr_decay_factor),
        ]
    )
    want = []
    for _ in range(30):
        want.append(sgd.param_groups[0]["lr"])
        sgd.step()
        sched.step()
    got = np.asarray(opt_lib.learning_rate_schedule(t)(jnp.arange(30)), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _param_tree(rng: np.random.Generator) -> dict:
    def a(*shape):
        return rng.normal(size=shape).astype(np.float32)

    return {
        "backbone": {
            "stem_conv": {"kernel": a(3, 3, 3, 4)},
            "stem_norm": {"scale": a(4), "bias": a(4)},
            "res2": {"block0": {"conv1": {"kernel": a(3, 3, 4, 4)}, "norm1": {"scale": a(4)}}},
            "res3": {
                "block0": {
                    "conv1": {"kernel": a(3, 3, 4, 6)},
                    "norm1": {"scale": a(6), "bias": a(6)},
                }
            },
        },
        "stuff_head": {"fuse_conv_norm": {"scale": a(6), "bias": a(6)}},
        "box_head": {"fc1": {"kernel": a(6, 5), "bias": a(5)}},
    }


def _flat(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


FROZEN_KEYS = ("['backbone']['stem_", "['backbone']['res2']")


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # paper solver
        {"grad_clip_norm": 1.0, "weight_decay_norm": 1e-3},
    ],
)
def test_sgd_matches_torch(overrides):
    t = _train_config(
        base_lr=0.05,
        warmup_init_lr=0.005,
        warmup_steps=3,
        lr_decay_steps=(5, 7),
        weight_decay=1e-2,  # large enough to matter in a few steps
        **overrides,
    )
    rng = np.random.default_rng(0)
    params = _param_tree(rng)
    labels = _flat(opt_lib.param_labels(params, freeze_at=2))
    assert {k for k, v in labels.items() if v == opt_lib.FROZEN} == {
        k for k in labels if k.startswith(FROZEN_KEYS)
    }
    norm_keys = {k for k in labels if "norm" in k and not k.startswith(FROZEN_KEYS)}
    assert {k for k, v in labels.items() if v == opt_lib.NO_DECAY} == norm_keys
    assert labels["['box_head']['fc1']['bias']"] == opt_lib.DECAY  # biases are decayed (d2)

    tx = opt_lib.make_optimizer(t, params, freeze_at=2)
    state = tx.init(params)
    update = jax.jit(tx.update)

    # torch: frozen params are not given to the optimizer (requires_grad=False in detectron2).
    flat = _flat(params)
    tparams = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in flat.items()}
    decay = [tparams[k] for k, v in labels.items() if v == opt_lib.DECAY]
    nodecay = [tparams[k] for k, v in labels.items() if v == opt_lib.NO_DECAY]
    sgd = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": t.weight_decay},
            {"params": nodecay, "weight_decay": t.weight_decay_norm},
        ],
        lr=t.base_lr,
        momentum=t.momentum,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: _d2_lr(s, t) / t.base_lr)

    jparams = params
    for step in range(9):
        # Frozen params get huge gradients: they must neither move nor enter the clipping norm.
        grads = {
            k: rng.normal(size=v.shape).astype(np.float32) * (100.0 if labels[k] == "frozen" else 3)
            for k, v in flat.items()
        }
        gtree = jax.tree_util.tree_unflatten(
            jax.tree.structure(params), [grads[k] for k in _flat(params)]
        )
        updates, state = update(gtree, state, jparams)
        jparams = optax.apply_updates(jparams, updates)

        for k, p in tparams.items():
            p.grad = torch.tensor(grads[k], dtype=torch.float64)
        if t.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(decay + nodecay, t.grad_clip_norm)
        sgd.step()
        sched.step()

        got = _flat(jparams)
        for k, p in tparams.items():
            np.testing.assert_allclose(
                got[k], p.detach().numpy(), rtol=1e-6, atol=1e-6, err_msg=f"{k} step {step}"
            )
            if labels[k] == opt_lib.FROZEN:
                np.testing.assert_array_equal(got[k], flat[k])  # bit-exact, never changes
    moved = [k for k in flat if not np.array_equal(_flat(jparams)[k], flat[k])]
    assert set(moved) == {k for k, v in labels.items() if v != opt_lib.FROZEN}


def test_clipping_is_global_over_trainable_grads():
    t = _train_config(base_lr=1.0, warmup_steps=0, weight_decay=0.0, momentum=0.0)
    t.grad_clip_norm = 2.0
    params = _param_tree(np.random.default_rng(1))
    tx = opt_lib.make_optimizer(t, params, freeze_at=2)
    labels = opt_lib.param_labels(params, freeze_at=2)
    grads = jax.tree.map(lambda p: np.full(p.shape, 5.0, np.float32), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    norm = float(opt_lib.trainable_global_norm(grads, labels))
    n_train = sum(
        p.size
        for p, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels), strict=True)
        if lab != "frozen"
    )
    np.testing.assert_allclose(norm, 5.0 * np.sqrt(n_train), rtol=1e-6)
    # With lr 1, no momentum and no decay the update is -clipped gradient: norm exactly 2.
    np.testing.assert_allclose(float(optax.global_norm(updates)), 2.0, rtol=1e-6)
    for u, lab in zip(jax.tree.leaves(updates), jax.tree.leaves(labels), strict=True):
        if lab == "frozen":
            assert not np.any(np.asarray(u))
        else:
            np.testing.assert_allclose(np.asarray(u), -5.0 * 2.0 / norm, rtol=1e-6)


@pytest.mark.parametrize("which", ["tiny", "base"])
def test_labels_from_names_and_paths_agree_on_the_model(which):
    """Boxed (logical names) and plain (paths) params give the same labels: the optimizer built
    inside the train step from plain params equals the one built at init from boxed ones."""
    cfg = tiny.get_config() if which == "tiny" else base.get_config()
    if which == "tiny":
        cfg.model.norm = "batch_norm"  # trainable norm params in the backbone too
        cfg.model.freeze_at = 2
    model = build_model(cfg)
    h, w = cfg.data.image_size
    m, s = cfg.data.max_instances, cfg.data.mask_size
    batch = {
        "image": jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32),
        "image_shape": jax.ShapeDtypeStruct((1, 2), jnp.int32),
        "boxes": jax.ShapeDtypeStruct((1, m, 4), jnp.float32),
        "classes": jax.ShapeDtypeStruct((1, m), jnp.int32),
        "is_crowd": jax.ShapeDtypeStruct((1, m), jnp.bool_),
        "valid": jax.ShapeDtypeStruct((1, m), jnp.bool_),
        "masks": jax.ShapeDtypeStruct((1, m, s, s), jnp.float32),
        "semantic": jax.ShapeDtypeStruct((1, h, w), jnp.uint8),
    }
    boxed = jax.eval_shape(
        lambda k, b: model.init({"params": k, "sampling": k}, b, train=True),
        jax.random.key(0),
        batch,
    )["params"]
    plain = nn.meta.unbox(boxed)
    from_names = _flat(opt_lib.param_labels(boxed, cfg.model.freeze_at))
    from_paths = _flat(opt_lib.param_labels(plain, cfg.model.freeze_at))
    assert from_names == from_paths
    names_norm = {
        jax.tree_util.keystr(p)
        for p, x in jax.tree_util.tree_leaves_with_path(
            boxed, is_leaf=lambda x: hasattr(x, "names")
        )
        if tuple(x.names) == ("norm",)
    }
    frozen = {k for k, v in from_paths.items() if v == opt_lib.FROZEN}
    assert {k for k, v in from_paths.items() if v == opt_lib.NO_DECAY} == names_norm - frozen
    assert frozen == {k for k in from_paths if k.startswith(FROZEN_KEYS)}
    assert frozen and (which == "base" or names_norm - frozen)
    # Every frozen parameter is in the backbone's stem or res2; res3 trains.
    assert any(k.startswith("['backbone']['res3']") for k, v in from_paths.items() if v == "decay")
