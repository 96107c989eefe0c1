"""ResNet / FPN / shared layers: shapes and dtypes, freezing, and layer-level torch parity.

(End-to-end parity of converted ResNet-50 + FPN with torchvision is in
tests/convert/test_convert_torchvision.py.)
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from oanet_jax.modeling import fpn as fpn_lib  # noqa: E402
from oanet_jax.modeling import layers, resnet  # noqa: E402

FACTORIES = {"resnet18": resnet.resnet18, "tiny": resnet.resnet_tiny, "resnet50": resnet.resnet50}
FPN_CHANNELS = {"resnet18": 64, "tiny": 16, "resnet50": 256}


def _nchw(x: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def _nhwc(t: "torch.Tensor") -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _random_variables(module: nn.Module, *args, seed: int = 0, **kwargs) -> dict:
    """Variables of `module` drawn with numpy (He-normal kernels, non-identity norms).

    Avoids compiling `module.init` (XLA's CPU compile of the RNG is slow on a shared machine).
    """
    rng = np.random.default_rng(seed)
    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs))

    def draw(path, s):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(size=s.shape) * np.sqrt(2.0 / (np.prod(s.shape[:2]) * s.shape[3]))
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, s.shape)
        return rng.normal(size=s.shape) * 0.1  # bias, mean

    return jax.tree_util.tree_map_with_path(lambda p, s: draw(p, s).astype(s.dtype), shapes)


# ----------------------------------------------------------------------------- shapes / dtypes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_eval_shape_resnet_fpn(name, dtype):
    backbone = FACTORIES[name](dtype=dtype)
    fpn = fpn_lib.FPN(features=FPN_CHANNELS[name], dtype=dtype)
    x = jax.ShapeDtypeStruct((2, 200, 296, 3), jnp.float32)

    def init_and_apply(x):
        bvars = backbone.init(jax.random.key(0), x)
        feats = backbone.apply(bvars, x)
        fvars = fpn.init(jax.random.key(1), feats)
        return bvars, fvars, feats, fpn.apply(fvars, feats)

    bvars, fvars, feats, levels = jax.eval_shape(init_and_apply, x)
    channels = backbone.feature_channels()
    sizes = {4: (50, 74), 8: (25, 37), 16: (13, 19), 32: (7, 10), 64: (4, 5)}
    assert set(feats) == {"stem", "res2", "res3", "res4", "res5"}
    for k, stride in backbone.feature_strides().items():
        assert feats[k].shape == (2, *sizes[stride], channels[k]), k
        assert feats[k].dtype == dtype
    assert fpn.level_names() == ("p2", "p3", "p4", "p5", "p6")
    assert set(levels) == set(fpn.level_names())
    for k in range(2, 7):
        assert levels[f"p{k}"].shape == (2, *sizes[2**k], FPN_CHANNELS[name])
        assert levels[f"p{k}"].dtype == dtype
    # Parameters stay float32 and carry logical axis names.
    for tree in (bvars, fvars):
        for leaf in jax.tree.leaves(nn.meta.unbox(tree)):
            assert leaf.dtype == jnp.float32
    k = bvars["params"]["res3"]["block0"]["conv1"]["kernel"]
    assert isinstance(k, nn.LogicallyPartitioned) and k.names == layers.CONV_KERNEL_AXES
    assert bvars["batch_stats"]["stem_norm"]["var"].names == layers.NORM_AXES
    assert fvars["params"]["lateral2"]["bias"].names == layers.CONV_BIAS_AXES
    specs = nn.get_partition_spec(bvars)
    assert all(s is not None for s in jax.tree.leaves(specs, is_leaf=lambda s: s is not None))
    # FrozenBN default: no norm tensor in params (nothing but conv kernels is trainable).
    for path, _ in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(bvars["params"])):
        assert path[-1].key == "kernel", path
    n_blocks = sum(backbone.stage_sizes)
    bottleneck = backbone.block == "bottleneck"
    # stem + per-block norms + projection shortcuts (res2 of basic-block nets has none).
    n_bn = 1 + n_blocks * (3 if bottleneck else 2) + (4 if bottleneck else 3)
    assert len(jax.tree.leaves(nn.meta.unbox(bvars["batch_stats"]))) == 4 * n_bn


@pytest.mark.parametrize("name", ["resnet50", "resnet101"])
def test_parameter_count_matches_torchvision(name):
    """Trainable (conv) weights equal torchvision's conv weights; BN tensors are all frozen."""
    import torchvision

    ref = getattr(torchvision.models, name)(weights=None)
    n_conv = sum(m.weight.numel() for m in ref.modules() if isinstance(m, torch.nn.Conv2d))
    n_bn = sum(4 * m.weight.numel() for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d))
    shapes = nn.meta.unbox(
        jax.eval_shape(getattr(resnet, name)().init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    )
    count = lambda tree: sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree))
    assert count(shapes["params"]) == n_conv
    assert count(shapes["batch_stats"]) == n_bn


