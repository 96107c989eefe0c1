"""Tests for oanet_jax.ops.sampling: detectron2 subsample_labels counts, validity, randomness."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oanet_jax.ops import sampling as S


@functools.partial(jax.jit, static_argnames=("num_samples", "positive_fraction", "bg_label"))
def jsample(labels, valid, key, num_samples, positive_fraction, bg_label=0):
    return S.sample_balanced(labels, num_samples, positive_fraction, key, valid, bg_label)


def expected_counts(labels, valid, num_samples, fraction, bg_label=0):
    """detectron2 subsample_labels: num_pos = min(#pos, int(S f)), num_neg = min(#neg, S - pos)."""
    pos = valid & (labels != -1) & (labels != bg_label)
    neg = valid & (labels == bg_label)
    num_pos = min(int(pos.sum()), int(num_samples * fraction))
    num_neg = min(int(neg.sum()), num_samples - num_pos)
    return pos, neg, num_pos, num_neg


def check_sample(labels, valid, num_samples, fraction, out, bg_label=0):
    labels = np.asarray(labels)
    valid = np.ones(labels.shape, bool) if valid is None else np.asarray(valid)
    idx, slab, svalid = (np.asarray(x) for x in out)
    assert idx.shape == slab.shape == svalid.shape == (num_samples,)
    assert idx.dtype == np.int32 and svalid.dtype == bool
    pos, neg, num_pos, num_neg = expected_counts(labels, valid, num_samples, fraction, bg_label)
    k = num_pos + num_neg
    np.testing.assert_array_equal(svalid, np.arange(num_samples) < k)
    assert pos[idx[:num_pos]].all(), "positive slots must hold valid positives"
    assert neg[idx[num_pos:k]].all(), "negative slots must hold valid negatives"
    assert len(set(idx[:k].tolist())) == k, "no element drawn twice"
    np.testing.assert_array_equal(slab[:k], labels[idx[:k]])
    assert (slab[k:] == -1).all() and (idx[k:] == 0).all()
    return num_pos, num_neg


def make_labels(rng, n, p_pos, p_neg):
    u = rng.uniform(size=n)
    return np.where(u < p_pos, 1, np.where(u < p_pos + p_neg, 0, -1)).astype(np.int32)


@pytest.mark.parametrize(
    ("n", "p_pos", "p_neg", "num_samples", "fraction"),
    [
        (500, 0.05, 0.8, 64, 0.5),  # few positives: filled up with negatives
        (500, 0.5, 0.3, 64, 0.5),  # plenty of both: exactly int(64 * 0.5) positives
        (500, 0.5, 0.02, 64, 0.25),  # few negatives: padding slots at the end
        (300, 0.0, 0.9, 32, 0.5),  # no positives
        (300, 0.3, 0.0, 32, 0.5),  # no negatives
        (300, 0.0, 0.0, 32, 0.5),  # nothing to sample
        (5, 0.4, 0.4, 16, 0.5),  # N < num_samples
        (200, 0.3, 0.6, 50, 0.33),  # int() truncation of 16.5
    ],
)
def test_counts_and_validity(n, p_pos, p_neg, num_samples, fraction):
    rng = np.random.default_rng(n + num_samples)
    labels = make_labels(rng, n, p_pos, p_neg)
    valid = rng.uniform(size=n) < 0.8  # padding entries carry real-looking labels
    for seed in range(3):
        out = jsample(labels, valid, jax.random.key(seed), num_samples, fraction)
        num_pos, num_neg = check_sample(labels, valid, num_samples, fraction, out)
    if p_pos >= 0.5 and p_neg >= 0.3:
        assert num_pos == int(num_samples * fraction) and num_pos + num_neg == num_samples


def test_rpn_defaults_fraction():
    rng = np.random.default_rng(0)
    labels = make_labels(rng, 4000, 0.1, 0.7)
    # valid=None means all entries are eligible.
    out = jax.jit(lambda lab, k: S.sample_balanced(lab, 256, 0.5, k))(labels, jax.random.key(0))
    num_pos, num_neg = check_sample(labels, None, 256, 0.5, out)
    assert (num_pos, num_neg) == (128, 128)
    np.testing.assert_array_equal(np.asarray(out[1]), [1] * 128 + [0] * 128)


def test_other_background_label_roi_style():
    rng = np.random.default_rng(1)
    classes = rng.integers(-1, 5, size=300)  # classes 0..4 (and some -1), background 5
    labels = np.where(rng.uniform(size=300) < 0.5, 5, classes).astype(np.int32)
    valid = rng.uniform(size=300) < 0.9
    out = jsample(labels, valid, jax.random.key(3), 64, 0.25, bg_label=5)
    num_pos, num_neg = check_sample(labels, valid, 64, 0.25, out, bg_label=5)
    assert num_pos == 16 and num_neg == 48
    assert set(np.asarray(out[1])[:16].tolist()) <= {0, 1, 2, 3, 4}


def test_determinism_and_key_dependence():
    rng = np.random.default_rng(2)
    labels = make_labels(rng, 1000, 0.2, 0.6)
    valid = np.ones(1000, bool)
    a = jsample(labels, valid, jax.random.key(42), 128, 0.5)
    b = jsample(labels, valid, jax.random.key(42), 128, 0.5)
    c = jsample(labels, valid, jax.random.key(43), 128, 0.5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert set(np.asarray(a[0]).tolist()) != set(np.asarray(c[0]).tolist())
    # Legacy uint32 keys work too and are deterministic.
    d = S.sample_balanced(labels, 128, 0.5, jax.random.PRNGKey(42), valid)
    e = S.sample_balanced(labels, 128, 0.5, jax.random.PRNGKey(42), valid)
    np.testing.assert_array_equal(np.asarray(d[0]), np.asarray(e[0]))
    check_sample(labels, valid, 128, 0.5, d)


def _chi2(counts, expected):
    return float(((counts - expected) ** 2 / expected).sum())


def test_uniformity_chi_square():
    """Marginal and pairwise inclusion frequencies of a uniform k-subset, loosely."""
    n, trials = 30, 3000
    labels = np.array([1] * 10 + [0] * 15 + [-1] * 5, np.int32)
    valid = np.ones(n, bool)
    valid[[0, 10, 11]] = False  # 9 eligible positives, 13 eligible negatives
    keys = jax.random.split(jax.random.key(123), trials)
    sample = jax.jit(jax.vmap(lambda k: S.sample_balanced(labels, 8, 0.25, k, valid)))
    idx, _, svalid = (np.asarray(x) for x in sample(keys))
    assert svalid.all()
    pos_idx, neg_idx = idx[:, :2], idx[:, 2:]  # 2 of 9 positives, 6 of 13 negatives
    pos_elems = np.flatnonzero(valid & (labels == 1))
    neg_elems = np.flatnonzero(valid & (labels == 0))
    assert np.isin(pos_idx, pos_elems).all() and np.isin(neg_idx, neg_elems).all()

    pos_counts = np.bincount(pos_idx.ravel(), minlength=n)[pos_elems]
    neg_counts = np.bincount(neg_idx.ravel(), minlength=n)[neg_elems]
    # chi-square with dof 8 and 12; thresholds ~ p < 1e-5, far above typical values (~dof).
    assert _chi2(pos_counts, trials * 2 / 9) < 40
    assert _chi2(neg_counts, trials * 6 / 13) < 50
    # Pairs of positives: each of the 36 pairs with probability 1 / 36.
    pairs = {p: 0 for p in itertools.combinations(pos_elems.tolist(), 2)}
    for row in np.sort(pos_idx, axis=1):
        pairs[tuple(row.tolist())] += 1
    assert _chi2(np.array(list(pairs.values()), float), trials / 36) < 90
    # Slot order within the positives is random too (not always the smaller index first).
    assert 0.4 < (pos_idx[:, 0] < pos_idx[:, 1]).mean() < 0.6


def test_mask_form_matches_indices():
    rng = np.random.default_rng(5)
    labels = make_labels(rng, 400, 0.1, 0.6)
    valid = rng.uniform(size=400) < 0.9
    key = jax.random.key(7)
    idx, slab, svalid = (np.asarray(x) for x in jsample(labels, valid, key, 64, 0.5))
    pos_mask, neg_mask = jax.jit(lambda lab, v, k: S.sample_balanced_mask(lab, 64, 0.5, k, v))(
        labels, valid, key
    )
    pos_mask, neg_mask = np.asarray(pos_mask), np.asarray(neg_mask)
    assert pos_mask.shape == neg_mask.shape == (400,) and pos_mask.dtype == bool
    np.testing.assert_array_equal(np.flatnonzero(pos_mask), np.sort(idx[svalid & (slab == 1)]))
    np.testing.assert_array_equal(np.flatnonzero(neg_mask), np.sort(idx[svalid & (slab == 0)]))
    assert not (pos_mask & neg_mask).any()
    assert pos_mask.sum() + neg_mask.sum() == svalid.sum()
    assert not ((pos_mask | neg_mask) & ~valid).any()


def test_jit_vmap_batch_no_retrace():
    n_traces = [0]

    def fn(labels, valid, key):
        n_traces[0] += 1
        return S.sample_balanced(labels, 32, 0.5, key, valid)

    batched = jax.jit(jax.vmap(fn))
    for seed in range(3):
        rng = np.random.default_rng(50 + seed)
        labels = np.stack([make_labels(rng, 200, p, 0.5) for p in (0.0, 0.05, 0.4, 0.45)])
        valid = rng.uniform(size=(4, 200)) < 0.85
        keys = jax.random.split(jax.random.key(seed), 4)
        out = batched(jnp.asarray(labels), valid, keys)
        assert out[0].shape == (4, 32)
        for b in range(4):
            check_sample(labels[b], valid[b], 32, 0.5, [x[b] for x in out])
        # Per-image keys: the same image content gives different samples in different slots.
        assert not np.array_equal(np.asarray(out[0][2]), np.asarray(out[0][3]))
    assert n_traces[0] == 1
