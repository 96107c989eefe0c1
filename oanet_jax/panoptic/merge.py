"""Panoptic fusion of instance and stuff predictions, jitted with static shapes, on device.

The algorithm is detectron2's ``combine_semantic_and_instance_outputs`` (Panoptic FPN's heuristic
merge), with the instance order given by an explicit key: the detection score for the heuristic
baseline, the spatial ranking module's ranking score for OANet (paper section 3.2). Inference
defaults follow the paper (section 4.2): overlap ratio threshold 0.5, stuff segments under 4,900
pixels removed.

1. Instances are visited in descending ``order_key`` (ties broken by detection slot, lowest first;
   padded detections are never assigned). An instance is skipped when it is padding or its
   detection score is below ``instance_score_thresh``.
2. Its mask is pasted at image resolution (``ops.masks.paste_masks``, stride 1) and binarised with
   ``>= mask_threshold``; pixels outside the un-padded image are cleared. The instance is dropped
   when its area is 0 or when ``intersect / area > overlap_threshold`` with the pixels already
   assigned; otherwise its still-free pixels get its segment id.
3. Stuff: the logits are upsampled bilinearly (``align_corners=False``, scale factor
   ``stuff_stride``, as ``F.interpolate(scale_factor=stride)``) to the padded image size and the
   argmax is taken over the stuff classes only. ``thing_pixels='void'`` (Panoptic FPN) leaves void
   the pixels where the argmax over ALL classes is a thing class (first maximum: a tie goes to the
   thing); ``'stuff'`` gives them the best stuff class. The still-free pixels of each stuff class
   form its segment, without the small areas: with ``stuff_area_unit='class'`` (detectron2) a
   class whose free pixels number fewer than ``stuff_area_limit`` is left void; with ``'region'``
   (the paper's wording, section 4.2) each 4-connected region of a class
   (`oanet_jax.ops.components`) smaller than the limit is left void. Areas are counted in
   original-image pixels when ``orig_shape`` is given (a merge pixel counts ``H * W / (h * w)``),
   else in merge pixels.
4. Pixels outside ``image_shape`` are void (id 0).

Unlike TF Model Garden's panoptic merge, nothing here has a data-dependent shape: the instances are
visited with ``lax.scan`` (one O(Hp * Wp) step each), the segment table is a padded array with a
``valid`` mask, and segment ids are fixed by position: the instance in detection slot ``d`` gets
id ``d + 1``, stuff class ``s`` (``0..S-1``, contiguous class ``T + s``) gets id ``D + 1 + s``.

Memory: pasting all ``D`` masks at once would need ``D * Hp * Wp * 4`` bytes (720 MB for 100
detections at 1344 x 1344, per image). Instead each scan step pastes one instance (``Hp * Wp``
floats plus an ``M x Wp`` intermediate per image, 7 MB at 1344 x 1344), trading memory for ``D``
sequential steps. The stuff upsampling (`oanet_jax.ops.resize.upsample_bilinear_rows`) is done in
blocks of ``row_block`` output rows (``lax.map``) so that the ``[Hp, Wp, S]`` upsampled logits
(383 MB per image for 53 COCO stuff classes at 1344 x 1344) never exist at once; only
``row_block * Wp * S`` floats per image do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from oanet_jax.ops.components import component_sizes, connected_components
from oanet_jax.ops.masks import paste_masks
from oanet_jax.ops.resize import upsample_bilinear_rows

ORDERINGS = ("score", "srm")
THING_PIXELS = ("stuff", "void")
STUFF_AREA_UNITS = ("class", "region")


def _check_options(thing_pixels: str, stuff_area_unit: str) -> None:
    if thing_pixels not in THING_PIXELS:
        raise ValueError(f"thing_pixels must be one of {THING_PIXELS}, got {thing_pixels!r}")
    if stuff_area_unit not in STUFF_AREA_UNITS:
        raise ValueError(
            f"stuff_area_unit must be one of {STUFF_AREA_UNITS}, got {stuff_area_unit!r}"
        )


def order_keys(det_scores: jax.Array, srm_scores: jax.Array, ordering: str) -> jax.Array:
    """The instance order key of a merge ordering.

    Args:
        det_scores: [B, D] float detection scores (heuristic baseline ordering).
        srm_scores: [B, D] float spatial-ranking-module ranking scores (OANet ordering, Eq. 3).
        ordering: 'score' (detection score, the heuristic baseline) or 'srm' (ranking score).

    Returns:
        [B, D] float32 order key for :func:`merge_panoptic` (higher is pasted first).

    Raises:
        ValueError: for an unknown ordering.
    """
    if ordering == "score":
        return jnp.asarray(det_scores, jnp.float32)
    if ordering == "srm":
        return jnp.asarray(srm_scores, jnp.float32)
    raise ValueError(f"unknown merge ordering {ordering!r}; expected one of {ORDERINGS}")


def merge_panoptic(
    det_masks: jax.Array,
    det_boxes: jax.Array,
    det_classes: jax.Array,
    det_scores: jax.Array,
    det_valid: jax.Array,
    order_key: jax.Array,
    stuff_logits: jax.Array,
    image_shape: jax.Array,
    *,
    image_size: tuple[int, int],
    num_thing_classes: int,
    mask_threshold: float = 0.5,
    overlap_threshold: float = 0.5,
    instance_score_thresh: float = 0.5,
    stuff_area_limit: int = 4900,
    stuff_stride: int = 4,
    row_block: int = 64,
    stuff_label_map: jax.Array | None = None,
    orig_shape: jax.Array | None = None,
    thing_pixels: str = "stuff",
    stuff_area_unit: str = "class",
) -> dict:
    """Merges instance and stuff predictions into a panoptic id map and a segment table.

    See the module docstring for the algorithm. Jitted (the keyword arguments are static), so new
    values of the same shapes never recompile. Batched over images with ``jax.vmap``.

    Args:
        det_masks: [B, D, M, M] float predicted-class mask probabilities in the box frame.
        det_boxes: [B, D, 4] float boxes (x1, y1, x2, y2) in padded-image pixels.
        det_classes: [B, D] int32 contiguous thing classes in ``0..T-1``.
        det_scores: [B, D] float detection scores (compared with ``instance_score_thresh``).
        det_valid: [B, D] bool, False for padded detections (never assigned).
        order_key: [B, D] float32 instance order, descending (see :func:`order_keys`).
        stuff_logits: [B, h, w, K] float semantic logits over all K = T + S panoptic classes at
            stride ``stuff_stride`` (channels ``T..K-1`` are the stuff classes).
        image_shape: [B, 2] int (h, w) of the un-padded image; pixels outside are void.
        image_size: static (Hp, Wp), the padded image size.
        num_thing_classes: static T.
        mask_threshold: static; a pasted mask pixel is on where its probability is >= this.
        overlap_threshold: static; an instance is dropped when more than this fraction of its
            mask is already assigned (computed as float32 ``intersect / area``).
        instance_score_thresh: static; instances with a detection score below it are skipped.
        stuff_area_limit: static; stuff classes (or regions) with fewer free pixels are left
            void (pixels of the original image when `orig_shape` is given).
        stuff_stride: static int upsampling factor of ``stuff_logits``.
        row_block: static number of output rows upsampled at once (memory knob, exact;
            rounded up to a multiple of ``stuff_stride``).
        stuff_label_map: optional [B, Hp, Wp] int32 output of :func:`stuff_labels` for the same
            ``stuff_logits``, ``image_shape``, ``image_size``, ``num_thing_classes`` and
            ``stuff_stride``. When given, the merge uses it instead of recomputing the stuff
            argmax (so several orderings merged in one jitted call share one argmax); the result
            is identical. ``stuff_logits`` then only supplies the number of classes. It must
            have been computed with the same ``thing_pixels``.
        orig_shape: optional [B, 2] int (H, W) of the original images: stuff areas are then
            counted in original pixels (scaled by ``H * W / (h * w)``), else in merge pixels.
        thing_pixels: static 'stuff' or 'void' (see the module docstring, step 3).
        stuff_area_unit: static 'class' or 'region' (see the module docstring, step 3).

    Returns:
        dict with
          'id_map': [B, Hp, Wp] int32 segment ids, 0 = void;
          'segments': dict of [B, D + S] arrays, row ``d < D`` for detection slot d, row
            ``D + s`` for stuff class s: 'id' int32 (d + 1 or D + 1 + s), 'category' int32
            (contiguous class: the detection class or T + s), 'isthing' bool, 'area' int32 (pixels
            of the segment in 'id_map'), 'score' float32 (detection score; 0 for stuff), 'valid'
            bool (area > 0; a dropped, skipped, padded or absent segment has valid False and area
            0, its other fields are still filled in).
    """
    det_masks = jnp.asarray(det_masks)
    stuff_logits = jnp.asarray(stuff_logits)
    if det_masks.ndim != 4:
        raise ValueError(f"det_masks must be [B, D, M, M], got shape {det_masks.shape}")
    if stuff_logits.ndim != 4:
        raise ValueError(f"stuff_logits must be [B, h, w, K], got shape {stuff_logits.shape}")
    _check_options(thing_pixels, stuff_area_unit)
    if stuff_logits.shape[-1] < num_thing_classes:
        raise ValueError(
            f"stuff_logits has {stuff_logits.shape[-1]} classes, fewer than the "
            f"{num_thing_classes} thing classes"
        )
    return _merge_panoptic(
        det_masks,
        jnp.asarray(det_boxes),
        jnp.asarray(det_classes),
        jnp.asarray(det_scores),
        jnp.asarray(det_valid),
        jnp.asarray(order_key),
        stuff_logits,
        jnp.asarray(image_shape),
        image_size=(int(image_size[0]), int(image_size[1])),
        num_thing_classes=int(num_thing_classes),
        mask_threshold=float(mask_threshold),
        overlap_threshold=float(overlap_threshold),
        instance_score_thresh=float(instance_score_thresh),
        stuff_area_limit=int(stuff_area_limit),
        stuff_stride=int(stuff_stride),
        row_block=int(row_block),
        stuff_label_map=None if stuff_label_map is None else jnp.asarray(stuff_label_map),
        orig_shape=None if orig_shape is None else jnp.asarray(orig_shape),
        thing_pixels=thing_pixels,
        stuff_area_unit=stuff_area_unit,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "image_size",
        "num_thing_classes",
        "mask_threshold",
        "overlap_threshold",
        "instance_score_thresh",
        "stuff_area_limit",
        "stuff_stride",
        "row_block",
        "thing_pixels",
        "stuff_area_unit",
    ),
)
def _merge_panoptic(
    det_masks: jax.Array,
    det_boxes: jax.Array,
    det_classes: jax.Array,
    det_scores: jax.Array,
    det_valid: jax.Array,
    order_key: jax.Array,
    stuff_logits: jax.Array,
    image_shape: jax.Array,
    *,
    image_size: tuple[int, int],
    num_thing_classes: int,
    mask_threshold: float,
    overlap_threshold: float,
    instance_score_thresh: float,
    stuff_area_limit: int,
    stuff_stride: int,
    row_block: int,
    stuff_label_map: jax.Array | None,
    orig_shape: jax.Array | None,
    thing_pixels: str,
    stuff_area_unit: str,
) -> dict:
    """Jitted body of :func:`merge_panoptic` (same arguments)."""
    merge_one = functools.partial(
        _merge_one,
        image_size=image_size,
        num_thing_classes=num_thing_classes,
        mask_threshold=mask_threshold,
        overlap_threshold=overlap_threshold,
        instance_score_thresh=instance_score_thresh,
        stuff_area_limit=stuff_area_limit,
        stuff_stride=stuff_stride,
        row_block=row_block,
        thing_pixels=thing_pixels,
        stuff_area_unit=stuff_area_unit,
    )
    image_shape = image_shape.astype(jnp.int32)
    if orig_shape is None:
        area_scale = jnp.ones(image_shape.shape[:1], jnp.float32)
    else:  # one merge pixel stands for H * W / (h * w) original pixels
        orig = orig_shape.astype(jnp.float32)
        resized = jnp.maximum(image_shape, 1).astype(jnp.float32)
        area_scale = (orig[:, 0] * orig[:, 1]) / (resized[:, 0] * resized[:, 1])
    if stuff_label_map is None:
        # Computed per image inside the vmap from the logits.
        label_map = jnp.zeros((det_masks.shape[0], 0, 0), jnp.int32)
    else:
        label_map = stuff_label_map.astype(jnp.int32)
    return jax.vmap(merge_one)(
        det_masks.astype(jnp.float32),
        det_boxes.astype(jnp.float32),
        det_classes.astype(jnp.int32),
        det_scores.astype(jnp.float32),
        det_valid.astype(bool),
        order_key.astype(jnp.float32),
        stuff_logits.astype(jnp.float32),
        image_shape,
        label_map,
        area_scale,
    )


def _merge_one(
    masks: jax.Array,
    boxes: jax.Array,
    classes: jax.Array,
    scores: jax.Array,
    valid: jax.Array,
    key: jax.Array,
    logits: jax.Array,
    shape: jax.Array,
    label_map: jax.Array,
    area_scale: jax.Array,
    *,
    image_size: tuple[int, int],
    num_thing_classes: int,
    mask_threshold: float,
    overlap_threshold: float,
    instance_score_thresh: float,
    stuff_area_limit: int,
    stuff_stride: int,
    row_block: int,
    thing_pixels: str,
    stuff_area_unit: str,
) -> dict:
    """Merge for one image: masks [D, M, M], boxes [D, 4], classes/scores/valid/key [D],
    logits [h, w, K], shape [2], label_map [Hp, Wp] stuff indices (or [0, 0]: computed here from
    the logits), area_scale [] original pixels per merge pixel; returns the per-image version of
    :func:`merge_panoptic`'s dict."""
    height, width = image_size
    num_det = masks.shape[0]
    num_stuff = logits.shape[-1] - num_thing_classes
    inside = (jnp.arange(height)[:, None] < shape[0]) & (jnp.arange(width)[None, :] < shape[1])

    # Descending key, ties by slot (stable ascending sort of the negated key); padded last.
    sort_key = jnp.where(valid & ~jnp.isnan(key), key, -jnp.inf)
    order = jnp.argsort(-sort_key, stable=True)
    active = valid & (scores >= instance_score_thresh)

    def paste_one(id_map: jax.Array, inputs: tuple) -> tuple[jax.Array, tuple]:
        slot, mask, box, is_active = inputs
        soft = paste_masks(mask[None], box[None], image_size, stride=1)[0]  # [Hp, Wp]
        on = (soft >= mask_threshold) & inside
        taken = id_map > 0
        area = jnp.sum(on, dtype=jnp.int32)
        intersect = jnp.sum(on & taken, dtype=jnp.int32)
        ratio = intersect.astype(jnp.float32) / jnp.maximum(area, 1).astype(jnp.float32)
        keep = is_active & (area > 0) & ~(ratio > overlap_threshold)
        assign = on & ~taken & keep
        id_map = jnp.where(assign, slot + 1, id_map)
        return id_map, jnp.sum(assign, dtype=jnp.int32)

    id_map = jnp.zeros((height, width), jnp.int32)
    id_map, sorted_area = jax.lax.scan(
        paste_one,
        id_map,
        (order.astype(jnp.int32), masks[order], boxes[order], active[order]),
    )
    inst_area = jnp.zeros((num_det,), jnp.int32).at[order].set(sorted_area)

    if num_stuff > 0:
        if not label_map.size:
            label_map = _stuff_labels(
                logits, image_size, stuff_stride, row_block, num_thing_classes, thing_pixels
            )
        # -1 outside the image, -2 on thing pixels ('void'): those pixels are not free.
        free = (id_map == 0) & inside & (label_map >= 0)
        labels = jnp.maximum(label_map, 0)
        if stuff_area_unit == "class":
            counts = jnp.zeros((num_stuff,), jnp.int32).at[labels.ravel()].add(free.ravel())
            assign = free & (counts.astype(jnp.float32) * area_scale >= stuff_area_limit)[labels]
        else:
            sizes = component_sizes(connected_components(labels, free))
            assign = free & (sizes.astype(jnp.float32) * area_scale >= stuff_area_limit)
        id_map = jnp.where(assign, num_det + 1 + labels, id_map)
        stuff_area = jnp.zeros((num_stuff,), jnp.int32).at[labels.ravel()].add(assign.ravel())
    else:
        stuff_area = jnp.zeros((0,), jnp.int32)

    stuff_ids = jnp.arange(num_stuff, dtype=jnp.int32)
    area = jnp.concatenate([inst_area, stuff_area])
    segments = {
        "id": jnp.arange(1, num_det + num_stuff + 1, dtype=jnp.int32),
        "category": jnp.concatenate([classes, num_thing_classes + stuff_ids]),
        "isthing": jnp.arange(num_det + num_stuff) < num_det,
        "area": area,
        "score": jnp.concatenate([scores, jnp.zeros((num_stuff,), jnp.float32)]),
        "valid": area > 0,
    }
    return {"id_map": id_map, "segments": segments}


