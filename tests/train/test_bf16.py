"""bfloat16 compute keeps float32 where DESIGN.md wants it (params, box math, losses, softmaxes).

Read off the jaxpr of the whole training step of the tiny config with
``model.compute_dtype='bfloat16'`` (traced on abstract values, nothing is compiled): the
convolutions and matrix products run in bfloat16, no exponential, logarithm, sigmoid, division
or square root does, and the parameters, optimizer state and loss metrics are float32. That
bfloat16 trains is in docs/BENCHMARKS.md ('bfloat16').
"""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp

from configs import tiny
from oanet_jax.data import spec
from oanet_jax.modeling.build import build_model
from oanet_jax.train import optimizer as optimizer_lib
from oanet_jax.train import step
from oanet_jax.train.state import TrainState

# Softmax, log-softmax, sigmoid, box decoding (exp), IoU (div), norms (rsqrt): float32 only.
FLOAT32_ONLY = {"exp", "exp2", "expm1", "log", "log1p", "logistic", "div", "sqrt", "rsqrt", "erf"}


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def test_bf16_compute_keeps_params_losses_and_softmaxes_float32():
    config = tiny.get_config()
    config.model.compute_dtype = "bfloat16"
    model = build_model(config)
    batch = spec.zeros_batch(config.data, 2, train=True)
    batch["boxes"][:, :2] = [[4, 4, 30, 30], [20, 10, 60, 50]]
    batch["valid"][:, :2] = True
    batch["masks"][:, :2, 4:12, 4:12] = 1
    keys = {"params": jax.random.key(0), "sampling": jax.random.key(1)}
    variables = nn.meta.unbox(jax.eval_shape(lambda: model.init(keys, batch, train=True)))
    params = variables["params"]
    tx = optimizer_lib.make_optimizer(config.train, params, int(config.model.freeze_at))
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=jax.eval_shape(tx.init, params),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}

    def fn(s, b):
        return step.train_step(s, b, model=model, config=config)

    closed = jax.make_jaxpr(fn)(state, batch)
    bf16 = collections.Counter()
    for eqn in _equations(closed.jaxpr):
        if any(getattr(v.aval, "dtype", None) == jnp.bfloat16 for v in eqn.outvars):
            bf16[eqn.primitive.name] += 1
    assert bf16["conv_general_dilated"] > 0 and bf16["dot_general"] > 0
    assert not FLOAT32_ONLY & set(bf16), {k: bf16[k] for k in FLOAT32_ONLY & set(bf16)}

    new_state, metrics = jax.eval_shape(fn, state, batch)
    leaves = jax.tree.leaves((new_state.params, new_state.opt_state))
    floats = {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {jnp.dtype(jnp.float32)}
    for name in (*step.LOSS_TERMS, "total", "grad_norm"):
        assert metrics[name].dtype == jnp.float32, name
