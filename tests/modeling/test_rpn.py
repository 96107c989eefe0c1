"""Tests of oanet_jax.modeling.rpn against torchvision's RPNHead and RegionProposalNetwork."""

from __future__ import annotations

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oanet_jax.modeling.rpn import RPNHead, generate_proposals
from oanet_jax.ops import anchors as anchor_ops

torch = pytest.importorskip("torch")
tv_rpn = pytest.importorskip("torchvision.models.detection.rpn")

IMAGE_SIZE = (96, 128)  # padded image (H, W)
STRIDES = (4, 8, 16, 32, 64)
SIZES = (8, 16, 32, 64, 128)
RATIOS = (0.5, 1.0, 2.0)
A = len(RATIOS)

# Jitted once per (shapes, top-k) case instead of op-by-op dispatch; TRACES counts the traces of
# each static configuration (the tests share compilations: same shapes, same static arguments).
TRACES: collections.Counter = collections.Counter()


def _counted_generate_proposals(*args, **kwargs):
    TRACES[(kwargs["pre_nms_topk"], kwargs["post_nms_topk"])] += 1
    return generate_proposals(*args, **kwargs)


_generate_proposals = jax.jit(
    _counted_generate_proposals, static_argnames=("pre_nms_topk", "post_nms_topk")
)


def _anchors() -> list[np.ndarray]:
    return [
        np.asarray(a)
        for a in anchor_ops.fpn_anchors(IMAGE_SIZE, STRIDES, SIZES, RATIOS, offset=0.0)
    ]


