"""Tests for oanet_jax.modeling.targets against float64 numpy references of detectron2's
Matcher / subsample_labels / label_and_sample_proposals semantics."""

import jax
import numpy as np
import pytest

from oanet_jax.modeling import targets as T

# ----------------------------------------------------------------------------- numpy references


def np_iou(a, b):
    a = np.asarray(a, np.float64)[:, None, :]
    b = np.asarray(b, np.float64)[None, :, :]
    lt = np.maximum(a[..., :2], b[..., :2])
    rb = np.minimum(a[..., 2:], b[..., 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def np_match(sim, thresholds, labels, allow_low_quality):
    """detectron2 Matcher on an [G, N] float64 matrix of the usable ground truth only."""
    g, n = sim.shape
    if g == 0:
        return np.zeros(n, np.int64), np.full(n, labels[0], np.int64)
    vals = sim.max(0)
    idx = sim.argmax(0)
    out = np.full(n, labels[0], np.int64)
    bounds = [-np.inf, *thresholds, np.inf]
    for lab, lo, hi in zip(labels, bounds[:-1], bounds[1:], strict=True):
        out[(vals >= lo) & (vals < hi)] = lab
    if allow_low_quality:
        best = sim.max(1, keepdims=True)
        out[np.any(sim == best, axis=0)] = 1
    return idx, out


def np_encode(boxes, refs, weights):
    boxes = np.asarray(boxes, np.float64)
    refs = np.asarray(refs, np.float64)
    wx, wy, ww, wh = weights
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    rw, rh = refs[:, 2] - refs[:, 0], refs[:, 3] - refs[:, 1]
    bx, by = boxes[:, 0] + 0.5 * bw, boxes[:, 1] + 0.5 * bh
    rx, ry = refs[:, 0] + 0.5 * rw, refs[:, 1] + 0.5 * rh
    return np.stack(
        [wx * (bx - rx) / rw, wy * (by - ry) / rh, ww * np.log(bw / rw), wh * np.log(bh / rh)], 1
    )


def np_usable(boxes, valid, crowd):
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return valid & ~crowd & (w > 1e-5) & (h > 1e-5)


def int_boxes(rng, n, size, min_side=4, max_side=40):
    """Random boxes with integer corners inside [0, size)."""
    w = rng.integers(min_side, max_side, n)
    h = rng.integers(min_side, max_side, n)
    x1 = rng.integers(0, size - w)
    y1 = rng.integers(0, size - h)
    return np.stack([x1, y1, x1 + w, y1 + h], 1).astype(np.float32)


def jitter(rng, boxes, amount):
    return (boxes + rng.integers(-amount, amount + 1, boxes.shape)).astype(np.float32)


# ----------------------------------------------------------------------------- RPN targets

_rpn = jax.jit(
    T.rpn_targets,
    static_argnames=(
        "iou_thresholds",
        "batch_size_per_image",
        "positive_fraction",
        "box_weights",
        "boundary_thresh",
        "crowd_ioa_threshold",
    ),
)


def make_rpn_case(seed, num_anchors=600, size=128):
    rng = np.random.default_rng(seed)
    anchors = int_boxes(rng, num_anchors, size, 8, 64)
    m = 8
    gt = jitter(rng, anchors[rng.choice(num_anchors, m, replace=False)], 3)
    gt = np.clip(gt, 0, size).astype(np.float32)
    valid = np.ones(m, bool)
    crowd = np.zeros(m, bool)
    # Padded rows with junk identical to anchors; a crowd row identical to an anchor; an empty box.
    valid[6:] = False
    gt[6] = anchors[5]
    gt[7] = anchors[7]
    crowd[1] = True
    gt[1] = anchors[11]
    gt[2] = [30, 30, 30, 50]  # zero width: filtered like detectron2's filter_empty_instances
    return anchors, gt, valid, crowd


def check_rpn(out, anchors, gt, valid, crowd, bs, pf, weights=(1, 1, 1, 1)):
    labels = np.asarray(out["labels"])
    match_labels = np.asarray(out["match_labels"])
    usable = np_usable(gt, valid, crowd)
    sub = np.flatnonzero(usable)
    idx, ref = np_match(np_iou(gt[sub], anchors), (0.3, 0.7), (0, -1, 1), True)
    np.testing.assert_array_equal(match_labels, ref)
    pos, neg = labels == 1, labels == 0
    assert set(np.unique(labels)) <= {-1, 0, 1}
    assert (ref[pos] == 1).all() and (ref[neg] == 0).all()
    num_pos = min(int((ref == 1).sum()), int(bs * pf))
    num_neg = min(int((ref == 0).sum()), bs - num_pos)
    assert (pos.sum(), neg.sum()) == (num_pos, num_neg)
    matched = np.asarray(out["matched_gt"])
    np.testing.assert_array_equal(matched[pos], sub[idx[pos]])
    assert usable[matched[pos]].all(), "crowd / padded / empty GT never matched"
    bt = np.asarray(out["box_targets"])
    want = np_encode(gt[sub[idx[pos]]], anchors[pos], weights)
    np.testing.assert_allclose(bt[pos], want, rtol=1e-5, atol=1e-5)
    assert (bt[~pos] == 0).all()
    return pos, neg


@pytest.mark.parametrize(("bs", "pf"), [(256, 0.5), (16, 0.25)])
def test_rpn_targets_vs_numpy(bs, pf):
    anchors, gt, valid, crowd = make_rpn_case(0)
    key = jax.random.key(3)
    out = _rpn(
        anchors, gt, valid, crowd, np.array([128, 128]), key,
        batch_size_per_image=bs, positive_fraction=pf,
    )  # fmt: skip
    pos, _ = check_rpn(out, anchors, gt, valid, crowd, bs, pf)
    assert pos.sum() > 0
    # Crowd / padded boxes identical to anchors 11, 5 and 7 do not make those anchors positive
    # by themselves: the reference (usable GT only) agrees, and no positive points at them.
    assert not np.isin(np.asarray(out["matched_gt"])[pos], [1, 2, 6, 7]).any()
    # Deterministic for a key, different for another.
    again = _rpn(
        anchors, gt, valid, crowd, np.array([128, 128]), key,
        batch_size_per_image=bs, positive_fraction=pf,
    )  # fmt: skip
    for k in out:
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(again[k]))
    other = _rpn(
        anchors, gt, valid, crowd, np.array([128, 128]), jax.random.key(4),
        batch_size_per_image=bs, positive_fraction=pf,
    )  # fmt: skip
    if bs < 256:
        assert not np.array_equal(np.asarray(out["labels"]), np.asarray(other["labels"]))


def test_rpn_no_gt_and_low_quality():
    anchors, gt, valid, crowd = make_rpn_case(1)
    out = _rpn(anchors, gt, np.zeros_like(valid), crowd, np.array([128, 128]), jax.random.key(0))
    labels = np.asarray(out["labels"])
    assert (labels != 1).all() and (labels == 0).sum() == 256
    assert (np.asarray(out["box_targets"]) == 0).all()
    # One small GT that overlaps every anchor at IoU < 0.3: its best anchors (all ties) are
    # positive through allow_low_quality_matches, nothing else is.
    g = np.tile(np.array([[60, 60, 63, 63]], np.float32), (8, 1))
    only_first = np.arange(8) == 0
    out = _rpn(anchors, g, only_first, np.zeros(8, bool), np.array([128, 128]),
               jax.random.key(0))  # fmt: skip
    iou = np_iou(g[:1], anchors)[0]
    assert iou.max() < 0.3
    best = np.flatnonzero(iou == iou.max())
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(out["match_labels"]) == 1), best)


