"""RoIAlign against torchvision (forward and autograd) and a float64 numpy loop reference."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from oanet_jax.ops.roi_align import assign_levels, multilevel_roi_align, roi_align

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

ATOL = 1e-5
B, H, W, C, N = 2, 13, 17, 3, 24
OUT = (5, 4)


# ----------------------------------------------------------------------------- helpers


def random_boxes(rng: np.random.Generator, n: int, h: int, w: int, max_extent: float) -> np.ndarray:
    """[n, 4] boxes in feature-map pixels: ordinary, tiny, zero-size, inverted, partly and
    wholly outside the h x w map. Extents stay below ``max_extent`` (pixels of the map)."""
    x1 = rng.uniform(-0.3 * w, 1.1 * w, n)
    y1 = rng.uniform(-0.3 * h, 1.1 * h, n)
    bw = rng.uniform(0.0, max_extent, n)
    bh = rng.uniform(0.0, max_extent, n)
    kind = np.arange(n) % 8
    tiny = kind == 1
    bw[tiny] *= 0.05
    bh[tiny] *= 0.05
    bw[kind == 2] = 0.0  # zero width
    bh[kind == 3] = 0.0  # zero height
    both = kind == 4  # a point
    bw[both] = 0.0
    bh[both] = 0.0
    out = kind == 5  # wholly outside (right of / below the map)
    x1[out] = w + 1.5 + rng.uniform(0, 3, out.sum())
    y1[out] = rng.uniform(-3, h + 3, out.sum())
    inv = kind == 6  # inverted box (x2 < x1, y2 < y1)
    bw[inv] = -0.3 * bw[inv]
    bh[inv] = -0.3 * bh[inv]
    left = kind == 7  # straddling the top-left corner
    x1[left] = rng.uniform(-0.5 * max_extent, 0.5, left.sum())
    y1[left] = rng.uniform(-0.5 * max_extent, 0.5, left.sum())
    return np.stack([x1, y1, x1 + bw, y1 + bh], axis=1)


def image_boxes(rng, scale, max_extent, b=B, n=N, h=H, w=W) -> np.ndarray:
    """[b, n, 4] float32 boxes in image pixels (map pixels / scale)."""
    boxes = np.stack([random_boxes(rng, n, h, w, max_extent) for _ in range(b)])
    return (boxes / scale).astype(np.float32)


def tv_roi_align(features, boxes, output_size, scale, sampling_ratio, aligned) -> np.ndarray:
    """torchvision.ops.roi_align on NHWC features / [B, N, 4] boxes -> [B, N, oh, ow, C]."""
    b, n = boxes.shape[:2]
    rois = [torch.from_numpy(np.asarray(boxes[i], np.float32)) for i in range(b)]
    feats = torch.from_numpy(np.ascontiguousarray(np.asarray(features).transpose(0, 3, 1, 2)))
    out = torchvision.ops.roi_align(feats, rois, output_size, scale, sampling_ratio, aligned)
    return out.permute(0, 2, 3, 1).reshape(b, n, *output_size, -1).numpy()


def needed_grid(boxes, scale, output_size, aligned) -> int:
    """Largest adaptive grid ceil(roi / out) over the boxes (what torchvision would use)."""
    mapped = boxes.astype(np.float64) * scale
    ext = mapped[..., 2:] - mapped[..., :2]
    if not aligned:
        ext = np.maximum(ext, 1.0)
    grid = np.ceil(ext / np.asarray(output_size[::-1], np.float64))
    return int(grid.max())


def reference_roi_align(feature, boxes, output_size, scale, sampling_ratio, aligned, cap=None):
    """Slow float64 loop RoIAlign of one image ([H, W, C], [N, 4]) written from the definition;
    ``cap`` bounds the adaptive grid per axis."""
    h, w, c = feature.shape
    oh, ow = output_size
    feature = feature.astype(np.float64)
    offset = 0.5 if aligned else 0.0
    out = np.zeros((len(boxes), oh, ow, c))

    def tap(y, size):
        if y < -1.0 or y > size:
            return None
        y = max(y, 0.0)
        low = int(math.floor(y))
        if low >= size - 1:
            return size - 1, size - 1, 1.0, 0.0
        return low, low + 1, 1.0 - (y - low), y - low

    for n, box in enumerate(boxes.astype(np.float64)):
        x1, y1, x2, y2 = box * scale - offset
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / oh)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / ow)
        if cap is not None:
            gh, gw = min(gh, cap), min(gw, cap)
        if gh <= 0 or gw <= 0:
            continue
        for ph in range(oh):
            for pw in range(ow):
                acc = np.zeros(c)
                for iy in range(gh):
                    ty = tap(y1 + ph * rh / oh + (iy + 0.5) * rh / oh / gh, h)
                    for ix in range(gw):
                        tx = tap(x1 + pw * rw / ow + (ix + 0.5) * rw / ow / gw, w)
                        if ty is None or tx is None:
                            continue
                        for yy, wy in ((ty[0], ty[2]), (ty[1], ty[3])):
                            for xx, wx in ((tx[0], tx[2]), (tx[1], tx[3])):
                                acc += wy * wx * feature[yy, xx]
                out[n, ph, pw] = acc / (gh * gw)
    return out


def max_err(ours, ref) -> float:
    """max |ours - ref|, infinite where exactly one side is NaN (NaNs must not hide)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = np.abs(ours - ref)
    err[np.isnan(ours) != np.isnan(ref)] = np.inf
    return float(np.nanmax(err)) if err.size else 0.0


