"""Tests for oanet_jax.ops.boxes against torchvision and float64 numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oanet_jax.ops import boxes as _boxes

torch = pytest.importorskip("torch")
tv_ops = pytest.importorskip("torchvision.ops")
from torchvision.models.detection._utils import BoxCoder  # noqa: E402

CLAMP = math.log(1000.0 / 16)


class B:
    """The ops under test, jitted (one compile per shape instead of one per primitive: faster)."""

    area = staticmethod(jax.jit(_boxes.area))
    iou = staticmethod(jax.jit(_boxes.iou))
    ioa = staticmethod(jax.jit(_boxes.ioa))
    clip = staticmethod(jax.jit(_boxes.clip))
    encode = staticmethod(jax.jit(_boxes.encode, static_argnums=2))
    decode = staticmethod(jax.jit(_boxes.decode, static_argnums=(2, 3)))


def random_boxes(rng, shape, zero_frac=0.0, max_xy=100.0, max_wh=60.0):
    """float32 boxes [..., 4] with positive size (or exactly zero w/h for a fraction)."""
    xy = rng.uniform(0, max_xy, size=(*shape, 2))
    wh = rng.uniform(2.0, max_wh, size=(*shape, 2))  # ratios < 1000/16: no clamp
    if zero_frac:
        wh = np.where(rng.uniform(size=(*shape, 2)) < zero_frac, 0.0, wh)
    return np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)


# ----------------------------------------------------------------------------- references (f64)
def ref_area(b):
    b = np.asarray(b, np.float64)
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def ref_inter(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            w = min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0])
            h = min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1])
            out[i, j] = max(w, 0.0) * max(h, 0.0)
    return out


def ref_iou(a, b):
    inter = ref_inter(a, b)
    union = ref_area(a)[:, None] + ref_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def ref_ioa(a, b):
    inter = ref_inter(a, b)
    aa = ref_area(a)[:, None]
    return np.where(aa > 0, inter / np.where(aa > 0, aa, 1), 0.0)


def _cs(b):
    w = b[..., 2] - b[..., 0]
    h = b[..., 3] - b[..., 1]
    return b[..., 0] + 0.5 * w, b[..., 1] + 0.5 * h, w, h


def ref_encode(boxes, anchors, weights):
    """detectron2 Box2BoxTransform.get_deltas, float64."""
    wx, wy, ww, wh = weights
    tx, ty, tw, th = _cs(np.asarray(boxes, np.float64))
    ax, ay, aw, ah = _cs(np.asarray(anchors, np.float64))
    return np.stack(
        [wx * (tx - ax) / aw, wy * (ty - ay) / ah, ww * np.log(tw / aw), wh * np.log(th / ah)], -1
    )


def ref_decode(deltas, anchors, weights, clamp=CLAMP):
    """detectron2 Box2BoxTransform.apply_deltas, float64."""
    wx, wy, ww, wh = weights
    d = np.asarray(deltas, np.float64)
    ax, ay, aw, ah = _cs(np.asarray(anchors, np.float64))
    cx = d[..., 0] / wx * aw + ax
    cy = d[..., 1] / wy * ah + ay
    w = np.exp(np.minimum(d[..., 2] / ww, clamp)) * aw
    h = np.exp(np.minimum(d[..., 3] / wh, clamp)) * ah
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def count_traces(fn):
    """jax.jit(fn) plus a list whose [0] counts how many times fn was traced."""
    n = [0]

    def wrapped(*args):
        n[0] += 1
        return fn(*args)

    return jax.jit(wrapped), n


# ----------------------------------------------------------------------------- tests
def test_area_matches_torchvision_and_reference():
    rng = np.random.default_rng(0)
    b = random_boxes(rng, (50,), zero_frac=0.2)
    got = np.asarray(B.area(b))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, tv_ops.box_area(torch.from_numpy(b)).numpy(), rtol=1e-6)
    np.testing.assert_allclose(got, ref_area(b), rtol=1e-5, atol=1e-4)


def test_iou_matches_torchvision_and_reference():
    rng = np.random.default_rng(1)
    a = random_boxes(rng, (37,))
    b = random_boxes(rng, (23,))
    got = np.asarray(B.iou(a, b))
    assert got.shape == (37, 23) and got.dtype == np.float32
    tv = tv_ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(got, tv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, ref_iou(a, b), rtol=1e-5, atol=1e-6)
    assert (got > 0).mean() > 0.1  # the test data actually overlaps
    np.testing.assert_allclose(np.diag(np.asarray(B.iou(a, a))), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(_boxes.iou(a, b)), got)  # eager == jit


def test_iou_zero_area_boxes_give_zero_not_nan():
    a = np.array([[5, 5, 5, 5], [0, 0, 0, 10], [0, 0, 10, 10]], np.float32)
    b = np.array([[5, 5, 5, 5], [0, 0, 10, 0], [20, 20, 20, 20]], np.float32)
    got = np.asarray(B.iou(a, b))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, ref_iou(a, b))
    assert got[0, 0] == 0.0 and got[1, 1] == 0.0  # identical zero-area boxes: union 0
    # torchvision gives NaN for the 0/0 entries; ours agrees elsewhere.
    tv = tv_ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert np.isnan(tv[0, 0])
    np.testing.assert_allclose(got[np.isfinite(tv)], tv[np.isfinite(tv)])
    # Gradients stay finite too (the where-guard is applied before the division).
    g = jax.grad(lambda x: B.iou(x, b).sum())(jnp.asarray(a))
    assert np.isfinite(np.asarray(g)).all()
    # Random boxes with many zero sides.
    rng = np.random.default_rng(2)
    a = random_boxes(rng, (30,), zero_frac=0.4)
    b = random_boxes(rng, (20,), zero_frac=0.4)
    got = np.asarray(B.iou(a, b))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref_iou(a, b), rtol=1e-5, atol=1e-6)


def test_ioa_matches_reference():
    rng = np.random.default_rng(3)
    a = random_boxes(rng, (25,), zero_frac=0.2)
    b = random_boxes(rng, (15,))
    got = np.asarray(B.ioa(a, b))
    assert got.shape == (25, 15) and np.isfinite(got).all()
    np.testing.assert_allclose(got, ref_ioa(a, b), rtol=1e-5, atol=1e-6)
    # A box inside another: IoA of the inner one is 1, of the outer one its area ratio.
    inner = np.array([[2, 2, 4, 4]], np.float32)
    outer = np.array([[0, 0, 8, 8]], np.float32)
    assert float(B.ioa(inner, outer)[0, 0]) == 1.0
    assert float(B.ioa(outer, inner)[0, 0]) == pytest.approx(4 / 64)


def test_iou_batched_and_vmapped_agree():
    rng = np.random.default_rng(4)
    a = random_boxes(rng, (3, 11))
    b = random_boxes(rng, (3, 7))
    batched = np.asarray(B.iou(a, b))
    vm = np.asarray(jax.vmap(B.iou)(a, b))
    assert batched.shape == (3, 11, 7)
    for i in range(3):
        np.testing.assert_allclose(batched[i], ref_iou(a[i], b[i]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(batched, vm)
    np.testing.assert_array_equal(np.asarray(jax.vmap(B.ioa)(a, b)), np.asarray(B.ioa(a, b)))


def test_clip_matches_torchvision():
    rng = np.random.default_rng(5)
    b = rng.uniform(-50, 150, size=(40, 4)).astype(np.float32)
    got = np.asarray(B.clip(b, (60, 90)))
    tv = tv_ops.clip_boxes_to_image(torch.from_numpy(b), (60, 90)).numpy()
    np.testing.assert_array_equal(got, tv)
    assert got[:, 0::2].max() <= 90 and got[:, 1::2].max() <= 60 and got.min() >= 0


def test_clip_per_image_sizes_vmap_and_broadcast():
    rng = np.random.default_rng(6)
    b = rng.uniform(-50, 150, size=(3, 10, 4)).astype(np.float32)
    hw = np.array([[60, 90], [100, 20], [33, 47]], np.float32)
    vm = np.asarray(jax.jit(jax.vmap(B.clip))(b, hw))
    bc = np.asarray(B.clip(b, hw[:, None, :]))
    for i in range(3):
        tv = tv_ops.clip_boxes_to_image(torch.from_numpy(b[i]), tuple(int(v) for v in hw[i]))
        np.testing.assert_array_equal(vm[i], tv.numpy())
    np.testing.assert_array_equal(vm, bc)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_matches_reference_and_torchvision(weights):
    rng = np.random.default_rng(7)
    anchors = random_boxes(rng, (64,))
    boxes = random_boxes(rng, (64,))
    got = np.asarray(B.encode(boxes, anchors, weights))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref_encode(boxes, anchors, weights), rtol=1e-4, atol=1e-4)
    tv = BoxCoder(weights).encode_single(torch.from_numpy(boxes), torch.from_numpy(anchors))
    np.testing.assert_allclose(got, tv.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_decode_matches_reference_and_torchvision(weights):
    rng = np.random.default_rng(8)
    anchors = random_boxes(rng, (64,))
    deltas = (rng.normal(size=(64, 4)) * np.array(weights) * 0.5).astype(np.float32)
    got = np.asarray(B.decode(deltas, anchors, weights))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref_decode(deltas, anchors, weights), rtol=1e-5, atol=1e-3)
    tv = BoxCoder(weights).decode_single(torch.from_numpy(deltas), torch.from_numpy(anchors))
    np.testing.assert_allclose(got, tv.numpy(), rtol=1e-5, atol=1e-3)


def test_encode_decode_round_trip():
    rng = np.random.default_rng(9)
    anchors = random_boxes(rng, (200,))
    boxes = random_boxes(rng, (200,))
    for w in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        back = np.asarray(B.decode(B.encode(boxes, anchors, w), anchors, w))
        np.testing.assert_allclose(back, boxes, rtol=1e-5, atol=1e-3)
    deltas = rng.normal(size=(200, 4)).astype(np.float32)
    again = np.asarray(B.encode(B.decode(deltas, anchors), anchors))
    np.testing.assert_allclose(again, deltas, rtol=1e-4, atol=1e-4)


def test_decode_clamp():
    anchors = np.array([[0, 0, 16, 32]], np.float32)  # w 16, h 32, centre (8, 16)
    deltas = np.array([[0.0, 0.0, 20.0, -3.0]], np.float32)
    out = np.asarray(B.decode(deltas, anchors))[0]
    w, h = out[2] - out[0], out[3] - out[1]
    assert np.isfinite(out).all()
    assert w == pytest.approx(1000.0, rel=1e-5)  # 16 * exp(log(1000/16)) : clamped above
    assert h == pytest.approx(32 * math.exp(-3.0), rel=1e-5)  # not clamped below
    assert (out[0] + out[2]) / 2 == pytest.approx(8.0) and (out[1] + out[3]) / 2 == pytest.approx(
        16
    )
    # The clamp applies to dw / ww, after dividing by the weight (detectron2 order).
    out = np.asarray(B.decode(np.array([[0, 0, 4 * 5.0, 0]], np.float32), anchors, (10, 10, 5, 5)))
    assert out[0, 2] - out[0, 0] == pytest.approx(16 * math.exp(4.0), rel=1e-5)
    out = np.asarray(B.decode(np.array([[0, 0, 50.0, 0]], np.float32), anchors, (10, 10, 5, 5)))
    assert out[0, 2] - out[0, 0] == pytest.approx(1000.0, rel=1e-5)
    # A custom clamp and bf16 deltas (computed in float32).
    out = B.decode(jnp.asarray([[0, 0, 3.0, 3.0]], jnp.bfloat16), anchors, clamp=1.0)
    assert out.dtype == jnp.float32
    wh = np.asarray(out)[0, 2:] - np.asarray(out)[0, :2]
    np.testing.assert_allclose(wh, [16 * math.e, 32 * math.e], rtol=1e-5)


def test_coder_leading_batch_dims_and_broadcast():
    rng = np.random.default_rng(10)
    anchors = random_boxes(rng, (2, 3, 5))
    boxes = random_boxes(rng, (2, 3, 5))
    enc = np.asarray(B.encode(boxes, anchors))
    assert enc.shape == (2, 3, 5, 4)
    flat = np.asarray(B.encode(boxes.reshape(-1, 4), anchors.reshape(-1, 4)))
    np.testing.assert_allclose(enc.reshape(-1, 4), flat, rtol=1e-6)
    # Class-specific deltas [N, K, 4] with anchors [N, 1, 4].
    deltas = rng.normal(size=(6, 4, 4)).astype(np.float32)
    props = random_boxes(rng, (6,))
    dec = np.asarray(B.decode(deltas, props[:, None, :], (10, 10, 5, 5)))
    ref = ref_decode(deltas, np.broadcast_to(props[:, None, :], (6, 4, 4)), (10, 10, 5, 5))
    np.testing.assert_allclose(dec, ref, rtol=1e-5, atol=1e-3)


def test_jit_vmap_no_retrace():
    def fn(a, b, deltas, hw):
        ious = B.iou(a, b)
        dec = B.clip(B.decode(deltas, a, (10, 10, 5, 5)), hw)
        return ious, B.ioa(a, b), B.encode(dec, a, (10, 10, 5, 5)), B.area(dec)

    jitted, n = count_traces(jax.vmap(fn))
    rng = np.random.default_rng(11)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        a = random_boxes(rng, (4, 9))
        b = random_boxes(rng, (4, 6))
        deltas = rng.normal(size=(4, 9, 4)).astype(np.float32) * 0.1
        hw = rng.uniform(50, 200, size=(4, 2)).astype(np.float32)
        ious, ioas, _, areas = jitted(a, b, deltas, hw)
        for i in range(4):
            np.testing.assert_allclose(np.asarray(ious[i]), ref_iou(a[i], b[i]), atol=1e-6)
            np.testing.assert_allclose(np.asarray(ioas[i]), ref_ioa(a[i], b[i]), atol=1e-6)
        assert areas.shape == (4, 9)
    assert n[0] == 1
