"""The training state and its sharded initialisation.

Recipe (flax's "scale up on multiple devices"): ``jax.eval_shape`` of the initialiser gives the
variables boxed with their logical axis names (and an optimizer state that inherits the boxes
of its parameters); :func:`oanet_jax.train.sharding.tree_shardings` turns these into
NamedShardings on the mesh (with the rules of ``config.sharding``); the initialiser is then
jitted with these ``out_shardings`` so every variable is created directly in its place. The
returned state holds plain (unboxed) arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from oanet_jax.train import optimizer as optimizer_lib
from oanet_jax.train import sharding as sharding_lib

# XLA:CPU options for programs that run once (or in tests): the same program, compiled without
# LLVM's optimisation passes and with the classic (faster to compile) fusion emitters.
CPU_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes (a pytree of arrays).

    Attributes:
      step: [] int32, number of steps taken (skipped non-finite steps included).
      params: the 'params' collection (plain arrays).
      batch_stats: the 'batch_stats' collection ({} when the model has none); static unless
        ``model.norm == 'batch_norm'``.
      opt_state: the optax state of :func:`oanet_jax.train.optimizer.make_optimizer`.
      rng: [2] uint32 key data (``jax.random.key_data``) of the base training key; the key of
        step n is ``fold_in(wrap_key_data(rng), n)``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def _init_batch(sample_batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """First example of the batch, host-side: parameter shapes do not depend on the batch size."""
    out = {}
    for k, v in sample_batch.items():
        x = np.asarray(v)[:1]
        out[k] = x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)
    return out


def create_train_state(
    config: Any,
    model: nn.Module,
    mesh: Mesh,
    sample_batch: Mapping[str, Any],
    *,
    seed: int | None = None,
) -> tuple[TrainState, TrainState]:
    """Initialises the model and optimizer directly sharded on `mesh`.

    Args:
      config: full config (uses model.freeze_at, train.*, sharding.*, seed).
      model: the OANet module (``build_model(config)``).
      mesh: the device mesh (:func:`oanet_jax.train.sharding.make_mesh`).
      sample_batch: a batch dict of the batch spec, e.g.
        ``oanet_jax.data.spec.zeros_batch(config.data, B)`` (numpy or arrays; only the first
        example is used, for shapes).
      seed: init seed (default ``config.seed``); the params, the init sampling stream and the
        training rng are split from ``jax.random.key(seed)``.

    Returns:
      (state, state_sharding): the TrainState (step 0) and a TrainState-shaped pytree of
      NamedShardings (pass it as in/out_shardings of the jitted train step).
    """
    key = jax.random.key(int(config.seed if seed is None else seed))
    init_variables, tx, _, state_sharding = _abstract_state(config, model, mesh, sample_batch)

    def init_state(k: jax.Array) -> TrainState:
        variables, rng = init_variables(k)
        params = nn.meta.unbox(variables["params"])
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=nn.meta.unbox(variables.get("batch_stats", {})),
            opt_state=tx.init(params),
            rng=rng,
        )

    lowered = jax.jit(init_state, out_shardings=state_sharding).lower(key)
    state = _compile_init(lowered, mesh)(key)
    return state, state_sharding


def _abstract_state(
    config: Any, model: nn.Module, mesh: Mesh, sample_batch: Mapping[str, Any]
) -> tuple[Any, Any, TrainState, TrainState]:
    """The initialiser, the optimizer, the boxed abstract state and its shardings.

    Returns:
      (init_variables, tx, abstract_state, state_sharding): ``init_variables(key) -> (variables,
      rng key data)`` (jitted), the optax transformation, the TrainState of ShapeDtypeStructs
      with the logical boxes of the variables, and its NamedShardings on ``mesh``.
    """
    batch = _init_batch(sample_batch)
    freeze_at = int(config.model.freeze_at)
    rules = sharding_lib.logical_axis_rules(config.sharding)

    @jax.jit
    def init_variables(k: jax.Array) -> tuple[Any, jax.Array]:
        k_params, k_sampling, k_train = jax.random.split(k, 3)
        variables = model.init({"params": k_params, "sampling": k_sampling}, batch, train=True)
        return variables, jax.random.key_data(k_train)

    # One trace of the model: eval_shape caches the jaxpr of `init_variables`, which the jitted
    # initialiser calls again with the same input types.
    abstract_vars, abstract_rng = jax.eval_shape(init_variables, jax.random.key(0))
    boxed_params = abstract_vars["params"]
    tx = optimizer_lib.make_optimizer(config.train, boxed_params, freeze_at)
    abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=boxed_params,
        batch_stats=abstract_vars.get("batch_stats", {}),
        opt_state=jax.eval_shape(tx.init, boxed_params),  # inherits the params' logical boxes
        rng=abstract_rng,
    )
    return (
        init_variables,
        tx,
        abstract_state,
        sharding_lib.tree_shardings(abstract_state, mesh, rules),
    )


def train_state_shapes(
    config: Any, model: nn.Module, mesh: Mesh, sample_batch: Mapping[str, Any]
) -> tuple[TrainState, TrainState]:
    """The TrainState's shapes and shardings on ``mesh``, without initialising anything.

    For compiling the train step ahead of time (``jit(...).lower(shapes, batch_shapes)``) or as
    a restore target on a mesh, at the cost of tracing the initialiser (no compile, no run).

    Args:
      config: full config (as :func:`create_train_state`).
      model: the OANet module.
      mesh: the device mesh.
      sample_batch: a batch dict of the batch spec (only shapes are used).

    Returns:
      (shapes, state_sharding): a TrainState of ``jax.ShapeDtypeStruct`` leaves carrying their
      NamedShardings, and the TrainState-shaped pytree of those NamedShardings.
    """
    _, _, boxed, state_sharding = _abstract_state(config, model, mesh, sample_batch)
    shapes = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(boxed),
        state_sharding,
    )
    return shapes, state_sharding


def _compile_init(lowered: jax.stages.Lowered, mesh: Mesh) -> jax.stages.Compiled:
    """Compiles the initialiser; on CPU without LLVM optimisation.

    The initialiser runs once and is dominated by the unrolled threefry hashes of the
    parameter initialisers, whose LLVM optimisation takes far longer on CPU than the run itself
    (tiny model: ~20 s vs ~3 s). The values agree with an optimised compile to float32 rounding
    (at most 1 ulp, in the float transforms of the random bits).
    """
    if mesh.devices.flat[0].platform == "cpu":
        try:
            return lowered.compile(compiler_options=CPU_FAST_COMPILE)
        except Exception:  # noqa: BLE001 - an XLA without these options: compile normally
            pass
    return lowered.compile()


def abstract_variables(config: Any, model: nn.Module) -> dict[str, Any]:
    """The shapes and dtypes of the variables the config's model has, without computing them.

    ``jax.eval_shape`` of the inference ``model.init`` at ``config.data.image_size`` (batch 1):
    the tree a checkpoint must hold for evaluation, prediction or export (see
    `oanet_jax.train.checkpoint.restore_variables`'s ``expected``). Tracing only; nothing is
    compiled.

    Args:
      config: full config (``data.image_size``).
      model: the OANet module (``build_model(config)``).

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` of unboxed ``jax.ShapeDtypeStruct`` leaves
      (``batch_stats`` is ``{}`` when the model has none).
    """
    hp, wp = (int(v) for v in config.data.image_size)
    dummy = {
        "image": jax.ShapeDtypeStruct((1, hp, wp, 3), jnp.uint8),
        "image_shape": jax.ShapeDtypeStruct((1, 2), jnp.int32),
    }
    shapes = jax.eval_shape(lambda k, b: model.init({"params": k}, b), jax.random.key(0), dummy)
    shapes = nn.meta.unbox(shapes)
    return {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
