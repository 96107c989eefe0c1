"""Tests for oanet_jax.ops.nms against torchvision.ops.nms / batched_nms and a numpy greedy loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oanet_jax.ops.nms import batched_nms, nms

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

THRESHOLDS = (0.3, 0.5, 0.7)
# Most tests share these static shapes so that jit compiles each variant once per session.
N = 300  # not a multiple of the tile
TILE = 64


# ----------------------------------------------------------------------------- data & references
def _distinct_scores(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n] float32 scores in (0, 1] without exact ties (a random permutation of k / n)."""
    return ((rng.permutation(n) + 1) / n).astype(np.float32)


def _random_boxes(rng: np.random.Generator, n: int, size: float = 512.0) -> np.ndarray:
    """[n, 4] float32 RPN-like boxes: uniform centres, log-uniform sides, clipped to the image."""
    cx, cy = rng.uniform(0.0, size, (2, n))
    w, h = np.exp(rng.uniform(np.log(8.0), np.log(size / 2), (2, n)))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return boxes.clip(0.0, size).astype(np.float32)


def _cluster_boxes(rng: np.random.Generator, n: int, clusters: int = 12) -> np.ndarray:
    """[n, 4] float32 boxes in overlapping clusters of jittered copies (IoUs spread widely)."""
    base = _random_boxes(rng, clusters, 256.0)
    base[:, 2:] = np.maximum(base[:, 2:], base[:, :2] + 8.0)
    pick = rng.integers(0, clusters, n)
    wh = (base[pick, 2:] - base[pick, :2]).repeat(2, axis=1)
    jitter = rng.normal(0.0, 0.08, (n, 4)) * wh
    boxes = base[pick] + jitter
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 0.5)
    return boxes.astype(np.float32)


def _tv_nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> np.ndarray:
    return torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).numpy()


def _tv_batched_nms(boxes, scores, classes, thr) -> np.ndarray:
    return torchvision.ops.batched_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes), thr
    ).numpy()