@functools.cache
def jitted_roi_align(output_size, sampling_ratio, aligned, max_sampling_ratio):
    """roi_align jitted with a traced spatial scale (one compile per static config)."""
    return jax.jit(
        lambda f, b, s: roi_align(
            f,
            b,
            output_size,
            s,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
            max_sampling_ratio=max_sampling_ratio,
        )
    )


# ------------------------------------------------------------------- single level, forward

# (sampling_ratio, max_sampling_ratio): cap 4 is the unrolled adaptive path, cap 7 the looped.
SAMPLING = [(1, 4), (2, 4), (0, 4), (0, 7)]


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize(("sampling_ratio", "cap"), SAMPLING)
def test_roi_align_matches_torchvision(aligned, sampling_ratio, cap):
    fn = jitted_roi_align(OUT, sampling_ratio, aligned, cap)
    rng = np.random.default_rng(100 * sampling_ratio + cap + aligned)
    worst = 0.0
    for seed in range(8):
        for scale in (1.0, 0.25, 1.0 / 16):
            features = rng.standard_normal((B, H, W, C)).astype(np.float32)
            # Adaptive grids stay within the cap here (the cap is tested separately).
            boxes = image_boxes(rng, scale, max_extent=cap * min(OUT) - 0.5)
            if sampling_ratio == 0:
                assert needed_grid(boxes, scale, OUT, aligned) <= cap, seed
            ours = np.asarray(fn(features, boxes, jnp.float32(scale)))
            ref = tv_roi_align(features, boxes, OUT, scale, sampling_ratio, aligned)
            assert ours.shape == (B, N, *OUT, C)
            assert np.isfinite(ours).all()
            worst = max(worst, max_err(ours, ref))
            assert np.abs(ref).max() > 0.1  # the comparison is not vacuous
    assert worst <= ATOL, worst