@functools.partial(
    jax.jit,
    static_argnames=("image_size", "num_thing_classes", "stride", "row_block", "thing_pixels"),
)
def stuff_labels(
    stuff_logits: jax.Array,
    image_shape: jax.Array,
    *,
    image_size: tuple[int, int],
    num_thing_classes: int,
    stride: int = 4,
    row_block: int = 64,
    thing_pixels: str = "stuff",
) -> jax.Array:
    """The stuff prediction the merge uses: argmax over stuff classes after upsampling.

    Args:
        stuff_logits: [B, h, w, K] float32 logits over all K = T + S panoptic classes.
        image_shape: [B, 2] int32 un-padded (h, w); pixels outside are -1.
        image_size: (Hp, Wp) static padded size.
        num_thing_classes: T (the stuff channels are T..K-1).
        stride: static upsampling factor of the logits.
        row_block: static output rows per ``lax.map`` step (memory only; rounded up to a
            multiple of ``stride``).
        thing_pixels: static 'stuff' (argmax over the stuff classes everywhere) or 'void'
            (-2 where the argmax over all classes is a thing class).

    Returns:
        [B, Hp, Wp] int32 stuff index in ``0..S-1`` (class T + index), -1 outside the image,
        -2 on thing pixels with ``thing_pixels='void'``.
    """
    _check_options(thing_pixels, "class")
    height, width = image_size

    def one(logits: jax.Array, shape: jax.Array) -> jax.Array:
        labels = _stuff_labels(
            logits, image_size, stride, row_block, num_thing_classes, thing_pixels
        )
        inside = (jnp.arange(height)[:, None] < shape[0]) & (jnp.arange(width)[None, :] < shape[1])
        return jnp.where(inside, labels, -1)

    return jax.vmap(one)(stuff_logits.astype(jnp.float32), image_shape)


