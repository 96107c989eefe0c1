"""SRM training on ground-truth or predicted masks, seam counting, and the ablation switches.

`config.model.srm.train_masks` ('auto' resolution, the predicted-mask canvas, stopped gradients),
`srm.split_conflicts` (genuine overlaps vs resampling seams, against scipy), and the switches
`config.model.stuff_head.classes`, `config.model.sharing` and `config.data.instance_masks`: their
shapes, that each changes what is computed, and one training step.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from configs import tiny
from oanet_jax import losses
from oanet_jax.data import pipeline, synthetic
from oanet_jax.data import spec as data_spec
from oanet_jax.modeling import build
from oanet_jax.modeling import srm as srm_lib
from oanet_jax.modeling import targets as targets_lib
from oanet_jax.modeling.oanet import STUFF_ONLY_THING_LOGIT
from oanet_jax.train import sharding, state, step

T, S = 4, 3  # the tiny config's thing and stuff classes
# Same program, faster compile on CPU (as the other model tests).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# ---------------------------------------------------------------------------------- helpers


def _config(**model):
    """The tiny config at batch 2 with `model` overrides ('srm.train_masks': 'both', ...)."""
    c = tiny.get_config()
    c.train.batch_size = 2
    for path, value in model.items():
        section, _, field = path.rpartition(".")
        target = c.model[section] if section else c.model
        target[field] = value
    return c


def _batch(c, seed: int = 0) -> dict[str, np.ndarray]:
    """A train batch: random image, two overlapping GT instances of different classes, random
    semantic labels over all classes."""
    b = data_spec.zeros_batch(c.data, int(c.train.batch_size), train=True)
    rng = np.random.default_rng(seed)
    b["image"] = rng.integers(0, 256, b["image"].shape, dtype=np.uint8)
    b["boxes"][:, :2] = [[4, 4, 40, 40], [20, 20, 60, 60]]
    b["classes"][:, :2] = [0, 1]
    b["valid"][:, :2] = True
    b["masks"][:, :2] = 1.0
    b["semantic"][:] = rng.integers(0, T + S, b["semantic"].shape)
    return b


def _init(model: nn.Module, batch: dict) -> dict:
    """All variables (jitted: the eager init of NMS and the heads is slow)."""
    rngs = {"params": jax.random.key(0), "sampling": jax.random.key(1)}
    return jit(lambda b: model.init(rngs, b, train=True))(batch)


def _trunk_init(model: nn.Module, batch: dict, abstract: bool = False) -> dict:
    """The variables of the trunk only (backbone(s), FPN(s), RPN head, stuff branch); only
    their shapes with `abstract`."""
    trunk = lambda m, b: m._trunk(b, train=False)
    init = lambda b: model.init(jax.random.key(0), b, method=trunk)
    return jax.eval_shape(init, batch) if abstract else jit(init)(batch)


def _confident_masks(variables: dict) -> dict:
    """Variables whose mask head predicts its whole box (bias +8): a predicted canvas is then the
    union of the detections' boxes, so overlaps of different classes exist."""
    params = nn.meta.unbox(variables["params"])
    params["mask_head"]["predictor"]["bias"] = jnp.full_like(
        params["mask_head"]["predictor"]["bias"], 8.0
    )
    return {**variables, "params": params}


def _train(model, variables, batch):
    return model.apply(variables, batch, train=True, rngs={"sampling": jax.random.key(2)})


# ------------------------------------------------------------------------ seams vs overlaps


def _canvas(boxes, masks, classes, size=64, stride=4) -> jnp.ndarray:
    """GT canvas [1, h, w, T] of box-frame `masks` [N, S, S] pasted as the SRM targets do."""
    n = len(boxes)
    sem = np.full((size, size), 255, np.uint8)
    out = targets_lib.srm_targets(
        np.asarray(masks, np.float32),
        np.asarray(boxes, np.float32),
        np.asarray(classes, np.int32),
        np.ones(n, bool),
        sem,
        (size, size),
        stride,
        T,
    )
    return out


def _crop(full: np.ndarray, box, size: int = 16) -> np.ndarray:
    """A full-resolution binary mask cropped to `box` and resampled to size x size (nearest)."""
    x1, y1, x2, y2 = box
    ys = np.clip((y1 + (np.arange(size) + 0.5) * (y2 - y1) / size).astype(int), 0, 63)
    xs = np.clip((x1 + (np.arange(size) + 0.5) * (x2 - x1) / size).astype(int), 0, 63)
    return full[np.ix_(ys, xs)].astype(np.float32)