def test_large_map_coordinates_are_rounded_as_torchvision():
    """On a 256-pixel map the sample coordinates must round exactly as torchvision's float32
    kernel (no FMA contraction, true divisions), else values drift by ~1e-4."""
    rng = np.random.default_rng(7)
    features = rng.standard_normal((1, 256, 256, 2)).astype(np.float32)
    xy = rng.uniform(-40, 1024, (1, 400, 2))
    wh = rng.uniform(0, 300, (1, 400, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    for sampling_ratio in (2, 3):
        fn = jitted_roi_align((7, 7), sampling_ratio, True, 4)
        ours = np.asarray(fn(features, boxes, jnp.float32(0.25)))
        ref = tv_roi_align(features, boxes, (7, 7), 0.25, sampling_ratio, True)
        assert max_err(ours, ref) <= 2e-6


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_roi_align_matches_float64_reference(aligned, sampling_ratio):
    fn = jitted_roi_align(OUT, sampling_ratio, aligned, 6)
    rng = np.random.default_rng(11 + sampling_ratio + aligned)
    for scale in (1.0, 0.25):
        features = rng.standard_normal((1, H, W, C)).astype(np.float32)
        boxes = image_boxes(rng, scale, max_extent=20.0, b=1, n=16)
        ours = np.asarray(fn(features, boxes, jnp.float32(scale)))[0]
        ref = reference_roi_align(features[0], boxes[0], OUT, scale, sampling_ratio, aligned)
        # float64 vs float32 sample coordinates: agreement to float32 rounding only.
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_degenerate_and_outside_boxes():
    features = jnp.asarray(np.random.default_rng(3).standard_normal((1, 8, 8, 2)), jnp.float32)
    boxes = jnp.asarray(
        [
            [
                [3.0, 3.0, 3.0, 3.0],  # point: adaptive grid 0 -> 0 (aligned)
                [20.0, 20.0, 30.0, 30.0],  # wholly outside (all samples > H + ...)
                [-9.0, -9.0, -2.0, -2.0],  # wholly outside on the negative side
                [5.0, 5.0, 3.0, 3.0],  # inverted: adaptive grid <= 0 -> 0
            ]
        ],
        jnp.float32,
    )
    out = roi_align(features, boxes, 2, 1.0, sampling_ratio=0, aligned=True, max_sampling_ratio=4)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    # aligned=False forces size >= 1: the point box samples the map (non-zero).
    legacy = roi_align(
        features, boxes, 2, 1.0, sampling_ratio=0, aligned=False, max_sampling_ratio=4
    )
    assert np.abs(np.asarray(legacy[0, 0])).max() > 0
    np.testing.assert_array_equal(np.asarray(legacy[0, 1:3]), 0.0)


def test_samples_exactly_on_the_map_border():
    """Samples at exactly y = H or x = -1 are kept (clamped); just beyond, they are dropped."""
    rng = np.random.default_rng(20)
    features = rng.standard_normal((1, 6, 5, 2)).astype(np.float32)
    # aligned=False, one bin, one sample at the box centre.
    boxes = np.array(
        [
            [
                [1.0, 5.5, 2.0, 6.5],  # y = 6 = H: kept, last row
                [-1.5, 2.0, -0.5, 3.0],  # x = -1: kept, first column
                [1.0, 5.5 + 2e-3, 2.0, 6.5 + 2e-3],  # y just above H: dropped
                [-1.5 - 2e-3, 2.0, -0.5 - 2e-3, 3.0],  # x just below -1: dropped
                [4.5, 1.0, 5.5, 2.0],  # x = 5 = W: kept, last column
            ]
        ],
        np.float32,
    )
    ours = np.asarray(roi_align(features, boxes, 1, 1.0, 1, aligned=False))
    ref = tv_roi_align(features, boxes, (1, 1), 1.0, 1, False)
    assert max_err(ours, ref) <= ATOL
    np.testing.assert_array_equal(ours[0, 2:4], 0.0)
    assert np.abs(ours[0, [0, 1, 4]]).min() > 0


# ---------------------------------------------------------------------- adaptive grid cap


def test_default_cap_is_exact_for_fpn_boxes():
    """Default cap (6 for 7x7): exact for boxes up to 2:1 pooled from their assigned level."""
    rng = np.random.default_rng(19)
    strides = (4, 8, 16, 32)
    feats = [rng.standard_normal((1, 512 // s, 512 // s, 2)).astype(np.float32) for s in strides]
    n = 96
    size = np.exp(rng.uniform(np.log(16.0), np.log(800.0), n))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), n))
    aspect[:4] = [2.0, 0.5, 2.0, 0.5]
    size[:4] = [447.0, 447.0, 223.0, 111.0]  # just below a level boundary: largest RoIs
    wh = np.stack([size * np.sqrt(aspect), size / np.sqrt(aspect)], 1)
    xy = rng.uniform(-50, 500, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1)[None].astype(np.float32)
    ours = multilevel_roi_align(feats, jnp.asarray(boxes), 7, strides, 0, True)
    levels = torch_levels(boxes, "detectron2")
    ref = np.zeros((1, n, 7, 7, 2), np.float32)
    grids = []
    for lvl, (f, s) in enumerate(zip(feats, strides, strict=True)):
        keep = levels == lvl
        ref[0, keep] = tv_roi_align(f, boxes, (7, 7), 1.0 / s, 0, True)[0, keep]
        grids.append(needed_grid(boxes[:, keep], 1.0 / s, (7, 7), True))
    assert max(grids) == 6  # the test reaches the cap
    assert max_err(ours, ref) <= ATOL
    # A 4:1 box just below the P5 boundary needs 8 samples across: the default cap (6)
    # samples it more sparsely (6 evenly spaced samples on that axis).
    long_box = np.array([[[10.0, 10.0, 904.0, 233.5]]], np.float32)  # sqrt(area) 447 -> P4
    assert needed_grid(long_box, 1.0 / 16, (7, 7), True) == 8
    capped = np.asarray(multilevel_roi_align(feats, jnp.asarray(long_box), 7, strides, 0, True))
    exact = tv_roi_align(feats[2], long_box, (7, 7), 1.0 / 16, 0, True)
    assert max_err(capped, exact) > 1e-3
    ref = reference_roi_align(feats[2][0], long_box[0], (7, 7), 1.0 / 16, 0, True, cap=6)
    np.testing.assert_allclose(capped[0], ref, atol=1e-4, rtol=0)


def test_adaptive_cap_equals_fixed_ratio_when_both_axes_exceed():
    """Above the cap a box uses cap samples per axis: torchvision with sampling_ratio=cap."""
    rng = np.random.default_rng(5)
    features = rng.standard_normal((1, 40, 40, C)).astype(np.float32)
    xy = rng.uniform(-5, 15, (1, 12, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(17, 30, (1, 12, 2))], -1).astype(np.float32)
    assert needed_grid(boxes, 1.0, (4, 4), True) > 3
    assert np.min(np.ceil((boxes[..., 2:] - boxes[..., :2]) / 4)) > 3  # every box, both axes
    ours = np.asarray(roi_align(features, boxes, 4, 1.0, 0, True, max_sampling_ratio=3))
    ref = tv_roi_align(features, boxes, (4, 4), 1.0, 3, True)
    assert max_err(ours, ref) <= ATOL


def test_adaptive_cap_per_axis_matches_reference():
    rng = np.random.default_rng(6)
    features = rng.standard_normal((1, 24, 24, 2)).astype(np.float32)
    # wide boxes: x grid ceil(20/3)=7 > cap 4, y grid ceil(4/3)=2 within the cap.
    boxes = np.array([[[1.0, 2.0, 21.0, 6.0], [0.5, 10.0, 22.5, 13.5], [2.0, 1.0, 4.0, 23.0]]])
    boxes = boxes.astype(np.float32)
    ours = np.asarray(roi_align(features, boxes, 3, 1.0, 0, True, max_sampling_ratio=4))[0]
    ref = reference_roi_align(features[0], boxes[0], (3, 3), 1.0, 0, True, cap=4)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    exact = reference_roi_align(features[0], boxes[0], (3, 3), 1.0, 0, True)
    assert max_err(ours, exact) > 1e-3  # the cap really changed those boxes


# ------------------------------------------------------------------------------- gradients


def test_check_grads_features():
    rng = np.random.default_rng(8)
    features = jnp.asarray(rng.standard_normal((1, 6, 7, 2)), jnp.float32)
    boxes = jnp.asarray(image_boxes(rng, 1.0, 6.0, b=1, n=8, h=6, w=7))
    for sampling_ratio in (2, 0):
        fn = jax.jit(lambda f, sr=sampling_ratio: roi_align(f, boxes, 3, 1.0, sr, True, 2))
        # Linear in the features: central differences are exact up to rounding for any eps.
        check_grads(fn, (features,), order=1, modes=("rev",), eps=1e-1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_gradients_match_torch_autograd(aligned, sampling_ratio):
    rng = np.random.default_rng(9 + sampling_ratio + aligned)
    features = rng.standard_normal((B, H, W, C)).astype(np.float32)
    boxes = image_boxes(rng, 0.25, max_extent=3.0 * min(OUT) - 0.5)
    cotangent = rng.standard_normal((B, N, *OUT, C)).astype(np.float32)

    def pooled(f):
        return roi_align(f, jnp.asarray(boxes), OUT, 0.25, sampling_ratio, aligned, 3)

    grad = jax.jit(lambda f, g: jax.vjp(pooled, f)[1](g)[0])
    ours = grad(jnp.asarray(features), jnp.asarray(cotangent))

    feats = torch.from_numpy(features.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    rois = [torch.from_numpy(boxes[i]) for i in range(B)]
    out = torchvision.ops.roi_align(feats, rois, OUT, 0.25, sampling_ratio, aligned)
    g = torch.from_numpy(cotangent.reshape(B * N, *OUT, C).transpose(0, 3, 1, 2).copy())
    out.backward(g)
    ref = feats.grad.numpy().transpose(0, 2, 3, 1)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5, rtol=0)


# ------------------------------------------------------------------ jit / vmap / dtypes


def test_jit_no_retrace_and_vmap():
    traces = []

    @jax.jit
    def fn(f, b):
        traces.append(1)
        return roi_align(f, b, OUT, 0.25, 2, True)

    rng = np.random.default_rng(10)
    feats = rng.standard_normal((3, B, H, W, C)).astype(np.float32)
    boxes = np.stack([image_boxes(rng, 0.25, 10.0) for _ in range(3)])
    outs = [np.asarray(fn(feats[i], boxes[i])) for i in range(3)]
    assert len(traces) == 1
    for i in range(3):
        ref = tv_roi_align(feats[i], boxes[i], OUT, 0.25, 2, True)
        assert max_err(outs[i], ref) <= ATOL
    batched = jax.jit(jax.vmap(lambda f, b: roi_align(f, b, OUT, 0.25, 2, True)))
    np.testing.assert_allclose(np.asarray(batched(feats, boxes)), np.stack(outs), atol=1e-6)


def test_bfloat16_features_interpolate_in_float32():
    rng = np.random.default_rng(12)
    features = jnp.asarray(rng.standard_normal((B, H, W, C)), jnp.bfloat16)
    boxes = jnp.asarray(image_boxes(rng, 0.25, 10.0))
    out = roi_align(features, boxes, OUT, 0.25, 2, True)
    assert out.dtype == jnp.bfloat16
    ref = roi_align(features.astype(jnp.float32), boxes, OUT, 0.25, 2, True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref.astype(jnp.bfloat16)))


# ------------------------------------------------------------------------- level mapping


def torch_levels(boxes, mapper, k_min=2, k_max=5, s0=224.0, k0=4):
    """The two libraries' formulas, in torch float32."""
    b = torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4))
    size = torch.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    if mapper == "detectron2":  # detectron2.modeling.poolers.assign_boxes_to_levels
        level = torch.floor(k0 + torch.log2(size / s0 + 1e-8))
    else:  # torchvision.ops.poolers.LevelMapper
        level = torch.floor(k0 + torch.log2(size / s0) + torch.tensor(1e-6))
    return (torch.clamp(level, min=k_min, max=k_max).to(torch.int64) - k_min).numpy()


