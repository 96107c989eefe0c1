"""`oanet-convert` (oanet_jax.convert.main) and its library half, oanet_jax.convert.checkpoint_io.

File layout detection, the ``--classes`` choice and a round trip .pth -> orbax -> variables; the
numerics of the conversion itself are in test_convert_torchvision.py / test_maskrcnn_parity.py.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from oanet_jax.convert import checkpoint_io  # noqa: E402
from oanet_jax.convert import main as convert_main  # noqa: E402
from oanet_jax.convert import torchvision as convert  # noqa: E402
from oanet_jax.modeling import resnet  # noqa: E402


@pytest.fixture(scope="module")
def maskrcnn_keys() -> list[str]:
    """Keys of a torchvision maskrcnn_resnet50_fpn (v1) state dict (random weights)."""
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    return list(model.state_dict())


def test_detects_checkpoint_kinds(maskrcnn_keys):
    assert checkpoint_io.detect_kind(maskrcnn_keys) == "maskrcnn"
    assert checkpoint_io.resnet_name(set(maskrcnn_keys), "backbone.body.") == "resnet50"
    for name in ("resnet18", "resnet34", "resnet50", "resnet101"):
        keys = list(getattr(torchvision.models, name)(weights=None).state_dict())
        assert checkpoint_io.detect_kind(keys) == name
    with pytest.raises(ValueError, match="unrecognised"):
        checkpoint_io.detect_kind(["encoder.weight"])
    assert checkpoint_io.class_indices("auto", 90, 91) is None
    assert checkpoint_io.class_indices("auto", 80, 91) == list(convert.COCO_THING_IDS)
    with pytest.raises(ValueError, match="--classes"):
        checkpoint_io.class_indices("auto", 50, 91)


def test_round_trip(tmp_path):
    """A wrapped, DDP-prefixed ResNet-18 file -> orbax checkpoint -> the same variables."""
    torch.manual_seed(9)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "r18.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    out = tmp_path / "ckpt"
    summary = convert_main.main([str(path), str(out)])
    assert summary["kind"] == "resnet18" and "note" in summary  # base config says resnet50
    restored = checkpoint_io.load_variables(str(out))

    want = convert.convert_resnet({k: v.numpy() for k, v in sd.items()}, resnet.resnet18())
    assert set(restored) == {"params", "batch_stats"}
    jax.tree.map(np.testing.assert_array_equal, restored["params"]["backbone"], want["params"])
    jax.tree.map(
        np.testing.assert_array_equal, restored["batch_stats"]["backbone"], want["batch_stats"]
    )
    with pytest.raises(SystemExit, match="exists"):
        convert_main.main([str(path), str(out)])


def test_load_config_and_default(tmp_path):
    """The default --config is the installed configs/base.py, whatever the working directory."""
    from configs import base

    args = convert_main.parse_args(["in.pth", "out"])
    assert convert_main.load_config(args.config).to_dict() == base.get_config().to_dict()
    with pytest.raises(FileNotFoundError, match="cannot load config file"):
        convert_main.load_config(str(tmp_path / "missing.py"))


def test_load_state_dict_rejects_non_state_dicts(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        checkpoint_io.load_state_dict(str(path))
