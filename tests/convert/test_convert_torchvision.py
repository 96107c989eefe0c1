"""Weight import from torchvision: numerical parity of ResNet / Mask R-CNN backbone + FPN.

The oracle is torchvision itself: the same random weights (BatchNorm statistics and affine
randomised so they are not the identity) run through torchvision in eval mode and through the
converted flax modules, on the same NCHW/NHWC tensor, including a size that is not a multiple of
32 (odd feature-map sizes in the FPN top-down path).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from torchvision.models._utils import IntermediateLayerGetter  # noqa: E402

from oanet_jax.convert import torchvision as convert  # noqa: E402
from oanet_jax.modeling import fpn as fpn_lib  # noqa: E402
from oanet_jax.modeling import resnet  # noqa: E402

RTOL = 1e-4
LEVELS = {"0": "p2", "1": "p3", "2": "p4", "3": "p5", "pool": "p6"}
BODY = {"0": "res2", "1": "res3", "2": "res4", "3": "res5"}
# Shared by both ResNet-50 parity tests so the jitted function compiles once per image shape.
R50 = resnet.resnet50()
FPN = fpn_lib.FPN()


@jax.jit
def _r50_fpn(variables, x):
    feats = R50.apply(variables["backbone"], x)
    return feats, FPN.apply(variables["fpn"], feats)


def _fpn_zeros() -> dict:
    """FPN variables of the right structure (zeros), to reuse `_r50_fpn`'s compilation."""
    feats = {
        f"res{k}": jax.ShapeDtypeStruct((1, 8, 8, 2 ** (6 + k)), jnp.float32) for k in range(2, 6)
    }
    shapes = nn.meta.unbox(jax.eval_shape(FPN.init, jax.random.key(0), feats))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _randomise_bn(module: "torch.nn.Module", seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torchvision.ops.FrozenBatchNorm2d):
                c = m.weight.shape[0]
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def _nhwc(t: "torch.Tensor") -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _rel_err(ref: np.ndarray, got) -> float:
    got = np.asarray(got, np.float32)
    assert ref.shape == got.shape, (ref.shape, got.shape)
    return float(np.abs(ref - got).max() / np.abs(ref).max())


def _split(variables: dict) -> dict:
    """{'params': {'backbone', 'fpn'}, 'batch_stats': {...}} -> per-module variables."""
    out: dict = {}
    for collection, tree in variables.items():
        for name, value in tree.items():
            out.setdefault(name, {})[collection] = value
    return out


@pytest.fixture(scope="module")
def maskrcnn():
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None
    ).eval()
    _randomise_bn(model.backbone, seed=1)
    return model


@pytest.fixture(scope="module")
def maskrcnn_converted(maskrcnn):
    return convert.convert_maskrcnn_backbone(maskrcnn.state_dict())


@pytest.mark.parametrize("hw", [(224, 320), (200, 296)])
def test_maskrcnn_backbone_fpn_parity(maskrcnn, maskrcnn_converted, hw):
    variables, consumed = maskrcnn_converted
    state_keys = set(maskrcnn.state_dict())
    assert consumed == {k for k in state_keys if k.startswith("backbone.")}
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(hw[0]))
    with torch.no_grad():
        body = maskrcnn.backbone.body(x)
        pyramid = maskrcnn.backbone.fpn(body)
    feats, levels = _r50_fpn(_split(variables), jnp.asarray(_nhwc(x)))
    for tk, name in BODY.items():
        assert _rel_err(_nhwc(body[tk]), feats[name]) < RTOL, name
    assert set(levels) == set(LEVELS.values())
    for tk, name in LEVELS.items():
        assert _rel_err(_nhwc(pyramid[tk]), levels[name]) < RTOL, name