@pytest.mark.parametrize("mapper", ["detectron2", "torchvision"])
def test_assign_levels_matches_formulas(mapper):
    rng = np.random.default_rng(13)
    xy = rng.uniform(0, 800, (2000, 2))
    wh = np.exp(rng.uniform(np.log(1.0), np.log(1500.0), (2000, 2)))
    boxes = np.concatenate([xy, xy + wh], 1)
    # Exact level boundaries (squares of side 224 * 2**k), just below/above, and empty boxes.
    sides = np.array([56.0, 112.0, 224.0, 448.0, 896.0, 8192.0])
    sides = np.concatenate([sides, sides - 0.01, sides + 0.01, [0.0, 1e-3]])
    square = np.stack([np.full_like(sides, 3.0), np.full_like(sides, 5.0)], 1)
    boxes = np.concatenate([boxes, np.concatenate([square, square + sides[:, None]], 1)])
    boxes = boxes.astype(np.float32)
    # Squares 3 float32 ulps below a boundary: the two formulas' epsilons disagree there.
    near = np.array([56.0, 112.0, 224.0], np.float32)
    for _ in range(3):
        near = np.nextafter(near, np.float32(0))
    near_boxes = np.stack([np.full(3, 3.0), np.full(3, 5.0), 3.0 + near, 5.0 + near], 1)
    boxes = np.concatenate([boxes, near_boxes.astype(np.float32)])
    ours = np.asarray(assign_levels(jnp.asarray(boxes), level_mapper=mapper))
    np.testing.assert_array_equal(ours, torch_levels(boxes, mapper))
    assert set(np.unique(ours)) == {0, 1, 2, 3}
    # The boundary squares land where the formula says (224 -> P4, 223.99 -> P3, ...).
    np.testing.assert_array_equal(ours[-23:-17], [0, 1, 2, 3, 3, 3])
    # Just below a boundary: detectron2 (eps inside the log) goes down a level, torchvision
    # (eps 1e-6 added to the level) does not.
    expected = [0, 0, 1] if mapper == "detectron2" else [0, 1, 2]
    np.testing.assert_array_equal(ours[-3:], expected)


