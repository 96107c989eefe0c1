"""Tests for oanet_jax.data.spec: the one batch schema, stated here once more as the pin."""

from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("torch")  # imported before tensorflow (conftest too)

from configs import tiny  # noqa: E402
from oanet_jax.data import spec, transforms  # noqa: E402

# The schema, written out independently of the module: (dtype, unbatched shape) with
# Hp, Wp = 64, 96; M = 5; S = 8.
PINNED = {
    "image": (np.uint8, (64, 96, 3)),
    "semantic": (np.uint8, (64, 96)),
    "image_shape": (np.int32, (2,)),
    "orig_shape": (np.int32, (2,)),
    "scale": (np.float32, ()),
    "image_id": (np.int64, ()),
    "flipped": (np.bool_, ()),
    "example_valid": (np.bool_, ()),
    "boxes": (np.float32, (5, 4)),
    "classes": (np.int32, (5,)),
    "is_crowd": (np.bool_, (5,)),
    "valid": (np.bool_, (5,)),
    "masks": (np.float32, (5, 8, 8)),
}
TRAIN = {"image", "image_shape", "boxes", "classes", "is_crowd", "valid", "masks", "semantic"}
CFG = transforms.TransformConfig(image_size=(64, 96), max_instances=5, mask_size=8, max_size=90)


def test_batch_spec_matches_the_pinned_schema():
    full = spec.batch_spec(CFG, train=False)
    assert list(full) == list(spec.KEYS) and set(full) == set(PINNED)
    for k, (dtype, shape) in PINNED.items():
        assert isinstance(full[k], jax.ShapeDtypeStruct)
        assert full[k].dtype == dtype and full[k].shape == shape, k
    batched = spec.batch_spec(CFG, 3, train=True)
    assert set(batched) == TRAIN == set(spec.TRAIN_KEYS)
    for k in TRAIN:
        assert batched[k].shape == (3, *PINNED[k][1]) and batched[k].dtype == PINNED[k][0], k


def test_config_data_and_transform_config_give_the_same_spec():
    config = tiny.get_config()
    cfg = transforms.TransformConfig.from_config(config.data)
    assert spec.batch_spec(config.data, 2, train=False) == spec.batch_spec(cfg, 2, train=False)


def test_padding_example_and_zeros_batch():
    pad = spec.padding_example(CFG)
    spec.validate(pad, CFG, train=False)
    assert not pad["example_valid"] and pad["image_id"] == -1
    assert np.all(pad["semantic"] == spec.IGNORE_LABEL) and not np.any(pad["image"])
    assert not pad["valid"].any() and not pad["image_shape"].any()
    pad["image"][0, 0, 0] = 1  # fresh writable arrays every call
    assert not spec.padding_example(CFG)["image"].any()

    zeros = spec.zeros_batch(CFG, 3)
    spec.validate(zeros, CFG, 3, train=True)
    assert zeros["image_shape"].tolist() == [[64, 96]] * 3  # a full-size empty image
    assert np.all(zeros["semantic"] == 255) and not zeros["valid"].any()
    everything = spec.zeros_batch(CFG, 2, train=False)
    spec.validate(everything, CFG, 2, train=False)
    assert everything["image_id"].tolist() == [-1, -1]


def test_tensor_signature():
    import tensorflow as tf

    sig = spec.tensor_signature(CFG)
    assert list(sig) == list(spec.KEYS)
    for k, (dtype, shape) in PINNED.items():
        assert sig[k] == tf.TensorSpec(shape, tf.as_dtype(dtype), name=k), k


def test_validate_names_every_problem():
    batch = spec.zeros_batch(CFG, 2)
    batch["image"] = batch["image"].astype(np.float32)
    batch["boxes"] = batch["boxes"][:, :4]
    del batch["masks"]
    batch["extra"] = np.zeros(2)
    with pytest.raises(ValueError) as err:
        spec.validate(batch, CFG, 2, train=True)
    msg = str(err.value)
    for part in ("missing key 'masks'", "unexpected key 'extra'", "image: float32", "boxes:"):
        assert part in msg, msg
