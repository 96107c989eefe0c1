"""Tests for oanet_jax.losses against torch.nn.functional with detectron2's normalisations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oanet_jax import losses as L

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = {"rtol": 1e-5, "atol": 1e-5}


def t(x):
    return torch.tensor(np.asarray(x))


def finite_grads(fn, *args):
    grads = jax.jit(jax.grad(fn, argnums=tuple(range(len(args)))))(*args)
    return all(bool(np.isfinite(np.asarray(g)).all()) for g in grads)


# ----------------------------------------------------------------------------- RPN


def rpn_case(seed, b=2, a=300, p_pos=0.1, p_neg=0.5):
    rng = np.random.default_rng(seed)
    obj = rng.normal(scale=3, size=(b, a)).astype(np.float32)
    deltas = rng.normal(size=(b, a, 4)).astype(np.float32)
    u = rng.uniform(size=(b, a))
    labels = np.where(u < p_pos, 1, np.where(u < p_pos + p_neg, 0, -1)).astype(np.int32)
    targets = rng.normal(size=(b, a, 4)).astype(np.float32)
    return obj, deltas, labels, targets


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_rpn_losses_vs_torch(beta):
    obj, deltas, labels, targets = rpn_case(0)
    # Non-positive rows of the targets may hold garbage (inf) and must not matter.
    targets[labels != 1] = np.inf
    cls, box = jax.jit(lambda *a: L.rpn_losses(*a, smooth_l1_beta=beta))(
        obj, deltas, labels, targets
    )
    norm = 256 * 2
    s = labels >= 0
    want_cls = (
        F.binary_cross_entropy_with_logits(
            t(obj[s]), t((labels[s] == 1).astype(np.float32)), reduction="sum"
        )
        / norm
    )
    p = labels == 1
    if beta == 0:
        want_box = F.l1_loss(t(deltas[p]), t(targets[p]), reduction="sum") / norm
    else:
        want_box = F.smooth_l1_loss(t(deltas[p]), t(targets[p]), beta=beta, reduction="sum") / norm
    np.testing.assert_allclose(float(cls), want_cls.item(), **TOL)
    np.testing.assert_allclose(float(box), want_box.item(), **TOL)
    assert finite_grads(lambda o, d: sum(L.rpn_losses(o, d, labels, targets)), obj, deltas)


def test_rpn_losses_gradient_vs_torch():
    obj, deltas, labels, targets = rpn_case(1)
    g_obj, g_del = jax.grad(lambda o, d: sum(L.rpn_losses(o, d, labels, targets)), (0, 1))(
        obj, deltas
    )
    to, td = t(obj).requires_grad_(), t(deltas).requires_grad_()
    s, p = t(labels >= 0), t(labels == 1)
    loss = (
        F.binary_cross_entropy_with_logits(to[s], p[s].float(), reduction="sum")
        + F.l1_loss(td[p], t(targets)[p], reduction="sum")
    ) / 512
    loss.backward()
    np.testing.assert_allclose(np.asarray(g_obj), to.grad.numpy(), **TOL)
    np.testing.assert_allclose(np.asarray(g_del), td.grad.numpy(), **TOL)


def test_rpn_losses_no_positives():
    obj, deltas, labels, targets = rpn_case(2, p_pos=0.0)
    cls, box = L.rpn_losses(obj, deltas, labels, targets)
    assert float(box) == 0.0 and np.isfinite(float(cls)) and float(cls) > 0
    none = np.full_like(labels, -1)
    cls, box = L.rpn_losses(obj, deltas, none, targets)
    assert float(cls) == 0.0 and float(box) == 0.0
    assert finite_grads(lambda o, d: sum(L.rpn_losses(o, d, none, targets)), obj, deltas)


# ----------------------------------------------------------------------------- Fast R-CNN


def roi_case(seed, b=2, r=64, c=6, p_valid=0.8):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2, size=(b, r, c + 1)).astype(np.float32)
    deltas = rng.normal(size=(b, r, c, 4)).astype(np.float32)
    classes = rng.integers(0, c + 1, (b, r)).astype(np.int32)
    classes[rng.uniform(size=(b, r)) < 0.5] = c  # plenty of background
    targets = rng.normal(size=(b, r, 4)).astype(np.float32)
    valid = rng.uniform(size=(b, r)) < p_valid
    return logits, deltas, classes, targets, valid


def torch_fast_rcnn(logits, deltas, classes, targets, valid, beta=0.0):
    c = deltas.shape[-2]
    lg, cl = t(logits[valid]), t(classes[valid]).long()
    cls = F.cross_entropy(lg, cl, reduction="mean")
    d, tg = t(deltas[valid]), t(targets[valid])
    fg = (cl >= 0) & (cl < logits.shape[-1] - 1)
    rows = torch.nonzero(fg)[:, 0]
    col = cl[fg] if c > 1 else torch.zeros_like(cl[fg])
    pred = d[rows, col]
    if beta == 0:
        box = F.l1_loss(pred, tg[fg], reduction="sum")
    else:
        box = F.smooth_l1_loss(pred, tg[fg], beta=beta, reduction="sum")
    return cls.item(), (box / max(cl.numel(), 1)).item()


@pytest.mark.parametrize(("agnostic", "beta"), [(False, 0.0), (True, 0.0), (False, 1.0)])
def test_fast_rcnn_losses_vs_torch(agnostic, beta):
    logits, deltas, classes, targets, valid = roi_case(0)
    if agnostic:
        deltas = deltas[:, :, :1]
    cls, box = jax.jit(lambda *a: L.fast_rcnn_losses(*a, smooth_l1_beta=beta))(
        logits, deltas, classes, targets, valid
    )
    want_cls, want_box = torch_fast_rcnn(logits, deltas, classes, targets, valid, beta)
    np.testing.assert_allclose(float(cls), want_cls, **TOL)
    np.testing.assert_allclose(float(box), want_box, **TOL)
    assert want_box > 0


def test_fast_rcnn_losses_empty_and_grads():
    logits, deltas, classes, targets, valid = roi_case(1)
    no_valid = np.zeros_like(valid)
    cls, box = L.fast_rcnn_losses(logits, deltas, classes, targets, no_valid)
    assert float(cls) == 0.0 and float(box) == 0.0
    bg = np.full_like(classes, logits.shape[-1] - 1)
    cls, box = L.fast_rcnn_losses(logits, deltas, bg, targets, valid)
    assert float(box) == 0.0 and float(cls) > 0
    for v, k in ((no_valid, classes), (valid, bg), (valid, classes)):
        fn = lambda lg, d, v=v, k=k: sum(L.fast_rcnn_losses(lg, d, k, targets, v))
        assert finite_grads(fn, logits, deltas)


# ----------------------------------------------------------------------------- masks


def mask_case(seed, b=2, r=12, p=14, c=5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2, size=(b, r, p, p, c)).astype(np.float32)
    classes = rng.integers(0, c, (b, r)).astype(np.int32)
    targets = (rng.uniform(size=(b, r, p, p)) < 0.4).astype(np.float32)
    fg = rng.uniform(size=(b, r)) < 0.4
    return logits, classes, targets, fg


def test_mask_loss_vs_torch():
    logits, classes, targets, fg = mask_case(0)
    got = jax.jit(L.mask_loss)(logits, classes, targets, fg)
    bi, ri = np.nonzero(fg)
    sel = logits[bi, ri, :, :, classes[bi, ri]]  # [n, P, P]
    want = F.binary_cross_entropy_with_logits(t(sel), t(targets[bi, ri]), reduction="mean")
    np.testing.assert_allclose(float(got), want.item(), **TOL)
    # Class-agnostic masks.
    got = L.mask_loss(logits[..., :1], classes, targets, fg)
    want = F.binary_cross_entropy_with_logits(t(logits[bi, ri, :, :, 0]), t(targets[bi, ri]))
    np.testing.assert_allclose(float(got), want.item(), **TOL)


def test_mask_loss_over_a_bucket_of_leading_slots_equals_all_slots():
    """Foreground in the first k slots only: the loss (and its gradient) over those k slots equals
    the loss over all R, as the model's mask-RoI buckets need."""
    logits, classes, targets, _ = mask_case(2)
    k = 5
    fg = np.zeros(classes.shape, bool)
    fg[0, :k] = True  # image 0 fills the bucket
    fg[1, :2] = True
    full = jax.value_and_grad(L.mask_loss)(logits, classes, targets, fg)
    part = jax.value_and_grad(L.mask_loss)(logits[:, :k], classes[:, :k], targets[:, :k], fg[:, :k])
    np.testing.assert_allclose(float(part[0]), float(full[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(part[1]), np.asarray(full[1])[:, :k], rtol=1e-6)
    assert (np.asarray(full[1])[:, k:] == 0).all()


def test_mask_loss_no_fg():
    logits, classes, targets, fg = mask_case(1)
    none = np.zeros_like(fg)
    assert float(L.mask_loss(logits, classes, targets, none)) == 0.0
    assert finite_grads(lambda lg: L.mask_loss(lg, classes, targets, none), logits)
    g = jax.grad(lambda lg: L.mask_loss(lg, classes, targets, none))(logits)
    assert (np.asarray(g) == 0).all()


# ----------------------------------------------------------------------------- semantic / SRM


def sem_case(seed, b=2, h=6, w=5, k=7, p_ignore=0.3):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2, size=(b, h, w, k)).astype(np.float32)
    labels = rng.integers(0, k, (b, 4 * h, 4 * w))
    labels[rng.uniform(size=labels.shape) < p_ignore] = 255
    return logits, labels.astype(np.uint8)


def torch_semantic(logits, labels):
    x = t(logits).permute(0, 3, 1, 2).requires_grad_()
    up = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
    loss = F.cross_entropy(up, t(labels).long(), ignore_index=255, reduction="mean")
    loss.backward()
    return loss.item(), x.grad.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("chunk_rows", [None, 1, 3])
def test_semantic_loss_vs_torch(chunk_rows):
    logits, labels = sem_case(0)
    fn = jax.jit(lambda lg, lb: L.semantic_loss(lg, lb, chunk_rows=chunk_rows))
    got, grad = fn(logits, labels), jax.grad(fn)(logits, labels)
    want, want_grad = torch_semantic(logits, labels)
    np.testing.assert_allclose(float(got), want, **TOL)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("chunk_rows", [1, 2, 6])
def test_semantic_loss_chunked_gradient_equals_one_shot(chunk_rows):
    # The chunked loss computes its gradient in the forward sweep (custom VJP): it must equal
    # autodiff of the one-shot loss, cotangent scaling and out-of-range labels included.
    logits, labels = sem_case(2, k=5)
    labels[0, :3, :4] = 7  # >= K: ignored like 255
    weight = 0.25

    def loss(lg, chunk):
        return weight * L.semantic_loss(lg, labels, chunk_rows=chunk) + jnp.sum(lg) * 1e-3

    want_v, want_g = jax.jit(jax.value_and_grad(lambda lg: loss(lg, None)))(logits)
    got_v, got_g = jax.jit(jax.value_and_grad(lambda lg: loss(lg, chunk_rows)))(logits)
    np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_g), np.asarray(want_g), rtol=1e-5, atol=1e-8)
    # bfloat16 logits: cast to float32 first, the gradient comes back as bfloat16.
    g16 = jax.grad(lambda lg: loss(lg, chunk_rows))(jnp.asarray(logits, jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16


def test_semantic_loss_all_ignored_and_bad_shapes():
    logits, labels = sem_case(1)
    void = np.full_like(labels, 255)
    for chunk in (None, 2):
        fn = lambda lg, chunk=chunk: L.semantic_loss(lg, void, chunk_rows=chunk)
        assert float(fn(logits)) == 0.0
        assert finite_grads(fn, logits)
    with pytest.raises(ValueError, match="scale"):
        L.semantic_loss(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="chunk_rows"):
        L.semantic_loss(logits, labels, chunk_rows=4)


def test_srm_loss_vs_torch():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2, size=(2, 9, 11, 4)).astype(np.float32)
    labels = np.full((2, 9, 11), 255, np.int32)
    conflict = rng.uniform(size=labels.shape) < 0.2
    labels[conflict] = rng.integers(0, 4, conflict.sum())
    got = jax.jit(L.srm_loss)(logits, labels)
    want = F.cross_entropy(
        t(logits).permute(0, 3, 1, 2), t(labels).long(), ignore_index=255, reduction="mean"
    )
    np.testing.assert_allclose(float(got), want.item(), **TOL)
    none = np.full_like(labels, 255)
    assert float(L.srm_loss(logits, none)) == 0.0
    assert finite_grads(lambda lg: L.srm_loss(lg, none), logits)


# ----------------------------------------------------------------------------- total / jit


def test_oanet_loss_total():
    vals = dict(rpn_cls=0.5, rpn_box=0.25, cls=1.0, box=0.75, mask=0.6, seg=2.0, srm=0.4)
    total, terms = L.oanet_loss(**{k: jnp.float32(v) for k, v in vals.items()})
    assert set(terms) == set(L.LOSS_TERMS)
    want = 0.5 + 0.25 + 1.0 + 0.75 + 0.6 + 0.25 * 2.0 + 0.4
    np.testing.assert_allclose(float(total), want, rtol=1e-6)
    total, _ = L.oanet_loss(**vals, seg_weight=1.0, srm_weight=0.0)
    np.testing.assert_allclose(float(total), 0.5 + 0.25 + 1.0 + 0.75 + 0.6 + 2.0, rtol=1e-6)
    assert total.dtype == jnp.float32


def test_jit_vmap_no_recompile():
    """All losses in one jitted function, vmapped over an outer axis: traced once."""
    traces = {"n": 0}

    def all_losses(rpn, roi, mask, sem, srm):
        traces["n"] += 1
        terms = (
            *L.rpn_losses(*rpn),
            *L.fast_rcnn_losses(*roi),
            L.mask_loss(*mask),
            L.semantic_loss(*sem),
            L.srm_loss(*srm),
        )
        return L.oanet_loss(*terms)

    fn = jax.jit(jax.vmap(all_losses))
    stack = lambda *xs: tuple(np.stack(z) for z in zip(*xs, strict=True))
    outs = []
    for seed in range(2):
        args = []
        for s in (seed, seed + 10):  # two elements along the vmapped axis
            lg, lb = sem_case(s)
            srm_lg = np.random.default_rng(s).normal(size=(2, 6, 5, 3)).astype(np.float32)
            srm_lb = np.random.default_rng(s).integers(0, 3, (2, 6, 5)).astype(np.int32)
            args.append((rpn_case(s), roi_case(s), mask_case(s), (lg, lb), (srm_lg, srm_lb)))
        batched = tuple(stack(*[a[i] for a in args]) for i in range(5))
        outs.append((fn(*batched), args))
    assert traces["n"] == 1
    (total, terms), args = outs[1]
    assert total.shape == (2,) and np.isfinite(np.asarray(total)).all()
    # Each vmapped element equals the unbatched computation.
    single, _ = all_losses(*args[1])
    np.testing.assert_allclose(float(total[1]), float(single), rtol=1e-5)


def test_compute_losses_matches_terms():
    rng = np.random.default_rng(5)
    obj, deltas, labels, targets = rpn_case(5)
    logits, bdeltas, classes, btargets, valid = roi_case(5)
    mlog, mcls, mtgt, mfg = mask_case(5)
    slog, sem = sem_case(5)
    srm_lg = rng.normal(size=(2, 6, 5, 3)).astype(np.float32)
    srm_lb = rng.integers(0, 3, (2, 6, 5)).astype(np.int32)
    outputs = {
        "rpn_objectness": obj,
        "rpn_deltas": deltas,
        "rpn_labels": labels,
        "rpn_box_targets": targets,
        "class_logits": logits,
        "box_deltas": bdeltas,
        "roi_classes": classes,
        "roi_box_targets": btargets,
        "roi_valid": valid,
        "mask_loss": L.mask_loss(mlog, mcls, mtgt, mfg),
        "stuff_logits": slog,
        "srm_logits": srm_lg,
        "srm_labels": srm_lb,
    }
    total, terms = jax.jit(L.compute_losses)(outputs, {"semantic": sem})
    want = dict(
        zip(("rpn_cls", "rpn_box"), L.rpn_losses(obj, deltas, labels, targets), strict=True)
    )
    want.update(
        zip(
            ("cls", "box"),
            L.fast_rcnn_losses(logits, bdeltas, classes, btargets, valid),
            strict=True,
        )  # fmt: skip
    )
    want["mask"] = L.mask_loss(mlog, mcls, mtgt, mfg)
    want["seg"] = L.semantic_loss(slog, sem)
    want["srm"] = L.srm_loss(srm_lg, srm_lb)
    for k, v in want.items():
        np.testing.assert_allclose(float(terms[k]), float(v), rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(float(total), float(L.oanet_loss(**want)[0]), rtol=1e-6)
