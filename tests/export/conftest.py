"""Fixtures of the export tests: a tiny synthetic split, a saved checkpoint of a fresh tiny model,
its `jax` artifact written by ``scripts/export.py`` (one per session) and the in-process model's
outputs on two validation images (the reference of every round trip)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import jax
import numpy as np
import pytest
from export_helpers import (
    BATCH,
    EXPORT_SIZE,
    NUM_VAL,
    ORDERING,
    ROOT,
    SIZE,
    STEP,
    ExportSetup,
    subprocess_env,
)
from tiny_model import fresh_variables

from configs import tiny
from oanet_jax.data import synthetic


@pytest.fixture(scope="session")
def export_setup(tmp_path_factory) -> ExportSetup:
    """Synthetic data, a checkpoint of fresh tiny variables and its `jax` artifact (CLI)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from oanet_jax.modeling.build import build_model
    from oanet_jax.predict import preprocess_image
    from oanet_jax.train.checkpoint import TrainCheckpointManager

    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(str(root), num_images=1, num_val_images=NUM_VAL, seed=0, size=EXPORT_SIZE)
    resized_root = tmp_path_factory.mktemp("synthetic_resized")
    synthetic.generate(str(resized_root), num_images=1, num_val_images=NUM_VAL, seed=1, size=SIZE)
    config = tiny.get_config()
    config.data.root = str(root)
    config.data.eval.instances_json = ""  # AP ground truth from the panoptic thing segments
    model = build_model(config)
    variables = fresh_variables(model, config)
    workdir = tmp_path_factory.mktemp("run")
    state = {"params": nn.meta.unbox(variables["params"]), "step": jnp.asarray(STEP, jnp.int32)}
    with TrainCheckpointManager(str(workdir), every_steps=1, keep=1, async_save=False) as mgr:
        mgr.save(STEP, state, {"data_position": STEP}, wait=True)
    artifact = tmp_path_factory.mktemp("exported") / "tiny_jax"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "export.py"),
            f"--config={ROOT / 'configs' / 'tiny.py'}",
            f"--config.data.root={root}",
            f"--workdir={workdir}",
            f"--out={artifact}",
            "--format=jax",
            f"--batch={BATCH}",
            "--platforms=cpu",
            f"--ordering={ORDERING}",
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(artifact)

    from PIL import Image

    images = sorted((resized_root / "val" / "images").iterdir())[:BATCH]
    batches = [preprocess_image(np.asarray(Image.open(p).convert("RGB")), config) for p in images]
    inputs = {
        "images": np.concatenate([b["image"] for b in batches]),
        "image_shapes": np.concatenate([b["image_shape"] for b in batches]).astype(np.int32),
        "orig_shapes": np.concatenate([b["orig_shape"] for b in batches]).astype(np.int32),
    }
    # Two different valid sizes in one batch: the second image is cropped inside its padding.
    inputs["image_shapes"][1] = (40, 64)
    return ExportSetup(
        config=config,
        model=model,
        variables={"params": state["params"]},
        data_root=root,
        resized_root=resized_root,
        workdir=workdir,
        artifact=artifact,
        inputs=inputs,
    )


@pytest.fixture(scope="session")
def reference_outputs(export_setup) -> dict[str, Any]:
    """The in-process model's merge ('id_map', 'segments') on `ExportSetup.inputs`."""
    from oanet_jax.eval.inference import make_inference_fn

    s = export_setup
    infer = make_inference_fn(s.model, s.config, (ORDERING,), batch_size=BATCH)
    batch = {
        "image": s.inputs["images"],
        "image_shape": s.inputs["image_shapes"],
        "orig_shape": s.inputs["orig_shapes"],
    }
    return jax.device_get(infer(s.variables, batch))["panoptic"][ORDERING]
