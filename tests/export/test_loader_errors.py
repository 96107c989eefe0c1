"""`export.load` and the loaded callable reject what the artifact was not exported for, with
errors that name what was expected (checked before XLA sees the inputs).

A toy artifact (the exported function's signature around a few array ops, written by the same
`write_jax_artifact` as the real export) keeps these tests fast; the real artifact's shape check
is in test_export_roundtrip.py.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export as jax_export

from oanet_jax import export

B, HP, WP = 2, 16, 24


def _toy(leaves, images, image_shapes, orig_shapes):
    del orig_shapes
    rows = jnp.arange(HP)[None, :, None] < image_shapes[:, 0, None, None]
    cols = jnp.arange(WP)[None, None, :] < image_shapes[:, 1, None, None]
    id_map = jnp.where(rows & cols, images[..., 0].astype(jnp.int32) % 2 + 1, 0)
    return {"id_map": id_map, "score": leaves[0] * jnp.ones((B, 2), jnp.float32)}


def _write_toy(path, platforms):
    leaves = [np.asarray([0.5, 0.25], np.float32)]
    specs = (
        [jax.ShapeDtypeStruct((2,), np.float32)],
        jax.ShapeDtypeStruct((B, HP, WP, 3), np.uint8),
        jax.ShapeDtypeStruct((B, 2), np.int32),
        jax.ShapeDtypeStruct((B, 2), np.int32),
    )
    exported = jax_export.export(jax.jit(_toy), platforms=platforms)(*specs)
    manifest = {
        "ordering": "srm",
        "inputs": {"images": {"shape": [B, HP, WP, 3], "dtype": "uint8"}},
        "params": [{"path": "['toy']", "shape": [2], "dtype": "float32"}],
    }
    export.write_jax_artifact(str(path), exported, leaves, manifest)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return export.load(str(_write_toy(tmp_path_factory.mktemp("toy") / "a", ("cpu",))))


def test_toy_runs_with_default_sizes(toy):
    images = np.full((B, HP, WP, 3), 3, np.uint8)
    out = toy(images)
    assert set(out) == {"id_map", "score"}
    assert (out["id_map"] == 2).all()  # default image_shapes: the whole padded image
    out = toy(images, np.asarray([[8, 24], [16, 4]]))
    assert out["id_map"][0, 8:].max() == 0 and out["id_map"][1, :, 4:].max() == 0


def test_wrong_dtype(toy):
    with pytest.raises(TypeError, match="images must be uint8 RGB .* got float32"):
        toy(np.zeros((B, HP, WP, 3), np.float32))


def test_wrong_rank(toy):
    with pytest.raises(ValueError, match=r"rank 4 \[B, Hp, Wp, 3\] = \(2, 16, 24, 3\), got rank 3"):
        toy(np.zeros((HP, WP, 3), np.uint8))


def test_wrong_shape(toy):
    with pytest.raises(ValueError, match=r"exported shape .* = \(2, 16, 24, 3\), got \(2, 24, 16"):
        toy(np.zeros((B, WP, HP, 3), np.uint8))


def test_wrong_sizes(toy):
    images = np.zeros((B, HP, WP, 3), np.uint8)
    with pytest.raises(ValueError, match=r"image_shapes must have shape \(2, 2\) .* got \(1, 2\)"):
        toy(images, np.asarray([[16, 24]]))
    with pytest.raises(ValueError, match=r"fit in the padded size \(16, 24\)"):
        toy(images, np.asarray([[16, 24], [17, 24]]))
    with pytest.raises(TypeError, match="orig_shapes must be integer"):
        toy(images, None, np.ones((B, 2), np.float32))
    with pytest.raises(ValueError, match="orig_shapes must be positive"):
        toy(images, None, np.zeros((B, 2), np.int32))


def test_missing_platform(tmp_path):
    path = _write_toy(tmp_path / "tpu_only", ("tpu",))
    assert json.loads((path / export.MANIFEST).read_text())["platforms"] == ["tpu"]
    with pytest.raises(
        export.ArtifactError,
        match=r"exported for platforms \['tpu'\], but this process runs on 'cpu'; re-export "
        r"with --platforms including cpu",
    ):
        export.load(str(path))


def test_not_an_artifact_and_mismatched_params(tmp_path):
    with pytest.raises(export.ArtifactError, match="no manifest.json; not an exported"):
        export.load(str(tmp_path))
    path = _write_toy(tmp_path / "bad", ("cpu",))
    np.savez(path / export.PARAMS_FILE, **{"00000": np.zeros((3,), np.float32)})
    with pytest.raises(
        export.ArtifactError, match=r"00000 \(\['toy'\]\) is float32\[3\], expected"
    ):
        export.load(str(path))