def test_resnet50_classification_checkpoint_parity():
    torch.manual_seed(2)
    model = torchvision.models.resnet50(weights=None).eval()
    _randomise_bn(model, seed=3)
    getter = IntermediateLayerGetter(
        model,
        {"maxpool": "stem", "layer1": "res2", "layer2": "res3", "layer3": "res4", "layer4": "res5"},
    )
    variables = convert.convert_resnet(model.state_dict(), resnet.resnet50())
    x = torch.randn(1, 3, 224, 320, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = getter(x)
    out, _ = _r50_fpn({"backbone": variables, "fpn": _fpn_zeros()}, jnp.asarray(_nhwc(x)))
    assert set(out) == set(ref)
    for name, t in ref.items():
        assert _rel_err(_nhwc(t), out[name]) < RTOL, name


def test_resnet18_basic_block_parity_and_frozen_bn_checkpoint():
    """Basic blocks, and a FrozenBatchNorm2d state dict (no num_batches_tracked keys)."""
    torch.manual_seed(5)
    model = torchvision.models.resnet18(
        weights=None, norm_layer=torchvision.ops.FrozenBatchNorm2d
    ).eval()
    _randomise_bn(model, seed=6)
    state = model.state_dict()
    assert not any(k.endswith("num_batches_tracked") for k in state)
    getter = IntermediateLayerGetter(model, {f"layer{i}": f"res{i + 1}" for i in range(1, 5)})
    x = torch.randn(2, 3, 72, 104, generator=torch.Generator().manual_seed(7))
    backbone = resnet.resnet18()
    variables = convert.convert_resnet({k: v.numpy() for k, v in state.items()}, backbone)
    with torch.no_grad():
        ref = getter(x)
    out = jax.jit(backbone.apply)(variables, jnp.asarray(_nhwc(x)))
    for name, t in ref.items():
        assert _rel_err(_nhwc(t), out[name]) < RTOL, name


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(8)
    return {k: v.numpy() for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}


def test_variable_tree_matches_module(resnet18_state):
    backbone = resnet.resnet18(norm="batch_norm")
    variables = convert.convert_resnet(resnet18_state, backbone)
    init = nn.meta.unbox(
        jax.eval_shape(backbone.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    )
    want = jax.tree.map(lambda s: (s.shape, np.dtype(s.dtype)), init)
    got = jax.tree.map(lambda a: (a.shape, a.dtype), variables)
    assert got == want
    # batch_norm: scale/bias trainable, statistics in batch_stats.
    assert set(variables["params"]["stem_norm"]) == {"scale", "bias"}
    assert set(variables["batch_stats"]["stem_norm"]) == {"mean", "var"}
    np.testing.assert_array_equal(
        variables["params"]["res3"]["block0"]["shortcut_conv"]["kernel"],
        resnet18_state["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["res5"]["block1"]["norm2"]["var"],
        resnet18_state["layer4.1.bn2.running_var"],
    )


def test_missing_key_is_an_error(resnet18_state):
    state = dict(resnet18_state)
    del state["layer3.1.conv2.weight"]
    del state["bn1.running_var"]
    with pytest.raises(convert.ConversionError, match="missing keys") as e:
        convert.convert_resnet(state, resnet.resnet18())
    assert "layer3.1.conv2.weight" in str(e.value) and "bn1.running_var" in str(e.value)


def test_unused_key_is_an_error(resnet18_state):
    state = dict(resnet18_state, **{"layer5.0.conv1.weight": np.zeros((1, 1, 1, 1))})
    with pytest.raises(convert.ConversionError, match=r"unused keys.*layer5\.0\.conv1\.weight"):
        convert.convert_resnet(state, resnet.resnet18())
    # A resnet18 checkpoint into a resnet34 model: missing blocks; into a GroupNorm model: the
    # running statistics are unused.
    with pytest.raises(convert.ConversionError, match=r"missing keys.*layer3\.5\.conv1\.weight"):
        convert.convert_resnet(resnet18_state, resnet.resnet34())
    with pytest.raises(convert.ConversionError, match=r"unused keys.*bn1\.running_mean"):
        convert.convert_resnet(resnet18_state, resnet.resnet18(norm="group_norm"))


def test_wrong_shape_is_an_error(resnet18_state):
    state = dict(resnet18_state)
    state["layer2.0.conv1.weight"] = np.zeros((128, 64, 5, 5), np.float32)
    state["layer4.0.bn1.bias"] = np.zeros((7,), np.float32)
    with pytest.raises(convert.ConversionError, match="mis-shaped keys") as e:
        convert.convert_resnet(state, resnet.resnet18())
    msg = str(e.value)
    assert "layer2.0.conv1.weight: got (128, 64, 5, 5), expected (128, 64, 3, 3)" in msg
    assert "layer4.0.bn1.bias" in msg
    # A ResNet-50 checkpoint does not fit a ResNet-18 (different shapes and keys).
    with pytest.raises(convert.ConversionError):
        convert.convert_resnet(torchvision.models.resnet50().state_dict(), resnet.resnet18())


def test_maskrcnn_errors_and_legacy_fpn_keys(maskrcnn, maskrcnn_converted):
    state = {k: v.numpy() for k, v in maskrcnn.state_dict().items()}
    # rpn.* / roi_heads.* are not this converter's business: not consumed, no error.
    new, consumed = maskrcnn_converted
    assert any(k.startswith(("rpn.", "roi_heads.")) for k in state)
    assert not any(k.startswith(("rpn.", "roi_heads.")) for k in consumed)
    # An unknown backbone.* key is an error.
    bad = dict(state, **{"backbone.fpn.extra_blocks.0.weight": np.zeros(3)})
    with pytest.raises(convert.ConversionError, match=r"unused keys.*extra_blocks"):
        convert.convert_maskrcnn_backbone(bad)
    # Missing FPN tensors are listed.
    bad = {k: v for k, v in state.items() if not k.startswith("backbone.fpn.layer_blocks.3")}
    with pytest.raises(convert.ConversionError, match=r"layer_blocks\.3\.0\.weight"):
        convert.convert_maskrcnn_backbone(bad)
    # Pre-0.13 key names (inner_blocks.{i}.weight, as in the original .pth file) convert the same.
    legacy = {
        k.replace(".0.weight", ".weight").replace(".0.bias", ".bias")
        if k.startswith("backbone.fpn.")
        else k: v
        for k, v in state.items()
    }
    assert any(k == "backbone.fpn.inner_blocks.2.weight" for k in legacy)
    old, consumed = convert.convert_maskrcnn_backbone(legacy)
    assert "backbone.fpn.inner_blocks.2.weight" in consumed
    jax.tree.map(np.testing.assert_array_equal, new, old)
    np.testing.assert_array_equal(
        new["params"]["fpn"]["lateral4"]["kernel"],
        state["backbone.fpn.inner_blocks.2.0.weight"].transpose(2, 3, 1, 0),
    )
