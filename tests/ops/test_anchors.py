"""Tests for oanet_jax.ops.anchors: hand-computed tables and a float64 loop reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oanet_jax.ops import anchors as A

R2 = math.sqrt(2.0)


def ref_level(image_size, stride, sizes, ratios, offset):
    """detectron2 DefaultAnchorGenerator, one level, as a plain float64 loop."""
    hl = math.ceil(image_size[0] / stride)
    wl = math.ceil(image_size[1] / stride)
    out = []
    for y in range(hl):
        for x in range(wl):
            cx = x * stride + offset * stride
            cy = y * stride + offset * stride
            for size in sizes:
                for r in ratios:
                    w = math.sqrt(size * size / r)
                    h = r * w
                    out.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    return np.array(out, np.float64).reshape(-1, 4)


def test_hand_computed_table_32x32():
    levels = A.fpn_anchors((32, 32))
    assert [lv.shape for lv in levels] == [(192, 4), (48, 4), (12, 4), (3, 4), (3, 4)]
    assert all(lv.dtype == jnp.float32 for lv in levels)
    p2 = np.asarray(levels[0])
    s = 16 * R2  # 22.627417: half of the long side of a 32x32-area box with ratio 2 or 0.5
    t = 8 * R2  # 11.313708: half of the short side
    expected_first = np.array(
        [
            [-s, -t, s, t],  # (y=0, x=0) ratio 0.5: w = sqrt(32^2 / 0.5) = 45.25, h = 22.63
            [-16, -16, 16, 16],  # ratio 1
            [-t, -s, t, s],  # ratio 2
            [4 - s, -t, 4 + s, t],  # (y=0, x=1): shifted by the stride 4 in x
            [-12, -16, 20, 16],
            [4 - t, -s, 4 + t, s],
        ]
    )
    np.testing.assert_allclose(p2[:6], expected_first, rtol=1e-6, atol=1e-5)
    # (y=1, x=0) starts at index Wl * A = 8 * 3 = 24: shifted by 4 in y.
    np.testing.assert_allclose(p2[24], [-s, 4 - t, s, 4 + t], rtol=1e-6, atol=1e-5)
    # Last P2 anchor: (y=7, x=7), ratio 2, centre (28, 28).
    np.testing.assert_allclose(
        p2[-1], [16.686292, 5.372583, 39.313708, 50.627417], rtol=1e-6, atol=1e-5
    )
    # P3 (stride 8, size 64), (y=0, x=1), ratio 0.5: w = 90.51, h = 45.25, centre (8, 0).
    np.testing.assert_allclose(
        np.asarray(levels[1])[3], [8 - 2 * s, -2 * t, 8 + 2 * s, 2 * t], rtol=1e-6, atol=1e-5
    )
    # P6 (stride 64, size 512): ceil(32 / 64) = 1 location, at the origin.
    np.testing.assert_allclose(
        np.asarray(levels[4]),
        [[-256 * R2, -128 * R2, 256 * R2, 128 * R2], [-256, -256, 256, 256],
         [-128 * R2, -256 * R2, 128 * R2, 256 * R2]],
        rtol=1e-6,
    )  # fmt: skip


def test_offset_half_moves_centres_to_cell_centres():
    p2 = np.asarray(A.fpn_anchors((32, 32), offset=0.5)[0])
    s, t = 16 * R2, 8 * R2
    np.testing.assert_allclose(p2[0], [2 - s, 2 - t, 2 + s, 2 + t], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(p2[4], [-10, -14, 22, 18], rtol=1e-6, atol=1e-5)
    centres = (p2[:, :2] + p2[:, 2:]) / 2
    np.testing.assert_allclose(centres.min(0), [2, 2])
    np.testing.assert_allclose(centres.max(0), [30, 30])


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_matches_float64_loop_reference(offset):
    image_size = (70, 100)  # not a multiple of any stride: exercises the ceil
    strides, sizes, ratios = (4, 8, 16, 32, 64), (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)
    levels = A.fpn_anchors(image_size, strides, sizes, ratios, offset)
    for lv, stride, size in zip(levels, strides, sizes, strict=True):
        ref = ref_level(image_size, stride, (size,), ratios, offset)
        assert lv.shape == ref.shape
        np.testing.assert_allclose(np.asarray(lv), ref, rtol=1e-6, atol=1e-4)
    cat = A.fpn_anchors_concat(image_size, strides, sizes, ratios, offset)
    np.testing.assert_array_equal(np.asarray(cat), np.concatenate([np.asarray(x) for x in levels]))


def test_counts_and_feature_sizes():
    assert A.feature_sizes((100, 130), (4, 8, 16, 32, 64)) == [
        (25, 33), (13, 17), (7, 9), (4, 5), (2, 3)
    ]  # fmt: skip
    counts = A.num_anchors_per_level((100, 130))
    assert counts == [25 * 33 * 3, 13 * 17 * 3, 7 * 9 * 3, 4 * 5 * 3, 2 * 3 * 3]
    assert [lv.shape[0] for lv in A.fpn_anchors((100, 130))] == counts
    # Padded to a multiple of 32 (as the pipeline does): exactly H / s.
    assert A.num_anchors_per_level((1024, 1344)) == [
        (1024 // s) * (1344 // s) * 3 for s in (4, 8, 16, 32, 64)
    ]
    total = sum(A.num_anchors_per_level((1024, 1344)))
    assert A.fpn_anchors_concat((1024, 1344)).shape == (total, 4)


def test_several_sizes_and_per_level_ratios():
    sizes = ((32, 40), (64,))
    ratios = ((1.0,), (0.5, 2.0))
    levels = A.fpn_anchors((16, 16), (8, 16), sizes, ratios)
    assert A.num_anchors_per_level((16, 16), (8, 16), sizes, ratios) == [2 * 2 * 2, 1 * 1 * 2]
    np.testing.assert_allclose(
        np.asarray(levels[0]), ref_level((16, 16), 8, (32, 40), (1.0,), 0.0), rtol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(levels[1]), ref_level((16, 16), 16, (64,), (0.5, 2.0), 0.0), rtol=1e-6
    )
    # Sizes in the outer loop: (size 32, size 40) at each location.
    np.testing.assert_allclose(np.asarray(levels[0])[:2], [[-16, -16, 16, 16], [-20, -20, 20, 20]])
    with pytest.raises(ValueError):
        A.fpn_anchors((16, 16), (8, 16), (32,), (1.0,))


def test_layout_matches_nhwc_head_reshape():
    """Anchor (y * Wl + x) * A + a sits at feature position (y, x), as a [Hl, Wl, A] head."""
    hl, wl, stride = 5, 7, 8
    anchors = np.asarray(A.fpn_anchors((hl * stride, wl * stride), (stride,), (32,))[0])
    grid = anchors.reshape(hl, wl, 3, 4)
    centres = (grid[..., :2] + grid[..., 2:]) / 2
    ys, xs = np.meshgrid(np.arange(hl), np.arange(wl), indexing="ij")
    np.testing.assert_allclose(centres[..., 0], np.repeat(xs[..., None] * stride, 3, -1), atol=1e-5)
    np.testing.assert_allclose(centres[..., 1], np.repeat(ys[..., None] * stride, 3, -1), atol=1e-5)


def test_inside_jit_constant_and_no_retrace():
    n = [0]

    def fn(x):
        n[0] += 1
        return A.fpn_anchors_concat((64, 96)) + x

    jitted = jax.jit(fn)
    expected = np.asarray(A.fpn_anchors_concat((64, 96)))
    for v in (0.0, 1.0, 2.5):
        np.testing.assert_allclose(np.asarray(jitted(jnp.float32(v))), expected + v, rtol=1e-6)
    assert n[0] == 1
    # Batched use: one set of anchors broadcast against per-image deltas under vmap.
    out = jax.vmap(lambda d: A.fpn_anchors((32, 32))[3] + d)(jnp.ones((2, 3, 4)))
    assert out.shape == (2, 3, 4)
