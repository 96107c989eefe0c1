"""Tests of the on-device PIL bilinear resize of oanet_jax.ops.resize (padded canvases, jit, vmap).

Oracles: a float64 re-derivation of PIL's coefficients (Resample.c's precompute loop), PIL itself
(``transforms.resize_image``), TensorFlow's triangle-filter resize (``tf.image.resize`` with
``antialias=True``, rounded once) and the host nearest-neighbour resize
(``transforms.resize_nearest``).

PIL runs two fixed-point passes and rounds to uint8 in between; we round once, so about 15-20% of
the pixels differ by 1 from PIL (random images and the COCO sample alike) and none by more.
TensorFlow's float resize, rounded once, differs from ours in under 1% of the pixels, by 1.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from oanet_jax.data.transforms import resize_image, resize_nearest, resize_shape
from oanet_jax.ops import resize

# One input and one output canvas for the random-image cases, so one compilation serves them all.
IN_CANVAS = (484, 648)
OUT_CANVAS = (804, 608)
SIZE_PAIRS = [
    ((480, 640), (320, 427)),  # shrink by 1.5 (non-integer output width)
    ((427, 320), (800, 600)),  # enlarge
    ((360, 241), (750, 502)),  # enlarge, odd sizes
    ((301, 477), (467, 211)),  # rows enlarged, columns shrunk
    ((50, 60), (50, 60)),  # equal size: a copy
]

_resize_jit = jax.jit(resize.resize_image_padded, static_argnames=("out_shape", "round_to_uint8"))
_labels_jit = jax.jit(resize.resize_labels_padded, static_argnames=("out_shape", "fill"))


def _pil_coefficients(in_size: int, out_size: int) -> np.ndarray:
    """float64 [out_size, in_size]: PIL's normalised bilinear coefficients, its own tap range."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    out = np.zeros((out_size, in_size))
    for o in range(out_size):
        center = (o + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        x = np.arange(xmin, xmax)
        w = np.maximum(0.0, 1.0 - np.abs((x + 0.5 - center) / filterscale))
        out[o, xmin:xmax] = w / w.sum()
    return out


def _canvas(image: np.ndarray, shape: tuple[int, ...], junk: int = 0) -> np.ndarray:
    """`image` in the top-left of a `shape` canvas filled with `junk` (which must be ignored)."""
    out = np.full(shape, junk, image.dtype)
    out[: image.shape[0], : image.shape[1]] = image
    return out


def _random_image(shape: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _check_vs_pil(out: np.ndarray, image: np.ndarray, out_hw, flip: bool) -> float:
    """|out - PIL| <= 1 in the valid region and 0 in the padding; returns the differing fraction."""
    oh, ow = out_hw
    want = resize_image(image, oh, ow)
    if flip:
        want = want[:, ::-1]
    assert out.dtype == np.uint8
    diff = np.abs(out[:oh, :ow].astype(np.int32) - want)
    assert diff.max() <= 1
    assert not out[oh:].any() and not out[:, ow:].any()
    return float((diff > 0).mean())


# --- resample_matrix


# One canvas for every size: one compilation, the sizes and the flip traced.
MATRIX_CANVAS = (810, 1340)  # (out_len, in_len)
_matrix_jit = jax.jit(resize.resample_matrix, static_argnums=(2, 3))


def _matrix(in_size: int, out_size: int, flip: bool = False) -> np.ndarray:
    in_len, out_len = MATRIX_CANVAS[1], MATRIX_CANVAS[0]
    return np.asarray(
        _matrix_jit(jnp.int32(in_size), jnp.int32(out_size), in_len, out_len, flip=jnp.bool_(flip))
    )


@pytest.mark.parametrize(
    "in_size,out_size", [(640, 427), (427, 800), (7, 3), (3, 7), (1333, 800), (1, 5), (5, 1)]
)
def test_resample_matrix_vs_pil_coefficients(in_size, out_size):
    want = _pil_coefficients(in_size, out_size)
    got = _matrix(in_size, out_size)
    assert got.dtype == np.float32 and got.shape == MATRIX_CANVAS
    np.testing.assert_allclose(got[:out_size, :in_size], want, rtol=0, atol=2e-7)
    np.testing.assert_allclose(got[:out_size].sum(axis=1), 1.0, rtol=0, atol=1e-6)
    assert not got[out_size:].any() and not got[:, in_size:].any()
    flipped = _matrix(in_size, out_size, flip=True)
    np.testing.assert_array_equal(flipped[:out_size], got[:out_size][::-1])
    assert not flipped[out_size:].any() and not flipped[:, in_size:].any()


def test_resample_matrix_identity_for_equal_sizes():
    for n in (1, 5, 427, 800):
        want = np.zeros(MATRIX_CANVAS, np.float32)
        want[np.arange(n), np.arange(n)] = 1.0
        np.testing.assert_array_equal(_matrix(n, n), want)
        want[:n, :n] = want[:n, :n][::-1]
        np.testing.assert_array_equal(_matrix(n, n, flip=True), want)
    assert _matrix_jit._cache_size() == 1


# --- resize_image_padded


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("in_hw,out_hw", SIZE_PAIRS)
def test_resize_image_padded_vs_pil(in_hw, out_hw, flip):
    image = _random_image(in_hw, seed=sum(in_hw))
    out = _resize_jit(
        _canvas(image, (*IN_CANVAS, 3), junk=200),
        jnp.asarray(in_hw, jnp.int32),
        jnp.asarray(out_hw, jnp.int32),
        OUT_CANVAS,
        flip=jnp.bool_(flip),
    )
    fraction = _check_vs_pil(np.asarray(out), image, out_hw, flip)
    assert fraction < (0.3 if in_hw != out_hw else 1e-9)  # equal sizes: an exact copy


def test_resize_image_padded_float_and_static_sizes():
    image = _random_image((37, 53), seed=3)
    hw_in, hw_out = (37, 53), (24, 70)
    # Python-int sizes (static under this jit), a float image, float output.
    got = jax.jit(
        lambda x: resize.resize_image_padded(x, hw_in, hw_out, (30, 72), round_to_uint8=False)
    )(image.astype(np.float32))
    assert got.dtype == jnp.float32 and got.shape == (30, 72, 3)
    wy = _pil_coefficients(37, 24)
    wx = _pil_coefficients(53, 70)
    want = np.einsum("oh,hwc,pw->opc", wy, image.astype(np.float64), wx)
    np.testing.assert_allclose(np.asarray(got)[:24, :70], want, rtol=0, atol=1e-3)
    assert not np.asarray(got)[24:].any() and not np.asarray(got)[:, 70:].any()


def test_resize_image_padded_coco_sample_paper_defaults(coco_sample_dir):
    # Short side 800, long side at most 1333, on the 1344 x 1344 canvas (configs/base.py); both
    # images in one vmapped call on a shared input canvas.
    images = [
        np.asarray(PIL.Image.open(p).convert("RGB"))
        for p in sorted((coco_sample_dir / "input_images").glob("*.jpg"))
    ]
    assert images
    in_hws = [im.shape[:2] for im in images]
    out_hws = [resize_shape(h, w, 800, 1333)[:2] for h, w in in_hws]
    canvas = tuple(max(s[i] for s in in_hws) for i in range(2))
    batch = np.stack([_canvas(im, (*canvas, 3)) for im in images])
    out = jax.jit(jax.vmap(lambda x, a, b: resize.resize_image_padded(x, a, b, (1344, 1344))))(
        batch, np.asarray(in_hws, np.int32), np.asarray(out_hws, np.int32)
    )
    for image, out_hw, got in zip(images, out_hws, np.asarray(out), strict=True):
        fraction = _check_vs_pil(got, image, out_hw, flip=False)
        assert fraction < 0.3  # 0.184 for both sample images


def test_resize_image_padded_vs_tensorflow():
    pytest.importorskip("torch")  # before tensorflow (conftest imports it too)
    tf = pytest.importorskip("tensorflow")

    for in_hw, out_hw in SIZE_PAIRS:
        image = _random_image(in_hw, seed=7 + sum(in_hw))
        # TF's triangle filter (antialiased when shrinking, PIL's rule), float, rounded once.
        resized = tf.image.resize(image, out_hw, method="bilinear", antialias=True)
        want = tf.cast(tf.clip_by_value(tf.floor(resized + 0.5), 0.0, 255.0), tf.int32)
        out = _resize_jit(
            _canvas(image, (*IN_CANVAS, 3)),
            jnp.asarray(in_hw, jnp.int32),
            jnp.asarray(out_hw, jnp.int32),
            OUT_CANVAS,
            flip=jnp.bool_(False),
        )
        diff = np.abs(np.asarray(out)[: out_hw[0], : out_hw[1]].astype(np.int32) - want.numpy())
        assert diff.max() <= 1
        assert (diff > 0).mean() < 0.01  # both round once: under 0.1% observed


# --- resize_labels_padded


@pytest.mark.parametrize("dtype", [np.int32, np.uint8])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize(
    "in_hw,out_hw", [((31, 47), (20, 29)), ((13, 9), (40, 25)), ((8, 8), (8, 8))]
)
def test_resize_labels_padded_vs_host(in_hw, out_hw, flip, dtype):
    labels = np.random.default_rng(sum(in_hw)).integers(0, 200, in_hw).astype(dtype)
    out = _labels_jit(
        _canvas(labels, (40, 48), junk=77),
        jnp.asarray(in_hw, jnp.int32),
        jnp.asarray(out_hw, jnp.int32),
        (44, 50),
        flip=jnp.bool_(flip),
        fill=255,
    )
    want = resize_nearest(labels, *out_hw)
    if flip:
        want = want[:, ::-1]
    out = np.asarray(out)
    assert out.dtype == dtype and out.shape == (44, 50)
    np.testing.assert_array_equal(out[: out_hw[0], : out_hw[1]], want)
    oh, ow = out_hw
    assert (out[oh:] == 255).all() and (out[:, ow:] == 255).all()


# --- one compilation for all sizes, vmap over a batch


def test_one_trace_for_all_sizes_and_batched():
    # (A test name with 'vmap' in it makes chex.assert_max_traces take `both` for a vmapped fn.)
    in_canvas, out_canvas = (64, 80), (96, 72)

    def both(image, labels, in_hw, out_hw, flip):
        return (
            resize.resize_image_padded(image, in_hw, out_hw, out_canvas, flip=flip),
            resize.resize_labels_padded(labels, in_hw, out_hw, out_canvas, flip=flip, fill=-1),
        )

    traced = jax.jit(chex.assert_max_traces(both, n=1))
    batched = jax.jit(jax.vmap(both))
    cases = [((64, 80), (53, 71), True), ((41, 23), (96, 55), False)]
    images, labels, singles = [], [], []
    for k, (in_hw, out_hw, flip) in enumerate(cases):
        image = _random_image(in_hw, seed=k)
        label = np.random.default_rng(k).integers(0, 9, in_hw).astype(np.int32)
        images.append(_canvas(image, (*in_canvas, 3), junk=9))
        labels.append(_canvas(label, in_canvas, junk=9))
        got_image, got_labels = traced(
            images[-1], labels[-1], np.asarray(in_hw, np.int32), np.asarray(out_hw, np.int32), flip
        )
        _check_vs_pil(np.asarray(got_image), image, out_hw, flip)
        want_labels = resize_nearest(label, *out_hw)[:, :: -1 if flip else 1]
        np.testing.assert_array_equal(np.asarray(got_labels)[: out_hw[0], : out_hw[1]], want_labels)
        singles.append((np.asarray(got_image), np.asarray(got_labels)))
    batch_image, batch_labels = batched(
        np.stack(images),
        np.stack(labels),
        np.asarray([c[0] for c in cases], np.int32),
        np.asarray([c[1] for c in cases], np.int32),
        np.asarray([c[2] for c in cases]),
    )
    for k, (single_image, single_labels) in enumerate(singles):
        diff = np.abs(np.asarray(batch_image[k]).astype(np.int32) - single_image)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # same math, maybe another sum order
        np.testing.assert_array_equal(np.asarray(batch_labels[k]), single_labels)