def test_bfloat16_forward_close_to_float32():
    x = jax.random.normal(jax.random.key(0), (1, 64, 96, 3))
    f32 = resnet.resnet_tiny(norm="group_norm")
    bf16 = resnet.resnet_tiny(norm="group_norm", dtype=jnp.bfloat16)
    variables = _random_variables(f32, x)
    a = jax.jit(f32.apply)(variables, x)["res5"]
    b = jax.jit(bf16.apply)(variables, x)["res5"]
    assert b.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(a - b.astype(jnp.float32))) / jnp.max(jnp.abs(a)))
    assert 0 < err < 0.05


def test_unknown_options_raise():
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    with pytest.raises(ValueError, match="Unknown norm"):
        jax.eval_shape(resnet.resnet_tiny(norm="layer_norm").init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="freeze_at"):
        jax.eval_shape(resnet.resnet_tiny(freeze_at=6).init, jax.random.key(0), x)


# ------------------------------------------------------------------------------------- freezing


@functools.cache
def _init(norm: str):
    """Variables of the tiny backbone + FPN (their structure does not depend on freeze_at)."""
    backbone = resnet.resnet_tiny(norm=norm)
    fpn = fpn_lib.FPN(features=16)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    bvars = _random_variables(backbone, x, seed=1)
    feats = jax.eval_shape(backbone.apply, bvars, x)
    return x, bvars, _random_variables(fpn, feats, seed=2)


def _grads(freeze_at: int, norm: str):
    backbone = resnet.resnet_tiny(norm=norm, freeze_at=freeze_at)
    fpn = fpn_lib.FPN(features=16)
    x, bvars, fvars = _init(norm)

    def loss(params):
        feats = backbone.apply({**bvars, "params": params["backbone"]}, x)
        levels = fpn.apply({"params": params["fpn"]}, feats)
        return sum(jnp.sum(jnp.sin(v)) for v in levels.values())

    params = {"backbone": bvars["params"], "fpn": fvars["params"]}
    return params, jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize("norm", ["frozen_bn", "group_norm"])
def test_freeze_at_2_zero_gradients_for_stem_and_res2(norm):
    params, grads = _grads(2, norm)
    g = grads["backbone"]
    for name in ("stem_conv", "res2"):
        assert all(float(jnp.max(jnp.abs(v))) == 0.0 for v in jax.tree.leaves(g[name])), name
    for name in ("res3", "res4", "res5"):
        assert all(float(jnp.max(jnp.abs(v))) > 0.0 for v in jax.tree.leaves(g[name])), name
    assert float(jnp.max(jnp.abs(grads["fpn"]["lateral2"]["kernel"]))) > 0
    if norm == "group_norm":
        assert float(jnp.max(jnp.abs(g["stem_norm"]["scale"]))) == 0.0
        assert float(jnp.max(jnp.abs(g["res3"]["block0"]["norm1"]["scale"]))) > 0.0
    # The optimizer mask marks exactly the parameters with zero gradient.
    mask = resnet.frozen_param_mask(params, 2, backbone_path=("backbone",))
    zero = jax.tree.map(lambda v: bool(jnp.all(v == 0)), grads)
    assert mask == zero
    assert not any(jax.tree.leaves(mask["fpn"]))


@pytest.mark.parametrize("freeze_at", [1, 5])
def test_frozen_param_mask_matches_gradients(freeze_at):
    params, grads = _grads(freeze_at, "frozen_bn")
    mask = resnet.frozen_param_mask(params["backbone"], freeze_at)
    zero = jax.tree.map(lambda v: bool(jnp.all(v == 0)), grads["backbone"])
    assert mask == zero