def _random_predictions(
    rng: np.random.Generator, batch: int, anchors: list[np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-level logits [B, Nl] and deltas [B, Nl, 4], float32."""
    obj, dlt = [], []
    for a in anchors:
        n = a.shape[0]
        obj.append(rng.normal(0.0, 2.0, (batch, n)).astype(np.float32))
        d = rng.normal(0.0, 1.0, (batch, n, 4)) * np.array([0.4, 0.4, 0.8, 0.8])
        dlt.append(d.astype(np.float32))
    return obj, dlt


# --------------------------------------------------------------------------------------- head


def _torch_head_to_params(head) -> dict:
    sd = {k: v.detach().numpy() for k, v in head.state_dict().items()}

    def conv(prefix: str) -> dict:
        return {
            "kernel": jnp.asarray(sd[f"{prefix}.weight"].transpose(2, 3, 1, 0)),
            "bias": jnp.asarray(sd[f"{prefix}.bias"]),
        }

    return {
        "params": {
            "conv": conv("conv.0.0"),
            "objectness": conv("cls_logits"),
            "deltas": conv("bbox_pred"),
        }
    }


def test_head_matches_torchvision():
    torch.manual_seed(0)
    c, b = 16, 2
    sizes = [(12, 16), (6, 8), (3, 4), (2, 2)]
    head_t = tv_rpn.RPNHead(c, A)
    with torch.no_grad():  # O(1) outputs, so the tolerance means something
        for p in head_t.parameters():
            p.normal_(0.0, 0.15)
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(b, h, w, c)).astype(np.float32) for h, w in sizes]

    with torch.no_grad():
        feats_t = [torch.from_numpy(f).permute(0, 3, 1, 2).contiguous() for f in feats]
        logits_t, reg_t = head_t(feats_t)
        shared_t = [head_t.conv(f).permute(0, 2, 3, 1).numpy() for f in feats_t]
        obj_ref, dlt_ref = tv_rpn.concat_box_prediction_layers(logits_t, reg_t)
    obj_ref = obj_ref.numpy().reshape(b, -1)
    dlt_ref = dlt_ref.numpy().reshape(b, -1, 4)

    out = RPNHead(num_anchors=A, channels=c).apply(
        _torch_head_to_params(head_t), [jnp.asarray(f) for f in feats]
    )
    obj = np.concatenate([np.asarray(o) for o in out["objectness"]], axis=1)
    dlt = np.concatenate([np.asarray(d) for d in out["deltas"]], axis=1)
    assert obj.shape == obj_ref.shape and dlt.shape == dlt_ref.shape
    assert np.abs(obj_ref).mean() > 0.1  # not a trivially small comparison
    np.testing.assert_allclose(obj, obj_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dlt, dlt_ref, atol=1e-5, rtol=1e-5)
    for s, s_ref in zip(out["shared"], shared_t, strict=True):
        np.testing.assert_allclose(np.asarray(s), s_ref, atol=1e-5, rtol=1e-5)


def test_head_init_and_axis_names():
    c = 64
    feats = [jnp.ones((1, 8, 8, c)), jnp.ones((1, 4, 4, c))]
    variables = jax.jit(RPNHead(num_anchors=A, channels=c).init)(jax.random.PRNGKey(0), feats)
    params = nn.unbox(variables["params"])
    assert set(params) == {"conv", "objectness", "deltas"}  # one set of weights for all levels
    assert params["conv"]["kernel"].shape == (3, 3, c, c)
    assert params["objectness"]["kernel"].shape == (1, 1, c, A)
    assert params["deltas"]["kernel"].shape == (1, 1, c, 4 * A)
    k = np.asarray(params["conv"]["kernel"])
    assert abs(k.std() - 0.01) < 0.001 and abs(k.mean()) < 0.001
    for name in params:
        assert not np.any(np.asarray(params[name]["bias"]))
    spec = nn.get_partition_spec(variables)["params"]
    assert tuple(spec["conv"]["kernel"]) == ("conv_h", "conv_w", "conv_in", "conv_out")
    assert tuple(spec["deltas"]["bias"]) == ("conv_out",)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(dtype):
    b, c = 2, 32
    sizes = [(32, 48), (16, 24), (8, 12)]
    feats = [jax.ShapeDtypeStruct((b, h, w, c), dtype) for h, w in sizes]
    head = RPNHead(num_anchors=A, channels=c, dtype=dtype)
    variables = jax.eval_shape(lambda f: head.init(jax.random.PRNGKey(0), f), feats)
    out = jax.eval_shape(head.apply, variables, feats)
    assert nn.unbox(variables)["params"]["conv"]["kernel"].dtype == jnp.float32
    for (h, w), o, d, s in zip(sizes, out["objectness"], out["deltas"], out["shared"], strict=True):
        assert o.shape == (b, h * w * A) and o.dtype == jnp.float32
        assert d.shape == (b, h * w * A, 4) and d.dtype == jnp.float32
        assert s.shape == (b, h, w, c) and s.dtype == dtype

    anchors = [jax.ShapeDtypeStruct((h * w * A, 4), jnp.float32) for h, w in sizes]
    shape = jax.ShapeDtypeStruct((b, 2), jnp.int32)
    props = jax.eval_shape(
        lambda o, d, a, s: generate_proposals(o, d, a, s, 100, 50, 0.7),
        [jax.ShapeDtypeStruct(o.shape, dtype) for o in out["objectness"]],
        [jax.ShapeDtypeStruct(d.shape, dtype) for d in out["deltas"]],
        anchors,
        shape,
    )
    assert props["boxes"].shape == (b, 50, 4) and props["boxes"].dtype == jnp.float32
    assert props["logits"].shape == (b, 50) and props["logits"].dtype == jnp.float32
    assert props["valid"].shape == (b, 50) and props["valid"].dtype == jnp.bool_
    assert props["levels"].shape == (b, 50) and props["levels"].dtype == jnp.int32


# ---------------------------------------------------------------------------------- proposals


def _torchvision_proposals(
    obj, dlt, anchors, image_shapes, pre, post, nms_thresh, min_size, replace_with_empty=None
):
    """torchvision's filter_proposals on the same inputs; also counts small/clipped candidates."""
    rpn = tv_rpn.RegionProposalNetwork(
        anchor_generator=None,
        head=None,
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_top_n={"training": pre, "testing": pre},
        post_nms_top_n={"training": post, "testing": post},
        nms_thresh=nms_thresh,
        score_thresh=0.0,
    )
    rpn.min_size = min_size
    rpn.eval()
    b = obj[0].shape[0]
    num_per_level = [a.shape[0] for a in anchors]
    obj_t = torch.from_numpy(np.concatenate(obj, axis=1))  # [B, N]
    dlt_t = torch.from_numpy(np.concatenate(dlt, axis=1)).reshape(-1, 4)
    anchors_t = torch.from_numpy(np.concatenate(anchors, axis=0))
    with torch.no_grad():
        proposals = rpn.box_coder.decode(dlt_t, [anchors_t] * b).view(b, -1, 4)
        if replace_with_empty is not None:  # [B, N] bool: degenerate boxes, removed by min_size
            proposals[torch.from_numpy(replace_with_empty)] = 0.0
        # Statistics of the pre-NMS candidates, so the test can check it covers the cases.
        top = rpn._get_top_n_idx(obj_t, num_per_level)
        cand = proposals[torch.arange(b)[:, None], top]
        n_small = n_clipped = 0
        for i, (h, w) in enumerate(image_shapes):
            clipped = tv_rpn.box_ops.clip_boxes_to_image(cand[i], (h, w))
            n_clipped += int((clipped != cand[i]).any(dim=1).sum())
            keep = tv_rpn.box_ops.remove_small_boxes(clipped, min_size)
            n_small += cand.shape[1] - keep.numel()
        boxes, scores = rpn.filter_proposals(
            proposals, obj_t.reshape(-1, 1), list(image_shapes), num_per_level
        )
    return [x.numpy() for x in boxes], [s.numpy() for s in scores], n_small, n_clipped


def _check_against_reference(out, ref_boxes, ref_scores, post):
    boxes = np.asarray(out["boxes"])
    logits = np.asarray(out["logits"])
    valid = np.asarray(out["valid"])
    levels = np.asarray(out["levels"])
    for i, (rb, rs) in enumerate(zip(ref_boxes, ref_scores, strict=True)):
        n = rb.shape[0]
        assert n <= post
        assert valid[i].sum() == n, (i, valid[i].sum(), n)
        assert valid[i, :n].all()  # valid entries first, then padding
        np.testing.assert_allclose(boxes[i, :n], rb, atol=1e-4, rtol=0)
        np.testing.assert_allclose(1.0 / (1.0 + np.exp(-logits[i, :n])), rs, atol=1e-6)
        assert np.all(np.diff(logits[i, :n]) <= 0)
        assert np.all(boxes[i, n:] == 0) and np.all(np.isneginf(logits[i, n:]))
        assert np.all((levels[i, :n] >= 0) & (levels[i, :n] < len(STRIDES)))


CASES = [
    # seed, pre_nms_topk, post_nms_topk, nms_thresh, min_size
    (0, 50, 40, 0.7, 2.0),  # post-NMS cap active
    (1, 200, 1000, 0.7, 2.0),  # post_nms_topk > candidates: padded output
    (2, 100, 120, 0.5, 4.0),
    (3, 3000, 500, 0.6, 1e-3),  # pre_nms_topk > anchors of every level
]


@pytest.mark.parametrize(("seed", "pre", "post", "nms_thresh", "min_size"), CASES)
def test_proposals_match_torchvision(seed, pre, post, nms_thresh, min_size):
    rng = np.random.default_rng(seed)
    anchors = _anchors()
    image_shapes = [(96, 128), (70, 101)]
    obj, dlt = _random_predictions(rng, 2, anchors)
    ref_boxes, ref_scores, n_small, n_clipped = _torchvision_proposals(
        obj, dlt, anchors, image_shapes, pre, post, nms_thresh, min_size
    )
    assert n_clipped > 0
    if min_size >= 1.0:
        assert n_small > 0
    out = _generate_proposals(
        [jnp.asarray(o) for o in obj],
        [jnp.asarray(d) for d in dlt],
        [jnp.asarray(a) for a in anchors],
        jnp.asarray(image_shapes, jnp.int32),
        pre_nms_topk=pre,
        post_nms_topk=post,
        nms_thresh=nms_thresh,
        min_size=min_size,
    )
    assert out["boxes"].shape == (2, post, 4)
    _check_against_reference(out, ref_boxes, ref_scores, post)
    # Every kept box lies inside its own image.
    b = np.asarray(out["boxes"])
    for i, (h, w) in enumerate(image_shapes):
        assert b[i, :, [0, 2]].max() <= w and b[i, :, [1, 3]].max() <= h and b.min() >= 0


def test_non_finite_boxes_are_dropped():
    rng = np.random.default_rng(7)
    anchors = _anchors()
    image_shapes = [(96, 128), (80, 90)]
    obj, dlt = _random_predictions(rng, 2, anchors)
    # Break the best anchors of level 0 and 2 of each image (they are certainly in the top-k).
    bad = [np.zeros(o.shape, bool) for o in obj]
    for lvl, coord, value in [(0, 0, np.nan), (0, 1, np.inf), (2, 0, -np.inf), (2, 3, -np.inf)]:
        for i in range(2):
            j = np.argsort(-obj[lvl][i])[coord]
            dlt[lvl][i, j, coord] = value
            bad[lvl][i, j] = True
    ref_boxes, ref_scores, _, _ = _torchvision_proposals(
        obj, dlt, anchors, image_shapes, 100, 120, 0.7, 1.0, np.concatenate(bad, axis=1)
    )
    out = _generate_proposals(
        [jnp.asarray(o) for o in obj],
        [jnp.asarray(d) for d in dlt],
        [jnp.asarray(a) for a in anchors],
        jnp.asarray(image_shapes, jnp.int32),
        pre_nms_topk=100,
        post_nms_topk=120,
        nms_thresh=0.7,
        min_size=1.0,
    )
    assert np.all(np.isfinite(np.asarray(out["boxes"])))
    _check_against_reference(out, ref_boxes, ref_scores, 120)


def test_jit_no_recompilation_and_no_gradient():
    anchors_np = _anchors()
    anchors = [jnp.asarray(a) for a in anchors_np]
    pre, post = 50, 40  # the static configuration of CASES[0]: its compilation is reused
    for seed, thr, ms, shapes in [
        (10, 0.7, 1.0, [(96, 128), (70, 101)]),
        (11, 0.5, 2.0, [(50, 128), (96, 64)]),
        (12, 0.6, 0.5, [(96, 128), (96, 128)]),
    ]:
        obj, dlt = _random_predictions(np.random.default_rng(seed), 2, anchors_np)
        out = _generate_proposals(
            [jnp.asarray(o) for o in obj],
            [jnp.asarray(d) for d in dlt],
            anchors,
            jnp.asarray(shapes, jnp.int32),
            pre_nms_topk=pre,
            post_nms_topk=post,
            nms_thresh=thr,
            min_size=ms,
        )
        ref_boxes, ref_scores, _, _ = _torchvision_proposals(
            obj, dlt, anchors_np, shapes, pre, post, thr, ms
        )
        _check_against_reference(out, ref_boxes, ref_scores, post)
    assert TRACES[(pre, post)] == 1

    @jax.jit
    @jax.grad
    def grad_fn(inputs):
        obj, dlt = inputs
        out = generate_proposals(obj, dlt, anchors, jnp.asarray([[96, 128]]), 20, 10, 0.7)
        return jnp.sum(out["boxes"]) + jnp.sum(jnp.where(out["valid"], out["logits"], 0.0))

    obj, dlt = _random_predictions(np.random.default_rng(3), 1, anchors_np)
    grads = grad_fn(([jnp.asarray(o) for o in obj], [jnp.asarray(d) for d in dlt]))
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))
