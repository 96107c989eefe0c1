"""The architecture check shared by evaluation and prediction (issue 14, item 6).

A checkpoint trained with another architecture than the config's gives `CheckpointMismatchError`
naming the checkpoint and the differing arrays, before any array is restored or anything is
compiled; before the fix, evaluation failed inside the model with a flax `ScopeParamShapeError`.
"""

from __future__ import annotations

import copy
import os
import pathlib
import subprocess
import sys

import pytest
from eval_setup import save_variables_checkpoint

from oanet_jax.eval.evaluator import evaluate_checkpoint
from oanet_jax.train.checkpoint import CheckpointMismatchError

ROOT = pathlib.Path(__file__).resolve().parents[2]
MISMATCH = r"(?s)checkpoints/5 does not match the model of the config .*fpn.*expected"


def test_evaluate_checkpoint_of_another_architecture(tiny_setup, tmp_path):
    config, _, variables, _ = tiny_setup
    save_variables_checkpoint(variables, tmp_path / "run")
    other = copy.deepcopy(config)
    other.model.fpn_channels = 8  # the checkpoint has 16
    with pytest.raises(CheckpointMismatchError, match=MISMATCH):
        evaluate_checkpoint(other, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "eval_5").exists()


@pytest.mark.slow
def test_predict_checkpoint_of_another_architecture(tiny_setup, tmp_path):
    config, _, variables, root = tiny_setup
    checkpoint = save_variables_checkpoint(variables, tmp_path / "run")
    image = sorted((root / "val" / "images").iterdir())[0]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "predict.py"),
            f"--config={ROOT / 'configs' / 'tiny.py'}",
            f"--config.data.root={root}",
            "--config.model.fpn_channels=8",
            f"--checkpoint={checkpoint}",
            f"--out={tmp_path / 'out'}",
            str(image),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode != 0
    assert "CheckpointMismatchError" in proc.stderr
    assert "ScopeParamShapeError" not in proc.stderr
    assert "does not match the model of the config" in proc.stderr
    assert not (tmp_path / "out").exists()
