"""Tests of the stuff head (paper Fig. 3) and the spatial ranking module (paper Eq. 2-3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oanet_jax.modeling import srm as srm_lib
from oanet_jax.modeling.stuff_head import StuffHead


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stuff_head_shapes(dtype):
    feats = [jnp.zeros((2, 64 // s, 96 // s, 16), dtype) for s in (4, 8, 16, 32)]
    head = StuffHead(num_classes=7, channels=8, dtype=dtype)
    variables = jax.eval_shape(head.init, jax.random.key(0), feats)
    out = jax.eval_shape(head.apply, variables, feats)
    assert out["logits"].shape == (2, 16, 24, 7)
    assert out["logits"].dtype == jnp.float32
    assert out["features"].shape == (2, 16, 24, 32)
    assert out["features"].dtype == dtype
    leaves = jax.tree.leaves(variables["params"])
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)


@pytest.mark.parametrize("kernel", ["large", "3x3", "1x1"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_srm_shapes(kernel, dtype):
    canvas = jnp.zeros((2, 20, 24, 5))
    module = srm_lib.SpatialRankingModule(num_classes=5, kernel=kernel, dtype=dtype)
    variables = jax.eval_shape(module.init, jax.random.key(0), canvas)
    out = jax.eval_shape(module.apply, variables, canvas)
    assert out.shape == (2, 20, 24, 5) and out.dtype == jnp.float32


def test_large_kernel_receptive_field():
    """The GCN block sees k pixels along each axis: a single 1 spreads to a (2k-1) cross."""
    canvas = jnp.zeros((1, 21, 21, 2)).at[0, 10, 10, 0].set(1.0)
    module = srm_lib.SpatialRankingModule(num_classes=2, kernel="large", kernel_size=7)
    params = module.init(jax.random.key(1), canvas)
    params = jax.tree.map(lambda p: jnp.ones_like(p) if p.ndim == 4 else jnp.zeros_like(p), params)
    out = np.asarray(module.apply(params, canvas))[0, :, :, 0]
    nonzero = np.argwhere(np.abs(out) > 0)
    # Separable 1xk then kx1 covers a kxk square centred on the input pixel.
    assert nonzero.min(0).tolist() == [7, 7] and nonzero.max(0).tolist() == [13, 13]


def test_canvas_and_ranking_score_by_hand():
    """Two overlapping instances of different classes, a fixed score map: Eq. 3 by hand."""
    h, w, t = 6, 8, 3
    m = np.zeros((1, 3, h, w), np.float32)
    m[0, 0, 1:5, 1:6] = 1  # class 0, 20 px
    m[0, 1, 3:6, 4:8] = 1  # class 2, 12 px, overlaps instance 0 on rows 3-4, cols 4-5 (4 px)
    m[0, 2, :, :] = 1  # padding row: must be ignored
    classes = jnp.array([[0, 2, 1]])
    valid = jnp.array([[True, True, False]])
    masks = jnp.asarray(m) * valid[:, :, None, None]

    canvas = srm_lib.build_canvas(masks, classes, valid, t)
    assert canvas.shape == (1, h, w, t)
    np.testing.assert_array_equal(canvas[0, :, :, 0], m[0, 0])
    np.testing.assert_array_equal(canvas[0, :, :, 2], m[0, 1])
    np.testing.assert_array_equal(canvas[0, :, :, 1], 0)

    conflict = np.asarray(srm_lib.conflict_mask(canvas))[0]
    assert conflict.sum() == 4 and conflict[3:5, 4:6].all()
    # A second class-0 instance on top of instance 0: same channel, not a conflict.
    same = masks.at[0, 2, 1:3, 1:3].set(1.0)
    same_canvas = srm_lib.build_canvas(same, jnp.array([[0, 2, 0]]), jnp.array([[1, 1, 1]]) > 0, t)
    np.testing.assert_array_equal(np.asarray(srm_lib.conflict_mask(same_canvas))[0], conflict)

    # Score map: class 2 dominates on the overlap, class 0 elsewhere.
    s = np.full((1, h, w, t), 0.1, np.float32)
    s[..., 0] = 0.8
    s[0, 3:5, 4:6] = [0.2, 0.1, 0.7]
    scores = np.asarray(srm_lib.ranking_scores(jnp.asarray(s), masks, classes, valid))
    expected0 = (16 * 0.8 + 4 * 0.2) / 20
    expected1 = (8 * 0.1 + 4 * 0.7) / 12
    np.testing.assert_allclose(scores[0], [expected0, expected1, 0.0], rtol=1e-6)


def test_paste_instances_threshold_and_valid():
    masks = jnp.ones((1, 2, 4, 4))
    boxes = jnp.array([[[8.0, 8.0, 24.0, 16.0], [0.0, 0.0, 32.0, 32.0]]])
    valid = jnp.array([[True, False]])
    out = np.asarray(srm_lib.paste_instances(masks, boxes, valid, (32, 32), stride=4))
    assert out.shape == (1, 2, 8, 8)
    assert out[0, 1].sum() == 0
    expected = np.zeros((8, 8))
    expected[2:4, 2:6] = 1  # stride-4 cells whose centres lie inside the box
    np.testing.assert_array_equal(out[0, 0], expected)
