"""Constants of the evaluation tests' tiny split (a plain module: `conftest` names collide).

48 x 56 images, resized to 55 x 64 inside the 64 x 64 padding; NUM_VAL = 5 with eval batch 4
gives a second batch with 1 valid and 3 padding examples.
"""

SIZE = (48, 56)
NUM_VAL = 5


def save_variables_checkpoint(variables, workdir, step: int = 5) -> str:
    """Saves `variables` as the trainer stores them (params unboxed from their logical-
    partitioning metadata) as checkpoint `step` of `workdir`; returns the step's folder."""
    import os

    import flax.linen as nn
    import jax.numpy as jnp

    from oanet_jax.train.checkpoint import CHECKPOINT_DIR, TrainCheckpointManager

    state = {"params": nn.meta.unbox(variables["params"]), "step": jnp.asarray(step, jnp.int32)}
    with TrainCheckpointManager(str(workdir), every_steps=1, keep=1, async_save=False) as mgr:
        mgr.save(step, state, {"data_position": step}, wait=True)
    return os.path.join(str(workdir), CHECKPOINT_DIR, str(step))
