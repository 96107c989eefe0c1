"""Connected components against scipy.ndimage.label (4-connectivity), under jit."""

import jax
import numpy as np
import pytest
from scipy import ndimage

from oanet_jax.ops.components import component_sizes, connected_components


def _scipy_components(labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Reference: per label value, scipy's 4-connected labelling; named by min flat index."""
    out = np.full(labels.shape, -1, np.int64)
    flat_index = np.arange(labels.size).reshape(labels.shape)
    for value in np.unique(labels[valid]):
        comp, n = ndimage.label(valid & (labels == value))
        for k in range(1, n + 1):
            where = comp == k
            out[where] = flat_index[where].min()
    return out


@pytest.mark.parametrize("seed", range(6))
def test_components_match_scipy(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
    # Blocky labels (few classes) so that components have interesting shapes.
    labels = np.kron(rng.integers(0, 3, (h // 3 + 1, w // 2 + 1)), np.ones((3, 2), int))[:h, :w]
    labels = np.where(rng.random((h, w)) < 0.15, rng.integers(0, 3, (h, w)), labels)
    valid = rng.random((h, w)) > 0.1
    got = np.asarray(jax.jit(connected_components)(labels, valid))
    np.testing.assert_array_equal(got, _scipy_components(labels, valid))
    sizes = np.asarray(jax.jit(component_sizes)(got))
    ref_sizes = np.where(got >= 0, np.vectorize(lambda c: (got == c).sum())(got), 0)
    np.testing.assert_array_equal(sizes, ref_sizes)


def test_spiral_needs_many_rounds_and_converges():
    """A one-pixel-wide spiral (long path inside one component) is still one component."""
    n = 21
    grid = np.zeros((n, n), bool)
    top, left, bottom, right = 0, 0, n - 1, n - 1
    while top <= bottom and left <= right:
        grid[top, left : right + 1] = True
        grid[top : bottom + 1, right] = True
        if top + 2 <= bottom:
            grid[bottom, left : right + 1] = True
        if left + 2 <= right and top + 2 <= bottom:
            grid[top + 2 : bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
    labels = np.zeros((n, n), np.int32)
    got = np.asarray(connected_components(labels, grid))
    np.testing.assert_array_equal(got, _scipy_components(labels, grid))