def _numpy_greedy(boxes: np.ndarray, scores: np.ndarray, thr: float) -> np.ndarray:
    """Plain float32 greedy NMS loop with a STABLE descending sort (ties: lower index first)."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept: list[int] = []
    for i in order:
        ok = True
        for j in kept:
            w = max(np.float32(0), min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
            h = max(np.float32(0), min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
            inter = np.float32(w * h)
            with np.errstate(invalid="ignore", divide="ignore"):
                iou = inter / np.float32(area[j] + area[i] - inter)
            if iou > thr:
                ok = False
                break
        if ok:
            kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)


def _kept(result) -> np.ndarray:
    idx, valid = (np.asarray(a) for a in result)
    assert idx.dtype == np.int32 and valid.dtype == np.bool_
    # Valid entries form a prefix; padding entries carry index 0.
    n_valid = int(valid.sum())
    assert valid[:n_valid].all() and not valid[n_valid:].any()
    assert (idx[~valid] == 0).all()
    return idx[valid]


# ----------------------------------------------------------------------------- nms vs torchvision
@pytest.mark.parametrize("n", [N, 45])  # 45: smaller than one tile
def test_nms_matches_torchvision_random(n):
    rng = np.random.default_rng(n)
    for seed in range(6):
        boxes = _random_boxes(rng, n)
        scores = _distinct_scores(rng, n)
        for thr in THRESHOLDS:
            ref = _tv_nms(boxes, scores, thr)
            got = _kept(nms(boxes, scores, thr, n, tile_size=TILE))
            np.testing.assert_array_equal(got, ref, err_msg=f"seed {seed} thr {thr}")


def test_nms_matches_torchvision_clusters():
    rng = np.random.default_rng(7)
    for seed in range(10):
        boxes = _cluster_boxes(rng, N, clusters=int(rng.integers(5, 40)))
        scores = _distinct_scores(rng, N)
        for thr in THRESHOLDS:
            ref = _tv_nms(boxes, scores, thr)
            assert len(ref) < N  # the clusters really suppress
            got = _kept(nms(boxes, scores, thr, N, tile_size=TILE))
            np.testing.assert_array_equal(got, ref, err_msg=f"seed {seed} thr {thr}")


def test_nms_max_output_truncates_and_pads():
    rng = np.random.default_rng(3)
    for _ in range(4):
        boxes = _cluster_boxes(rng, N, clusters=60)
        scores = _distinct_scores(rng, N)
        for thr in THRESHOLDS:
            ref = _tv_nms(boxes, scores, thr)
            # Fewer slots than kept boxes: the first max_output of torchvision's list.
            assert len(ref) > 40
            got = _kept(nms(boxes, scores, thr, 40, tile_size=TILE))
            np.testing.assert_array_equal(got, ref[:40])
            # More slots than boxes: all kept, the rest padded.
            got = _kept(nms(boxes, scores, thr, N + 50, tile_size=TILE))
            np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("n", [N, 45])
def test_nms_chain_needs_many_fixed_point_passes(n):
    # Box i overlaps i+1 with IoU 0.6 and i+2 with IoU ~0.33: greedy keeps every other box, and
    # inside a tile each decision depends on the previous one (worst case for the fixed point).
    x = np.arange(n, dtype=np.float32) * 25.0
    boxes = np.stack([x, np.zeros(n), x + 100.0, np.full(n, 100.0)], axis=1).astype(np.float32)
    scores = np.linspace(1.0, 0.1, n, dtype=np.float32)
    for thr in (0.5, 0.7, 0.3):
        ref = _tv_nms(boxes, scores, thr)
        np.testing.assert_array_equal(_kept(nms(boxes, scores, thr, n, tile_size=TILE)), ref)
    assert len(_tv_nms(boxes, scores, 0.5)) == (n + 1) // 2


def test_nms_degenerate_zero_area_boxes():
    rng = np.random.default_rng(11)
    for _ in range(5):
        boxes = _cluster_boxes(rng, N, clusters=20)
        flat = rng.random(N) < 0.3
        boxes[flat, 2] = boxes[flat, 0]  # zero width
        flat_h = rng.random(N) < 0.2
        boxes[flat_h, 3] = boxes[flat_h, 1]  # zero height
        boxes[:10] = boxes[10]  # identical boxes, possibly degenerate
        boxes[20:25] = 5.0  # points
        scores = _distinct_scores(rng, N)
        for thr in THRESHOLDS:
            ref = _tv_nms(boxes, scores, thr)
            np.testing.assert_array_equal(_kept(nms(boxes, scores, thr, N, tile_size=TILE)), ref)


def test_nms_ties_are_stable_by_index():
    # Documented tie-break: equal scores keep the lower input index first (a stable sort).
    rng = np.random.default_rng(5)
    for _ in range(3):
        boxes = np.round(_cluster_boxes(rng, N, clusters=15))
        scores = rng.integers(0, 8, N).astype(np.float32) / 8  # many exact ties
        for thr in THRESHOLDS:
            ref = _numpy_greedy(boxes, scores, thr)
            np.testing.assert_array_equal(_kept(nms(boxes, scores, thr, N, tile_size=TILE)), ref)


# ----------------------------------------------------------------------------- padding
def test_padded_boxes_never_valid():
    rng = np.random.default_rng(17)
    for _ in range(4):
        boxes = _cluster_boxes(rng, N, clusters=30)
        scores = _distinct_scores(rng, N)
        valid = rng.random(N) < 0.7
        neg_inf = rng.random(N) < 0.1
        scores_in = np.where(neg_inf, -np.inf, scores).astype(np.float32)
        # Padding gets the highest scores so that, if it took part, it would suppress real boxes.
        scores_in = np.where(valid, scores_in, 2.0).astype(np.float32)
        real = np.flatnonzero(valid & ~neg_inf)
        for thr in THRESHOLDS:
            ref = real[_tv_nms(boxes[real], scores[real], thr)]
            got = _kept(nms(boxes, scores_in, thr, N, valid=valid, tile_size=TILE))
            np.testing.assert_array_equal(got, ref)
            assert np.all(valid[got]) and np.all(np.isfinite(scores_in[got]))

    # Nothing valid at all -> nothing comes out.
    all_inf = np.full(N, -np.inf, np.float32)
    idx, out_valid = nms(boxes, all_inf, 0.5, N, tile_size=TILE)
    assert not np.asarray(out_valid).any() and (np.asarray(idx) == 0).all()
    _, out_valid = nms(boxes, scores, 0.5, N, valid=np.zeros(N, bool), tile_size=TILE)
    assert not np.asarray(out_valid).any()


# ----------------------------------------------------------------------------- batched_nms
def test_batched_nms_matches_torchvision_coordinate_trick_path():
    # Small N: torchvision offsets boxes per class. Coordinates on a 1/8 px grid keep the offset
    # arithmetic exact, so both formulations give identical IoUs.
    rng = np.random.default_rng(29)
    for _ in range(5):
        boxes = (np.round(_cluster_boxes(rng, N, clusters=20) * 8) / 8).astype(np.float32)
        scores = _distinct_scores(rng, N)
        classes = rng.integers(0, 4, N).astype(np.int64)
        valid = rng.random(N) < 0.8
        real = np.flatnonzero(valid)
        for thr in THRESHOLDS:
            ref = _tv_batched_nms(boxes, scores, classes, thr)
            assert len(ref) > len(_tv_nms(boxes, scores, thr))  # classes really matter
            got = _kept(batched_nms(boxes, scores, classes, thr, N, tile_size=TILE))
            np.testing.assert_array_equal(got, ref)
            ref_v = real[_tv_batched_nms(boxes[real], scores[real], classes[real], thr)]
            got_v = _kept(batched_nms(boxes, scores, classes, thr, N, valid=valid, tile_size=TILE))
            np.testing.assert_array_equal(got_v, ref_v)


def test_large_inputs_match_torchvision():
    # N * 4 > 4000: torchvision's batched_nms runs per-class NMS on the original coordinates.
    # Default tile (256, N not a multiple); nms also checks the early stop at max_output=1000.
    rng = np.random.default_rng(23)
    n = 1500
    boxes = _random_boxes(rng, n, 1024.0)
    boxes[::2] = _cluster_boxes(rng, n // 2, clusters=40) * 4.0
    scores = _distinct_scores(rng, n)
    classes = rng.integers(0, 5, n).astype(np.int64)
    for thr in THRESHOLDS:
        ref = _tv_nms(boxes, scores, thr)
        np.testing.assert_array_equal(_kept(nms(boxes, scores, thr, 1000)), ref[:1000])
        ref = _tv_batched_nms(boxes, scores, classes, thr)
        np.testing.assert_array_equal(_kept(batched_nms(boxes, scores, classes, thr, n)), ref)


# ----------------------------------------------------------------------------- jit / vmap
def test_jit_vmap_no_recompilation():
    rng = np.random.default_rng(31)
    b, k = 3, 200
    traces = {"nms": 0, "batched": 0}

    def per_image(boxes, scores, classes, valid, thr):
        traces["nms"] += 1
        return nms(boxes, scores, thr, k, valid=valid, tile_size=TILE)

    def per_image_batched(boxes, scores, classes, valid, thr):
        traces["batched"] += 1
        return batched_nms(boxes, scores, classes, thr, k, valid=valid, tile_size=TILE)

    f = jax.jit(jax.vmap(per_image, in_axes=(0, 0, 0, 0, None)))
    g = jax.jit(jax.vmap(per_image_batched, in_axes=(0, 0, 0, 0, None)))
    for step, thr in enumerate((0.5, 0.7, 0.3)):
        make = _cluster_boxes if step % 2 else _random_boxes
        boxes = np.stack([make(rng, N) for _ in range(b)])
        scores = np.stack([_distinct_scores(rng, N) for _ in range(b)])
        classes = rng.integers(0, 3, (b, N)).astype(np.int32)
        valid = rng.random((b, N)) < 0.9
        thr_arr = jnp.float32(thr)
        idx, ok = f(boxes, scores, classes, valid, thr_arr)
        bidx, bok = g(boxes, scores, classes, valid, thr_arr)
        assert idx.shape == (b, k) and ok.shape == (b, k)
        for i in range(b):
            real = np.flatnonzero(valid[i])
            ref = real[_tv_nms(boxes[i][real], scores[i][real], thr)][:k]
            np.testing.assert_array_equal(_kept((idx[i], ok[i])), ref)
            cls = classes[i][real].astype(np.int64)
            ref_b = real[_tv_batched_nms(boxes[i][real], scores[i][real], cls, thr)][:k]
            np.testing.assert_array_equal(_kept((bidx[i], bok[i])), ref_b)
    assert traces == {"nms": 1, "batched": 1}
