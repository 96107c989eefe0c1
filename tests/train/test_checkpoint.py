"""Tests of oanet_jax/train/checkpoint.py: sharded async save/restore, keep-N, corrupt fallback."""

import glob
import logging
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from oanet_jax.train import checkpoint as ckpt_lib


@flax.struct.dataclass
class _State:
    """Same fields as the TrainState (step, params, batch_stats, opt_state, rng key data)."""

    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: object
    rng: jax.Array


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))


def _make_state(mesh: Mesh, step: int, seed: int = 0) -> tuple[_State, _State]:
    """A state with params sharded on 'model' / 'data' and a real optax momentum state."""
    rng = np.random.default_rng(seed)
    params = {
        "conv": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32)},
        "dense": {
            "kernel": rng.normal(size=(8, 6)).astype(np.float32),
            "bias": rng.normal(size=(6,)).astype(np.float32),
        },
    }
    batch_stats = {"bn": {"mean": rng.normal(size=(8,)).astype(np.float32)}}
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    opt_state = tx.init(params)
    opt_state = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), opt_state)
    state = _State(
        step=np.int32(step),
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        rng=np.asarray(jax.random.key_data(jax.random.key(seed + step))),
    )

    def spec(path, x):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if x.ndim == 4:
            return NamedSharding(mesh, P(None, None, None, "model"))  # conv_out on 'model'
        if x.ndim == 2 and "kernel" in names:
            return NamedSharding(mesh, P("data", "model"))
        return NamedSharding(mesh, P())

    shardings = jax.tree_util.tree_map_with_path(spec, state)
    return jax.device_put(state, shardings), shardings


def _assert_equal_trees(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save_steps(workdir, mesh, steps, *, keep=3, async_save=True):
    states = {}
    with ckpt_lib.TrainCheckpointManager(
        workdir, every_steps=1, keep=keep, async_save=async_save
    ) as mgr:
        for s in steps:
            state, shardings = _make_state(mesh, s, seed=s)
            assert mgr.save(s, state, {"data_seed": 7, "data_position": s})
            states[s] = jax.device_get(state)
        mgr.wait_until_finished()
    return states, shardings


def test_save_restore_sharded_keep_n(tmp_path):
    mesh = _mesh()
    states, shardings = _save_steps(str(tmp_path), mesh, [2, 4, 6, 8], keep=3)
    mgr = ckpt_lib.TrainCheckpointManager(str(tmp_path), every_steps=2, keep=3)
    assert mgr.all_steps() == [4, 6, 8]  # keep-N dropped step 2
    assert mgr.should_save(4) and not mgr.should_save(5) and not mgr.should_save(0)
    template, _ = _make_state(mesh, 0, seed=123)
    target = ckpt_lib.abstract_state(template, shardings)
    state, meta = mgr.restore(target)
    assert meta["step"] == 8 and meta["data_seed"] == 7 and meta["data_position"] == 8
    assert isinstance(state, _State)
    _assert_equal_trees(state, states[8])
    # Restored arrays land with the target shardings (sharded, not gathered on one device).
    for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == sh
    conv = state.params["conv"]["kernel"]
    assert conv.addressable_shards[0].data.shape == (3, 3, 4, 4)
    # A specific step.
    state6, meta6 = mgr.restore(target, step=6)
    assert meta6["step"] == 6
    _assert_equal_trees(state6, states[6])
    # Saving an existing step is a no-op, not an error.
    assert not mgr.save(8, state, {"data_seed": 7})
    mgr.close()


def test_restore_empty_and_mismatch(tmp_path):
    mesh = _mesh()
    mgr = ckpt_lib.TrainCheckpointManager(str(tmp_path / "empty"), every_steps=1, keep=2)
    template, shardings = _make_state(mesh, 0)
    assert mgr.restore(ckpt_lib.abstract_state(template, shardings)) is None
    mgr.close()

    _save_steps(str(tmp_path), mesh, [1, 2], keep=2)
    other = template.replace(
        params={**template.params, "dense": {**template.params["dense"], "bias": jnp.zeros(5)}}
    )
    other_sh = shardings.replace(
        params={**shardings.params, "dense": {**shardings.params["dense"], "bias": None}}
    )
    other_sh = jax.tree.map(
        lambda s: NamedSharding(mesh, P()) if s is None else s,
        other_sh,
        is_leaf=lambda x: x is None,
    )
    mgr = ckpt_lib.TrainCheckpointManager(str(tmp_path), every_steps=1, keep=2)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="dense/bias"):
        mgr.restore(ckpt_lib.abstract_state(other, other_sh))
    # A config mismatch is not corruption: nothing was moved aside.
    assert mgr.all_steps() == [1, 2]
    assert not os.path.exists(tmp_path / ckpt_lib.CORRUPT_DIR)
    mgr.close()