def test_abutting_masks_give_seams_only_and_overlaps_genuine_only():
    # A visible segment with a hole where a second object lies on top of it: disjoint at full
    # resolution, they overlap once cropped to their boxes (16 x 16), resampled and pasted
    # back at stride 4, along the hole's edge, inside the first box.
    yy, xx = np.mgrid[:64, :64]
    top_box, under_box = (22, 22, 43, 43), (4, 4, 60, 60)
    top = (xx >= 22) & (xx < 43) & (yy >= 22) & (yy < 43)
    under = (xx >= 4) & (xx < 60) & (yy >= 4) & (yy < 60) & ~top
    out = _canvas([under_box, top_box], [_crop(under, under_box), _crop(top, top_box)], [0, 1])
    assert int(out["conflict"].sum()) > 0, "the paste of abutting masks makes no seam"
    assert int(out["genuine"].sum()) == 0
    assert np.array_equal(out["seam"], out["conflict"])

    # Two masks that overlap by 20 image pixels (5 canvas pixels) each way: genuine only.
    out = _canvas([[4, 4, 40, 40], [20, 20, 60, 60]], np.ones((2, 16, 16)), [0, 1])
    assert int(out["conflict"].sum()) == 25
    assert np.array_equal(out["genuine"], out["conflict"]) and int(out["seam"].sum()) == 0


def test_split_conflicts_matches_scipy():
    rng = np.random.default_rng(0)
    canvas = np.zeros((4, 14, 12, T), np.float32)  # random rectangles of every class
    for b, t, _ in np.ndindex(4, T, 2):
        y, x = rng.integers(0, 12, 2)
        h, w = rng.integers(1, 8, 2)
        canvas[b, y : y + h, x : x + w, t] = 1
    genuine, seam = jit(srm_lib.split_conflicts)(jnp.asarray(canvas))
    conflict = canvas.sum(-1) >= 2
    # Erosion with the window cut at the border (= padding with ones), dilation likewise.
    eroded = ndi.minimum_filter(canvas, size=(1, 3, 3, 1), mode="constant", cval=1.0)
    core = eroded.sum(-1) >= 2
    near = ndi.maximum_filter(core.astype(np.uint8), size=(1, 3, 3), mode="constant") > 0
    np.testing.assert_array_equal(np.asarray(genuine), conflict & near)
    np.testing.assert_array_equal(np.asarray(seam), conflict & ~near)
    assert genuine.any() and seam.any()


def test_label_in_canvas_ignores_labels_of_absent_classes():
    sem = np.full((64, 64), 2, np.uint8)  # class 2 everywhere: not one of the two masks
    sem[:, 32:] = 1
    args = (
        np.ones((2, 16, 16), np.float32),
        np.asarray([[4, 4, 40, 40], [20, 20, 60, 60]], np.float32),
        np.asarray([0, 1], np.int32),
        np.ones(2, bool),
        sem,
        (64, 64),
        4,
        T,
    )
    plain = targets_lib.srm_targets(*args)
    strict = targets_lib.srm_targets(*args, label_in_canvas=True)
    conflict = np.asarray(plain["conflict"])
    assert set(np.unique(np.asarray(plain["labels"])[conflict])) == {1, 2}
    kept = np.asarray(strict["labels"])[conflict]
    assert set(np.unique(kept)) == {1, 255}
    np.testing.assert_array_equal(kept == 1, sem[2::4, 2::4][conflict] == 1)


# ------------------------------------------------------------------- train_masks resolution


def test_auto_resolves_from_the_data():
    c = tiny.get_config()  # raw synthetic data with an instances JSON
    assert build.resolve_srm_train_masks(c)[0] == "gt"
    assert build.build_model(c).srm_config.train_masks == "gt"
    for change, why in [
        (lambda c: setattr(c.data.train, "instances_json", ""), "no instances JSON"),
        (lambda c: setattr(c.data, "source", "tfds"), "TFDS"),
        (lambda c: setattr(c.data, "instance_masks", "panoptic"), "instance_masks='panoptic'"),
    ]:
        c = tiny.get_config()
        change(c)
        mode, line = build.resolve_srm_train_masks(c)
        assert mode == "predicted" and why in line and "predicted masks" in line
        assert build.build_model(c).srm_config.train_masks == "predicted"
        c.model.srm.train_masks = "gt"  # kept when asked for, with what it means
        mode, line = build.resolve_srm_train_masks(c)
        assert mode == "gt" and "seams only" in line
    c.model.srm.train_masks = "sometimes"
    with pytest.raises(ValueError, match="train_masks"):
        build.resolve_srm_train_masks(c)


# ----------------------------------------------------------------- predicted-mask canvas