@pytest.mark.parametrize("mapper", ["detectron2", "torchvision"])
def test_assign_levels_exact_at_powers_of_two(mapper):
    """Squares of side 2**k sit exactly on level k0 + k (XLA's own log2 is off by an ulp at
    some powers of two, e.g. 2**13, which would floor one level too low when k0 = 0)."""
    k = np.arange(-15, 16)
    side = (2.0**k).astype(np.float32)
    boxes = np.stack([np.zeros_like(side), np.zeros_like(side), side, side], 1)
    levels = assign_levels(
        jnp.asarray(boxes),
        min_level=-20,
        max_level=20,
        canonical_box_size=1.0,
        canonical_level=0,
        level_mapper=mapper,
    )
    np.testing.assert_array_equal(np.asarray(levels), k + 20)


# ---------------------------------------------------------------------------- multilevel

IMAGE = (128, 160)  # (H, W) of the image; P2..P5 are 32x40 .. 4x5
STRIDES = (4, 8, 16, 32)
S0 = 28.0  # canonical size small enough that every level is used on this small image


def pyramid(rng, b=B, c=C):
    return [
        rng.standard_normal((b, IMAGE[0] // s, IMAGE[1] // s, c)).astype(np.float32)
        for s in STRIDES
    ]


def pyramid_boxes(rng, b=B, n=N):
    xy = rng.uniform(-10, 150, (b, n, 2))
    size = np.exp(rng.uniform(np.log(2.0), np.log(120.0), (b, n, 1)))
    aspect = np.exp(rng.uniform(-1.0, 1.0, (b, n, 1)))  # 1:e .. e:1
    wh = np.concatenate([size * np.sqrt(aspect), size / np.sqrt(aspect)], -1)
    boxes = np.concatenate([xy, xy + wh], -1)
    boxes[:, 0] = [10.0, 20.0, 38.0, 48.0]  # sqrt(area) == 28 exactly: level boundary
    boxes[:, 1] = [3.0, 4.0, 17.0, 18.0]  # 14 x 14: boundary one level lower
    return boxes.astype(np.float32)


@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_multilevel_matches_torchvision_multiscale(sampling_ratio):
    """torchvision's MultiScaleRoIAlign: aligned=False, LevelMapper (eps outside the log)."""
    rng = np.random.default_rng(14 + sampling_ratio)
    fn = jax.jit(
        lambda f, b: multilevel_roi_align(
            f,
            b,
            OUT,
            STRIDES,
            sampling_ratio,
            aligned=False,
            canonical_box_size=S0,
            max_sampling_ratio=6,
            level_mapper="torchvision",
        )
    )
    pooler = torchvision.ops.MultiScaleRoIAlign(
        ["p2", "p3", "p4", "p5"], OUT, sampling_ratio, canonical_scale=int(S0)
    )
    for _ in range(3):
        feats = pyramid(rng)
        boxes = pyramid_boxes(rng)
        ours = np.asarray(fn(feats, boxes))
        x = {
            f"p{i + 2}": torch.from_numpy(np.ascontiguousarray(f.transpose(0, 3, 1, 2)))
            for i, f in enumerate(feats)
        }
        ref = pooler(x, [torch.from_numpy(b) for b in boxes], [IMAGE] * B)
        ref = ref.permute(0, 2, 3, 1).reshape(B, N, *OUT, C).numpy()
        assert max_err(ours, ref) <= ATOL
    levels = np.asarray(
        assign_levels(jnp.asarray(boxes), canonical_box_size=S0, level_mapper="torchvision")
    )
    assert set(np.unique(levels)) == {0, 1, 2, 3}


@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_multilevel_matches_per_level_loop_detectron2(sampling_ratio):
    """aligned=True with detectron2's assignment, against a loop of per-level torchvision."""
    rng = np.random.default_rng(15 + sampling_ratio)
    feats = pyramid(rng)
    boxes = pyramid_boxes(rng)
    ours = multilevel_roi_align(
        feats, boxes, OUT, STRIDES, sampling_ratio, True, S0, max_sampling_ratio=6
    )
    levels = torch_levels(boxes, "detectron2", s0=S0).reshape(B, N)
    ref = np.zeros((B, N, *OUT, C), np.float32)
    for lvl, (f, s) in enumerate(zip(feats, STRIDES, strict=True)):
        full = tv_roi_align(f, boxes, OUT, 1.0 / s, sampling_ratio, True)
        ref[levels == lvl] = full[levels == lvl]
    assert set(np.unique(levels)) == {0, 1, 2, 3}
    assert max_err(ours, ref) <= ATOL


def test_multilevel_gradients_match_torch():
    rng = np.random.default_rng(16)
    feats = pyramid(rng, b=1, c=2)
    boxes = pyramid_boxes(rng, b=1, n=16)
    cot = rng.standard_normal((1, 16, *OUT, 2)).astype(np.float32)

    def pooled(*fs):
        return multilevel_roi_align(list(fs), boxes, OUT, STRIDES, 2, True, S0)

    grad = jax.jit(lambda fs, g: jax.vjp(pooled, *fs)[1](g))
    ours = grad([jnp.asarray(f) for f in feats], jnp.asarray(cot))
    levels = torch_levels(boxes, "detectron2", s0=S0)
    tfeats = [torch.from_numpy(f.transpose(0, 3, 1, 2).copy()).requires_grad_(True) for f in feats]
    total = 0.0
    for lvl, (f, s) in enumerate(zip(tfeats, STRIDES, strict=True)):
        keep = np.nonzero(levels == lvl)[0]
        out = torchvision.ops.roi_align(f, [torch.from_numpy(boxes[0, keep])], OUT, 1 / s, 2, True)
        g = torch.from_numpy(cot[0, keep].transpose(0, 3, 1, 2).copy())
        total = total + (out * g).sum()
    total.backward()
    for mine, ref in zip(ours, tfeats, strict=True):
        np.testing.assert_allclose(
            np.asarray(mine), ref.grad.numpy().transpose(0, 2, 3, 1), atol=2e-5, rtol=0
        )


def test_multilevel_is_one_pass_no_retrace():
    """One gather pass over the concatenated pyramid (same gathers as a single-level call,
    not one per level), no matmul/einsum, and no retrace for new values."""

    def prims(jaxpr):
        out = []
        for eqn in jaxpr.eqns:
            out.append((eqn.primitive.name, tuple(v.aval.shape for v in eqn.outvars)))
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else (param,):
                    sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                    if hasattr(sub, "eqns"):
                        out.extend(prims(sub))
        return out

    rng = np.random.default_rng(17)
    feats = pyramid(rng)
    boxes = pyramid_boxes(rng)
    multi = prims(
        jax.make_jaxpr(lambda f, b: multilevel_roi_align(f, b, OUT, STRIDES, 2))(feats, boxes).jaxpr
    )
    single = prims(
        jax.make_jaxpr(lambda f, b: roi_align(f, b, OUT, 0.25, 2))(feats[0], boxes).jaxpr
    )
    gathers_multi = [p for p in multi if p[0] == "gather" and p[1][0][-1] == C]
    gathers_single = [p for p in single if p[0] == "gather" and p[1][0][-1] == C]
    assert gathers_multi == gathers_single
    assert len(gathers_single) == 16  # 2x2 samples x 4 bilinear taps
    assert not [p for p in multi if p[0] in ("dot_general", "conv_general_dilated")]

    traces = []

    @jax.jit
    def fn(f, b):
        traces.append(1)
        return multilevel_roi_align(f, b, OUT, STRIDES, 0)

    for _ in range(3):
        fn(pyramid(rng), pyramid_boxes(rng))
    assert len(traces) == 1


def test_multilevel_rejects_bad_inputs():
    rng = np.random.default_rng(18)
    feats = pyramid(rng)
    boxes = pyramid_boxes(rng)
    with pytest.raises(ValueError, match="powers of two"):
        multilevel_roi_align(feats, boxes, OUT, strides=(4, 8, 16, 24))
    with pytest.raises(ValueError, match="feature maps"):
        multilevel_roi_align(feats[:3], boxes, OUT)
    with pytest.raises(ValueError, match="boxes"):
        roi_align(feats[0], boxes[:1], OUT, 0.25)


def test_data_sharded_batch_needs_no_collective():
    """Each box reads its own image: with the batch sharded over 'data', forward and backward
    compile without any collective (a flat [B * rows, C] table made XLA all-gather the pyramid),
    and the gradient equals the unsharded one."""
    import re

    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py fakes 8 CPU devices)")
    b = 4
    mesh = Mesh(np.array(devices[:b]), ("data",))
    rng = np.random.default_rng(0)
    feats = [
        jnp.asarray(rng.normal(size=(b, 64 // s, 64 // s, 8)), jnp.float32) for s in (4, 8, 16, 32)
    ]
    xy = rng.uniform(0, 40, size=(b, 6, 2))
    boxes = jnp.asarray(np.concatenate([xy, xy + rng.uniform(4, 200, size=(b, 6, 2))], -1))
    weights = jnp.asarray(rng.normal(size=(b, 6, 7, 7, 8)), jnp.float32)

    def loss(fs, bx):
        return (multilevel_roi_align(fs, bx, 7, sampling_ratio=0) * weights).sum()

    sharded = NamedSharding(mesh, PartitionSpec("data"))
    grad = jax.jit(
        jax.grad(loss), in_shardings=([sharded] * 4, sharded), out_shardings=[sharded] * 4
    )
    hlo = grad.lower(feats, boxes.astype(jnp.float32)).compile().as_text()
    collectives = re.findall(
        r"= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)[-(]", hlo
    )
    # Only the backward's loop bounds cross devices (which of the <= 6 samples per axis some box
    # of the batch uses: pred[6] all-reduces); no feature data does.
    assert collectives, "expected the loop-bound reductions"
    for shapes, kind in collectives:
        sizes = [
            math.prod(int(d) for d in dims.split(",") if d)
            for dims in re.findall(r"\[([\d,]*)\]", shapes)
        ]
        assert kind == "all-reduce" and max(sizes) <= 6, (shapes, kind)
    want = jax.jit(jax.grad(loss))(feats, boxes.astype(jnp.float32))
    got = grad(feats, boxes.astype(jnp.float32))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