def test_rpn_crowd_ioa_and_boundary():
    anchors, gt, valid, crowd = make_rpn_case(2)
    gt[1] = [0, 0, 70, 70]  # a big crowd region
    out = _rpn(anchors, gt, valid, crowd, np.array([128, 128]), jax.random.key(1),
               crowd_ioa_threshold=0.7)  # fmt: skip
    ml = np.asarray(out["match_labels"])
    usable = np_usable(gt, valid, crowd)
    sub = np.flatnonzero(usable)
    _, ref = np_match(np_iou(gt[sub], anchors), (0.3, 0.7), (0, -1, 1), True)
    a = anchors.astype(np.float64)
    inter = np.clip(np.minimum(a[:, 2], 70) - a[:, 0], 0, None) * np.clip(
        np.minimum(a[:, 3], 70) - a[:, 1], 0, None
    )
    ioa = inter / ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))
    ref = np.where((ioa >= 0.7) & (ref != 1), -1, ref)
    assert (ioa >= 0.7).sum() > 10
    np.testing.assert_array_equal(ml, ref)

    # boundary_thresh=0 with a 64 x 100 image: anchors sticking out are ignored.
    out = _rpn(anchors, gt, valid, crowd, np.array([64, 100]), jax.random.key(1),
               boundary_thresh=0.0)  # fmt: skip
    inside = (a[:, 0] >= 0) & (a[:, 1] >= 0) & (a[:, 2] < 100) & (a[:, 3] < 64)
    _, ref = np_match(np_iou(gt[sub], anchors), (0.3, 0.7), (0, -1, 1), True)
    np.testing.assert_array_equal(np.asarray(out["match_labels"]), np.where(inside, ref, -1))
    assert (np.asarray(out["labels"])[~inside] == -1).all()