def test_frozen_param_mask_structure():
    _, bvars, _ = _init("group_norm")
    params = {"backbone": bvars["params"], "head": {"stem_conv": {"kernel": np.zeros(3)}}}
    for freeze_at in range(6):
        mask = resnet.frozen_param_mask(params, freeze_at, backbone_path=("backbone",))
        assert not any(jax.tree.leaves(mask["head"]))  # outside the backbone: never frozen
        expected = {"stem_conv", "stem_norm"} if freeze_at >= 1 else set()
        expected |= {f"res{k}" for k in range(2, freeze_at + 1)}
        assert set(resnet.frozen_module_names(freeze_at)) == expected
        for name, sub in mask["backbone"].items():
            assert set(jax.tree.leaves(sub)) == {name in expected}, (freeze_at, name)


def test_trainable_batch_norm_frozen_stages_keep_statistics():
    backbone = resnet.resnet_tiny(norm="batch_norm", freeze_at=2)
    x = np.random.default_rng(0).normal(1.0, 3.0, size=(2, 64, 64, 3)).astype(np.float32)
    variables = _random_variables(backbone, x)
    apply = jax.jit(backbone.apply, static_argnames=("train", "mutable"))
    _, updates = apply(variables, x, train=True, mutable=("batch_stats",))
    before, after = variables["batch_stats"], updates["batch_stats"]
    for name in ("stem_norm", "res2"):
        jax.tree.map(np.testing.assert_array_equal, before[name], after[name])
    for name in ("res3", "res4", "res5"):
        changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before[name], after[name])
        assert all(jax.tree.leaves(changed)), name
    # Evaluation mode never updates.
    _, same = apply(variables, x, train=False, mutable=("batch_stats",))
    jax.tree.map(np.testing.assert_array_equal, before, same["batch_stats"])


# ---------------------------------------------------------------------- layers vs torch oracle


def test_conv2d_explicit_padding_matches_torch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 13, 18, 5)).astype(np.float32)
    for k, s, p, d in [(7, 2, 3, 1), (3, 2, 1, 1), (1, 2, 0, 1), (3, 1, 2, 2), (3, 2, 0, 1)]:
        conv = layers.Conv2D(6, k, s, padding=p, dilation=d)
        variables = _random_variables(conv, x, seed=k)
        w, b = variables["params"]["kernel"], variables["params"]["bias"]
        ref = F.conv2d(
            _nchw(x),
            torch.from_numpy(w.transpose(3, 2, 0, 1).copy()),
            torch.from_numpy(b),
            stride=s,
            padding=p,
            dilation=d,
        )
        got = jax.jit(conv.apply)(variables, x)
        np.testing.assert_allclose(got, _nhwc(ref), rtol=1e-5, atol=1e-5)


def test_max_pool_pads_with_minus_inf_as_torch():
    x = -np.abs(np.random.default_rng(1).normal(size=(1, 11, 14, 3))).astype(np.float32) - 1
    got = layers.max_pool(jnp.asarray(x), 3, 2, 1)
    ref = F.max_pool2d(_nchw(x), 3, 2, 1)
    np.testing.assert_array_equal(got, _nhwc(ref))
    assert float(jnp.max(got)) < 0  # zero padding would have produced zeros


@pytest.mark.parametrize("channels", [8, 48, 64])
def test_group_norm_matches_torch(channels):
    rng = np.random.default_rng(channels)
    x = (rng.normal(size=(2, 5, 7, channels)) * 3 + 2).astype(np.float32)
    gn = layers.GroupNorm(num_groups=32)
    scale = rng.normal(size=channels).astype(np.float32)
    bias = rng.normal(size=channels).astype(np.float32)
    got = gn.apply({"params": {"scale": scale, "bias": bias}}, x)
    ref_mod = torch.nn.GroupNorm(np.gcd(32, channels), channels, eps=1e-5)
    with torch.no_grad():
        ref_mod.weight.copy_(torch.from_numpy(scale))
        ref_mod.bias.copy_(torch.from_numpy(bias))
        ref = ref_mod(_nchw(x))
    np.testing.assert_allclose(got, _nhwc(ref), rtol=1e-4, atol=1e-4)


