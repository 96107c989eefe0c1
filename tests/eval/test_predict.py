"""scripts/predict.py (oanet_jax.predict.main) on one image from a saved checkpoint; the console
shows the result, not the orbax / absl INFO lines."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax.numpy as jnp
from eval_setup import SIZE
from PIL import Image

from oanet_jax.data import synthetic
from oanet_jax.panoptic import visualize as vis

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_predict_script_on_one_image(tiny_setup, tmp_path):
    from oanet_jax.train.checkpoint import TrainCheckpointManager

    config, _, variables, root = tiny_setup
    workdir = tmp_path / "run"
    # As the trainer stores them: unboxed from their logical-partitioning metadata.
    state = {"params": nn.meta.unbox(variables["params"]), "step": jnp.asarray(5, jnp.int32)}
    with TrainCheckpointManager(str(workdir), every_steps=1, keep=1, async_save=False) as mgr:
        mgr.save(5, state, {"data_position": 5}, wait=True)
    image = sorted((root / "val" / "images").iterdir())[0]
    out = tmp_path / "out"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "predict.py"),
            f"--config={ROOT / 'configs' / 'tiny.py'}",
            f"--config.data.root={root}",
            f"--checkpoint={workdir / 'checkpoints' / '5'}",
            f"--out={out}",
            str(image),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    png = out / f"{image.stem}_panoptic.png"
    with Image.open(png) as im:
        width, height = im.size
    scale = vis.display_scale(SIZE)
    assert width == 3 * SIZE[1] * scale + 2 * 6  # score | srm | changed pixels
    assert height > SIZE[0] * scale
    segments = json.loads((out / f"{image.stem}_segments.json").read_text())
    assert set(segments) == {"score", "srm"}
    assert all(s["category_id"] in {c["id"] for c in synthetic.CATEGORIES} for s in segments["srm"])
    # Quiet console: the written path on stdout, no absl-formatted INFO line (orbax's restore
    # logs ~50 of them at INFO) on stderr.
    assert proc.stdout.strip().splitlines() == [str(png)]
    assert not re.search(r"^I\d{4} ", proc.stderr, re.M), proc.stderr[-3000:]