# ----------------------------------------------------------------------------- RoI sampling

_rois = jax.jit(
    T.sample_rois,
    static_argnames=(
        "num_classes",
        "batch_size_per_image",
        "positive_fraction",
        "iou_threshold",
        "box_weights",
    ),
)


def make_roi_case(seed, num_props, size=200):
    rng = np.random.default_rng(seed)
    m = 7
    gt = int_boxes(rng, m, size, 10, 60)
    classes = rng.integers(0, 5, m).astype(np.int32)
    valid = np.array([1, 1, 1, 1, 1, 0, 0], bool)
    crowd = np.array([0, 0, 0, 1, 0, 0, 0], bool)
    gt[5] = [1, 1, 5, 5]  # padded row with junk
    props = np.concatenate(
        [jitter(rng, gt[rng.integers(0, m, num_props // 2)], 6),
         int_boxes(rng, num_props - num_props // 2, size, 5, 80)]
    )  # fmt: skip
    props = np.clip(props, 0, size).astype(np.float32)
    pvalid = rng.uniform(size=num_props) < 0.85
    return props, pvalid, gt, classes, valid, crowd


def np_roi_reference(props, pvalid, gt, classes, valid, crowd, num_classes):
    """Candidates (valid proposals + usable GT) with their class and box target."""
    usable = np_usable(gt, valid, crowd)
    sub = np.flatnonzero(usable)
    cand = np.concatenate([props[pvalid], gt[usable]])
    idx, lab = np_match(np_iou(gt[sub], cand), (0.5,), (0, 1), False)
    cls = np.where(lab == 1, classes[sub[idx]], num_classes)
    bt = np.zeros((len(cand), 4))
    fg = cls < num_classes
    bt[fg] = np_encode(gt[sub[idx[fg]]], cand[fg], (10, 10, 5, 5))
    return cand, cls, bt, sub[idx]


def test_sample_rois_all_candidates_vs_numpy():
    """R larger than the candidate count: the sample is every valid candidate exactly once."""
    c = 5
    props, pvalid, gt, classes, valid, crowd = make_roi_case(0, 40)
    out = _rois(props, pvalid, gt, classes, valid, crowd, jax.random.key(0), num_classes=c,
                batch_size_per_image=512, positive_fraction=0.25)  # fmt: skip
    cand, cls, bt, midx = np_roi_reference(props, pvalid, gt, classes, valid, crowd, c)
    v = np.asarray(out["valid"])
    k = len(cand)
    assert int(v.sum()) == k and (v == (np.arange(512) < k)).all()
    rois = np.asarray(out["rois"])[v]
    order = np.lexsort(rois.T[::-1])
    ref_order = np.lexsort(cand.T[::-1])
    np.testing.assert_array_equal(rois[order], cand[ref_order])
    np.testing.assert_array_equal(np.asarray(out["classes"])[v][order], cls[ref_order])
    np.testing.assert_allclose(np.asarray(out["box_targets"])[v][order], bt[ref_order],
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    fg = np.asarray(out["is_fg"])
    np.testing.assert_array_equal(fg[v][order], cls[ref_order] < c)
    ref_fg = cls[ref_order] < c
    np.testing.assert_array_equal(
        np.asarray(out["matched_gt"])[v][order][ref_fg], midx[ref_order][ref_fg]
    )
    assert (np.asarray(out["matched_gt"])[fg] != 3).all(), "crowd GT never matched"
    assert (np.asarray(out["matched_gt"])[fg] < 5).all(), "padded GT never matched"
    # Every usable GT is a foreground RoI of its own class, matched to itself with IoU 1.
    for g in np.flatnonzero(np_usable(gt, valid, crowd)):
        hit = np.flatnonzero((rois == gt[g]).all(1))
        assert len(hit) == 1
        j = np.flatnonzero(v)[hit[0]]
        assert fg[j] and out["classes"][j] == classes[g] and out["matched_gt"][j] == g
        np.testing.assert_allclose(np.asarray(out["box_targets"])[j], 0, atol=1e-6)
    # Crowd and padded GT boxes are not appended; padding slots are background and invalid.
    assert not (rois == gt[3]).all(1).any() and not (rois == gt[5]).all(1).any()
    assert (np.asarray(out["classes"])[~v] == c).all() and not fg[~v].any()
    assert (np.asarray(out["box_targets"])[~fg] == 0).all()


def test_sample_rois_subsampling_counts():
    c = 5
    props, pvalid, gt, classes, valid, crowd = make_roi_case(1, 400)
    r, pf = 64, 0.25
    cand, cls, _, _ = np_roi_reference(props, pvalid, gt, classes, valid, crowd, c)
    num_fg = min(int((cls < c).sum()), int(r * pf))
    num_bg = min(int((cls == c).sum()), r - num_fg)
    assert (cls < c).sum() > num_fg and num_bg == r - num_fg
    outs = []
    for seed in (0, 0, 1):
        out = _rois(props, pvalid, gt, classes, valid, crowd, jax.random.key(seed),
                    num_classes=c, batch_size_per_image=r, positive_fraction=pf)  # fmt: skip
        outs.append({k: np.asarray(x) for k, x in out.items()})
        fg, v = outs[-1]["is_fg"], outs[-1]["valid"]
        assert fg.sum() == num_fg and v.all()
        rois = outs[-1]["rois"]
        assert len(np.unique(rois, axis=0)) == r, "no candidate drawn twice"
        iou = np_iou(gt[np_usable(gt, valid, crowd)], rois).max(0)
        assert (iou[fg] >= 0.5).all() and (iou[~fg] < 0.5).all()
        # Labels only from the right sets: each sampled box is a candidate with that class.
        for box, k in zip(rois, outs[-1]["classes"], strict=True):
            hit = np.flatnonzero((cand == box).all(1))
            assert len(hit) >= 1 and k in cls[hit]
        g = outs[-1]["matched_gt"][fg]
        np.testing.assert_array_equal(outs[-1]["classes"][fg], classes[g])
        want = np_encode(gt[g], rois[fg], (10, 10, 5, 5))
        np.testing.assert_allclose(outs[-1]["box_targets"][fg], want, rtol=1e-5, atol=1e-4)
    for k in outs[0]:
        np.testing.assert_array_equal(outs[0][k], outs[1][k])
    assert not np.array_equal(outs[0]["rois"], outs[2]["rois"])


def test_sample_rois_no_gt():
    props, pvalid, gt, classes, valid, crowd = make_roi_case(2, 50)
    out = _rois(props, pvalid, gt, classes, np.zeros_like(valid), crowd, jax.random.key(0),
                num_classes=5, batch_size_per_image=32)  # fmt: skip
    assert np.asarray(out["valid"]).all() and not np.asarray(out["is_fg"]).any()
    assert (np.asarray(out["classes"]) == 5).all()
    assert np.isfinite(np.asarray(out["box_targets"])).all()


# ----------------------------------------------------------------------------- mask targets


def np_resample(mask, src, dst, out):
    """Float64 loop: bilinear (zero padded) sample of the box-frame mask at dst cell centres."""
    s = mask.shape[0]
    res = np.zeros((out, out))
    sw, sh = src[2] - src[0], src[3] - src[1]
    for i in range(out):
        for j in range(out):
            x = dst[0] + (j + 0.5) * (dst[2] - dst[0]) / out
            y = dst[1] + (i + 0.5) * (dst[3] - dst[1]) / out
            u = (x - src[0]) / sw * s - 0.5
            v = (y - src[1]) / sh * s - 0.5
            val = 0.0
            for a in range(s):
                wy = max(0.0, 1 - abs(v - a))
                if wy == 0:
                    continue
                for b in range(s):
                    wx = max(0.0, 1 - abs(u - b))
                    val += wy * wx * mask[a, b]
            res[i, j] = val
    return res


def test_mask_targets_vs_numpy_loop():
    rng = np.random.default_rng(0)
    m, s, r, out = 3, 12, 5, 14
    gt = int_boxes(rng, m, 100, 20, 60)
    masks = (rng.uniform(size=(m, s, s)) < 0.6).astype(np.float32)
    matched = rng.integers(0, m, r).astype(np.int32)
    rois = jitter(rng, gt[matched], 8)
    got = np.asarray(jax.jit(T.mask_targets, static_argnums=4)(masks, gt, rois, matched, out))
    assert got.shape == (r, out, out) and got.dtype == np.float32
    assert set(np.unique(got)) <= {0.0, 1.0}
    for k in range(r):
        soft = np_resample(masks[matched[k]], gt[matched[k]].astype(np.float64),
                           rois[k].astype(np.float64), out)  # fmt: skip
        clear = np.abs(soft - 0.5) > 1e-4
        np.testing.assert_array_equal(got[k][clear], (soft >= 0.5)[clear].astype(np.float32))
        assert 0 < got[k].sum() < out * out


# ----------------------------------------------------------------------------- SRM targets


def test_srm_targets_hand_made():
    stride, hp, wp, t = 4, 32, 32, 3
    s = 8
    masks = np.ones((5, s, s), np.float32)
    boxes = np.array(
        [
            [0, 0, 16, 16],  # A, class 1: canvas rows/cols 0..3
            [8, 8, 24, 24],  # B, class 2: canvas 2..5
            [0, 0, 8, 8],  # D, class 1: canvas 0..1 (same class as A: not a conflict)
            [16, 16, 32, 32],  # invalid (padding): pastes nothing
            [24, 0, 32, 8],  # E, class 0, alone: canvas rows 0..1, cols 6..7
        ],
        np.float32,
    )
    classes = np.array([1, 2, 1, 0, 0], np.int32)
    valid = np.array([True, True, True, False, True])
    sem = np.full((hp, wp), 7, np.uint8)  # a stuff class
    sem[:, :12] = 1
    sem[12:, 12:] = 2
    sem[10, 14] = 255  # void at canvas pixel (2, 3)'s sample point
    sem[14, 10] = 9  # stuff at canvas pixel (3, 2)
    sem[10, 10] = 0  # a thing class at (2, 2), different from the overlapping ones: kept
    out = jax.jit(T.srm_targets, static_argnums=(5, 6, 7))(
        masks, boxes, classes, valid, sem, (hp, wp), stride, t
    )
    canvas = np.asarray(out["canvas"])
    assert canvas.shape == (8, 8, t)
    want_canvas = np.zeros((8, 8, t), np.float32)
    want_canvas[0:4, 0:4, 1] = 1
    want_canvas[2:6, 2:6, 2] = 1
    want_canvas[0:2, 6:8, 0] = 1
    np.testing.assert_array_equal(canvas, want_canvas)
    conflict = np.zeros((8, 8), bool)  # A and D (both class 1) overlap on 0:2, 0:2: no conflict
    conflict[2:4, 2:4] = True  # A and B
    np.testing.assert_array_equal(np.asarray(out["conflict"]), conflict)
    want = np.full((8, 8), 255, np.int32)
    want[2, 2] = 0  # sem[10, 10]
    want[2, 3] = 255  # void
    want[3, 2] = 255  # stuff
    want[3, 3] = 2  # sem[14, 14]
    labels = np.asarray(out["labels"])
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, want)
    sem_t = np.asarray(T.semantic_target(sem))
    assert sem_t.dtype == np.int32 and (sem_t == sem).all()


# ----------------------------------------------------------------------------- batching


def test_vmap_jit_no_recompile():
    traces = {"n": 0}
    b = 2

    def per_image(anchors, gt, classes, valid, crowd, masks, sem, shape, props, pvalid, key):
        traces["n"] += 1
        k1, k2 = jax.random.split(key)
        rpn = T.rpn_targets(anchors, gt, valid, crowd, shape, k1, batch_size_per_image=64)
        rois = T.sample_rois(props, pvalid, gt, classes, valid, crowd, k2, num_classes=5,
                             batch_size_per_image=32)  # fmt: skip
        mt = T.mask_targets(masks, gt, rois["rois"], rois["matched_gt"], 28)
        srm = T.srm_targets(masks, gt, classes, valid & ~crowd, sem, (128, 128), 4, 5)
        return rpn, rois, mt, srm

    fn = jax.jit(jax.vmap(per_image, in_axes=(None, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)))
    results = []
    for seed in range(2):
        rng = np.random.default_rng(seed)
        anchors, gt, valid, crowd = make_rpn_case(seed)
        anchors = anchors[:300]
        gts = np.stack([gt, gt[::-1]])
        classes = rng.integers(0, 5, (b, 8)).astype(np.int32)
        props = np.stack([jitter(rng, anchors[:40], 2)] * b)
        masks = (rng.uniform(size=(b, 8, 16, 16)) < 0.5).astype(np.float32)
        sem = rng.integers(0, 8, (b, 128, 128)).astype(np.uint8)
        keys = jax.random.split(jax.random.key(seed), b)
        valids = np.stack([valid, valid[::-1]])
        crowds = np.stack([crowd, crowd[::-1]])
        results.append(fn(anchors, gts, classes, valids, crowds,
                          masks, sem, np.full((b, 2), 128, np.int32), props,
                          np.ones((b, 40), bool), keys))  # fmt: skip
    assert traces["n"] == 1
    rpn, rois, mt, srm = results[0]
    assert rpn["labels"].shape == (b, 300) and rois["rois"].shape == (b, 32, 4)
    assert mt.shape == (b, 32, 28, 28) and srm["labels"].shape == (b, 32, 32)
    # Per-image results under vmap equal the unbatched call with the same key.
    anchors, gt, valid, crowd = make_rpn_case(1)
    k1, _ = jax.random.split(jax.random.split(jax.random.key(1), b)[1])
    single = _rpn(anchors[:300], gt[::-1], valid[::-1], crowd[::-1], np.array([128, 128]), k1,
                  batch_size_per_image=64)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(results[1][0]["labels"][1]),
                                  np.asarray(single["labels"]))  # fmt: skip
