"""Config validation at load time (oanet_jax/config_check.py) and its calls by the entry points.

Every broken rule gives a `ConfigError` naming the field, its value and the rule, raised by
`train_and_evaluate`, `evaluate_checkpoint` and `scripts/predict.py` before any model is built or
data read (before the fix these were a numpy broadcasting error, a JAX IndivisibleError, an image
size silently accepted, a synthetic dataset silently generated at a mistyped root).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from configs import base, tiny
from oanet_jax import config_check
from oanet_jax.config_check import ConfigError, validate_config
from oanet_jax.eval.evaluator import evaluate_checkpoint
from oanet_jax.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny(tmp_path: pathlib.Path):
    config = tiny.get_config()
    config.data.root = str(tmp_path)  # exists
    return config


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("batch_size", -4, r"train\.batch_size=-4: must be a positive integer"),
        ("batch_size", 0, r"train\.batch_size=0: must be a positive integer"),
        (
            "batch_size",
            12,
            r"train\.batch_size=12: must be divisible by the 8-way 'data' axis .*e\.g\. 16",
        ),
    ],
)
def test_train_batch_rules(tmp_path, field, value, match):
    config = _tiny(tmp_path)
    config.train[field] = value
    with pytest.raises(ConfigError, match=match):
        validate_config(config, "train", num_devices=8, process_count=1)
    validate_config(config, "eval", num_devices=8)  # the training batch is not the eval's


def test_batch_divisible_by_the_processes_too(tmp_path):
    config = _tiny(tmp_path)
    config.train.batch_size = 6
    config.sharding.mesh_shape = (1, -1)  # 'data' axis 1: only the 4 processes must divide it
    with pytest.raises(
        ConfigError, match=r"batch_size=6: must be divisible by 4 processes \(.*\); e\.g\. 8"
    ):
        validate_config(config, "train", num_devices=8, process_count=4)
    config.train.batch_size = 12
    validate_config(config, "train", num_devices=8, process_count=4)


def test_batch_divisible_by_the_data_axis_not_all_devices(tmp_path):
    config = _tiny(tmp_path)
    config.train.batch_size = 4
    config.sharding.mesh_shape = (4, 2)  # 'data' axis 4 of 8 devices
    validate_config(config, "train", num_devices=8, process_count=1)
    config.sharding.mesh_shape = (3, 1)
    with pytest.raises(ConfigError, match=r"sharding\.mesh_shape=\(3, 1\): .*does not divide"):
        validate_config(config, "train", num_devices=8, process_count=1)


def test_image_size_multiple_of_the_backbone_stride(tmp_path):
    config = _tiny(tmp_path)
    config.data.image_size = (64, 80)
    with pytest.raises(
        ConfigError,
        match=r"data\.image_size=\(64, 80\): each side must be a multiple of 32, the coarsest "
        r"stride of model\.backbone='tiny'; e\.g\. \(64, 96\)",
    ):
        validate_config(config, "predict")
    config.data.image_size = (64, 96)
    validate_config(config, "predict")
    assert config_check.coarsest_backbone_stride(base.get_config()) == 32


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("source_size", (0, 640), r"data\.source_size=\(0, 640\): must be two positive"),
        ("source_size", (480, -1), r"data\.source_size=\(480, -1\)"),
        ("max_mask_runs", 0, r"data\.max_mask_runs=0: must be a positive integer"),
        ("max_instances", 300, r"data\.max_instances=300: at most 254"),
    ],
)
def test_wire_format_rules(tmp_path, field, value, match):
    config = _tiny(tmp_path)
    validate_config(config, "eval")
    config.data[field] = value
    with pytest.raises(ConfigError, match=match):
        validate_config(config, "eval")


def test_all_problems_listed_at_once(tmp_path):
    config = _tiny(tmp_path)
    config.train.batch_size = 0
    config.eval.batch_size = -1
    config.data.image_size = (50, 64)
    with pytest.raises(ConfigError) as err:
        validate_config(config, "train", num_devices=1, process_count=1)
    lines = str(err.value).splitlines()
    assert len(lines) == 4 and lines[0] == "invalid config:"
    assert [line.split("=")[0].strip() for line in lines[1:]] == [
        "train.batch_size",
        "eval.batch_size",
        "data.image_size",
    ]


def test_missing_root_only_generated_for_a_synthetic_training_config(tmp_path):
    missing = tmp_path / "data" / "cocoo"
    coco = base.get_config()
    coco.data.root = str(missing)
    coco.data.image_size = (128, 128)
    for purpose in ("train", "eval"):
        with pytest.raises(ConfigError, match=r"data\.root='.*cocoo': does not exist .*synthetic"):
            validate_config(coco, purpose, num_devices=8, process_count=1)
    validate_config(coco, "predict")  # prediction reads no data from the root
    synthetic = _tiny(tmp_path)
    synthetic.data.root = str(missing)
    validate_config(synthetic, "train", num_devices=8, process_count=1)  # will be generated
    with pytest.raises(ConfigError, match=r"generated only by training"):
        validate_config(synthetic, "eval")
    assert not missing.exists()


def test_train_and_evaluate_validates_first(tmp_path):
    """Before the fix: batch 0 gave a 103-line broadcasting error after building the model, and
    a mistyped root of a non-synthetic config failed in the input pipeline."""
    config = _tiny(tmp_path)
    config.train.batch_size = 0
    with pytest.raises(ConfigError, match=r"train\.batch_size=0"):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    config = _tiny(tmp_path)
    del config.data["synthetic_num_images"]  # no longer a synthetic config
    config.data.root = str(tmp_path / "typo")
    with pytest.raises(ConfigError, match=r"data\.root='.*typo': does not exist"):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "typo").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_evaluate_checkpoint_validates_first(tmp_path):
    config = _tiny(tmp_path)
    config.eval.batch_size = 0
    with pytest.raises(ConfigError, match=r"eval\.batch_size=0"):
        evaluate_checkpoint(config, str(tmp_path / "no_run"))


def test_synthetic_generation_is_announced_loudly(tmp_path, capsys):
    config = _tiny(tmp_path)
    config.data.root = str(tmp_path / "new")
    config.data.synthetic_num_images = 2
    config.data.synthetic_num_val_images = 1
    assert loop.maybe_generate_synthetic(config)
    err = capsys.readouterr().err
    assert "!" * 72 in err
    assert f"GENERATING a synthetic dataset there ({tmp_path / 'new'})" in err
    assert "check --config.data.root" in err


def test_predict_script_validates_the_config(tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "predict.py"),
            f"--config={ROOT / 'configs' / 'tiny.py'}",
            "--config.data.image_size=(60,64)",
            f"--checkpoint={tmp_path}",
            str(image),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode != 0
    assert "data.image_size=(60, 64): each side must be a multiple of 32" in proc.stderr