def _truncate_state_files(step_dir):
    files = [
        f
        for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
        if os.path.isfile(f) and os.sep + "d" + os.sep in f
    ]
    assert files
    for f in files:
        size = os.path.getsize(f)
        with open(f, "r+b") as fh:
            fh.truncate(size // 2)


def _delete_state_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _truncate_json(step_dir):
    with open(os.path.join(step_dir, "metadata", "metadata"), "r+b") as fh:
        fh.truncate(5)


# orbax reports failed async reads once more through asyncio ("Event loop is closed").
_QUIET = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_QUIET
@pytest.mark.parametrize("corrupt", [_truncate_state_files, _delete_state_metadata, _truncate_json])
def test_corrupt_latest_falls_back(tmp_path, caplog, corrupt):
    mesh = _mesh()
    states, shardings = _save_steps(str(tmp_path), mesh, [3, 6], keep=3)
    corrupt(str(tmp_path / ckpt_lib.CHECKPOINT_DIR / "6"))
    mgr = ckpt_lib.TrainCheckpointManager(str(tmp_path), every_steps=3, keep=3)
    template, _ = _make_state(mesh, 0, seed=99)
    with caplog.at_level(logging.DEBUG):
        state, meta = mgr.restore(ckpt_lib.abstract_state(template, shardings))
    assert meta["step"] == 3
    _assert_equal_trees(state, states[3])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    ours = [w for w in warnings if "step 6" in w and "unreadable" in w]
    assert len(ours) == 1, warnings
    # One short line: TensorStore's spec dump and nested causes only at debug level.
    assert "\n" not in ours[0] and len(ours[0]) < 500 and "tensorstore_spec" not in ours[0], ours
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "step 6" in r.getMessage()]
    assert debug and debug[0].exc_info is not None
    # Moved aside, so the step can be saved again by the resumed run.
    assert mgr.all_steps() == [3]
    assert os.path.isdir(tmp_path / ckpt_lib.CORRUPT_DIR / "6")
    new_state, _ = _make_state(mesh, 6, seed=6)
    assert mgr.save(6, new_state, {"data_seed": 7}, wait=True)
    state6, _ = mgr.restore(ckpt_lib.abstract_state(template, shardings))
    _assert_equal_trees(state6, jax.device_get(new_state))
    mgr.close()


@_QUIET
def test_all_corrupt_raises(tmp_path):
    mesh = _mesh()
    _, shardings = _save_steps(str(tmp_path), mesh, [1, 2], keep=3)
    for s in (1, 2):
        _truncate_state_files(str(tmp_path / ckpt_lib.CHECKPOINT_DIR / str(s)))
    mgr = ckpt_lib.TrainCheckpointManager(str(tmp_path), every_steps=1, keep=3)
    template, _ = _make_state(mesh, 0)
    with pytest.raises(ckpt_lib.NoReadableCheckpointError, match="step 2"):
        mgr.restore(ckpt_lib.abstract_state(template, shardings))
    assert mgr.all_steps() == []
    mgr.close()


