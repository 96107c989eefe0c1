"""The pure training step.

``train_step(state, batch, model=..., config=...)`` runs the training forward pass, the losses of
Eq. 1 (float32), the gradients and one optimizer update. It is jitted by the caller with the
state's shardings and ``donate_argnums=0`` (see :func:`jit_train_step`).

Non-finite steps: when the total loss or the gradient norm is not finite, the update is skipped
on device (params, batch_stats and opt_state keep their values, ``step`` still advances) and the
metrics carry ``nonfinite = nonfinite_skipped = 1``. With ``config.train.on_nonfinite ==
'error'`` the host then raises :class:`NonFiniteLossError` (:func:`raise_if_nonfinite`, called
by the loop on the fetched metrics); with 'skip' training goes on. The optimizer's own step
counter does not advance on a skipped step, so after k skipped steps its schedule lags
``state.step`` by k steps; the logged 'lr' is the schedule at ``state.step``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from oanet_jax import losses
from oanet_jax.train import optimizer as optimizer_lib
from oanet_jax.train import sharding as sharding_lib
from oanet_jax.train.state import TrainState

ON_NONFINITE = ("error", "skip")


class NonFiniteLossError(FloatingPointError):
    """A training step produced a non-finite loss or gradient (``on_nonfinite='error'``)."""

    def __init__(self, step: int, terms: Mapping[str, float]):
        self.step = int(step)
        self.terms = dict(terms)
        detail = ", ".join(f"{k}={v:.6g}" for k, v in sorted(self.terms.items()))
        super().__init__(
            f"Non-finite loss at step {self.step} (update skipped): {detail}. Set "
            "config.train.on_nonfinite='skip' to skip such steps instead of stopping."
        )


LOSS_TERMS = ("rpn_cls", "rpn_box", "cls", "box", "mask", "seg", "srm")


def train_step(
    state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module, config: Any
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step (pure; jit it).

    Args:
      state: the TrainState (plain arrays).
      batch: the global batch: the keys of ``oanet_jax.data.spec.TRAIN_KEYS`` with the shapes
        and dtypes of ``spec.batch_spec(config.data, B, train=True)`` (other keys are ignored).
      model: the OANet module.
      config: full config (model.freeze_at, model.norm, model.rpn.smooth_l1_beta,
        model.roi.smooth_l1_beta, model.rpn.batch_size_per_image, model.stuff_head.classes
        with model.num_thing_classes (a stuff-only head ignores thing pixels), loss.*,
        train.*).

    Returns:
      (new_state, metrics): metrics is a dict of [] arrays: every loss term of Eq. 1
      ('rpn_cls', 'rpn_box', 'cls', 'box', 'mask', 'seg', 'srm') and 'total' (float32), 'lr'
      (float32, the learning rate of this step), 'grad_norm' (float32, global norm of the
      trainable gradients before clipping), 'nonfinite' and 'nonfinite_skipped' (int32 0/1)
      and 'step' (int32, the step index of this update, i.e. ``state.step`` before it); and the
      model's 'srm_counts': per image, the SRM's supervised pixels that are genuine overlaps and
      resampling seams, 'srm_{gt,pred}_{genuine,seam}_px' (float32) for each canvas in use.
    """
    tc = config.train
    if tc.on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"train.on_nonfinite must be one of {ON_NONFINITE}: {tc.on_nonfinite!r}")
    freeze_at = int(config.model.freeze_at)
    tx = optimizer_lib.make_optimizer(tc, state.params, freeze_at)
    labels = optimizer_lib.param_labels(state.params, freeze_at)
    schedule = optimizer_lib.learning_rate_schedule(tc)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    has_stats = bool(jax.tree.leaves(state.batch_stats))
    update_stats = has_stats and config.model.norm == "batch_norm"

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
        variables = {"params": params}
        if has_stats:
            variables["batch_stats"] = state.batch_stats
        if update_stats:
            outputs, mutated = model.apply(
                variables, batch, train=True, rngs={"sampling": key}, mutable=["batch_stats"]
            )
            new_stats = mutated["batch_stats"]
        else:
            outputs = model.apply(variables, batch, train=True, rngs={"sampling": key})
            new_stats = state.batch_stats
        total, terms = losses.compute_losses(
            outputs,
            batch,
            rpn_batch_size_per_image=config.model.rpn.batch_size_per_image,
            rpn_smooth_l1_beta=config.model.rpn.smooth_l1_beta,
            roi_smooth_l1_beta=config.model.roi.smooth_l1_beta,
            seg_weight=config.loss.seg_weight,
            srm_weight=config.loss.srm_weight,
            ignore_label=config.loss.ignore_label,
            seg_chunk_rows=int(config.loss.seg_chunk_rows) or None,
            seg_ignore_below=seg_ignore_below,
        )
        terms = {k: jnp.asarray(v, jnp.float32) for k, v in terms.items()}
        counts = dict(outputs.get("srm_counts", {}))
        return jnp.asarray(total, jnp.float32), (terms, counts, new_stats)

    stuff_only = config.model.stuff_head.classes == "stuff"
    seg_ignore_below = int(config.model.num_thing_classes) if stuff_only else 0
    (total, (terms, counts, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    grad_norm = optimizer_lib.trainable_global_norm(grads, labels)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)

    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    def keep_if_nonfinite(new: Any, old: Any) -> Any:
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_nonfinite(new_params, state.params),
        batch_stats=keep_if_nonfinite(new_stats, state.batch_stats),
        opt_state=keep_if_nonfinite(new_opt_state, state.opt_state),
    )
    flag = jnp.logical_not(finite).astype(jnp.int32)
    metrics = dict(terms)
    metrics.update(jax.lax.stop_gradient(counts))
    metrics.update(
        total=total,
        lr=schedule(state.step),
        grad_norm=grad_norm,
        nonfinite=flag,
        nonfinite_skipped=flag,
        step=state.step,
    )
    return new_state, metrics


