"""OANet training losses (paper Eq. 1 and 2), pure float32 functions over batched arrays.

Every loss returns a float32 scalar and follows detectron2's normalisations (Base-RCNN-FPN,
Panoptic FPN), computed over the whole batch (so under data-parallel sharding the sums and counts
are global). All are safe with empty sets: a loss over zero positives / zero valid pixels is 0 with
zero (finite) gradients, using ``where`` on the inputs and ``maximum(count, 1)`` denominators.

Inputs may be bfloat16; everything is cast to float32 first.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from oanet_jax.ops.resize import upsample_bilinear, upsample_bilinear_block

Array = jax.Array


def _f32(x: Array) -> Array:
    return jnp.asarray(x, jnp.float32)


def smooth_l1(x: Array, beta: float = 0.0) -> Array:
    """Elementwise smooth-L1 of a difference (detectron2 ``fvcore.smooth_l1_loss``).

    ``0.5 x^2 / beta`` where ``|x| < beta`` else ``|x| - 0.5 beta``; plain L1 when
    ``beta < 1e-5`` (as detectron2, which avoids the division by a tiny beta).

    Args:
      x: [...] float differences.
      beta: static float transition point.

    Returns:
      [...] float32.
    """
    x = _f32(x)
    ax = jnp.abs(x)
    if beta < 1e-5:
        return ax
    return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def _bce_with_logits(logits: Array, targets: Array) -> Array:
    """Elementwise, numerically stable ``BCEWithLogits``: max(x,0) - x t + log(1 + exp(-|x|))."""
    x = _f32(logits)
    t = _f32(targets)
    return jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _cross_entropy_sum(logits: Array, labels: Array, valid: Array) -> Array:
    """Sum over ``valid`` positions of the softmax cross entropy.

    Args:
      logits: [..., K] float.
      labels: [...] int (clipped to [0, K) for the gather; mask with ``valid``).
      valid: [...] bool.

    Returns:
      float32 scalar.
    """
    z = _f32(logits)
    k = z.shape[-1]
    lse = jax.nn.logsumexp(z, axis=-1)
    idx = jnp.clip(jnp.asarray(labels, jnp.int32), 0, k - 1)
    picked = jnp.take_along_axis(z, idx[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, lse - picked, 0.0))


def rpn_losses(
    objectness: Array,
    deltas: Array,
    labels: Array,
    box_targets: Array,
    *,
    batch_size_per_image: int = 256,
    smooth_l1_beta: float = 0.0,
) -> tuple[Array, Array]:
    """RPN objectness and box losses (detectron2 ``StandardRPNHead.losses``).

    ``cls = sum_{labels >= 0} BCEWithLogits(objectness, labels == 1) / (batch_size_per_image * B)``
    and ``box = sum_{labels == 1} smooth_l1(deltas - box_targets) / (batch_size_per_image * B)``
    (summed over the 4 coordinates). detectron2 normalises both by the nominal number of sampled
    anchors, ``batch_size_per_image * num_images``, not by the actual count.

    Args:
      objectness: [B, A] float logits (all levels concatenated, anchor order of ops.anchors).
      deltas: [B, A, 4] float predicted deltas.
      labels: [B, A] int 1 / 0 / -1 from ``targets.rpn_targets``.
      box_targets: [B, A, 4] float target deltas (used only where labels == 1).
      batch_size_per_image: the sampler's anchors per image (static).
      smooth_l1_beta: static; 0 = L1 (detectron2 default).

    Returns:
      (cls, box) float32 scalars.
    """
    labels = jnp.asarray(labels, jnp.int32)
    num_images = labels.shape[0]
    normalizer = float(batch_size_per_image * num_images)
    sampled = labels >= 0
    bce = _bce_with_logits(objectness, (labels == 1).astype(jnp.float32))
    cls = jnp.sum(jnp.where(sampled, bce, 0.0)) / normalizer
    pos = (labels == 1)[..., None]
    diff = jnp.where(pos, _f32(deltas) - jnp.where(pos, _f32(box_targets), 0.0), 0.0)
    box = jnp.sum(jnp.where(pos, smooth_l1(diff, smooth_l1_beta), 0.0)) / normalizer
    return cls, box


def fast_rcnn_losses(
    class_logits: Array,
    box_deltas: Array,
    classes: Array,
    box_targets: Array,
    valid: Array,
    *,
    smooth_l1_beta: float = 0.0,
) -> tuple[Array, Array]:
    """Box-head classification and class-specific box losses (detectron2 ``FastRCNNOutputLayers``).

    ``cls`` = softmax cross entropy averaged over the valid sampled RoIs of the whole batch
    (background = index C, last). ``box`` = smooth-L1 of the deltas of each foreground RoI's GT
    class (summed over the 4 coordinates), divided by the number of valid sampled RoIs (detectron2
    divides by ``gt_classes.numel()``, all sampled RoIs, not only foreground).

    Args:
      class_logits: [B, R, C + 1] float logits, background last.
      box_deltas: [B, R, C, 4] float class-specific deltas ([B, R, 1, 4] = class-agnostic).
      classes: [B, R] int in [0, C], C = background.
      box_targets: [B, R, 4] float target deltas (used only for foreground).
      valid: [B, R] bool sampled (non-padding) RoIs.
      smooth_l1_beta: static; 0 = L1 (detectron2 default).

    Returns:
      (cls, box) float32 scalars; both 0 when no RoI is valid.
    """
    classes = jnp.asarray(classes, jnp.int32)
    valid = jnp.asarray(valid, bool)
    num_classes = class_logits.shape[-1] - 1
    count = jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)
    cls = _cross_entropy_sum(class_logits, classes, valid) / count

    fg = valid & (classes >= 0) & (classes < num_classes)
    d = _f32(box_deltas)
    if d.shape[-2] == 1:
        pred = d[..., 0, :]
    else:
        idx = jnp.clip(classes, 0, d.shape[-2] - 1)[..., None, None]  # [B, R, 1, 1]
        pred = jnp.take_along_axis(d, idx, axis=-2)[..., 0, :]  # [B, R, 4]
    m = fg[..., None]
    diff = jnp.where(m, pred - jnp.where(m, _f32(box_targets), 0.0), 0.0)
    box = jnp.sum(jnp.where(m, smooth_l1(diff, smooth_l1_beta), 0.0)) / count
    return cls, box


def mask_loss(mask_logits: Array, classes: Array, targets: Array, is_fg: Array) -> Array:
    """Mask loss (detectron2 ``mask_rcnn_loss``): BCE on the GT class channel, fg RoIs only.

    Mean over all pixels of all foreground RoIs in the batch; 0 when there is none. Slots that
    are not foreground count for nothing, so the loss over the first k slots of each image equals
    the loss over all R when no foreground lies past k: what lets the model run its mask head on
    a bucket of k RoIs (`oanet_jax.modeling.oanet.mask_buckets`).

    Args:
      mask_logits: [B, R, P, P, C] float class-specific logits ([..., 1] = class-agnostic).
      classes: [B, R] int GT class of each RoI (used for foreground only).
      targets: [B, R, P, P] float binary targets from ``targets.mask_targets``.
      is_fg: [B, R] bool foreground (valid) RoIs.

    Returns:
      float32 scalar.
    """
    logits = _f32(mask_logits)
    is_fg = jnp.asarray(is_fg, bool)
    c = logits.shape[-1]
    if c == 1:
        sel = logits[..., 0]
    else:
        idx = jnp.clip(jnp.asarray(classes, jnp.int32), 0, c - 1)[:, :, None, None, None]
        sel = jnp.take_along_axis(logits, idx, axis=-1)[..., 0]  # [B, R, P, P]
    m = is_fg[..., None, None]
    bce = _bce_with_logits(jnp.where(m, sel, 0.0), jnp.where(m, _f32(targets), 0.0))
    pixels = sel.shape[-2] * sel.shape[-1]
    count = jnp.maximum(jnp.sum(is_fg, dtype=jnp.float32) * pixels, 1.0)
    return jnp.sum(jnp.where(m, bce, 0.0)) / count


def semantic_loss(
    logits: Array,
    semantic: Array,
    *,
    ignore_label: int = 255,
    scale: int = 4,
    chunk_rows: int | None = None,
    ignore_below: int = 0,
) -> Array:
    """Semantic (stuff + object) segmentation loss of Panoptic FPN: ``L_seg`` of Eq. 1.

    The stride-``scale`` logits are upsampled bilinearly (`oanet_jax.ops.resize`, PyTorch's
    ``F.interpolate(scale_factor=scale, align_corners=False)`` as detectron2's ``SemSegFPNHead``)
    to the label resolution, then softmax cross entropy is averaged over the non-ignored pixels of
    the whole batch (``F.cross_entropy(ignore_index=255, reduction='mean')``); 0 if there are none.
    Labels outside [0, K) other than ``ignore_label`` are ignored too (they would be an error in
    PyTorch).

    Memory: the full-resolution logits are ``Hp * Wp * K * 4`` bytes per image, 961 MB at
    1344 x 1344 x 133, and autodiff keeps a few such tensors (upsampled logits, softmax, their
    cotangents) per image, exactly as detectron2. ``chunk_rows=n`` instead processes ``n`` logit
    rows (``scale * n`` label rows) at a time in one ``lax.scan`` that computes each chunk's
    upsample, log-softmax, label gather and (under reverse-mode autodiff) the gradient pulled
    back to the stride-``scale`` logits in the same sweep, so the full-resolution logits never
    exist and nothing is recomputed in the backward pass; the loss and its gradient equal the
    one-shot ones up to float rounding.

    Args:
      logits: [B, h, w, K] float logits at stride ``scale``.
      semantic: [B, Hp, Wp] int labels with ``Hp = scale * h``, ``Wp = scale * w``.
      ignore_label: static label to ignore.
      scale: static integer upsampling factor (the head's stride, 4).
      chunk_rows: static; None = one shot, else logit rows per chunk (must divide h).
      ignore_below: static; labels below it are ignored too (stuff-only supervision, Table 2:
        ``num_thing_classes``, so thing pixels are holes in the target; 0 = none).

    Returns:
      float32 scalar.
    """
    logits = _f32(logits)
    labels = jnp.asarray(semantic).astype(jnp.int32)
    b, h, w, k = logits.shape
    if labels.shape != (b, scale * h, scale * w):
        raise ValueError(
            f"semantic {labels.shape} must be scale={scale} times the logits {logits.shape[:3]}"
        )
    valid = (labels != ignore_label) & (labels >= int(ignore_below)) & (labels < k)
    count = jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)

    if chunk_rows is None:
        return _cross_entropy_sum(upsample_bilinear(logits, scale), labels, valid) / count

    n = int(chunk_rows)
    if n <= 0 or h % n:
        raise ValueError(f"chunk_rows={chunk_rows} must divide the logit height {h}")
    return _chunked_cross_entropy_sum(logits, labels, valid, n, scale) / count


def _chunk_pass(
    logits: Array, labels: Array, valid: Array, n: int, scale: int, with_grad: bool
) -> tuple[Array, Array | None]:
    """One sweep over chunks of ``n`` logit rows: CE sum, and optionally its logit gradient.

    Per chunk, the ``n + 2`` logit rows it needs (edge-replicated at the map's ends) are
    upsampled (`oanet_jax.ops.resize.upsample_bilinear_block`, bit-identical to the full
    upsample's rows), the CE is summed over its valid pixels and, with `with_grad`, the gradient
    ``valid * (softmax - onehot)`` of that sum w.r.t. the chunk's upsampled logits is pulled back
    through the upsample onto the ``n + 2`` rows and added into a [B, h + 2, w, K] accumulator.
    Only one chunk's full-resolution logits exist at a time, and the gradient needs no second
    pass (no recomputation of the upsample or the log-sum-exp).

    Returns:
      (float32 CE sum, [B, h, w, K] float32 gradient of it w.r.t. `logits`, or None).
    """
    b, h, w, k = logits.shape
    num_chunks = h // n
    padded = jnp.pad(logits, ((0, 0), (1, 1), (0, 0), (0, 0)), mode="edge")  # [B, h + 2, w, K]
    shape = (b, num_chunks, scale * n, scale * w)
    label_chunks = labels.reshape(shape).swapaxes(0, 1)
    valid_chunks = valid.reshape(shape).swapaxes(0, 1)
    classes = jnp.arange(k, dtype=jnp.int32)

    def body(carry, xs):
        total, acc = carry
        start, lab, val = xs
        block = jax.lax.dynamic_slice_in_dim(padded, start, n + 2, axis=1)
        up, pullback = jax.vjp(lambda x: upsample_bilinear_block(x, scale), block)
        lse = jax.nn.logsumexp(up, axis=-1)
        idx = jnp.clip(lab, 0, k - 1)
        picked = jnp.take_along_axis(up, idx[..., None], axis=-1)[..., 0]
        total = total + jnp.sum(jnp.where(val, lse - picked, 0.0))
        if with_grad:
            onehot = (classes == idx[..., None]).astype(jnp.float32)
            g = jnp.where(val[..., None], jnp.exp(up - lse[..., None]) - onehot, 0.0)
            (g_block,) = pullback(g)
            here = jax.lax.dynamic_slice_in_dim(acc, start, n + 2, axis=1)
            acc = jax.lax.dynamic_update_slice_in_dim(acc, here + g_block, start, axis=1)
        return (total, acc), None

    acc0 = jnp.zeros(padded.shape if with_grad else (0,), jnp.float32)
    starts = jnp.arange(num_chunks, dtype=jnp.int32) * n
    (total, acc), _ = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), acc0), (starts, label_chunks, valid_chunks)
    )
    if not with_grad:
        return total, None
    # Fold the edge-copy rows back onto the first and last rows they replicate.
    grad = acc[:, 1 : h + 1]
    grad = grad.at[:, 0].add(acc[:, 0]).at[:, h - 1].add(acc[:, h + 1])
    return total, grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_cross_entropy_sum(
    logits: Array, labels: Array, valid: Array, n: int, scale: int
) -> Array:
    """CE sum over the valid pixels of the x`scale` upsampled logits, ``n`` logit rows at a time.

    Args:
      logits: [B, h, w, K] float32 logits at stride `scale`.
      labels: [B, scale * h, scale * w] int32 labels.
      valid: [B, scale * h, scale * w] bool.
      n: static logit rows per chunk (divides h).
      scale: static upsampling factor.

    Returns:
      float32 scalar. Reverse-mode differentiable w.r.t. `logits` (the gradient is computed in
      the same sweep as the forward value, see :func:`_chunk_pass`).
    """
    return _chunk_pass(logits, labels, valid, n, scale, with_grad=False)[0]


def _chunked_ce_fwd(logits, labels, valid, n, scale):
    total, grad = _chunk_pass(logits, labels, valid, n, scale, with_grad=True)
    return total, grad


def _chunked_ce_bwd(n, scale, grad, cotangent):
    del n, scale
    return cotangent * grad, None, None


_chunked_cross_entropy_sum.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def srm_loss(logits: Array, labels: Array, *, ignore_label: int = 255) -> Array:
    """Spatial ranking module loss, Eq. 2: softmax CE over thing classes at labelled pixels.

    Mean over the non-ignored pixels (the conflicting pixels with a thing label, see
    ``targets.srm_targets``) of the whole batch; 0 when there is none.

    Args:
      logits: [B, h, w, T] float SRM logits.
      labels: [B, h, w] int thing class or ``ignore_label``.
      ignore_label: static.

    Returns:
      float32 scalar.
    """
    labels = jnp.asarray(labels, jnp.int32)
    t = logits.shape[-1]
    valid = (labels != ignore_label) & (labels >= 0) & (labels < t)
    count = jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)
    return _cross_entropy_sum(logits, labels, valid) / count


LOSS_TERMS = ("rpn_cls", "rpn_box", "cls", "box", "mask", "seg", "srm")


def oanet_loss(
    rpn_cls: Array,
    rpn_box: Array,
    cls: Array,
    box: Array,
    mask: Array,
    seg: Array,
    srm: Array,
    *,
    seg_weight: float = 0.25,
    srm_weight: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """The total loss of Eq. 1.

    ``total = rpn_cls + rpn_box + cls + box + mask + seg_weight * seg + srm_weight * srm``
    (lambda = ``seg_weight`` = 0.25, Table 1).

    Args:
      rpn_cls, rpn_box, cls, box, mask, seg, srm: float scalars (the unweighted terms).
      seg_weight: lambda of Eq. 1.
      srm_weight: weight of the SRM loss (1 in the paper).

    Returns:
      (total float32 scalar, dict of the unweighted float32 terms keyed by ``LOSS_TERMS``).
    """
    terms = {
        "rpn_cls": _f32(rpn_cls),
        "rpn_box": _f32(rpn_box),
        "cls": _f32(cls),
        "box": _f32(box),
        "mask": _f32(mask),
        "seg": _f32(seg),
        "srm": _f32(srm),
    }
    total = (
        terms["rpn_cls"]
        + terms["rpn_box"]
        + terms["cls"]
        + terms["box"]
        + terms["mask"]
        + seg_weight * terms["seg"]
        + srm_weight * terms["srm"]
    )
    return total, terms


def compute_losses(
    outputs: Mapping[str, Array],
    batch: Mapping[str, Array],
    *,
    rpn_batch_size_per_image: int = 256,
    rpn_smooth_l1_beta: float = 0.0,
    roi_smooth_l1_beta: float = 0.0,
    seg_weight: float = 0.25,
    srm_weight: float = 1.0,
    ignore_label: int = 255,
    seg_chunk_rows: int | None = None,
    seg_ignore_below: int = 0,
) -> tuple[Array, dict[str, Array]]:
    """All terms of Eq. 1 from the training outputs of ``OANet`` and the batch.

    Args:
      outputs: the training forward pass's dict: 'rpn_objectness' [B, A], 'rpn_deltas'
        [B, A, 4], 'rpn_labels' [B, A], 'rpn_box_targets' [B, A, 4], 'class_logits'
        [B, R, C+1], 'box_deltas' [B, R, C, 4], 'roi_classes' [B, R], 'roi_box_targets'
        [B, R, 4], 'roi_valid' [B, R], 'mask_loss' [] (:func:`mask_loss`, computed by the
        model on its bucket of mask RoIs), 'stuff_logits' [B, h, w, K] at stride 4,
        'srm_logits' [B', h', w', T], 'srm_labels' [B', h', w'] (B' = 2B when the SRM is
        trained on ground-truth and predicted masks).
      batch: the input batch; uses 'semantic' [B, Hp, Wp] uint8 (Hp = 4 h, Wp = 4 w).
      rpn_batch_size_per_image: the RPN sampler's anchors per image (loss normaliser).
      rpn_smooth_l1_beta, roi_smooth_l1_beta: smooth-L1 betas (0 = L1).
      seg_weight, srm_weight: weights of Eq. 1.
      ignore_label: ignore value of the semantic and SRM labels.
      seg_chunk_rows: ``chunk_rows`` of :func:`semantic_loss`.
      seg_ignore_below: ``ignore_below`` of :func:`semantic_loss` (T for a stuff-only head).

    Returns:
      (total, terms) as :func:`oanet_loss`.
    """
    rpn_cls, rpn_box = rpn_losses(
        outputs["rpn_objectness"],
        outputs["rpn_deltas"],
        outputs["rpn_labels"],
        outputs["rpn_box_targets"],
        batch_size_per_image=rpn_batch_size_per_image,
        smooth_l1_beta=rpn_smooth_l1_beta,
    )
    cls, box = fast_rcnn_losses(
        outputs["class_logits"],
        outputs["box_deltas"],
        outputs["roi_classes"],
        outputs["roi_box_targets"],
        outputs["roi_valid"],
        smooth_l1_beta=roi_smooth_l1_beta,
    )
    mask = outputs["mask_loss"]  # made by the model inside its mask-RoI bucket (mask_loss)
    seg = semantic_loss(
        outputs["stuff_logits"],
        batch["semantic"],
        ignore_label=ignore_label,
        chunk_rows=seg_chunk_rows,
        ignore_below=seg_ignore_below,
    )
    srm = srm_loss(outputs["srm_logits"], outputs["srm_labels"], ignore_label=ignore_label)
    return oanet_loss(
        rpn_cls, rpn_box, cls, box, mask, seg, srm, seg_weight=seg_weight, srm_weight=srm_weight
    )
