"""Tests for oanet_jax.panoptic.merge: hand-made cases and a float64 torch/numpy loop reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from oanet_jax.panoptic import merge as pm

torch = pytest.importorskip("torch")

HP, WP = 32, 48
STRIDE = 4
D, T, S = 4, 2, 2


# ----------------------------------------------------------------------------------------------
# float64 reference: torch grid_sample / interpolate (detectron2's ops) and loops over instances.
# ----------------------------------------------------------------------------------------------


def _ref_paste(mask: np.ndarray, box: np.ndarray, height: int, width: int) -> np.ndarray:
    """detectron2's paste_masks_in_image before thresholding, in float64 (grid_sample)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        return np.zeros((height, width))
    gx = (np.arange(width) + 0.5 - x1) / (x2 - x1) * 2 - 1
    gy = (np.arange(height) + 0.5 - y1) / (y2 - y1) * 2 - 1
    grid = np.stack(np.broadcast_arrays(gx[None, :], gy[:, None]), axis=-1)[None]  # [1,H,W,2]
    out = torch.nn.functional.grid_sample(
        torch.from_numpy(np.asarray(mask, np.float64))[None, None],
        torch.from_numpy(grid),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )
    return out[0, 0].numpy()


def _ref_stuff_up(logits: np.ndarray, stride: int) -> np.ndarray:
    """[h, w, K] -> [h*stride, w*stride, K] float64 bilinear (align_corners=False)."""
    x = torch.from_numpy(np.asarray(logits, np.float64)).permute(2, 0, 1)[None]
    up = torch.nn.functional.interpolate(
        x, scale_factor=stride, mode="bilinear", align_corners=False
    )
    return up[0].permute(1, 2, 0).numpy()


def _ref_merge(
    inp: dict,
    *,
    mask_thr=0.5,
    overlap=0.5,
    score_thr=0.5,
    limit=4900,
    thing_void=False,
    region=False,
    area_scale=None,
):
    """Loop implementation of detectron2's combine_semantic_and_instance_outputs with an order key.

    Options: `thing_void` leaves void the free pixels whose argmax over all classes is a thing;
    `region` applies the area limit per 4-connected region (scipy.ndimage.label) instead of per
    class; `area_scale` [B] multiplies pixel counts before the comparison with `limit`.

    Returns (id_map [B,Hp,Wp], area [B,D+S], soft_margin): soft_margin is the smallest distance of
    a pasted probability (inside the image) from the mask threshold, to make sure float32 vs
    float64 cannot disagree.
    """
    nb, nd = inp["det_scores"].shape
    ns = inp["stuff_logits"].shape[-1] - T
    id_maps = np.zeros((nb, HP, WP), np.int64)
    areas = np.zeros((nb, nd + ns), np.int64)
    margin = np.inf
    for b in range(nb):
        h, w = inp["image_shape"][b]
        inside = np.zeros((HP, WP), bool)
        inside[:h, :w] = True
        id_map = id_maps[b]
        key = inp["order_key"][b]
        slots = [d for d in range(nd) if inp["det_valid"][b, d]]
        for d in sorted(slots, key=lambda d: (-float(key[d]), d)):
            soft = _ref_paste(inp["det_masks"][b, d], inp["det_boxes"][b, d], HP, WP)
            margin = min(margin, float(np.abs(soft - mask_thr)[inside].min()))
            if inp["det_scores"][b, d] < score_thr:
                continue
            m = (soft >= mask_thr) & inside
            area = int(m.sum())
            if area == 0:
                continue
            inter = int((m & (id_map > 0)).sum())
            if inter / area > overlap:
                continue
            m &= id_map == 0
            id_map[m] = d + 1
            areas[b, d] = int(m.sum())
        if ns:
            up = _ref_stuff_up(inp["stuff_logits"][b], STRIDE)[:HP, :WP]
            sem = np.argmax(up[..., T:], axis=-1)
            free = (id_map == 0) & inside
            if thing_void:
                free &= np.argmax(up, axis=-1) >= T
            scale = 1.0 if area_scale is None else float(area_scale[b])
            for s in range(ns):
                m = (sem == s) & free
                if region:
                    comp, n = ndimage.label(m)
                    for k in range(1, n + 1):
                        if (comp == k).sum() * scale < limit:
                            m &= comp != k
                elif m.sum() * scale < limit:
                    continue
                id_map[m] = nd + 1 + s
                areas[b, nd + s] = int(m.sum())
    return id_maps, areas, margin


