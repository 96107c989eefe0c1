"""Tests of oanet_jax.modeling.roi_heads against torchvision's RoI heads (same weights)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oanet_jax.modeling.roi_heads import (
    BoxHead,
    BoxPredictor,
    MaskHead,
    postprocess_detections,
    select_class_masks,
)

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
from torchvision.models.detection.faster_rcnn import (  # noqa: E402
    FastRCNNPredictor,
    TwoMLPHead,
)
from torchvision.models.detection.mask_rcnn import (  # noqa: E402
    MaskRCNNHeads,
    MaskRCNNPredictor,
)
from torchvision.models.detection.roi_heads import RoIHeads  # noqa: E402


def _t2n(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# (1) shapes, dtypes, parameter layout


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_eval_shape_box_and_mask_heads(dtype):
    b, k, cin, c = 2, 5, 16, 7
    box_head = BoxHead(fc_dim=32, dtype=dtype)
    predictor = BoxPredictor(c, dtype=dtype)
    mask_head = MaskHead(c, conv_dim=8, num_convs=3, dtype=dtype)
    pooled7 = jax.ShapeDtypeStruct((b, k, 7, 7, cin), dtype)
    pooled14 = jax.ShapeDtypeStruct((b, k, 14, 14, cin), dtype)
    rng = jax.random.key(0)

    vb = jax.eval_shape(box_head.init, rng, pooled7)
    feats = jax.eval_shape(box_head.apply, vb, pooled7)
    assert feats.shape == (b, k, 32) and feats.dtype == dtype
    vp = jax.eval_shape(predictor.init, rng, feats)
    out = jax.eval_shape(predictor.apply, vp, feats)
    assert out["class_logits"].shape == (b, k, c + 1)
    assert out["class_logits"].dtype == jnp.float32
    assert out["box_deltas"].shape == (b, k, c, 4)
    assert out["box_deltas"].dtype == jnp.float32
    vm = jax.eval_shape(mask_head.init, rng, pooled14)
    masks = jax.eval_shape(mask_head.apply, vm, pooled14)
    assert masks.shape == (b, k, 28, 28, c) and masks.dtype == jnp.float32

    # Parameter names, shapes, dtypes (param_dtype stays float32) and logical axis names.
    pb, pp, pm = vb["params"], vp["params"], vm["params"]
    assert set(pb) == {"fc1", "fc2"} and set(pp) == {"cls_score", "bbox_pred"}
    assert set(pm) == {"mask_fcn1", "mask_fcn2", "mask_fcn3", "deconv", "predictor"}
    assert pb["fc1"]["kernel"].value.shape == (7 * 7 * cin, 32)
    assert pb["fc1"]["kernel"].names == ("embed", "mlp")
    assert pb["fc1"]["bias"].names == ("mlp",)
    assert pp["cls_score"]["kernel"].names == ("embed", "mlp")
    assert pp["bbox_pred"]["kernel"].value.shape == (32, 4 * c)
    assert pm["deconv"]["kernel"].value.shape == (2, 2, 8, 8)
    assert pm["deconv"]["kernel"].names == ("conv_h", "conv_w", "conv_out", "conv_in")
    assert pm["mask_fcn1"]["kernel"].names == ("conv_h", "conv_w", "conv_in", "conv_out")
    for leaf in jax.tree.leaves(nn.unbox((pb, pp, pm))):
        assert leaf.dtype == jnp.float32


def test_initialisers_match_detectron2():
    # Statistics of the initialised weights: fc xavier U(+-sqrt(3/fan_in)), cls N(0, 0.01),
    # bbox N(0, 0.001), mask convs/deconv He normal fan_out, predictor N(0, 0.001), biases 0.
    cin, fc, c, conv = 32, 128, 40, 32

    @jax.jit
    def init_all(rng):
        r1, r2, r3 = jax.random.split(rng, 3)
        pb = BoxHead(fc_dim=fc).init(r1, jnp.zeros((1, 1, 7, 7, cin)))
        pp = BoxPredictor(c).init(r2, jnp.zeros((1, 1, fc)))
        pm = MaskHead(c, conv_dim=conv, num_convs=2).init(r3, jnp.zeros((1, 1, 14, 14, cin)))
        return nn.unbox((pb["params"], pp["params"], pm["params"]))

    pb, pp, pm = init_all(jax.random.key(1))
    fan_in = 7 * 7 * cin
    k1 = np.asarray(pb["fc1"]["kernel"])
    assert np.abs(k1).max() <= np.sqrt(3 / fan_in) + 1e-7
    np.testing.assert_allclose(k1.std(), np.sqrt(1 / fan_in), rtol=0.05)
    np.testing.assert_allclose(np.asarray(pp["cls_score"]["kernel"]).std(), 0.01, rtol=0.1)
    np.testing.assert_allclose(np.asarray(pp["bbox_pred"]["kernel"]).std(), 0.001, rtol=0.1)
    # He normal fan_out: conv fan_out = 9 * conv; deconv (torch layout [in, out, 2, 2])
    # fan_out = in * 4 = conv * 4; flax's truncated normal keeps the variance.
    np.testing.assert_allclose(
        np.asarray(pm["mask_fcn1"]["kernel"]).std(), np.sqrt(2 / (9 * conv)), rtol=0.05
    )
    np.testing.assert_allclose(
        np.asarray(pm["deconv"]["kernel"]).std(), np.sqrt(2 / (4 * conv)), rtol=0.1
    )
    np.testing.assert_allclose(np.asarray(pm["predictor"]["kernel"]).std(), 0.001, rtol=0.15)
    for tree in (pb, pp, pm):
        for name, p in tree.items():
            assert not np.any(np.asarray(p["bias"])), name


# ---------------------------------------------------------------------------------------------
# (2) heads against torchvision with the same weights


def _box_params_from_torchvision(head: TwoMLPHead, pred: FastRCNNPredictor, cin: int, p: int):
    fc6 = _t2n(head.fc6.weight)
    fc_dim = fc6.shape[0]
    # torch flattens (c, y, x); ours flattens (y, x, c).
    fc1 = fc6.reshape(fc_dim, cin, p, p).transpose(2, 3, 1, 0).reshape(-1, fc_dim)
    box = {
        "fc1": {"kernel": fc1, "bias": _t2n(head.fc6.bias)},
        "fc2": {"kernel": _t2n(head.fc7.weight).T, "bias": _t2n(head.fc7.bias)},
    }
    # Background: torchvision's class 0 -> our last index; its box deltas are dropped.
    cls_w, cls_b = _t2n(pred.cls_score.weight), _t2n(pred.cls_score.bias)
    predictor = {
        "cls_score": {"kernel": np.roll(cls_w, -1, axis=0).T, "bias": np.roll(cls_b, -1)},
        "bbox_pred": {
            "kernel": _t2n(pred.bbox_pred.weight)[4:].T,
            "bias": _t2n(pred.bbox_pred.bias)[4:],
        },
    }
    return box, predictor


def test_box_head_and_predictor_match_torchvision():
    torch.manual_seed(0)
    b, k, cin, p, fc_dim, c = 2, 6, 12, 7, 48, 9
    head = TwoMLPHead(cin * p * p, fc_dim)
    pred = FastRCNNPredictor(fc_dim, c + 1)
    with torch.no_grad():  # non-trivial biases so the bias mapping is tested too
        for m in (head.fc6, head.fc7, pred.cls_score, pred.bbox_pred):
            m.bias.normal_(0.0, 0.5)
    x = torch.randn(b * k, cin, p, p)
    with torch.no_grad():
        ref_logits, ref_deltas = pred(head(x))
    ref_logits, ref_deltas = _t2n(ref_logits), _t2n(ref_deltas)

    box_params, pred_params = _box_params_from_torchvision(head, pred, cin, p)
    xj = jnp.asarray(_t2n(x).transpose(0, 2, 3, 1).reshape(b, k, p, p, cin))
    feats = BoxHead(fc_dim=fc_dim).apply({"params": box_params}, xj)
    out = BoxPredictor(c).apply({"params": pred_params}, feats)

    want_logits = np.concatenate([ref_logits[:, 1:], ref_logits[:, :1]], axis=1)
    want_deltas = ref_deltas.reshape(b * k, c + 1, 4)[:, 1:]
    got_logits = np.asarray(out["class_logits"]).reshape(b * k, c + 1)
    got_deltas = np.asarray(out["box_deltas"]).reshape(b * k, c, 4)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_deltas, want_deltas, rtol=1e-4, atol=1e-5)

    # bfloat16 compute with the same float32 parameters stays close (loose bf16 tolerance).
    feats16 = BoxHead(fc_dim=fc_dim, dtype=jnp.bfloat16).apply({"params": box_params}, xj)
    out16 = BoxPredictor(c, dtype=jnp.bfloat16).apply({"params": pred_params}, feats16)
    assert out16["class_logits"].dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(out16["class_logits"]).reshape(b * k, c + 1), want_logits, atol=0.1
    )


def test_mask_head_matches_torchvision():
    torch.manual_seed(1)
    b, k, cin, conv, c, p = 2, 3, 8, 16, 5, 14
    heads = MaskRCNNHeads(cin, (conv, conv, conv), 1)
    pred = MaskRCNNPredictor(conv, conv, c + 1)
    with torch.no_grad():
        for prm in list(heads.parameters()) + list(pred.parameters()):
            prm.normal_(0.0, 0.2)
    x = torch.randn(b * k, cin, p, p)
    with torch.no_grad():
        ref = _t2n(pred(heads(x)))  # [N, C + 1, 28, 28]

    params = {}
    for i in range(3):
        conv_t = heads[i][0]
        params[f"mask_fcn{i + 1}"] = {
            "kernel": _t2n(conv_t.weight).transpose(2, 3, 1, 0),
            "bias": _t2n(conv_t.bias),
        }
    # ConvTranspose2d weight [in, out, kh, kw] -> [kh, kw, out, in] (transpose_kernel=True),
    # exactly the Conv2d transpose and no spatial flip.
    params["deconv"] = {
        "kernel": _t2n(pred.conv5_mask.weight).transpose(2, 3, 1, 0),
        "bias": _t2n(pred.conv5_mask.bias),
    }
    params["predictor"] = {
        "kernel": _t2n(pred.mask_fcn_logits.weight)[1:].transpose(2, 3, 1, 0),
        "bias": _t2n(pred.mask_fcn_logits.bias)[1:],
    }
    xj = jnp.asarray(_t2n(x).transpose(0, 2, 3, 1).reshape(b, k, p, p, cin))
    got = MaskHead(c, conv_dim=conv, num_convs=3).apply({"params": params}, xj)
    assert got.shape == (b, k, 28, 28, c) and got.dtype == jnp.float32
    want = ref[:, 1:].transpose(0, 2, 3, 1).reshape(b, k, 28, 28, c)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

    # A spatially flipped deconv kernel must NOT match (the test can tell the layouts apart).
    flipped = dict(params)
    flipped["deconv"] = {
        "kernel": params["deconv"]["kernel"][::-1, ::-1],
        "bias": params["deconv"]["bias"],
    }
    bad = MaskHead(c, conv_dim=conv, num_convs=3).apply({"params": flipped}, xj)
    assert np.abs(np.asarray(bad) - want).max() > 1e-2 * np.abs(want).max()


def test_select_class_masks():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 6, 6, 5)).astype(np.float32) * 3
    classes = rng.integers(0, 5, size=(2, 4)).astype(np.int32)
    got = np.asarray(select_class_masks(jnp.asarray(logits), jnp.asarray(classes)))
    want = np.empty((2, 4, 6, 6))
    for i in range(2):
        for j in range(4):
            want[i, j] = 1.0 / (1.0 + np.exp(-logits[i, j, :, :, classes[i, j]].astype(np.float64)))
    assert got.shape == (2, 4, 6, 6) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# (3) postprocess_detections against torchvision's RoIHeads.postprocess_detections


def _make_detection_inputs(seed: int, k: int, c: int, image_shapes, bg_boost: float = 4.0):
    """Random predictor outputs; ~half of the RoIs are background-like, the rest ambiguous."""
    rng = np.random.default_rng(seed)
    b = len(image_shapes)
    logits = (rng.normal(size=(b, k, c + 1)) * 2.0).astype(np.float32)
    logits[..., c] += np.where(rng.uniform(size=(b, k)) < 0.5, bg_boost + 4.0, bg_boost)
    deltas = rng.normal(size=(b, k, c, 4)).astype(np.float32)
    deltas[..., 2:] *= 0.5
    big = rng.uniform(size=(b, k, c)) < 0.01  # dw/dh above the clamp
    deltas[..., 2] = np.where(big, 40.0, deltas[..., 2])
    proposals = np.zeros((b, k, 4), np.float32)
    for i, (h, w) in enumerate(image_shapes):
        # Some proposals lie partly or fully outside the image (clipping, empty boxes).
        xy = rng.uniform([-20, -20], [w + 40, h + 40], size=(k, 2))
        wh = rng.uniform(2.0, 0.5 * min(h, w), size=(k, 2))
        proposals[i] = np.concatenate([xy, xy + wh], -1)
    valid = rng.uniform(size=(b, k)) < 0.85
    # Padding RoIs get very confident foreground logits: they must never be detected.
    logits[~valid] = rng.normal(size=(int((~valid).sum()), c + 1)) * 10.0
    return logits, deltas, proposals, valid, np.asarray(image_shapes, np.int32)


def _torchvision_postprocess(logits, deltas, proposals, valid, image_shapes, sc, nms, det):
    heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, (10.0, 10.0, 5.0, 5.0), sc, nms, det)
    c = deltas.shape[2]
    t_logits, t_deltas, t_props = [], [], []
    for i in range(logits.shape[0]):
        v = valid[i]
        lg = logits[i][v]
        t_logits.append(np.concatenate([lg[:, c:], lg[:, :c]], axis=1))  # background first
        d = deltas[i][v]
        d = np.concatenate([np.zeros_like(d[:, :1]), d], axis=1)  # background deltas
        t_deltas.append(d.reshape(len(d), -1))
        t_props.append(torch.from_numpy(proposals[i][v]))
    boxes, scores, labels = heads.postprocess_detections(
        torch.from_numpy(np.concatenate(t_logits)),
        torch.from_numpy(np.concatenate(t_deltas)),
        t_props,
        [tuple(int(v) for v in s) for s in image_shapes],
    )
    return [
        (_t2n(bx), _t2n(s), _t2n(lb) - 1) for bx, s, lb in zip(boxes, scores, labels, strict=True)
    ]


def _check_against_torchvision(out, ref):
    for i, (rb, rs, rl) in enumerate(ref):
        n = int(np.asarray(out["valid"][i]).sum())
        assert n == len(rs), (i, n, len(rs))
        assert np.all(np.asarray(out["valid"][i])[:n])
        np.testing.assert_array_equal(np.asarray(out["classes"][i])[:n], rl)
        np.testing.assert_allclose(np.asarray(out["scores"][i])[:n], rs, rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out["boxes"][i])[:n], rb, rtol=1e-6, atol=1e-4)
        # Padding entries are zeroed.
        assert not np.any(np.asarray(out["scores"][i])[n:])
        assert not np.any(np.asarray(out["boxes"][i])[n:])


def _num_passing(logits, proposals, valid, deltas, image_shapes, thresh):
    del proposals, deltas, image_shapes
    c = logits.shape[-1] - 1
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return ((p[..., :c] > thresh) & valid[..., None]).sum(axis=(1, 2))


_PP_CASES = [
    # seed, score_thresh, nms_thresh, max_detections
    (0, 0.05, 0.5, 100),
    (1, 0.05, 0.5, 100),
    (2, 0.3, 0.7, 40),
    (3, 0.5, 0.3, 100),  # fewer than D detections: padding exercised
]


@functools.cache
def _jitted_postprocess(max_detections, max_candidates):
    """Jitted postprocess; thresholds are traced arguments, so cases share one compilation."""

    def fn(logits, deltas, proposals, valid, hw, score_thresh, nms_thresh, min_size):
        return postprocess_detections(
            logits,
            deltas,
            proposals,
            valid,
            hw,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            max_detections=max_detections,
            max_candidates=max_candidates,
            min_size=min_size,
        )

    return jax.jit(fn)


def _run(args, sc, nms_t, det, max_cand, min_size=1e-2):
    fn = _jitted_postprocess(det, max_cand)
    return fn(
        *(jnp.asarray(a) for a in args), jnp.float32(sc), jnp.float32(nms_t), jnp.float32(min_size)
    )


@pytest.mark.parametrize("seed,sc,nms_t,det", _PP_CASES)
def test_postprocess_matches_torchvision(seed, sc, nms_t, det):
    image_shapes = [(480, 640), (600, 420)]
    max_cand = 1024
    args = _make_detection_inputs(seed, 400, 20, image_shapes)
    logits, deltas, proposals, valid, hw = args
    passing = _num_passing(logits, proposals, valid, deltas, hw, sc)
    assert np.all(passing <= max_cand)  # the exact regime
    assert np.all(passing > 20)  # a realistic, non-trivial number of candidates
    out = _run(args, sc, nms_t, 100, max_cand) if det == 100 else _run(args, sc, nms_t, det, 256)
    ref = _torchvision_postprocess(logits, deltas, proposals, valid, hw, sc, nms_t, det)
    assert all(len(r[1]) > 0 for r in ref)
    if seed == 3:
        assert all(len(r[1]) < det for r in ref)
    else:
        assert all(len(r[1]) == det for r in ref)
    _check_against_torchvision(out, ref)
    assert out["classes"].dtype == jnp.int32 and out["boxes"].dtype == jnp.float32
    assert out["boxes"].shape == (2, det, 4) and out["valid"].shape == (2, det)


def test_postprocess_exact_when_nms_fills_detections_beyond_max_candidates():
    # More candidates pass than max_candidates, but NMS on the kept top ones already yields D
    # detections: the documented exactness condition, so the result still equals torchvision.
    image_shapes = [(500, 500), (320, 480)]
    args = _make_detection_inputs(7, 400, 20, image_shapes, bg_boost=0.0)
    logits, deltas, proposals, valid, hw = args
    passing = _num_passing(logits, proposals, valid, deltas, hw, 0.05)
    assert np.all(passing > 2 * 256)
    out = _run(args, 0.05, 0.5, 40, 256)
    ref = _torchvision_postprocess(logits, deltas, proposals, valid, hw, 0.05, 0.5, 40)
    _check_against_torchvision(out, ref)


def test_postprocess_min_size_and_clipping():
    # detectron2 semantics (min_size=0): boxes fully outside the image clip to zero size and are
    # dropped; every output box lies inside its image.
    image_shapes = [(300, 200), (200, 300)]
    args = _make_detection_inputs(11, 400, 20, image_shapes)
    logits, deltas, proposals, valid, hw = args
    # Confident, valid RoIs far outside the image: after clipping they are empty.
    for i, (h, w) in enumerate(image_shapes):
        proposals[i, :10] = [w + 100, h + 100, w + 200, h + 150]
        logits[i, :10] = 0.0
        logits[i, :10, 3] = 20.0
        valid[i, :10] = True
    out = _run(args, 0.05, 0.5, 100, 1024, min_size=0.0)
    for i, (h, w) in enumerate(image_shapes):
        v = np.asarray(out["valid"][i])
        bx = np.asarray(out["boxes"][i])[v]
        assert v.sum() > 0
        assert np.all(bx >= 0) and np.all(bx[:, [0, 2]] <= w) and np.all(bx[:, [1, 3]] <= h)
        assert np.all(bx[:, 2] > bx[:, 0]) and np.all(bx[:, 3] > bx[:, 1])
        s = np.asarray(out["scores"][i])[v]
        assert np.all(np.diff(s) <= 0) and np.all(s > 0.05)


# ---------------------------------------------------------------------------------------------
# (4) jit: one compilation for new values of the same shapes


def test_postprocess_jit_no_recompilation():
    traces = []

    def fn(*a):
        traces.append(1)
        return postprocess_detections(*a, score_thresh=0.05, nms_thresh=0.5, max_detections=50)

    jfn = jax.jit(fn)
    image_shapes = [(480, 640), (600, 420)]
    outs = []
    for seed in (20, 21, 22):
        args = _make_detection_inputs(seed, 200, 8, image_shapes)
        outs.append(jfn(*(jnp.asarray(a) for a in args)))
        ref = _torchvision_postprocess(*args, 0.05, 0.5, 50)
        _check_against_torchvision(outs[-1], ref)
    assert len(traces) == 1
    assert not np.array_equal(np.asarray(outs[0]["boxes"]), np.asarray(outs[1]["boxes"]))


def test_deconv2x2_equals_flax_conv_transpose_and_torch():
    """The einsum + depth-to-space deconv equals flax's ConvTranspose(transpose_kernel=True) with
    the same parameters (same names, shapes and init) and torch's ConvTranspose2d(k=2, s=2)."""
    from oanet_jax.modeling.roi_heads import Deconv2x2

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5, 6, 8)), jnp.float32)
    ours = Deconv2x2(4)
    variables = nn.meta.unbox(ours.init(jax.random.key(0), x))
    variables = jax.tree.map(lambda v: v + jnp.asarray(rng.normal(size=v.shape)), variables)
    flax_ref = nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding="VALID", transpose_kernel=True)
    ref_vars = flax_ref.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ref_vars) == jax.tree.map(jnp.shape, variables)
    got = np.asarray(ours.apply(variables, x))
    assert got.shape == (3, 10, 12, 4)
    np.testing.assert_allclose(got, np.asarray(flax_ref.apply(variables, x)), rtol=1e-5, atol=1e-5)
    conv = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)
    kernel = np.asarray(variables["params"]["kernel"])  # [2, 2, out, in]
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(np.asarray(variables["params"]["bias"])))
        want = conv(torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
