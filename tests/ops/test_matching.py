"""Tests for oanet_jax.ops.matching against a float64 loop and torchvision's Matcher."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oanet_jax.ops import matching as M

torch = pytest.importorskip("torch")
from torchvision.models.detection._utils import Matcher as TVMatcher  # noqa: E402

INF = math.inf


def ref_match(
    sim,
    thresholds=(0.3, 0.7),
    labels=(0, -1, 1),
    allow_lq=False,
    valid=None,
    ignore=None,
    ignore_sim=None,
    ignore_thr=0.7,
    ignore_label=-1,
):
    """Slow float64 loop with detectron2 Matcher semantics.

    Thresholds are rounded to float32 first: detectron2 compares a float32 IoU tensor with a
    Python float, which torch casts to float32 (so an IoU of float32(0.7) is >= 0.7).
    """
    sim = np.asarray(sim, np.float64)
    g_count, n_count = sim.shape
    valid = np.ones(g_count, bool) if valid is None else np.asarray(valid, bool)
    thr = [float(np.float32(t)) for t in thresholds]
    bounds = [-INF, *thr, INF]
    matchable = [g for g in range(g_count) if valid[g] and not (ignore is not None and ignore[g])]
    idx = np.zeros(n_count, np.int64)
    lab = np.full(n_count, labels[0], np.int64)
    if matchable:
        for n in range(n_count):
            best, best_g = -INF, 0
            for g in matchable:
                if sim[g, n] > best:  # strict: the first gt wins ties
                    best, best_g = sim[g, n], g
            idx[n] = best_g
            for i, label in enumerate(labels):
                if bounds[i] <= best < bounds[i + 1]:
                    lab[n] = label
        if allow_lq:
            for g in matchable:
                top = max(sim[g, n] for n in range(n_count))
                for n in range(n_count):
                    if sim[g, n] == top:
                        lab[n] = 1
    if ignore is not None:
        isim = sim if ignore_sim is None else np.asarray(ignore_sim, np.float64)
        for n in range(n_count):
            if lab[n] == 1:
                continue
            for g in range(g_count):
                if valid[g] and ignore[g] and isim[g, n] >= float(np.float32(ignore_thr)):
                    lab[n] = ignore_label
    return idx, lab


def tied_similarity(rng, g, n):
    """Sparse float32 IoU-like values on a 0.1 grid: many ties, values exactly at 0.3 / 0.7."""
    vals = rng.integers(0, 11, size=(g, n)) / 10.0
    return np.where(rng.uniform(size=(g, n)) < 0.6, 0.0, vals).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("thresholds", "labels", "allow_low_quality_matches"))
def jmatch(
    sim, gt_valid, thresholds=(0.3, 0.7), labels=(0, -1, 1), allow_low_quality_matches=False
):
    return M.match(sim, thresholds, labels, allow_low_quality_matches, gt_valid)


@pytest.mark.parametrize("allow_lq", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_random_ties_and_padding_match_reference(seed, allow_lq):
    rng = np.random.default_rng(seed)
    g, n = 7, 60
    sim = tied_similarity(rng, g, n)
    valid = np.ones(g, bool)
    valid[[2, 5]] = False
    sim[[2, 5]] = rng.uniform(0.9, 1.0, size=(2, n))  # padding would win everything if used
    if seed == 3:
        sim[:, :] = np.round(sim * 2) / 2  # even coarser: {0, 0.5, 1}
    idx, lab = jmatch(sim, valid, allow_low_quality_matches=allow_lq)
    assert idx.dtype == jnp.int32 and lab.dtype == jnp.int32 and idx.shape == lab.shape == (n,)
    ref_idx, ref_lab = ref_match(sim, allow_lq=allow_lq, valid=valid)
    np.testing.assert_array_equal(np.asarray(idx), ref_idx)
    np.testing.assert_array_equal(np.asarray(lab), ref_lab)
    assert not np.isin(np.asarray(idx), [2, 5]).any()
    assert set(np.unique(ref_lab)) == {-1, 0, 1}  # the case exercises all three labels


@pytest.mark.parametrize("allow_lq", [False, True])
def test_agrees_with_torchvision_matcher_on_valid_rows(allow_lq):
    rng = np.random.default_rng(10)
    g, n = 9, 80
    sim = np.where(
        rng.uniform(size=(g, n)) < 0.5, tied_similarity(rng, g, n), rng.uniform(size=(g, n))
    ).astype(np.float32)
    valid = rng.uniform(size=g) < 0.7
    valid[0] = True
    idx, lab = jmatch(sim, valid, allow_low_quality_matches=allow_lq)
    idx, lab = np.asarray(idx), np.asarray(lab)
    rows = np.flatnonzero(valid)
    tv = TVMatcher(0.7, 0.3, allow_low_quality_matches=allow_lq)(torch.from_numpy(sim[rows]))
    tv = tv.numpy()
    tv_lab = np.where(tv >= 0, 1, np.where(tv == -1, 0, -1))
    np.testing.assert_array_equal(lab, tv_lab)
    pos = tv >= 0
    np.testing.assert_array_equal(idx[pos], rows[tv[pos]])


def test_low_quality_ties_and_matched_index_stay_argmax():
    sim = np.array(
        [
            [0.4, 0.4, 0.1, 0.0],  # gt0: best 0.4, tied between predictions 0 and 1
            [0.5, 0.0, 0.2, 0.0],  # gt1: best 0.5 at prediction 0 (which also argmaxes to gt1)
            [0.0, 0.0, 0.0, 0.9],  # padded: ignored
        ],
        np.float32,
    )
    valid = np.array([True, True, False])
    idx, lab = jmatch(sim, valid, allow_low_quality_matches=True)
    np.testing.assert_array_equal(np.asarray(lab), [1, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(idx), [1, 0, 1, 0])
    idx, lab = jmatch(sim, valid, allow_low_quality_matches=False)
    np.testing.assert_array_equal(np.asarray(lab), [-1, -1, 0, 0])
    # detectron2 quirk (documented): a valid gt overlapping nothing makes all zero-IoU
    # predictions positive under low-quality matching.
    sim0 = np.array([[0.0, 0.0, 0.0], [0.8, 0.0, 0.0]], np.float32)
    _, lab = jmatch(sim0, np.array([True, True]), allow_low_quality_matches=True)
    np.testing.assert_array_equal(np.asarray(lab), [1, 1, 1])
    np.testing.assert_array_equal(
        np.asarray(lab), ref_match(sim0, allow_lq=True, valid=[True, True])[1]
    )


@pytest.mark.parametrize("allow_lq", [False, True])
def test_no_valid_gt_is_all_background(allow_lq):
    rng = np.random.default_rng(3)
    sim = rng.uniform(size=(4, 30)).astype(np.float32)
    idx, lab = jmatch(sim, np.zeros(4, bool), allow_low_quality_matches=allow_lq)
    np.testing.assert_array_equal(np.asarray(idx), np.zeros(30))
    np.testing.assert_array_equal(np.asarray(lab), np.zeros(30))
    # Background is labels[0], whatever it is.
    _, lab = jmatch(sim, np.zeros(4, bool), labels=(7, -1, 1))
    np.testing.assert_array_equal(np.asarray(lab), np.full(30, 7))
    # G == 0 (no rows at all).
    idx, lab = M.match(np.zeros((0, 5), np.float32), allow_low_quality_matches=allow_lq)
    assert idx.shape == lab.shape == (5,)
    np.testing.assert_array_equal(np.asarray(lab), np.zeros(5))


@pytest.mark.parametrize(
    ("thresholds", "labels"), [((0.5,), (0, 1)), ((0.4, 0.5), (0, -1, 1)), ((0.3, 0.7), (-1, 0, 1))]
)
def test_other_threshold_label_sets(thresholds, labels):
    rng = np.random.default_rng(4)
    sim = tied_similarity(rng, 5, 50)
    valid = np.array([True, True, True, False, True])
    idx, lab = jmatch(sim, valid, thresholds=thresholds, labels=labels)
    ref_idx, ref_lab = ref_match(sim, thresholds, labels, valid=valid)
    np.testing.assert_array_equal(np.asarray(idx), ref_idx)
    np.testing.assert_array_equal(np.asarray(lab), ref_lab)
    with pytest.raises(ValueError):
        M.match(sim, thresholds, labels[:-1])


@pytest.mark.parametrize("allow_lq", [False, True])
def test_crowd_ignore(allow_lq):
    rng = np.random.default_rng(5)
    g, n = 6, 50
    sim = tied_similarity(rng, g, n)
    isim = tied_similarity(rng, g, n)
    valid = np.array([True, True, True, True, False, True])
    ignore = np.array([False, True, False, False, True, False])
    for ignore_sim in (None, isim):
        idx, lab = M.match(sim, (0.3, 0.7), (0, -1, 1), allow_lq, valid, ignore, ignore_sim, 0.6)
        ref_idx, ref_lab = ref_match(
            sim, allow_lq=allow_lq, valid=valid, ignore=ignore, ignore_sim=ignore_sim,
            ignore_thr=0.6,
        )  # fmt: skip
        np.testing.assert_array_equal(np.asarray(idx), ref_idx)
        np.testing.assert_array_equal(np.asarray(lab), ref_lab)
        assert not np.isin(np.asarray(idx), [1, 4]).any()  # crowd / padding never matched
    # Only crowd: all background except inside the crowd region.
    only = np.array([False, True, False, False, False, False])
    _, lab = M.match(sim, gt_valid=only, gt_ignore=only, ignore_threshold=0.6)
    np.testing.assert_array_equal(np.asarray(lab), np.where(sim[1] >= np.float32(0.6), -1, 0))


def test_jit_vmap_batch_no_retrace():
    n_traces = [0]

    def fn(sim, valid):
        n_traces[0] += 1
        return M.match(sim, allow_low_quality_matches=True, gt_valid=valid)

    batched = jax.jit(jax.vmap(fn))
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        sim = tied_similarity(rng, 3 * 5, 40).reshape(3, 5, 40)
        valid = rng.uniform(size=(3, 5)) < 0.6
        valid[0] = False  # one image without ground truth
        idx, lab = batched(sim, valid)
        assert idx.shape == lab.shape == (3, 40)
        for b in range(3):
            ref_idx, ref_lab = ref_match(sim[b], allow_lq=True, valid=valid[b])
            np.testing.assert_array_equal(np.asarray(idx[b]), ref_idx)
            np.testing.assert_array_equal(np.asarray(lab[b]), ref_lab)
    assert n_traces[0] == 1