def test_batch_norm_and_frozen_batch_norm_match_torch():
    rng = np.random.default_rng(3)
    c = 6
    x = (rng.normal(size=(3, 4, 5, c)) * 2 + 1).astype(np.float32)
    stats = {
        "scale": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "bias": rng.normal(size=c).astype(np.float32),
        "mean": rng.normal(size=c).astype(np.float32),
        "var": rng.uniform(0.5, 1.5, c).astype(np.float32),
    }
    ref_mod = torch.nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)
    with torch.no_grad():
        ref_mod.weight.copy_(torch.from_numpy(stats["scale"]))
        ref_mod.bias.copy_(torch.from_numpy(stats["bias"]))
        ref_mod.running_mean.copy_(torch.from_numpy(stats["mean"]))
        ref_mod.running_var.copy_(torch.from_numpy(stats["var"]))
    bn = layers.BatchNorm()
    variables = {
        "params": {"scale": stats["scale"], "bias": stats["bias"]},
        "batch_stats": {"mean": stats["mean"], "var": stats["var"]},
    }
    # Evaluation mode and FrozenBatchNorm: running statistics.
    ref_mod.eval()
    with torch.no_grad():
        ref_eval = _nhwc(ref_mod(_nchw(x)))
    np.testing.assert_allclose(bn.apply(variables, x), ref_eval, rtol=1e-5, atol=1e-5)
    frozen = layers.FrozenBatchNorm().apply({"batch_stats": stats}, x, train=True)
    np.testing.assert_allclose(frozen, ref_eval, rtol=1e-5, atol=1e-5)
    # Training mode: batch statistics, and PyTorch's running update (unbiased variance).
    ref_mod.train()
    with torch.no_grad():
        ref_train = _nhwc(ref_mod(_nchw(x)))
    got, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(got, ref_train, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        updates["batch_stats"]["mean"], ref_mod.running_mean.numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        updates["batch_stats"]["var"], ref_mod.running_var.numpy(), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "src,dst", [((7, 10), (13, 19)), ((4, 5), (7, 10)), ((5, 3), (10, 6)), ((3, 4), (8, 9))]
)
def test_upsample_nearest_to_matches_torch_interpolate(src, dst):
    x = np.random.default_rng(0).normal(size=(2, *src, 3)).astype(np.float32)
    got = fpn_lib.upsample_nearest_to(jnp.asarray(x), dst)
    ref = F.interpolate(_nchw(x), size=dst, mode="nearest")
    np.testing.assert_array_equal(got, _nhwc(ref))


def test_fpn_top_down_and_p6_against_torch_ops():
    """The FPN recomputed with torch ops from the same (random) weights, odd sizes."""
    rng = np.random.default_rng(5)
    chans = {"res2": 8, "res3": 16, "res4": 32, "res5": 64}
    sizes = {"res2": (25, 37), "res3": (13, 19), "res4": (7, 10), "res5": (4, 5)}
    feats = {k: rng.normal(size=(1, *sizes[k], c)).astype(np.float32) for k, c in chans.items()}
    fpn = fpn_lib.FPN(features=12)
    variables = _random_variables(fpn, feats)
    got = jax.jit(fpn.apply)(variables, feats)

    def conv(name, x, pad):
        p = variables["params"][name]
        w = torch.from_numpy(p["kernel"].transpose(3, 2, 0, 1).copy())
        return F.conv2d(x, w, torch.from_numpy(p["bias"]), padding=pad)

    top = None
    with torch.no_grad():
        for k in (5, 4, 3, 2):
            lat = conv(f"lateral{k}", _nchw(feats[f"res{k}"]), 0)
            if top is not None:
                lat = lat + F.interpolate(top, size=lat.shape[-2:], mode="nearest")
            top = lat
            ref = conv(f"output{k}", lat, 1)
            np.testing.assert_allclose(got[f"p{k}"], _nhwc(ref), rtol=1e-4, atol=1e-4)
            if k == 5:
                p6 = _nhwc(F.max_pool2d(ref, 1, 2, 0))
                np.testing.assert_allclose(got["p6"], p6, rtol=1e-4, atol=1e-4)