def _stuff_labels(
    logits: jax.Array,
    image_size: tuple[int, int],
    stride: int,
    row_block: int,
    num_thing_classes: int,
    thing_pixels: str,
) -> jax.Array:
    """Argmax stuff class of the bilinearly upsampled stuff logits.

    Args:
        logits: [h, w, K] float32 logits over all classes at stride ``stride`` (stuff from
            channel ``num_thing_classes``; only those are upsampled unless
            ``thing_pixels='void'``).
        image_size: (Hp, Wp) static output size.
        stride: static upsampling factor.
        row_block: static number of output rows computed per ``lax.map`` step (rounded up to a
            multiple of ``stride``).
        num_thing_classes: T.
        thing_pixels: 'stuff' or 'void' (-2 where the argmax over all K classes is a thing).

    Returns:
        [Hp, Wp] int32 stuff index in ``0..S-1`` (first maximum on ties): the first Hp x Wp
        pixels of ``F.interpolate(scale_factor=stride)`` (`oanet_jax.ops.resize`); -2 on thing
        pixels with ``thing_pixels='void'``.

    Raises:
        ValueError: if the upsampled logits are smaller than (Hp, Wp).
    """
    height, width = image_size
    if stride * logits.shape[0] < height or stride * logits.shape[1] < width:
        raise ValueError(
            f"stuff logits {logits.shape[:2]} upsampled by {stride} do not cover the image size "
            f"{image_size}"
        )
    rows_in = max(1, -(-min(row_block, height) // stride))  # logit rows per block
    num_blocks = -(-height // (rows_in * stride))

    thing_void = thing_pixels == "void" and num_thing_classes > 0
    if not thing_void:
        logits = logits[..., num_thing_classes:]

    def one_block(start: jax.Array) -> jax.Array:
        up = upsample_bilinear_rows(logits, start, rows_in, stride)  # [rows_in * stride, Wp, C]
        if not thing_void:
            return jnp.argmax(up, axis=-1).astype(jnp.int32)
        stuff = up[..., num_thing_classes:]
        label = jnp.argmax(stuff, axis=-1).astype(jnp.int32)
        # The first maximum over all classes is a thing when a thing logit ties the best stuff.
        is_thing = jnp.max(up[..., :num_thing_classes], axis=-1) >= jnp.max(stuff, axis=-1)
        return jnp.where(is_thing, -2, label)

    labels = jax.lax.map(one_block, jnp.arange(num_blocks, dtype=jnp.int32) * rows_in)
    return labels.reshape(num_blocks * rows_in * stride, -1)[:height, :width]
