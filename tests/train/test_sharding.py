"""Mesh, sharding rules, batch placement and the sharded train step (tiny config, 8 fake CPUs).

The acceptance test of training: the same three steps on one device, on 8 devices data-parallel
(mesh (8, 1)) and with parameters sharded on 'model' (mesh (4, 2)) give the same losses. The
batch-norm / frozen-stage step test is marked slow.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import tiny
from oanet_jax.data import spec as data_spec
from oanet_jax.modeling.build import build_model
from oanet_jax.train import sharding as sharding_lib
from oanet_jax.train import state as state_lib
from oanet_jax.train import step as step_lib

P = PartitionSpec
LOSS_KEYS = ("rpn_cls", "rpn_box", "cls", "box", "mask", "seg", "srm", "total")
NUM_STEPS = 3
# Losses agree to float32 round-off: the only differences between meshes are the order of the
# cross-device reductions (batch means, gradient all-reduces), ~1e-7 relative per step.
LOSS_RTOL = 1e-5
LOSS_ATOL = 1e-7
# Parameters after 3 steps: the backbone's gradients are ~1e-3 of the heads' and come out of
# long reductions through group norms, so their float32 round-off differs between meshes by up to
# a few % of their (tiny, ~1e-4) updates; 5e-5 absolute is far below the heads' updates (~1e-1)
# and any real divergence (e.g. gradients not all-reduced) would move them by ~1e-3 or more.
PARAM_ATOL = 5e-5
# Test-only: the same program and SPMD partitioning, compiled without LLVM's optimisations
# (compile time is what these tests spend; the numerics of both meshes use the same setting).
FAST_COMPILE = state_lib.CPU_FAST_COMPILE


def _config(mesh_shape=(-1, 1), shard_params=False, root=None):
    cfg = tiny.get_config()
    cfg.sharding.mesh_shape = mesh_shape
    cfg.sharding.shard_params = shard_params
    cfg.train.on_nonfinite = "skip"
    if root is not None:
        cfg.data.root = str(root)
    return cfg


def _mesh(cfg, num_devices):
    return sharding_lib.make_mesh(cfg.sharding, jax.devices()[:num_devices])


# ----------------------------------------------------------------------------------- fast
def test_make_mesh_shapes():
    assert jax.device_count() == 8
    cases = {(-1, 1): (8, 1), (4, 2): (4, 2), (-1, 2): (4, 2), (1, -1): (1, 8)}
    for shape, want in cases.items():
        mesh = sharding_lib.make_mesh(_config(shape).sharding)
        assert mesh.axis_names == ("data", "model")
        assert tuple(mesh.devices.shape) == want
        assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    one = _mesh(_config(), 1)
    assert dict(one.shape) == {"data": 1, "model": 1}
    for bad in [(3, -1), (-1, -1), (4, 4)]:
        with pytest.raises(ValueError):
            sharding_lib.make_mesh(_config(bad).sharding)


def test_distributed_initialisation_is_opt_in():
    cfg = _config()
    assert not cfg.sharding.distributed
    assert sharding_lib.maybe_initialize_distributed(cfg.sharding) is False
    assert jax.process_count() == 1


def test_partition_spec_rules_and_divisibility_fallback():
    mesh = _mesh(_config((4, 2)), 8)
    on = sharding_lib.logical_axis_rules(_config(shard_params=True).sharding)
    off = sharding_lib.logical_axis_rules(_config(shard_params=False).sharding)
    conv = ("conv_h", "conv_w", "conv_in", "conv_out")
    spec = functools.partial(sharding_lib.mesh_partition_spec, mesh=mesh)
    assert spec(conv, (3, 3, 16, 16), rules=on) == P(None, None, None, "model")
    # 3 outputs (RPN objectness) do not divide by 2: the input channels take 'model'.
    assert spec(conv, (1, 1, 16, 3), rules=on) == P(None, None, "model", None)
    assert spec(conv, (1, 1, 5, 3), rules=on) == P(None, None, None, None)
    assert spec(("conv_out",), (16,), rules=on) == P("model")
    assert spec(("mlp",), (5,), rules=on) == P(None)  # a 5-way classifier's bias
    assert spec(("embed", "mlp"), (32, 5), rules=on) == P("model", None)
    assert spec(("embed", "mlp"), (32, 16), rules=on) == P(None, "model")
    assert spec(("norm",), (16,), rules=on) == P(None)
    assert spec((), (), rules=on) == P()
    for names, shape in [(conv, (3, 3, 16, 16)), (("embed", "mlp"), (32, 16))]:
        assert spec(names, shape, rules=off) == P(*([None] * len(shape)))
    # A 'model' axis of size 1 shards nothing.
    mesh81 = _mesh(_config(), 8)
    assert sharding_lib.mesh_partition_spec(conv, (3, 3, 16, 16), mesh81, on) == P(
        None, None, None, None
    )


def _synthetic_batch(cfg, b, rng):
    """A plausible tiny batch of the batch spec (used where the real pipeline is not needed)."""
    batch = data_spec.zeros_batch(cfg.data, b, train=True)
    h, w = batch["semantic"].shape[1:]
    m = batch["valid"].shape[1]
    batch["image"] = rng.integers(0, 256, size=batch["image"].shape, dtype=np.uint8)
    batch["image_id"] = np.arange(b, dtype=np.int64)  # a host-side key rides along
    batch["boxes"][:] = np.array([4, 4, 30, 40], np.float32)
    batch["valid"][:] = np.arange(m) < 2
    batch["masks"][:] = 1.0
    batch["semantic"] = rng.integers(0, 7, size=(b, h, w)).astype(np.uint8)
    return batch


@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2)])
def test_shard_batch_splits_over_data(mesh_shape):
    cfg = _config(mesh_shape)
    mesh = _mesh(cfg, 8)
    batch = _synthetic_batch(cfg, 8, np.random.default_rng(0))
    placed = sharding_lib.shard_batch(batch, mesh)
    n_data = mesh_shape[0]
    for k, x in placed.items():
        assert x.shape == batch[k].shape, k
        assert x.sharding == NamedSharding(mesh, P("data")), k
        assert x.sharding.spec == P("data")
        shards = x.addressable_shards
        assert len(shards) == 8
        assert {s.data.shape[0] for s in shards} == {8 // n_data}
        starts = {s.index[0].start or 0 for s in shards}
        assert starts == set(range(0, 8, 8 // n_data))  # every example on exactly one data row
        np.testing.assert_array_equal(np.asarray(x), batch[k])
    assert placed["image_id"].dtype == jnp.int32  # 64-bit host ids canonicalised
    # Already-placed arrays pass through untouched.
    again = sharding_lib.shard_batch(placed, mesh)
    assert all(again[k] is placed[k] for k in placed)


def test_state_sharding_shards_params_on_model():
    """The sharding recipe on the real model (abstract: no init compile)."""
    cfg = _config((4, 2), shard_params=True)
    mesh = _mesh(cfg, 8)
    model = build_model(cfg)
    batch = _synthetic_batch(cfg, 1, np.random.default_rng(0))
    boxed = jax.eval_shape(
        lambda k: model.init({"params": k, "sampling": k}, batch, train=True), jax.random.key(0)
    )
    shardings = sharding_lib.tree_shardings(
        boxed, mesh, sharding_lib.logical_axis_rules(cfg.sharding)
    )
    plain = nn.meta.unbox(boxed)
    assert jax.tree.structure(shardings) == jax.tree.structure(plain)
    specs = {
        jax.tree_util.keystr(p): s.spec
        for p, s in jax.tree_util.tree_leaves_with_path(shardings["params"])
    }
    shapes = {
        jax.tree_util.keystr(p): x.shape
        for p, x in jax.tree_util.tree_leaves_with_path(plain["params"])
    }
    sharded = [k for k, s in specs.items() if "model" in tuple(s)]
    assert len(sharded) > len(specs) // 2
    for k, s in specs.items():
        for dim, axis in zip(shapes[k], s, strict=True):
            assert axis is None or dim % 2 == 0, (k, s, shapes[k])
    assert specs["['box_predictor']['cls_score']['bias']"] == P(None)  # 5 classes
    assert specs["['box_predictor']['cls_score']['kernel']"] == P("model", None)
    assert specs["['rpn']['conv']['kernel']"] == P(None, None, None, "model")
    assert specs["['stuff_head']['fuse_conv_norm']['scale']"] == P(None)


# ------------------------------------------------------------------------ the real step
@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """Three training batches of 8 64x64 images from the tf.data pipeline + a NaN batch."""
    from oanet_jax.data import device_transform, pipeline, synthetic

    root = tmp_path_factory.mktemp("synthetic_tiny")
    synthetic.generate(str(root), 8, 2, 0, size=(64, 64))
    cfg = _config(root=root)
    ds = pipeline.build_dataset(cfg, "train", training=True, batch_size=8, seed=0)
    it = ds.as_numpy_iterator()
    out = [device_transform.finish_numpy(next(it), cfg.data) for _ in range(NUM_STEPS)]
    assert all(b["image"].shape == (8, 64, 64, 3) for b in out)
    assert all(b["valid"].any() for b in out)
    bad = {k: v.copy() for k, v in out[0].items()}
    # A uint8 image cannot hold a NaN and the losses mask every other input: the NaN batch
    # carries a float32 image (taken by the model as already normalised; a second trace).
    bad["image"] = bad["image"].astype(np.float32)
    bad["image"][3, 10:20, 10:20] = np.nan
    return root, out, bad


def _host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _run(root, batches, mesh_shape, shard_params, num_devices, step_fn=step_lib.train_step):
    cfg = _config(mesh_shape, shard_params, root)
    mesh = _mesh(cfg, num_devices)
    model = build_model(cfg)
    state, state_sharding = state_lib.create_train_state(cfg, model, mesh, batches[0])
    init_params = _host(state.params)
    fn = step_lib.jit_train_step(
        model, cfg, mesh, state_sharding, step_fn=step_fn, compiler_options=FAST_COMPILE
    )
    metrics = []
    for b in batches:
        state, m = fn(state, sharding_lib.shard_batch(b, mesh))
        metrics.append(m)
    return dict(
        cfg=cfg,
        mesh=mesh,
        model=model,
        fn=fn,
        state=state,
        state_sharding=state_sharding,
        init_params=init_params,
        metrics=_host(metrics),
    )


@pytest.fixture(scope="module")
def single(batches):
    root, bs, _ = batches
    return _run(root, bs, (1, 1), False, 1)


def _assert_same_training(ref, other):
    # Same initial parameters: the sharded initialiser draws the same random numbers.
    chex.assert_trees_all_equal(ref["init_params"], other["init_params"])
    for i, (m_ref, m) in enumerate(zip(ref["metrics"], other["metrics"], strict=True)):
        for k in LOSS_KEYS:
            np.testing.assert_allclose(
                m[k], m_ref[k], rtol=LOSS_RTOL, atol=LOSS_ATOL, err_msg=f"{k} at step {i}"
            )
        assert int(m["nonfinite"]) == 0 and int(m["step"]) == i
        np.testing.assert_allclose(m["lr"], m_ref["lr"], rtol=1e-7)
        np.testing.assert_allclose(m["grad_norm"], m_ref["grad_norm"], rtol=1e-4)
    # Parameters after the steps agree to float32 round-off of the reduced gradients.
    chex.assert_trees_all_close(
        _host(ref["state"].params), _host(other["state"].params), rtol=0, atol=PARAM_ATOL
    )


def test_data_parallel_matches_single_device(batches, single):
    root, bs, bad = batches
    # The loss actually moves and the schedule is detectron2's (warmup 2 steps, 0.002 -> 0.02).
    totals = [float(m["total"]) for m in single["metrics"]]
    assert all(np.isfinite(totals)) and len(set(totals)) == NUM_STEPS
    np.testing.assert_allclose([m["lr"] for m in single["metrics"]], [0.002, 0.011, 0.02])
    assert int(single["state"].step) == NUM_STEPS
    assert single["fn"]._cache_size() == 1  # production jit compiled once for 3 steps

    traces = []

    @chex.assert_max_traces(n=2)  # the uint8 batches, and the float32 NaN batch below
    def counted_step(state, batch, *, model, config):
        traces.append(1)
        return step_lib.train_step(state, batch, model=model, config=config)

    dp = _run(root, bs, (8, 1), False, 8, step_fn=counted_step)
    assert len(traces) == 1  # one trace (and one compile) for all steps
    _assert_same_training(single, dp)

    mesh, fn, state = dp["mesh"], dp["fn"], dp["state"]
    # Data parallel: every state leaf replicated on the 8 devices.
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8

    # No hidden host<->device transfer inside the step once the inputs are on device.
    placed = sharding_lib.shard_batch(bs[0], mesh)
    with jax.transfer_guard("disallow"):
        state, m = fn(state, placed)
        jax.block_until_ready((state, m))
    assert int(m["nonfinite"]) == 0 and int(m["step"]) == NUM_STEPS

    # Non-finite batch ('skip'): no update at all, the step still advances.
    before = _host(state)
    state, m = fn(state, sharding_lib.shard_batch(bad, mesh))
    m = _host(m)
    assert not np.isfinite(m["total"])
    assert int(m["nonfinite"]) == 1 and int(m["nonfinite_skipped"]) == 1
    after = _host(state)
    chex.assert_trees_all_equal(after.params, before.params)
    chex.assert_trees_all_equal(after.opt_state, before.opt_state)
    chex.assert_trees_all_equal(after.batch_stats, before.batch_stats)
    np.testing.assert_array_equal(after.rng, before.rng)
    assert int(after.step) == int(before.step) + 1
    step_lib.raise_if_nonfinite(m, "skip")  # skip mode: the host goes on
    with pytest.raises(step_lib.NonFiniteLossError, match=rf"step {NUM_STEPS + 1}\b.*total=nan"):
        step_lib.raise_if_nonfinite(m, "error")
    # A finite step afterwards trains again.
    state, m = fn(state, sharding_lib.shard_batch(bs[1], mesh))
    assert int(m["nonfinite"]) == 0
    assert len(traces) == 2  # uint8 batches: still the first trace


def test_param_sharded_matches_single_device(batches, single):
    root, bs, _ = batches
    fsdp = _run(root, bs, (4, 2), True, 8)
    _assert_same_training(single, fsdp)
    state, sh = fsdp["state"], fsdp["state_sharding"]
    # The created arrays carry the planned shardings; some are really split on 'model'.
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(sh), strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    split = [x for x in jax.tree.leaves(state.params) if not x.sharding.is_fully_replicated]
    assert split
    for x in split:
        assert "model" in tuple(x.sharding.spec)
        assert {s.data.shape for s in x.addressable_shards} != {x.shape}
    # Momentum buffers follow their parameters.
    trace = state.opt_state.inner_states["trainable"].inner_state
    momentum = [s for s in jax.tree.leaves(trace) if s.ndim > 0]
    assert any(not s.sharding.is_fully_replicated for s in momentum)


@pytest.mark.slow
def test_batch_norm_stats_update_and_frozen_stages(batches):
    """norm='batch_norm', freeze_at=2: running statistics of the trained stages are updated by the
    step, while the frozen stem/res2 (parameters and statistics) never change."""
    root, bs, _ = batches
    cfg = _config((2, 1), root=root)
    cfg.model.norm = "batch_norm"
    cfg.model.freeze_at = 2
    mesh = _mesh(cfg, 2)
    model = build_model(cfg)
    two = [{k: v[:2] for k, v in b.items()} for b in bs[:2]]
    state, sh = state_lib.create_train_state(cfg, model, mesh, two[0])
    before = _host(state)
    fn = step_lib.jit_train_step(model, cfg, mesh, sh, compiler_options=FAST_COMPILE)
    for b in two:
        state, m = fn(state, sharding_lib.shard_batch(b, mesh))
        assert int(m["nonfinite"]) == 0
    after = _host(state)
    frozen = ("stem_conv", "stem_norm", "res2")
    for name in ("params", "batch_stats"):
        old, new = getattr(before, name)["backbone"], getattr(after, name)["backbone"]
        for stage in old:
            changed = any(
                not np.array_equal(a, b)
                for a, b in zip(
                    jax.tree.leaves(old[stage]), jax.tree.leaves(new[stage]), strict=True
                )
            )
            assert changed == (stage not in frozen), (name, stage)
    # Running statistics move towards the batch's: finite, and the variances stay positive.
    for leaf in jax.tree.leaves(after.batch_stats):
        assert np.all(np.isfinite(leaf))
    res3 = jax.tree_util.tree_leaves_with_path(after.batch_stats["backbone"]["res3"])
    variances = [v for p, v in res3 if jax.tree_util.keystr(p).endswith("['var']")]
    assert variances and all(np.all(v > 0) for v in variances)
