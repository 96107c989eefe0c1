"""Tests of oanet_jax.ops.resize: the bilinear upsample against torch's F.interpolate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oanet_jax.ops import resize

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = dict(rtol=1e-6, atol=1e-6)


def _torch_up(x: np.ndarray, **kwargs) -> np.ndarray:
    """F.interpolate(bilinear, align_corners=False) of an NHWC array, returned NHWC."""
    out = F.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), mode="bilinear", align_corners=False, **kwargs
    )
    return out.permute(0, 2, 3, 1).numpy()


def _rand(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 8])
def test_upsample_bilinear_vs_torch_scale_factor(factor):
    x = _rand((2, 5, 3, 4))
    got = resize.upsample_bilinear(x, factor)
    np.testing.assert_allclose(np.asarray(got), _torch_up(x, scale_factor=factor), **TOL)


def test_upsample_bilinear_per_axis_factors_and_layouts():
    x = _rand((2, 5, 3, 4), seed=1)
    want = _torch_up(x, scale_factor=(2, 4))
    np.testing.assert_allclose(np.asarray(resize.upsample_bilinear(x, (2, 4))), want, **TOL)
    # Unbatched [h, w, C] with the default axes, and NCHW with explicit axes.
    np.testing.assert_allclose(np.asarray(resize.upsample_bilinear(x[0], (2, 4))), want[0], **TOL)
    nchw = resize.upsample_bilinear(x.transpose(0, 3, 1, 2), (2, 4), axes=(2, 3))
    np.testing.assert_allclose(np.asarray(nchw).transpose(0, 2, 3, 1), want, **TOL)


@pytest.mark.parametrize("size", [(10, 6), (20, 24), (5, 12)])
def test_resize_bilinear_vs_torch_size(size):
    x = _rand((2, 5, 3, 4), seed=2)
    got = resize.resize_bilinear(x, size)
    np.testing.assert_allclose(np.asarray(got), _torch_up(x, size=size), **TOL)


def test_resize_bilinear_identity_and_errors():
    x = jnp.asarray(_rand((1, 4, 6, 2)))
    assert resize.resize_bilinear(x, (4, 6)) is x
    with pytest.raises(ValueError, match="multiple"):
        resize.resize_bilinear(x, (6, 12))
    with pytest.raises(ValueError, match="multiple"):
        resize.resize_bilinear(x, (2, 6))
    with pytest.raises(ValueError, match="factor"):
        resize.upsample_bilinear(x, 0)


def test_dtype_is_kept():
    x = jnp.asarray(_rand((1, 4, 6, 2)), jnp.bfloat16)
    out = resize.upsample_bilinear(x, 4)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 16, 24, 2)
    want = _torch_up(np.array(x.astype(jnp.float32)), scale_factor=4)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), want, rtol=2e-2, atol=2e-2)


def test_rows_equal_the_full_upsample_bitwise():
    x = _rand((2, 7, 5, 3), seed=3)
    # Both jitted: XLA may fuse multiply-adds differently from op-by-op dispatch.
    full = np.asarray(jax.jit(lambda v: resize.upsample_bilinear(v, 4))(x))
    rows = jax.jit(lambda s: resize.upsample_bilinear_rows(x, s, 3, 4))
    for start in range(0, 5):
        np.testing.assert_array_equal(np.asarray(rows(start)), full[:, 4 * start : 4 * start + 12])
    # A block running over the end: its real rows are still exact.
    tail = np.asarray(rows(6))
    assert tail.shape == (2, 12, 20, 3)
    np.testing.assert_array_equal(tail[:, :4], full[:, 24:])


def test_gradient_vs_torch():
    """The semantic loss differentiates through the upsample: jax.grad equals torch autograd."""
    x = _rand((2, 4, 3, 5), seed=4)
    w = _rand((2, 16, 12, 5), seed=5)
    grad = jax.grad(lambda v: jnp.sum(resize.upsample_bilinear(v, 4) * w))(x)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    up = F.interpolate(xt, scale_factor=4, mode="bilinear", align_corners=False)
    (up * torch.from_numpy(w).permute(0, 3, 1, 2)).sum().backward()
    np.testing.assert_allclose(
        np.asarray(grad), xt.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5
    )
    grad_rows = jax.grad(lambda v: jnp.sum(resize.upsample_bilinear_rows(v, 1, 2, 4)))(x)
    assert np.isfinite(np.asarray(grad_rows)).all() and np.asarray(grad_rows)[:, 0].sum() > 0


def test_nearest_source_index_pixel_centre_rule():
    np.testing.assert_array_equal(resize.nearest_indices(4, 8), [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(resize.nearest_indices(8, 4), [1, 3, 5, 7])
    np.testing.assert_array_equal(
        np.asarray(resize.nearest_source_index(jnp.arange(3), 5, 3)), [0, 2, 4]
    )


def test_upsample_bilinear_block_is_rows_of_the_full_upsample():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 7, 5, 3)).astype(np.float32))
    full = resize.upsample_bilinear(x, 4)
    padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0)), mode="edge")
    for start, n in ((0, 2), (3, 3), (5, 2)):
        block = padded[:, start : start + n + 2]
        got = resize.upsample_bilinear_block(block, 4)
        np.testing.assert_array_equal(
            np.asarray(got), np.asarray(full[:, 4 * start : 4 * (start + n)])
        )
