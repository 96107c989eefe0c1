"""Shapes and dtypes of the assembled OANet (train and inference outputs, variables).

Everything runs under ``jax.eval_shape`` (``init_with_output``: one trace gives the variables and
the outputs), for the tiny test config and the ResNet-50 paper config at its padded input size
(1344 x 1344), in float32 and with bfloat16 compute. Every key documented in
`OANet.train_forward` / `OANet.inference` is checked against the shape computed here from the
config fields, and float outputs must be float32 whatever the compute dtype (box math, softmaxes
and losses stay float32). Numerical behaviour of the network is checked elsewhere (parity with
torchvision in tests/convert/test_maskrcnn_parity.py, the pieces in their own tests).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, tiny
from oanet_jax.modeling.build import build_model, resolve_srm_train_masks
from oanet_jax.modeling.config import SECTIONS
from oanet_jax.modeling.oanet import FPN_STRIDES

F32, I32, BOOL = jnp.float32, jnp.int32, jnp.bool_
CONFIGS = {"tiny": tiny.get_config, "resnet50": base.get_config}
BATCH = 2


def _config(name: str, dtype: str):
    cfg = CONFIGS[name]()
    cfg.model.compute_dtype = dtype
    return cfg


def _abstract_batch(cfg, train: bool) -> dict[str, jax.ShapeDtypeStruct]:
    h, w = cfg.data.image_size
    m, s = cfg.data.max_instances, cfg.data.mask_size
    batch = {
        "image": jax.ShapeDtypeStruct((BATCH, h, w, 3), F32),
        "image_shape": jax.ShapeDtypeStruct((BATCH, 2), I32),
    }
    if train:
        batch |= {
            "boxes": jax.ShapeDtypeStruct((BATCH, m, 4), F32),
            "classes": jax.ShapeDtypeStruct((BATCH, m), I32),
            "is_crowd": jax.ShapeDtypeStruct((BATCH, m), BOOL),
            "valid": jax.ShapeDtypeStruct((BATCH, m), BOOL),
            "masks": jax.ShapeDtypeStruct((BATCH, m, s, s), F32),
            "semantic": jax.ShapeDtypeStruct((BATCH, h, w), jnp.uint8),
        }
    return batch


def _shapes(cfg, train: bool):
    """(outputs, variables) of ``init_with_output`` as ShapeDtypeStructs."""
    model = build_model(cfg)
    batch = _abstract_batch(cfg, train)

    def run(key, batch):
        return model.init_with_output({"params": key, "sampling": key}, batch, train=train)

    out, variables = jax.eval_shape(run, jax.random.key(0), batch)
    return out, nn.meta.unbox(variables)


def _dims(cfg) -> dict[str, int]:
    m = cfg.model
    h, w = cfg.data.image_size
    r = m.roi.batch_size_per_image
    return {
        "T": m.num_thing_classes,
        "S": m.num_stuff_classes,
        "A": sum(
            math.ceil(h / s) * math.ceil(w / s) * len(m.rpn.anchor_aspect_ratios)
            for s in FPN_STRIDES
        ),
        "R": r,
        "F": int(r * m.roi.positive_fraction),
        "D": m.test.detections_per_image,
        "P": 2 * m.mask_head.pooler_resolution,
        "h": math.ceil(h / 4),
        "w": math.ceil(w / 4),
        "hs": math.ceil(h / m.srm.stride),
        "ws": math.ceil(w / m.srm.stride),
    }


def _expected_train(cfg) -> dict[str, tuple[tuple[int, ...], object]]:
    d = _dims(cfg)
    b, k = BATCH, cfg.model.rpn.post_nms_topk_train
    a, r, t, h, w = d["A"], d["R"], d["T"], d["h"], d["w"]
    return {
        "rpn_objectness": ((b, a), F32),
        "rpn_deltas": ((b, a, 4), F32),
        "rpn_labels": ((b, a), I32),
        "rpn_box_targets": ((b, a, 4), F32),
        "proposals": ((b, k, 4), F32),
        "proposal_valid": ((b, k), BOOL),
        "class_logits": ((b, r, t + 1), F32),
        "box_deltas": ((b, r, t, 4), F32),
        "roi_classes": ((b, r), I32),
        "roi_box_targets": ((b, r, 4), F32),
        "roi_valid": ((b, r), BOOL),
        "roi_is_fg": ((b, r), BOOL),
        "mask_loss": ((), F32),
        "mask_num_fg": ((b,), I32),
        "mask_rois": ((), I32),
        "stuff_logits": ((b, h, w, t + d["S"]), F32),
        "srm_logits": ((b, h, w, t), F32),
        "srm_labels": ((b, h, w), I32),
        "srm_canvas": ((b, h, w, t), F32),
        # The tiny and base configs have an instances JSON: 'auto' trains the SRM on GT masks.
        "srm_counts/srm_gt_genuine_px": ((), F32),
        "srm_counts/srm_gt_seam_px": ((), F32),
    }


def _expected_inference(cfg) -> dict[str, tuple[tuple[int, ...], object]]:
    d = _dims(cfg)
    b, k = BATCH, cfg.model.rpn.post_nms_topk_test
    t, dd, p = d["T"], d["D"], d["P"]
    srm = (b, d["hs"], d["ws"], t)
    return {
        "proposals": ((b, k, 4), F32),
        "proposal_logits": ((b, k), F32),
        "proposal_valid": ((b, k), BOOL),
        "class_logits": ((b, k, t + 1), F32),
        "box_deltas": ((b, k, t, 4), F32),
        "boxes": ((b, dd, 4), F32),
        "scores": ((b, dd), F32),
        "classes": ((b, dd), I32),
        "valid": ((b, dd), BOOL),
        "masks": ((b, dd, p, p), F32),
        "stuff_logits": ((b, d["h"], d["w"], t + d["S"]), F32),
        "srm_logits": (srm, F32),
        "srm_map": (srm, F32),
        "srm_scores": ((b, dd), F32),
    }


def _check(out: dict, expected: dict) -> None:
    out = {  # nested dicts of outputs ('srm_counts') as 'outer/inner'
        f"{k}/{kk}" if isinstance(v, dict) else k: vv
        for k, v in out.items()
        for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])
    }
    assert set(out) == set(expected), set(out) ^ set(expected)
    got = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in out.items()}
    want = {k: (shape, np.dtype(dtype)) for k, (shape, dtype) in expected.items()}
    bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not bad, bad


def _check_variables(variables: dict, cfg) -> None:
    """Parameters and statistics are stored in float32 (param_dtype) whatever the compute dtype."""
    assert "params" in variables
    for collection in variables.values():
        for leaf in jax.tree.leaves(collection):
            assert leaf.dtype == jnp.float32
    params = variables["params"]
    expected_modules = {"backbone", "fpn", "rpn", "box_head", "box_predictor", "mask_head"}
    assert set(params) == expected_modules | {"stuff_head", "srm"}
    t, s = cfg.model.num_thing_classes, cfg.model.num_stuff_classes
    assert params["box_predictor"]["cls_score"]["kernel"].shape[-1] == t + 1
    assert params["mask_head"]["predictor"]["kernel"].shape[-1] == t
    assert params["stuff_head"]["predictor"]["kernel"].shape[-1] == t + s
    if cfg.model.norm == "frozen_bn":  # FrozenBN statistics and affine never in params
        assert "backbone" in variables["batch_stats"]
        assert "stem_norm" not in params["backbone"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["tiny", "resnet50"])
def test_train_outputs_shapes_and_dtypes(name, dtype):
    cfg = _config(name, dtype)
    out, variables = _shapes(cfg, train=True)
    _check(out, _expected_train(cfg))
    _check_variables(variables, cfg)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["tiny", "resnet50"])
def test_inference_outputs_shapes_and_dtypes(name, dtype):
    cfg = _config(name, dtype)
    out, variables = _shapes(cfg, train=False)
    _check(out, _expected_inference(cfg))
    _check_variables(variables, cfg)


def test_resnet50_sizes_match_the_paper_defaults():
    """The ResNet-50 config's derived sizes, stated once: guards `_dims` against itself."""
    d = _dims(base.get_config())
    assert d["A"] == 3 * sum((1344 // s) ** 2 for s in (4, 8, 16, 32)) + 3 * 21 * 21
    assert (d["T"], d["S"], d["R"], d["F"], d["D"], d["P"]) == (80, 53, 512, 128, 100, 28)
    assert (d["h"], d["w"]) == (336, 336)


@pytest.mark.parametrize("train", [True, False])
def test_box_pooler_resolution_is_used(train):
    """model.box_head.pooler_resolution sets the box head's RoIAlign size and its fc1 input."""
    cfg = tiny.get_config()
    cfg.model.box_head.pooler_resolution = 5
    _, variables = _shapes(cfg, train=train)
    fc1 = variables["params"]["box_head"]["fc1"]["kernel"]
    assert fc1.shape == (5 * 5 * cfg.model.fpn_channels, cfg.model.box_head.fc_dim)


def test_build_maps_every_section_to_its_dataclass():
    cfg = tiny.get_config()
    model = build_model(cfg)
    for name, cls in SECTIONS.items():
        section = getattr(model, f"{name}_config")
        assert isinstance(section, cls)
        want = {
            k: tuple(v) if isinstance(v, tuple | list) else v
            for k, v in cfg.model[name].to_dict().items()
        }
        if name == "srm":  # 'auto' is resolved from the data (an instances JSON: 'gt')
            assert want["train_masks"] == "auto"
            want["train_masks"] = resolve_srm_train_masks(cfg)[0]
        assert dataclasses.asdict(section) == want
    assert model.test_config.mask_threshold == cfg.model.test.mask_threshold
    assert model.test_config.instance_score_thresh == cfg.model.test.instance_score_thresh


def test_section_mismatch_fails_naming_the_field():
    cfg = tiny.get_config()
    cfg.model.rpn.unknown_knob = 1
    with pytest.raises(ValueError, match=r"model\.rpn\.unknown_knob is not a field of RPNConfig"):
        build_model(cfg)
    cfg = tiny.get_config()
    del cfg.model.test.mask_threshold
    with pytest.raises(ValueError, match=r"model\.test\.mask_threshold \(TestConfig field\)"):
        build_model(cfg)