def jit_train_step(
    model: nn.Module,
    config: Any,
    mesh: Mesh,
    state_sharding: TrainState,
    *,
    step_fn: Callable[..., Any] = train_step,
    compiler_options: dict[str, Any] | None = None,
) -> Any:
    """``train_step`` jitted with the state's and the batch's shardings, donating the state.

    Args:
      model: the OANet module.
      config: full config.
      mesh: the device mesh.
      state_sharding: the second output of :func:`oanet_jax.train.state.create_train_state`.
      step_fn: the step to jit, called as ``step_fn(state, batch, model=, config=)`` (default
        :func:`train_step`; a wrapper of it, e.g. to count traces or profile).
      compiler_options: XLA compiler options of ``jax.jit`` (e.g. the tests compile with
        ``{'xla_backend_optimization_level': 0}`` on CPU: same program, faster compile).

    Returns:
      ``fn(state, batch) -> (state, metrics)``; batch arrays placed with
      :func:`oanet_jax.train.sharding.shard_batch`; metrics replicated.
    """
    return jax.jit(
        functools.partial(step_fn, model=model, config=config),
        in_shardings=(state_sharding, sharding_lib.batch_sharding(mesh)),
        out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options,
    )


def raise_if_nonfinite(metrics: Mapping[str, Any], on_nonfinite: str = "error") -> None:
    """Host check of a step's (fetched) metrics; raises in 'error' mode on a non-finite step.

    Args:
      metrics: the metrics of :func:`train_step` (device or host values; fetched here).
      on_nonfinite: ``config.train.on_nonfinite`` ('error' | 'skip').

    Raises:
      NonFiniteLossError: naming the step and every loss term, when ``metrics['nonfinite']``
        is set and `on_nonfinite` is 'error'.
    """
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}: {on_nonfinite!r}")
    if on_nonfinite == "error" and int(metrics["nonfinite"]):
        terms = {k: float(metrics[k]) for k in (*LOSS_TERMS, "total") if k in metrics}
        terms["grad_norm"] = float(metrics.get("grad_norm", float("nan")))
        raise NonFiniteLossError(int(metrics.get("step", -1)), terms)