def _merge(inp: dict, **kwargs) -> dict:
    out = pm.merge_panoptic(
        inp["det_masks"],
        inp["det_boxes"],
        inp["det_classes"],
        inp["det_scores"],
        inp["det_valid"],
        inp["order_key"],
        inp["stuff_logits"],
        inp["image_shape"],
        image_size=(HP, WP),
        num_thing_classes=T,
        stuff_stride=STRIDE,
        **kwargs,
    )
    return jax.tree.map(np.asarray, out)


def _check_table(out: dict, inp: dict) -> None:
    """Segment table agrees with the id map; padding and void pixels behave."""
    id_map, seg = out["id_map"], out["segments"]
    nb, nd = inp["det_scores"].shape
    ns = inp["stuff_logits"].shape[-1] - T
    assert id_map.dtype == np.int32 and id_map.shape == (nb, HP, WP)
    assert id_map.min() >= 0 and id_map.max() <= nd + ns
    for b in range(nb):
        counts = np.bincount(id_map[b].ravel(), minlength=nd + ns + 1)
        np.testing.assert_array_equal(seg["area"][b], counts[1:])
        np.testing.assert_array_equal(seg["valid"][b], counts[1:] > 0)
        np.testing.assert_array_equal(seg["id"][b], np.arange(1, nd + ns + 1))
        np.testing.assert_array_equal(seg["isthing"][b], np.arange(nd + ns) < nd)
        np.testing.assert_array_equal(seg["category"][b, nd:], T + np.arange(ns))
        thing_ok = seg["valid"][b, :nd]
        np.testing.assert_array_equal(
            seg["category"][b, :nd][thing_ok], inp["det_classes"][b][thing_ok]
        )
        np.testing.assert_allclose(seg["score"][b, :nd], inp["det_scores"][b])
        # Padded / low-score detections never own pixels.
        assert not np.any(thing_ok & ~inp["det_valid"][b])
        assert not np.any(thing_ok & (inp["det_scores"][b] < 0.5))
        # Pixels outside the un-padded image are void.
        h, w = inp["image_shape"][b]
        assert not id_map[b, h:, :].any() and not id_map[b, :, w:].any()
    assert seg["area"].dtype == np.int32 and seg["valid"].dtype == bool
    assert seg["score"].dtype == np.float32 and seg["category"].dtype == np.int32


# ----------------------------------------------------------------------------------------------
# Hand-made cases: full masks (all ones) in integer boxes paste to exact rectangles.
# ----------------------------------------------------------------------------------------------


