"""Training targets of OANet: RPN labels, sampled RoIs, mask targets, semantic and SRM labels.

Every function here is pure, works on ONE image with static shapes, computes in float32 and is
meant to be batched with ``jax.vmap`` (anchors shared: ``in_axes=None``; one PRNG key per image).
Targets carry no gradient (``stop_gradient``).

Ground truth follows DESIGN.md: ``gt_boxes [M, 4]`` x1y1x2y2 absolute pixels, ``gt_classes [M]``
contiguous thing ids, ``gt_valid [M]`` (False for padding rows), ``gt_crowd [M]``. The semantics
are detectron2's (Base-RCNN-FPN, Panoptic FPN):

* Crowd annotations: detectron2's ``DatasetMapper`` drops ``iscrowd`` annotations from the
  training instances, so crowd boxes are neither matched nor used to ignore anything. That is
  what these functions do by default: a crowd row is treated exactly like a padded row.
  ``rpn_targets(crowd_ioa_threshold=...)`` optionally marks anchors that lie inside a crowd
  region as ignored instead (Detectron1 style); detectron2 has no such option.
* Empty boxes: detectron2's ``filter_empty_instances`` removes ground truth whose width or height
  is <= 1e-5; such rows are treated as padding too. (This also guards against the Matcher quirk
  where a valid zero-area box would make every anchor with IoU 0 a low-quality positive.)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from oanet_jax.modeling import srm as srm_lib
from oanet_jax.ops import boxes as box_ops
from oanet_jax.ops import masks as mask_ops
from oanet_jax.ops import matching, sampling

Array = jax.Array

# detectron2's Boxes.nonempty / filter_empty_instances threshold on width and height.
EMPTY_BOX_THRESHOLD = 1e-5


def usable_gt(gt_boxes: Array, gt_valid: Array, gt_crowd: Array) -> Array:
    """Ground truth that takes part in matching: valid, not crowd, non-empty box.

    Args:
      gt_boxes: [M, 4] float boxes (x1, y1, x2, y2).
      gt_valid: [M] bool, False for padding rows.
      gt_crowd: [M] bool, True for crowd annotations.

    Returns:
      [M] bool.
    """
    b = jnp.asarray(gt_boxes, jnp.float32)
    nonempty = ((b[:, 2] - b[:, 0]) > EMPTY_BOX_THRESHOLD) & (
        (b[:, 3] - b[:, 1]) > EMPTY_BOX_THRESHOLD
    )
    return jnp.asarray(gt_valid, bool) & ~jnp.asarray(gt_crowd, bool) & nonempty


def _masked_encode(
    targets: Array, references: Array, mask: Array, weights: Sequence[float]
) -> Array:
    """``encode(targets, references)`` where ``mask``, exactly 0 elsewhere (no inf/NaN).

    Args:
      targets: [N, 4] float target boxes.
      references: [N, 4] float anchors / proposals.
      mask: [N] bool rows to encode.
      weights: box coder weights.

    Returns:
      [N, 4] float32 deltas.
    """
    unit = jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32)
    m = mask[:, None]
    t = jnp.where(m, jnp.asarray(targets, jnp.float32), unit)
    r = jnp.where(m, jnp.asarray(references, jnp.float32), unit)
    return jnp.where(m, box_ops.encode(t, r, weights), 0.0)


def rpn_targets(
    anchors: Array,
    gt_boxes: Array,
    gt_valid: Array,
    gt_crowd: Array,
    image_shape: Array,
    key: Array,
    *,
    iou_thresholds: Sequence[float] = (0.3, 0.7),
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
    box_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    boundary_thresh: float = -1.0,
    crowd_ioa_threshold: float | None = None,
) -> dict[str, Array]:
    """RPN anchor labels and regression targets (detectron2 ``RPN.label_and_sample_anchors``).

    1. IoU of usable ground truth (see module docstring) vs. all anchors; detectron2 ``Matcher``
       with ``iou_thresholds`` and labels (0, -1, 1), ``allow_low_quality_matches=True``.
    2. ``boundary_thresh >= 0`` marks anchors that extend more than ``boundary_thresh`` pixels
       outside ``image_shape`` as ignored (``Boxes.inside_box``); the default -1 keeps every
       anchor, as detectron2's default ``RPN.BOUNDARY_THRESH = -1``.
    3. Balanced sampling of ``batch_size_per_image`` anchors with ``positive_fraction``
       positives (``sampling.sample_balanced_mask``, detectron2 ``subsample_labels``).
    4. Regression targets ``encode(matched gt, anchor)`` for sampled positives, 0 elsewhere.

    Memory: the IoU matrix is [M, A] float32, e.g. 100 x 361,920 anchors (1344 x 1344, 5 levels,
    3 ratios) = 145 MB per image, plus a few same-size temporaries inside the matcher.

    Args:
      anchors: [A, 4] float32 anchors (x1, y1, x2, y2), e.g. ``ops.anchors`` concatenated over
        levels.
      gt_boxes: [M, 4] float ground-truth boxes.
      gt_valid: [M] bool, False for padding.
      gt_crowd: [M] bool crowd flags.
      image_shape: [2] int (h, w) of the un-padded image (used only when
        ``boundary_thresh >= 0``).
      key: PRNG key of the sampler.
      iou_thresholds: (negative below, positive from), static.
      batch_size_per_image: sampled anchors per image, static.
      positive_fraction: target fraction of positives, static.
      box_weights: box coder weights (wx, wy, ww, wh), static.
      boundary_thresh: see step 2, static.
      crowd_ioa_threshold: None (detectron2: crowd dropped). A float t: anchors that are not
        positive and whose intersection-over-anchor-area with a crowd box is >= t become -1.

    Returns:
      dict with
        ``labels``: [A] int32, 1 sampled positive, 0 sampled negative, -1 ignored / not sampled;
        ``box_targets``: [A, 4] float32 deltas, non-zero only at sampled positives;
        ``matched_gt``: [A] int32 index of the matched ground truth (the argmax; 0 if none);
        ``match_labels``: [A] int32 matcher labels (1 / 0 / -1) before sampling.
    """
    anchors = jnp.asarray(anchors, jnp.float32)
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    gt_valid = jnp.asarray(gt_valid, bool)
    gt_crowd = jnp.asarray(gt_crowd, bool)
    usable = usable_gt(gt_boxes, gt_valid, gt_crowd)
    similarity = box_ops.iou(gt_boxes, anchors)  # [M, A]

    if crowd_ioa_threshold is None:
        matched_idx, match_labels = matching.match(
            similarity, iou_thresholds, (0, -1, 1), True, gt_valid=usable
        )
    else:
        b = gt_boxes
        nonempty = ((b[:, 2] - b[:, 0]) > EMPTY_BOX_THRESHOLD) & (
            (b[:, 3] - b[:, 1]) > EMPTY_BOX_THRESHOLD
        )
        crowd = gt_valid & gt_crowd & nonempty
        matched_idx, match_labels = matching.match(
            similarity,
            iou_thresholds,
            (0, -1, 1),
            True,
            gt_valid=usable | crowd,
            gt_ignore=crowd,
            ignore_similarity=box_ops.ioa(anchors, gt_boxes).T,
            ignore_threshold=float(crowd_ioa_threshold),
        )

    if boundary_thresh >= 0:
        hw = jnp.asarray(image_shape, jnp.float32)
        t = float(boundary_thresh)
        inside = (
            (anchors[:, 0] >= -t)
            & (anchors[:, 1] >= -t)
            & (anchors[:, 2] < hw[1] + t)
            & (anchors[:, 3] < hw[0] + t)
        )
        match_labels = jnp.where(inside, match_labels, -1)

    pos, neg = sampling.sample_balanced_mask(
        match_labels, batch_size_per_image, positive_fraction, key
    )
    labels = jnp.where(pos, 1, jnp.where(neg, 0, -1)).astype(jnp.int32)
    matched_boxes = jnp.take(gt_boxes, matched_idx, axis=0)
    box_targets = _masked_encode(matched_boxes, anchors, pos, box_weights)
    return {
        "labels": jax.lax.stop_gradient(labels),
        "box_targets": jax.lax.stop_gradient(box_targets),
        "matched_gt": matched_idx.astype(jnp.int32),
        "match_labels": match_labels.astype(jnp.int32),
    }


def sample_rois(
    proposals: Array,
    proposal_valid: Array,
    gt_boxes: Array,
    gt_classes: Array,
    gt_valid: Array,
    gt_crowd: Array,
    key: Array,
    *,
    num_classes: int,
    batch_size_per_image: int = 512,
    positive_fraction: float = 0.25,
    iou_threshold: float = 0.5,
    box_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
) -> dict[str, Array]:
    """RoI sampling for the box/mask heads (detectron2 ``ROIHeads.label_and_sample_proposals``).

    1. The ground-truth boxes are appended to the proposals (detectron2's ``proposal_append_gt``):
       candidates are ``[proposals (K); gt_boxes (M)]``; a GT row is a valid candidate only when
       it is usable (valid, not crowd, non-empty), padded/crowd rows are invalid candidates.
    2. ``Matcher(thresholds=[iou_threshold], labels=[0, 1], allow_low_quality_matches=False)``
       of usable ground truth vs. candidates; candidate class = class of the matched GT when
       IoU >= ``iou_threshold`` else ``num_classes`` (background).
    3. ``sampling.sample_balanced`` with ``bg_label=num_classes`` picks R =
       ``batch_size_per_image`` slots among valid candidates: at most
       ``int(R * positive_fraction)`` foreground first, then background, then padding slots
       (``valid=False``) when there are fewer than R candidates.
    4. Box targets ``encode(matched gt, roi, box_weights)`` for foreground, 0 elsewhere.

    Args:
      proposals: [K, 4] float proposals (x1, y1, x2, y2); gradients are stopped.
      proposal_valid: [K] bool.
      gt_boxes: [M, 4] float ground-truth boxes.
      gt_classes: [M] int contiguous thing class ids in [0, num_classes).
      gt_valid: [M] bool, False for padding.
      gt_crowd: [M] bool crowd flags (dropped, as detectron2).
      key: PRNG key of the sampler.
      num_classes: number of thing classes C (static); background is C.
      batch_size_per_image: R, static.
      positive_fraction: static.
      iou_threshold: foreground IoU threshold, static.
      box_weights: RoI box coder weights, static.

    Returns:
      dict with
        ``rois``: [R, 4] float32 sampled boxes (no gradient); padding slots repeat candidate 0
          (a real proposal, harmless for RoIAlign; mask with ``valid``);
        ``classes``: [R] int32 in [0, C], C = background (also in padding slots);
        ``box_targets``: [R, 4] float32, non-zero only for foreground;
        ``matched_gt``: [R] int32 index into M of the matched ground truth (the argmax, also for
          background slots; 0 in padding slots or when there is no usable GT);
        ``is_fg``: [R] bool, valid foreground;
        ``valid``: [R] bool, filled slots.
    """
    num_classes = int(num_classes)
    proposals = jax.lax.stop_gradient(jnp.asarray(proposals, jnp.float32))
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    gt_classes = jnp.asarray(gt_classes, jnp.int32)
    usable = usable_gt(gt_boxes, gt_valid, gt_crowd)

    candidates = jnp.concatenate([proposals, gt_boxes], axis=0)  # [K + M, 4]
    cand_valid = jnp.concatenate([jnp.asarray(proposal_valid, bool), usable], axis=0)
    similarity = box_ops.iou(gt_boxes, candidates)  # [M, K + M]
    matched_idx, match_labels = matching.match(
        similarity, (float(iou_threshold),), (0, 1), False, gt_valid=usable
    )
    cand_classes = jnp.where(
        match_labels == 1, jnp.take(gt_classes, matched_idx), num_classes
    ).astype(jnp.int32)

    idx, sampled_classes, slot_valid = sampling.sample_balanced(
        cand_classes,
        batch_size_per_image,
        positive_fraction,
        key,
        valid=cand_valid,
        bg_label=num_classes,
    )
    rois = jnp.take(candidates, idx, axis=0)
    classes = jnp.where(slot_valid, sampled_classes, num_classes).astype(jnp.int32)
    matched_gt = jnp.where(slot_valid, jnp.take(matched_idx, idx), 0).astype(jnp.int32)
    is_fg = slot_valid & (classes < num_classes)
    box_targets = _masked_encode(jnp.take(gt_boxes, matched_gt, axis=0), rois, is_fg, box_weights)
    return {
        "rois": jax.lax.stop_gradient(rois),
        "classes": classes,
        "box_targets": jax.lax.stop_gradient(box_targets),
        "matched_gt": matched_gt,
        "is_fg": is_fg,
        "valid": slot_valid,
    }


def mask_targets(
    gt_masks: Array,
    gt_boxes: Array,
    rois: Array,
    matched_gt: Array,
    out_size: int = 28,
    threshold: float = 0.5,
) -> Array:
    """Binary mask targets: each RoI's matched GT mask resampled into its frame, ``>= 0.5``.

    Uses ``ops.masks.resample_masks`` (bilinear point sample of the S x S box-cropped GT mask at
    the centres of the RoI's ``out_size`` x ``out_size`` cells); see its docstring for how this
    approximates detectron2's RoIAlign of the full-resolution bitmask. Rows of background or
    padding RoIs hold whatever their ``matched_gt`` gives; mask them with ``is_fg``.

    Args:
      gt_masks: [M, S, S] float GT masks in [0, 1] cropped to ``gt_boxes``.
      gt_boxes: [M, 4] float GT boxes.
      rois: [R, 4] float sampled RoIs.
      matched_gt: [R] int32 index into M per RoI.
      out_size: static output side (28).
      threshold: static binarisation threshold.

    Returns:
      [R, out_size, out_size] float32 in {0, 1}, no gradient.
    """
    soft = mask_ops.resample_masks(
        jax.lax.stop_gradient(jnp.asarray(gt_masks, jnp.float32)),
        jnp.asarray(gt_boxes, jnp.float32),
        jax.lax.stop_gradient(jnp.asarray(rois, jnp.float32)),
        jnp.asarray(matched_gt, jnp.int32),
        int(out_size),
    )
    return jax.lax.stop_gradient((soft >= threshold).astype(jnp.float32))


def semantic_target(semantic: Array) -> Array:
    """The semantic-segmentation target: the panoptic label map as int32.

    Args:
      semantic: [Hp, Wp] uint8 contiguous class ids, 255 = void / padding.

    Returns:
      [Hp, Wp] int32 (255 stays the ignore label).
    """
    return jnp.asarray(semantic).astype(jnp.int32)


def srm_targets(
    gt_masks: Array,
    gt_boxes: Array,
    gt_classes: Array,
    valid: Array,
    semantic: Array,
    image_size: tuple[int, int],
    stride: int,
    num_thing_classes: int,
    *,
    mask_threshold: float = 0.5,
    ignore_label: int = 255,
    label_in_canvas: bool = False,
) -> dict[str, Array]:
    """Input canvas and labels of the spatial ranking module (paper Eq. 2).

    From ground truth (the paper) or from the network's own predicted masks
    (`config.model.srm.train_masks`: pass the detections' box-frame mask probabilities, boxes,
    classes, the in-canvas flags and the inference ``mask_threshold``).

    GT instance masks are pasted at the SRM stride (``srm.paste_instances``, threshold 0.5) into
    the per-thing-class canvas (``srm.build_canvas``). Canvas pixel (i, j) is centred at image
    point ``((j + 0.5) * stride, (i + 0.5) * stride)``; its label is the panoptic (semantic)
    label at that point, nearest-neighbour: ``semantic[floor((i + 0.5) * stride),
    floor((j + 0.5) * stride)]`` (indices clamped to the map), kept only where the pixel is
    conflicting (covered by instances of >= 2 different thing classes, ``srm.conflict_mask``) and
    the label is a thing
    class (< T); everywhere else ``ignore_label``. With ``label_in_canvas`` the label must
    also be one of the classes active at the pixel (for predicted masks: a conflict between,
    say, a person and a dog mask where the panoptic ground truth shows a car says nothing about
    which of the two masks lies on top, so it is ignored).

    Args:
      gt_masks: [M, S, S] float GT masks in [0, 1] cropped to their boxes.
      gt_boxes: [M, 4] float GT boxes (padded-image pixels).
      gt_classes: [M] int thing class ids in [0, T).
      valid: [M] bool instances to paste; pass ``gt_valid & ~gt_crowd``.
      semantic: [Hp, Wp] uint8/int panoptic label map (255 void).
      image_size: (Hp, Wp) static padded image size.
      stride: static SRM stride (4).
      num_thing_classes: T, static.
      mask_threshold: static paste threshold.
      ignore_label: static ignore value.
      label_in_canvas: static; keep only labels whose class channel is active at the pixel.

    Returns:
      dict with ``canvas`` [h, w, T] float32 in {0, 1}, ``labels`` [h, w] int32 (thing class or
      ``ignore_label``), ``conflict`` [h, w] bool, and its split ``genuine`` / ``seam`` [h, w]
      bool (``srm.split_conflicts``); h = ceil(Hp / stride), w = ceil(Wp / stride).
    """
    image_size = (int(image_size[0]), int(image_size[1]))
    stride = int(stride)
    t = int(num_thing_classes)
    valid = jnp.asarray(valid, bool)
    inst = srm_lib.paste_instances(
        jnp.asarray(gt_masks, jnp.float32)[None],
        jnp.asarray(gt_boxes, jnp.float32)[None],
        valid[None],
        image_size,
        stride,
        threshold=mask_threshold,
    )  # [1, M, h, w]
    inst = jax.lax.stop_gradient(inst)
    classes = jnp.asarray(gt_classes, jnp.int32)[None]
    canvas = srm_lib.build_canvas(inst, classes, valid[None], t)[0]
    conflict = srm_lib.conflict_mask(canvas[None])[0]
    h, w = conflict.shape

    sem = jnp.asarray(semantic).astype(jnp.int32)
    hp, wp = sem.shape
    rows = np.minimum(np.floor((np.arange(h) + 0.5) * stride).astype(np.int32), hp - 1)
    cols = np.minimum(np.floor((np.arange(w) + 0.5) * stride).astype(np.int32), wp - 1)
    sampled = jnp.take(jnp.take(sem, rows, axis=0), cols, axis=1)  # [h, w]
    keep = conflict & (sampled >= 0) & (sampled < t)
    if label_in_canvas:
        active = jnp.take_along_axis(canvas, jnp.clip(sampled, 0, t - 1)[..., None], axis=-1)
        keep = keep & (active[..., 0] > 0)
    labels = jnp.where(keep, sampled, ignore_label).astype(jnp.int32)
    genuine, seam = srm_lib.split_conflicts(canvas[None])
    return {
        "canvas": canvas,
        "labels": labels,
        "conflict": conflict,
        "genuine": genuine[0],
        "seam": seam[0],
    }