@pytest.fixture(scope="module")
def predicted_setup():
    """Tiny model, train proposals = test proposals, every detection in the canvas."""
    c = _config(**{"srm.train_masks": "both", "test.instance_score_thresh": 0.0})
    c.model.rpn.pre_nms_topk_train = c.model.rpn.pre_nms_topk_test
    c.model.rpn.post_nms_topk_train = c.model.rpn.post_nms_topk_test
    model = build.build_model(c)
    batch = _batch(c)
    variables = _confident_masks(_init(model, batch))
    return c, model, batch, variables


@pytest.mark.slow
def test_predicted_canvas_is_the_inference_canvas(predicted_setup):
    c, model, batch, variables = predicted_setup
    out = jit(functools.partial(_train, model))(variables, batch)
    b = int(c.train.batch_size)
    assert out["srm_canvas"].shape == (2 * b, 16, 16, T)
    assert out["srm_logits"].shape == (2 * b, 16, 16, T)
    gt_canvas, pred_canvas = out["srm_canvas"][:b], out["srm_canvas"][b:]

    # The predicted half: the detections of the inference pass, pasted as inference does.
    inf = jit(lambda v, x: model.apply(v, x, train=False))(variables, batch)
    in_canvas = inf["valid"] & (inf["scores"] >= c.model.test.instance_score_thresh)
    inst = srm_lib.paste_instances(inf["masks"], inf["boxes"], in_canvas, (64, 64), 4, 0.5)
    expected = srm_lib.build_canvas(inst, inf["classes"], in_canvas, T)
    np.testing.assert_array_equal(np.asarray(pred_canvas), np.asarray(expected))
    assert float(pred_canvas.sum()) > 0
    assert not np.array_equal(np.asarray(pred_canvas), np.asarray(gt_canvas))

    # The GT half: the ground-truth targets, as 'gt' computes them.
    gt = jax.vmap(lambda *a: targets_lib.srm_targets(*a, (64, 64), 4, T))(
        batch["masks"], batch["boxes"], batch["classes"], batch["valid"], batch["semantic"]
    )
    np.testing.assert_array_equal(np.asarray(gt_canvas), np.asarray(gt["canvas"]))
    np.testing.assert_array_equal(np.asarray(out["srm_labels"][:b]), np.asarray(gt["labels"]))

    # Predicted labels: the panoptic thing class at conflicts where its own mask is present.
    labels = np.asarray(out["srm_labels"][b:])
    conflict = np.asarray(srm_lib.conflict_mask(pred_canvas))
    kept = labels != 255
    assert kept.any() and not np.any(kept & ~conflict)
    sem = np.asarray(batch["semantic"])[:, 2::4, 2::4]
    np.testing.assert_array_equal(labels[kept], sem[kept])
    active = np.take_along_axis(np.asarray(pred_canvas), np.clip(labels, 0, T - 1)[..., None], -1)
    assert np.all(active[kept] == 1)
    counts = jax.device_get(out["srm_counts"])
    assert set(counts) == {f"srm_{s}_{k}_px" for s in ("gt", "pred") for k in ("genuine", "seam")}
    assert counts["srm_pred_genuine_px"] + counts["srm_pred_seam_px"] == pytest.approx(
        kept.sum() / b
    )


@pytest.mark.slow
def test_srm_loss_on_predicted_masks_trains_only_the_srm(predicted_setup):
    c, _, batch, variables = predicted_setup
    model = build.build_model(
        _config(**{"srm.train_masks": "predicted", "test.instance_score_thresh": 0.0})
    )

    def srm_loss(params):
        out = _train(model, {**variables, "params": params}, batch)
        assert out["srm_labels"].shape[0] == int(c.train.batch_size)
        return losses.srm_loss(out["srm_logits"], out["srm_labels"])

    grads = jit(jax.grad(srm_loss))(variables["params"])
    norms = {k: float(optax_norm(g)) for k, g in grads.items()}
    assert norms["srm"] > 0
    assert all(v == 0.0 for k, v in norms.items() if k != "srm"), norms


def optax_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


# ------------------------------------------------------------------------------- switches


def _stuff_logits(model, variables, batch):
    return model.apply(
        variables, batch, method=lambda m, b: m._trunk(b, train=False)["stuff_logits"]
    )


@pytest.mark.slow
def test_stuff_only_head():
    c = _config(**{"stuff_head.classes": "stuff"})
    model = build.build_model(c)
    batch = _batch(c)
    variables = _trunk_init(model, batch)
    predictor = lambda v: nn.meta.unbox(v["params"]["stuff_head"]["predictor"]["kernel"])
    assert predictor(variables).shape[-1] == S
    all_vars = _trunk_init(build.build_model(_config()), batch, abstract=True)
    assert predictor(all_vars).shape[-1] == T + S

    logits = jit(functools.partial(_stuff_logits, model))(variables, batch)
    assert logits.shape == (2, 16, 16, T + S)
    assert np.all(np.asarray(logits[..., :T]) == STUFF_ONLY_THING_LOGIT)
    assert np.all(np.asarray(jnp.argmax(logits, -1)) >= T)

    # The semantic loss ignores thing pixels: it equals the loss with them set to void.
    sem = jnp.asarray(batch["semantic"])
    stuff_only = losses.semantic_loss(logits, sem, ignore_below=T)
    as_void = losses.semantic_loss(logits, jnp.where(sem < T, 255, sem))
    np.testing.assert_allclose(float(stuff_only), float(as_void), rtol=1e-6)
    assert float(stuff_only) < 100  # thing labels would cost ~1e4 each
    assert float(losses.semantic_loss(logits, sem)) > 1000