@_QUIET
def test_restore_variables(tmp_path, caplog):
    mesh = _mesh()
    states, _ = _save_steps(str(tmp_path), mesh, [5, 10], keep=3, async_save=False)
    variables, step = ckpt_lib.restore_variables(str(tmp_path))
    assert step == 10
    assert set(variables) == {"params", "batch_stats"}
    _assert_equal_trees(variables["params"], states[10].params)
    _assert_equal_trees(variables["batch_stats"], states[10].batch_stats)
    variables5, step5 = ckpt_lib.restore_variables(str(tmp_path), step=5)
    assert step5 == 5
    _assert_equal_trees(variables5["params"], states[5].params)
    # Latest corrupt: reported and the previous one used; read-only, so nothing is moved.
    _truncate_state_files(str(tmp_path / ckpt_lib.CHECKPOINT_DIR / "10"))
    with caplog.at_level(logging.WARNING):
        variables, step = ckpt_lib.restore_variables(str(tmp_path))
    assert step == 5
    _assert_equal_trees(variables["params"], states[5].params)
    assert any("step 10" in r.getMessage() for r in caplog.records)
    assert os.path.isdir(tmp_path / ckpt_lib.CHECKPOINT_DIR / "10")
    with pytest.raises(FileNotFoundError):
        ckpt_lib.restore_variables(str(tmp_path / "nothing"))


@_QUIET
def test_restore_variables_checks_the_architecture(tmp_path):
    """The architecture check of evaluation / prediction: a readable checkpoint whose arrays
    differ from the model's raises CheckpointMismatchError naming the array (no fallback to an
    older step, which is of the same architecture); a matching one restores."""
    mesh = _mesh()
    states, _ = _save_steps(str(tmp_path), mesh, [5, 10], keep=3, async_save=False)
    spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)  # noqa: E731
    expected = {
        "params": jax.tree.map(spec, states[10].params),
        "batch_stats": jax.tree.map(spec, states[10].batch_stats),
    }
    variables, step = ckpt_lib.restore_variables(str(tmp_path), expected=expected)
    assert step == 10
    _assert_equal_trees(variables["params"], states[10].params)
    expected["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct((8, 7), np.float32)
    expected["params"]["extra"] = {"bias": jax.ShapeDtypeStruct((3,), np.float32)}
    with pytest.raises(ckpt_lib.CheckpointMismatchError) as err:
        ckpt_lib.restore_variables(str(tmp_path), expected=expected)
    message = str(err.value)
    assert os.path.join(ckpt_lib.CHECKPOINT_DIR, "10") in message
    assert "params/dense/kernel: expected ((8, 7), 'float32'), checkpoint has ((8, 6)" in message
    assert "params/extra/bias: missing in the checkpoint" in message


def test_init_from_pretrained_overlays_subtree(tmp_path):
    """Converted weights replace exactly the arrays they hold, sharded like the state."""
    import orbax.checkpoint as ocp

    mesh = _mesh()
    state, shardings = _make_state(mesh, step=0)
    pretrained = {
        "params": {"conv": {"kernel": np.full((3, 3, 4, 8), 7.0, np.float32)}},
        "batch_stats": {"bn": {"mean": np.arange(8, dtype=np.float32)}},
    }
    path = str(tmp_path / "converted")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, pretrained)
    checkpointer.wait_until_finished()
    checkpointer.close()

    out = ckpt_lib.init_from_pretrained(state, shardings, path)
    np.testing.assert_array_equal(out.params["conv"]["kernel"], 7.0)
    assert out.params["conv"]["kernel"].sharding == shardings.params["conv"]["kernel"]
    np.testing.assert_array_equal(out.batch_stats["bn"]["mean"], np.arange(8))
    _assert_equal_trees(out.params["dense"], state.params["dense"])
    _assert_equal_trees(out.opt_state, state.opt_state)

    bad = {"params": {"conv": {"kernel": np.zeros((3, 3, 4, 9), np.float32)}, "extra": {"w": 1.0}}}
    bad_path = str(tmp_path / "bad")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(bad_path, bad)
    checkpointer.wait_until_finished()
    checkpointer.close()
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"(?s)shape.*extra"):
        ckpt_lib.init_from_pretrained(state, shardings, bad_path)


