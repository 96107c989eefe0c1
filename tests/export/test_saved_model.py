"""The `saved_model` format: exported in process, loaded with `tf.saved_model.load`, its
``serving_default`` signature called on uint8 images gives the in-process model's panoptic
output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from export_helpers import BATCH, ORDERING, assert_same_panoptic

from oanet_jax import export
from oanet_jax.data import synthetic
from oanet_jax.data.coco_panoptic import CategoryTable

pytestmark = pytest.mark.slow


def test_saved_model_serving_default(export_setup, reference_outputs, tmp_path):
    import tensorflow as tf

    s = export_setup
    out = tmp_path / "tiny_saved_model"
    export.export_variables(
        s.config,
        s.variables,
        str(out),
        table=CategoryTable.from_categories(synthetic.CATEGORIES),
        export_format="saved_model",
        batch_size=BATCH,
        platforms=("cpu",),
        ordering=ORDERING,
    )
    manifest = json.loads((out / export.MANIFEST).read_text())
    assert manifest["artifact"] == "saved_model" and manifest["platforms"] == ["cpu"]
    with pytest.raises(export.ArtifactError, match="a 'saved_model' artifact; load\\(\\) reads"):
        export.load(str(out))

    loaded = tf.saved_model.load(str(out))
    serve = loaded.signatures["serving_default"]
    spec = serve.structured_input_signature[1]
    assert spec["images"].dtype == tf.uint8
    assert spec["images"].shape.as_list() == [BATCH, 64, 64, 3]
    result = serve(
        images=tf.constant(s.inputs["images"]),
        image_shapes=tf.constant(s.inputs["image_shapes"]),
        orig_shapes=tf.constant(s.inputs["orig_shapes"]),
    )
    outputs = {k: v.numpy() for k, v in result.items()}
    assert set(outputs) == set(export.OUTPUTS)
    assert_same_panoptic(outputs, reference_outputs)
    # Float input is refused by the signature itself (uint8 only).
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a uint8 tensor"):
        serve(
            images=tf.constant(s.inputs["images"].astype(np.float32)),
            image_shapes=tf.constant(s.inputs["image_shapes"]),
            orig_shapes=tf.constant(s.inputs["orig_shapes"]),
        )