def _inputs(boxes, scores, srm=None, valid=None, classes=None, stuff=None, image_shape=(HP, WP)):
    nd = len(boxes)
    classes = [i % T for i in range(nd)] if classes is None else classes
    stuff_logits = np.zeros((1, HP // STRIDE, WP // STRIDE, T + S), np.float32)
    stuff_logits[..., :T] = 50.0  # thing channels dominate but must be ignored
    stuff_logits[..., T] = 1.0  # stuff class 0 everywhere, class 1 nowhere
    if stuff is not None:
        stuff_logits[0] = stuff
    return {
        "det_masks": np.ones((1, nd, 28, 28), np.float32),
        "det_boxes": np.asarray(boxes, np.float32)[None],
        "det_classes": np.asarray(classes, np.int32)[None],
        "det_scores": np.asarray(scores, np.float32)[None],
        "det_valid": np.asarray(valid if valid is not None else [True] * nd)[None],
        "order_key": np.asarray(srm if srm is not None else scores, np.float32)[None],
        "stuff_logits": stuff_logits,
        "image_shape": np.asarray([image_shape], np.int32),
    }


def _rect(y1, x1, y2, x2):
    m = np.zeros((HP, WP), bool)
    m[y1:y2, x1:x2] = True
    return m


def test_order_flips_between_score_and_srm():
    boxes = [[4, 4, 20, 20], [12, 12, 28, 28], [0, 0, 0, 0], [0, 0, 0, 0]]
    scores = np.array([0.9, 0.7, 0.0, 0.0], np.float32)
    srm = np.array([0.1, 0.8, 0.0, 0.0], np.float32)
    overlap = _rect(12, 12, 20, 20)  # 8 x 8 = 64 px, 25% of each mask: both kept
    results = {}
    for ordering in pm.ORDERINGS:
        inp = _inputs(boxes, scores, valid=[True, True, False, False])
        inp["order_key"] = np.asarray(pm.order_keys(scores[None], srm[None], ordering))
        out = _merge(inp, stuff_area_limit=10)
        _check_table(out, inp)
        results[ordering] = out
    by_score, by_srm = results["score"], results["srm"]
    assert np.all(by_score["id_map"][0][overlap] == 1)  # A (higher score) on top
    assert np.all(by_srm["id_map"][0][overlap] == 2)  # B (higher ranking score) on top
    np.testing.assert_array_equal(by_score["segments"]["area"][0, :2], [256, 192])
    np.testing.assert_array_equal(by_srm["segments"]["area"][0, :2], [192, 256])
    # Everything else is the single stuff segment (id D + 1).
    rest = ~(_rect(4, 4, 20, 20) | _rect(12, 12, 28, 28))
    assert np.all(by_srm["id_map"][0][rest] == D + 1)
    assert by_srm["segments"]["area"][0, D] == HP * WP - 256 - 192
    assert not by_srm["segments"]["valid"][0, D + 1]


def test_order_keys_helper():
    a, b = jnp.ones((2, 3)), jnp.zeros((2, 3))
    np.testing.assert_array_equal(pm.order_keys(a, b, "score"), a)
    np.testing.assert_array_equal(pm.order_keys(a, b, "srm"), b)
    with pytest.raises(ValueError, match="ordering"):
        pm.order_keys(a, b, "area")


def test_overlap_threshold_drop_and_boundary():
    boxes = [[0, 0, 16, 16], [4, 4, 20, 20], [0, 8, 16, 24], [0, 0, 0, 0]]
    # B: 144/256 = 0.5625 of it already taken by A -> dropped. C (B dropped): 128/256 = 0.5,
    # not > 0.5 -> kept with its 128 free pixels.
    inp = _inputs(boxes, [0.9, 0.8, 0.7, 0.6], valid=[True, True, True, False])
    out = _merge(inp, stuff_area_limit=10)
    _check_table(out, inp)
    seg = out["segments"]
    np.testing.assert_array_equal(seg["area"][0, :D], [256, 0, 128, 0])
    np.testing.assert_array_equal(seg["valid"][0, :D], [True, False, True, False])
    assert not np.any(out["id_map"][0] == 2)
    assert np.all(out["id_map"][0][_rect(16, 0, 24, 16)] == 3)
    # A stricter threshold drops C as well.
    out = _merge(inp, stuff_area_limit=10, overlap_threshold=0.4)
    np.testing.assert_array_equal(out["segments"]["valid"][0, :D], [True, False, False, False])


def test_instance_score_threshold():
    boxes = [[0, 0, 16, 16], [20, 0, 36, 16], [0, 20, 16, 32], [0, 0, 0, 0]]
    scores = [0.9, 0.45, 0.5, 0.0]
    srm = [0.1, 0.99, 0.2, 0.0]  # the low-score instance ranks first but is still skipped
    inp = _inputs(boxes, scores, srm=srm, valid=[True, True, True, False])
    out = _merge(inp, stuff_area_limit=10)
    _check_table(out, inp)
    np.testing.assert_array_equal(out["segments"]["valid"][0, :D], [True, False, True, False])
    assert np.all(out["id_map"][0][_rect(0, 20, 16, 36)] == D + 1)  # stuff, not the instance
    out = _merge(inp, stuff_area_limit=10, instance_score_thresh=0.4)
    np.testing.assert_array_equal(out["segments"]["area"][0, :D], [256, 256, 192, 0])


def test_stuff_area_limit_and_free_pixels():
    stuff = np.zeros((HP // STRIDE, WP // STRIDE, T + S), np.float32)
    stuff[..., T] = 1.0
    stuff[:3, :3, T + 1] = 2.0  # a small region of stuff class 1 in the top-left corner
    up = _ref_stuff_up(stuff, STRIDE)
    region = np.argmax(up[..., T:], axis=-1) == 1
    n_region = int(region.sum())
    assert 60 < n_region < 200
    inp = _inputs([[0, 0, 0, 0]] * D, [0.0] * D, valid=[False] * D, stuff=stuff)

    out = _merge(inp, stuff_area_limit=n_region + 1)  # too small: void
    _check_table(out, inp)
    assert np.all(out["id_map"][0][region] == 0)
    assert np.all(out["id_map"][0][~region] == D + 1)
    assert not out["segments"]["valid"][0, D + 1] and out["segments"]["area"][0, D + 1] == 0

    out = _merge(inp, stuff_area_limit=n_region)  # exactly at the limit: kept
    _check_table(out, inp)
    assert np.all(out["id_map"][0][region] == D + 2)
    assert out["segments"]["area"][0, D + 1] == n_region
    assert out["segments"]["category"][0, D + 1] == T + 1

    # An instance covering part of the region: only the free pixels count toward the limit.
    inp2 = _inputs(
        [[0, 0, 4, 4]] + [[0, 0, 0, 0]] * 3,
        [0.9, 0, 0, 0],
        stuff=stuff,
        valid=[True, False, False, False],
    )
    out = _merge(inp2, stuff_area_limit=n_region)
    _check_table(out, inp2)
    assert np.all(out["id_map"][0][_rect(0, 0, 4, 4)] == 1)
    assert np.all(out["id_map"][0][region & ~_rect(0, 0, 4, 4)] == 0)
    out = _merge(inp2, stuff_area_limit=n_region - 16)
    assert out["segments"]["area"][0, D + 1] == n_region - 16


def test_padding_never_leaks():
    boxes = [[30, 10, 46, 26], [0, 0, 48, 32], [2, 2, 10, 10], [5, 5, 30, 20]]
    inp = _inputs(
        boxes,
        [0.9, 0.99, 0.8, 0.95],
        srm=[0.5, 9.0, 0.4, 8.0],
        valid=[True, False, True, False],  # slots 1 and 3 are padding with huge scores/keys
        classes=[1, -1, 0, -1],
        image_shape=(24, 40),
    )
    out = _merge(inp, stuff_area_limit=10)
    _check_table(out, inp)
    id_map = out["id_map"][0]
    assert not id_map[24:].any() and not id_map[:, 40:].any()
    assert not np.isin(id_map, [2, 4]).any()
    np.testing.assert_array_equal(out["segments"]["area"][0, :D], [10 * 14, 0, 64, 0])
    assert out["segments"]["area"][0, D] == 24 * 40 - 140 - 64


def test_no_stuff_classes():
    inp = _inputs([[0, 0, 16, 16], [8, 8, 24, 24], [0, 0, 0, 0], [0, 0, 0, 0]], [0.9, 0.8, 0, 0])
    inp["stuff_logits"] = inp["stuff_logits"][..., :T]
    out = _merge(inp)
    _check_table(out, inp)
    assert out["segments"]["area"].shape == (1, D)
    np.testing.assert_array_equal(out["segments"]["area"][0], [256, 192, 0, 0])


# ----------------------------------------------------------------------------------------------
# Random inputs against the float64 reference; compile once.
# ----------------------------------------------------------------------------------------------

RB, RD, RS = 2, 8, 3


def _random_inputs(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.0, 1.0, size=(RB, RD, 7, 7))
    masks = np.kron(coarse, np.ones((4, 4)))  # blocky 28 x 28 probabilities
    xy = rng.uniform([-6, -6], [WP - 8, HP - 8], size=(RB, RD, 2))
    wh = rng.uniform(6, 26, size=(RB, RD, 2))
    boxes = np.concatenate([xy, xy + wh], axis=-1)
    logits = rng.integers(-8, 9, size=(RB, HP // STRIDE, WP // STRIDE, T + RS)) / 4.0
    logits[..., :T] += 5.0  # thing logits are larger; the argmax must ignore them
    logits[..., -1] -= 1.0  # a rarer stuff class, often under the area limit
    return {
        "det_masks": masks.astype(np.float32),
        "det_boxes": boxes.astype(np.float32),
        "det_classes": rng.integers(0, T, size=(RB, RD)).astype(np.int32),
        "det_scores": rng.uniform(0.3, 1.0, size=(RB, RD)).astype(np.float32),
        "det_valid": rng.uniform(size=(RB, RD)) < 0.85,
        "order_key": rng.uniform(size=(RB, RD)).astype(np.float32),
        "stuff_logits": logits.astype(np.float32),  # multiples of 1/4: exact interpolation
        "image_shape": np.stack(
            [rng.integers(20, HP + 1, RB), rng.integers(30, WP + 1, RB)], axis=1
        ).astype(np.int32),
    }


def test_random_against_float64_reference():
    limit = 100
    traces = []

    @jax.jit
    def run(*args):
        traces.append(1)
        return pm.merge_panoptic(
            *args, image_size=(HP, WP), num_thing_classes=T, stuff_area_limit=limit, row_block=5
        )

    keys = (
        "det_masks",
        "det_boxes",
        "det_classes",
        "det_scores",
        "det_valid",
        "order_key",
        "stuff_logits",
        "image_shape",
    )
    stats = {"dropped": 0, "stuff_void": 0, "low_score": 0, "kept": 0}
    checked = 0
    for seed in range(10):
        inp = _random_inputs(seed)
        ref_map, ref_area, margin = _ref_merge(inp, limit=limit)
        if margin < 2e-5:  # float32 vs float64 could legitimately differ at the threshold
            continue
        checked += 1
        out = jax.tree.map(np.asarray, run(*(inp[k] for k in keys)))
        np.testing.assert_array_equal(out["id_map"], ref_map, err_msg=f"seed {seed}")
        np.testing.assert_array_equal(out["segments"]["area"], ref_area, err_msg=f"seed {seed}")
        _check_table(out, inp)
        # Same inputs through the public eager entry point (default row block) agree.
        eager = _merge(inp, stuff_area_limit=limit)
        np.testing.assert_array_equal(eager["id_map"], out["id_map"])
        active = inp["det_valid"] & (inp["det_scores"] >= 0.5)
        stats["low_score"] += int((inp["det_valid"] & ~active).sum())
        stats["kept"] += int(out["segments"]["valid"][:, :RD].sum())
        stats["dropped"] += int((active & ~out["segments"]["valid"][:, :RD]).sum())
        stats["stuff_void"] += int((~out["segments"]["valid"][:, RD:]).sum())
    assert checked >= 8
    assert len(traces) == 1, "new values of the same shapes must not retrace"
    # The random cases exercise every branch.
    assert all(v > 0 for v in stats.values()), stats


def test_no_recompilation_for_new_values():
    inp = _random_inputs(100)
    _merge(inp, stuff_area_limit=60)
    size = pm._merge_panoptic._cache_size()
    for seed in (101, 102):
        _merge(_random_inputs(seed), stuff_area_limit=60)
    assert pm._merge_panoptic._cache_size() == size


def test_stuff_labels_equal_the_merge_stuff_assignment():
    """stuff_labels is the merge's own stuff argmax: a merge with no instance and no area limit
    paints every in-image pixel with segment D + 1 + s."""
    from oanet_jax.panoptic.merge import merge_panoptic, stuff_labels

    rng = np.random.default_rng(3)
    b, t, s, d = 2, 2, 3, 1
    logits = jnp.asarray(rng.normal(size=(b, 8, 12, t + s)), jnp.float32)
    shape = jnp.array([[32, 48], [25, 30]], jnp.int32)
    zeros = jnp.zeros
    id_map = merge_panoptic(
        zeros((b, d, 28, 28)),
        zeros((b, d, 4)),
        zeros((b, d), jnp.int32),
        zeros((b, d)),
        zeros((b, d), bool),
        zeros((b, d)),
        logits,
        shape,
        image_size=(32, 48),
        num_thing_classes=t,
        stuff_area_limit=0,
    )["id_map"]
    labels = stuff_labels(logits, shape, image_size=(32, 48), num_thing_classes=t)
    expected = np.where(np.asarray(id_map) > 0, np.asarray(id_map) - (d + 1), -1)
    np.testing.assert_array_equal(np.asarray(labels), expected)
    assert (np.asarray(labels)[1, 25:] == -1).all() and (np.asarray(labels)[1, :, 30:] == -1).all()
    assert set(np.unique(np.asarray(labels)[0])) <= {0, 1, 2}


def _labels(inp: dict, **kwargs) -> jax.Array:
    """`stuff_labels` of the test inputs (the argmax inference shares between the merges)."""
    return pm.stuff_labels(
        jnp.asarray(inp["stuff_logits"]),
        jnp.asarray(inp["image_shape"]),
        image_size=(HP, WP),
        num_thing_classes=T,
        stride=STRIDE,
        **kwargs,
    )


def test_shared_stuff_label_map_gives_the_same_merge():
    """A merge given `stuff_labels`' output (the argmax shared by several orderings) equals the
    merge that computes the argmax itself, for both orderings."""
    for seed in (0, 1):
        inp = _random_inputs(seed)
        labels = _labels(inp)
        for key in (inp["order_key"], inp["det_scores"]):
            inp = {**inp, "order_key": key}
            want = _merge(inp, stuff_area_limit=60)
            got = _merge(inp, stuff_area_limit=60, stuff_label_map=labels)
            jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("thing_pixels", ["stuff", "void"])
@pytest.mark.parametrize("unit", ["class", "region"])
def test_merge_options_against_float64_reference(thing_pixels, unit):
    """thing_pixels, per-class or per-region area limits, and areas in original pixels: the jitted
    merge equals the loop reference (regions by scipy.ndimage.label)."""
    limit = 40
    checked = 0
    for seed in range(4):
        inp = _random_inputs(seed)
        rng = np.random.default_rng(seed + 50)
        # Thing logits win on about half the pixels (blocks), so 'void' has work to do.
        offset = np.where(rng.random(inp["stuff_logits"].shape[:3]) < 0.5, 5.0, -5.0)
        inp["stuff_logits"][..., :T] += offset[..., None].astype(np.float32) - 5.0
        # Original sizes: integer multiples of the resized image (area ratios exact in float32).
        ratios = np.array([(1, 1), (2, 1), (2, 2), (3, 1)])[: len(inp["image_shape"])]
        orig = inp["image_shape"] * ratios
        scale = ratios.prod(axis=1)
        ref_map, ref_area, margin = _ref_merge(
            inp,
            limit=limit,
            thing_void=thing_pixels == "void",
            region=unit == "region",
            area_scale=scale,
        )
        if margin < 2e-5:
            continue
        checked += 1
        options = dict(
            stuff_area_limit=limit,
            orig_shape=orig.astype(np.int32),
            thing_pixels=thing_pixels,
            stuff_area_unit=unit,
        )
        out = _merge(inp, **options)
        np.testing.assert_array_equal(out["id_map"], ref_map, err_msg=f"seed {seed}")
        np.testing.assert_array_equal(out["segments"]["area"], ref_area, err_msg=f"seed {seed}")
        _check_table(out, inp)
        # The shared label map (as inference computes it once) gives the same merge.
        labels = _labels(inp, thing_pixels=thing_pixels)
        shared = _merge(inp, **options, stuff_label_map=labels)
        np.testing.assert_array_equal(shared["id_map"], out["id_map"])
    assert checked >= 3


def test_thing_pixels_and_region_limit_by_hand():
    """Hand-made: a thing-dominated half stays void with 'void'; two regions of one stuff class,
    one under the limit, only the small one removed per region; original-pixel areas."""
    stuff = np.zeros((HP // STRIDE, WP // STRIDE, T + S), np.float32)
    stuff[..., T] = 1.0  # stuff class 0 everywhere ...
    stuff[:, : WP // STRIDE // 2, 0] = 3.0  # ... but thing class 0 wins on the left half
    inp = _inputs([[0, 0, 0, 0]] * D, [0.0] * D, valid=[False] * D, stuff=stuff)
    left = np.zeros((HP, WP), bool)
    up = _ref_stuff_up(stuff, STRIDE)[:HP, :WP]
    left[np.argmax(up, axis=-1) < T] = True
    assert 0 < left.sum() < HP * WP
    out = _merge(inp, stuff_area_limit=1, thing_pixels="void")
    assert np.all(out["id_map"][0][left] == 0) and np.all(out["id_map"][0][~left] == D + 1)
    out = _merge(inp, stuff_area_limit=1, thing_pixels="stuff")
    assert np.all(out["id_map"][0] == D + 1)

    stuff = np.zeros((HP // STRIDE, WP // STRIDE, T + S), np.float32)
    stuff[..., T + 1] = 1.0  # class 1 background; class 0 in two separate blobs
    stuff[:2, :2, T] = 4.0
    stuff[4:, 6:, T] = 4.0
    up = _ref_stuff_up(stuff, STRIDE)[:HP, :WP]
    comp, n = ndimage.label(np.argmax(up[..., T:], axis=-1) == 0)
    assert n == 2
    small, big = sorted((comp == k).sum() for k in (1, 2))
    inp = _inputs([[0, 0, 0, 0]] * D, [0.0] * D, valid=[False] * D, stuff=stuff)
    per_class = _merge(inp, stuff_area_limit=big + 1)  # the class totals small + big: kept
    assert per_class["segments"]["area"][0, D] == small + big
    per_region = _merge(inp, stuff_area_limit=big, stuff_area_unit="region")
    assert per_region["segments"]["area"][0, D] == big  # the small blob is removed
    # Areas in original pixels: an original twice as large per side counts 4x.
    orig = np.array([[2 * HP, 2 * WP]], np.int32)
    scaled = _merge(inp, stuff_area_limit=4 * small, stuff_area_unit="region", orig_shape=orig)
    assert scaled["segments"]["area"][0, D] == small + big
    scaled = _merge(inp, stuff_area_limit=4 * small + 1, stuff_area_unit="region", orig_shape=orig)
    assert scaled["segments"]["area"][0, D] == big
    with pytest.raises(ValueError, match="thing_pixels"):
        _merge(inp, thing_pixels="other")
    with pytest.raises(ValueError, match="stuff_area_unit"):
        _merge(inp, stuff_area_unit="segment")