_RESTORE_ON_TWO_DEVICES = """
import sys
import numpy as np, jax
from jax.sharding import Mesh
sys.path.insert(0, {tests!r})
from test_checkpoint import _make_state
from oanet_jax.train import checkpoint as ckpt_lib
mesh = Mesh(np.array(jax.devices()).reshape(2, 1), ("data", "model"))
state, shardings = _make_state(mesh, step=0)
out = ckpt_lib.init_from_pretrained(state, shardings, {path!r})
kernel = out.params["conv"]["kernel"]
assert kernel.sharding == shardings.params["conv"]["kernel"], kernel.sharding
np.testing.assert_array_equal(kernel, np.arange(288, dtype=np.float32).reshape(3, 3, 4, 8))
print("restored on", len(jax.devices()), "devices")
"""


def test_init_from_pretrained_on_another_topology(tmp_path):
    """Weights converted (saved) sharded over this process's 8 devices initialise a run on 2
    devices: the restore names its targets (orbax refuses a topology change without them)."""
    import subprocess
    import sys

    import orbax.checkpoint as ocp
    from subprocess_env import subprocess_env

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("model",))
    kernel = np.arange(288, dtype=np.float32).reshape(3, 3, 4, 8)
    sharded = jax.device_put(kernel, NamedSharding(mesh, P(None, None, None, "model")))
    path = str(tmp_path / "converted")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, {"params": {"conv": {"kernel": sharded}}})
    checkpointer.wait_until_finished()
    checkpointer.close()
    code = _RESTORE_ON_TWO_DEVICES.format(tests=os.path.dirname(__file__), path=path)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(2), capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and "restored on 2 devices" in proc.stdout, proc.stderr[-3000:]


def test_init_from_pretrained_fills_the_stuff_backbone(tmp_path):
    """model.sharing='none': a backbone-only checkpoint initialises the stuff branch's ResNet."""
    import orbax.checkpoint as ocp

    mesh = _mesh()
    state, shardings = _make_state(mesh, step=0)
    own = lambda p: {"backbone": p["conv"], "stuff_backbone": p["conv"], "dense": p["dense"]}
    state = state.replace(params=own(state.params))
    shardings = shardings.replace(params=own(shardings.params))
    path = str(tmp_path / "imagenet")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, {"params": {"backbone": {"kernel": np.full((3, 3, 4, 8), 7.0)}}})
    checkpointer.wait_until_finished()
    checkpointer.close()

    out = ckpt_lib.init_from_pretrained(state, shardings, path)
    for name in ("backbone", "stuff_backbone"):
        np.testing.assert_array_equal(out.params[name]["kernel"], 7.0)
    _assert_equal_trees(out.params["dense"], state.params["dense"])


def test_best_checkpoint_kept_besides_last_k(tmp_path):
    """checkpoints_best keeps the single best by the metric; periodic ones keep the last K."""
    mesh = _mesh()
    workdir = str(tmp_path)
    pq_by_step = {2: 40.0, 4: 55.0, 6: 50.0, 8: float("nan"), 10: 54.0}
    saved = {}
    with (
        ckpt_lib.TrainCheckpointManager(workdir, every_steps=2, keep=2, async_save=False) as last,
        ckpt_lib.TrainCheckpointManager(
            workdir,
            every_steps=0,
            keep=1,
            async_save=False,
            subdir=ckpt_lib.BEST_DIR,
            best_metric="PQ",
        ) as best,
    ):
        for s, pq in pq_by_step.items():
            state, _ = _make_state(mesh, s, seed=s)
            last.save(s, state, {"data_seed": 0})
            saved[s] = best.save_if_best(s, state, {"data_seed": 0}, pq)
            if s == 4:
                best_state = jax.device_get(state)
        assert saved == {2: True, 4: True, 6: False, 8: False, 10: False}
        assert best.best() == (4, 55.0)
        assert best.all_steps() == [4] and last.all_steps() == [8, 10]
    # A reopened manager (a resumed run) still knows the best value.
    reopened = ckpt_lib.TrainCheckpointManager(
        workdir, every_steps=0, keep=1, subdir=ckpt_lib.BEST_DIR, best_metric="PQ"
    )
    assert reopened.best() == (4, 55.0)
    state, _ = _make_state(mesh, 12, seed=12)
    assert not reopened.save_if_best(12, state, {}, 54.9)
    reopened.close()
    variables, step = ckpt_lib.restore_variables(workdir, best=True)
    assert step == 4
    _assert_equal_trees(variables["params"], best_state.params)