@pytest.mark.slow
@pytest.mark.parametrize(
    "sharing, own, shared_with_stuff",
    [
        ("backbone_fpn", set(), {"backbone", "fpn", "rpn"}),
        ("backbone", {"stuff_fpn", "stuff_skip"}, {"backbone"}),
        ("none", {"stuff_backbone", "stuff_fpn", "stuff_skip"}, set()),
    ],
)
def test_sharing_modes(sharing, own, shared_with_stuff):
    c = _config(sharing=sharing)
    model = build.build_model(c)
    batch = _batch(c)
    variables = _trunk_init(model, batch)
    assert set(variables["params"]) == {"backbone", "fpn", "rpn", "stuff_head"} | own

    # What the stuff branch's output depends on: exactly the modules it shares or owns.
    def seg(params):
        out = _stuff_logits(model, {**variables, "params": params}, batch)
        return losses.semantic_loss(out, jnp.asarray(batch["semantic"]))

    grads = jit(jax.grad(seg))(variables["params"])
    reached = {k for k, g in grads.items() if float(optax_norm(g)) > 0}
    assert reached == {"stuff_head"} | own | shared_with_stuff
    if sharing == "none":  # same architecture, own weights
        shapes = lambda k: jax.tree.map(jnp.shape, nn.meta.unbox(variables["params"][k]))
        assert shapes("stuff_backbone") == shapes("backbone")


def test_stuff_backbone_is_frozen_like_the_backbone():
    from oanet_jax.train import optimizer

    c = _config(sharing="none")
    model = build.build_model(c)
    params = _trunk_init(model, _batch(c), abstract=True)["params"]
    labels = optimizer.param_labels(params, freeze_at=2)
    assert labels["stuff_backbone"] == labels["backbone"]
    assert "frozen" in jax.tree.leaves(labels["stuff_backbone"])


def test_instance_masks_panoptic_ignores_the_instances_json(tmp_path):
    synthetic.generate(str(tmp_path), num_images=6, num_val_images=1, seed=0, size=(64, 64))
    c = tiny.get_config()
    c.data.root = str(tmp_path)

    def overlap(reader) -> int:  # most instances under one pixel, over the split
        return max(int(reader.read(i)["masks"].sum(0).max()) for i in range(len(reader)))

    full = pipeline.make_reader(c.data, "train")
    assert full.masks_from_instances and overlap(full) >= 2
    c.data.instance_masks = "panoptic"
    visible = pipeline.make_reader(c.data, "train")
    assert not visible.masks_from_instances and overlap(visible) == 1
    assert pipeline.make_reader(c.data, "eval").masks_from_instances  # eval keeps its JSON
    c.data.instance_masks = "amodal"
    with pytest.raises(ValueError, match="instance_masks"):
        pipeline.make_reader(c.data, "train")


# ------------------------------------------------------------------- one training step


@pytest.mark.slow
def test_one_training_step_with_the_switches():
    """Every switch off its default in one step (one compile; the forward tests above cover
    each value)."""
    overrides = {"srm.train_masks": "both", "stuff_head.classes": "stuff", "sharing": "none"}
    c = _config(**overrides, **{"test.instance_score_thresh": 0.0})
    model = build.build_model(c)
    batch = _batch(c)
    mesh = sharding.make_mesh(c.sharding, devices=jax.devices()[:1])
    train_state, shardings = state.create_train_state(c, model, mesh, batch)
    fn = step.jit_train_step(
        model, c, mesh, shardings, compiler_options={"xla_backend_optimization_level": 0}
    )
    train_state, metrics = fn(train_state, sharding.shard_batch(batch, mesh))
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["total"]) and int(metrics["nonfinite_skipped"]) == 0
    assert np.isfinite(metrics["seg"]) and metrics["seg"] < 100  # stuff-only: no 1e4 terms
    for s in ("gt", "pred"):
        for k in ("genuine", "seam"):
            assert np.isfinite(metrics[f"srm_{s}_{k}_px"])
    assert metrics["srm_gt_genuine_px"] > 0  # the batch's two GT masks overlap
    assert int(train_state.step) == 1
