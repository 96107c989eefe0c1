"""Region proposal network: the shared-conv head and static-shape proposal generation.

`RPNHead` is detectron2's ``StandardRPNHead`` / torchvision's ``RPNHead``: one 3x3 conv + ReLU
shared by every FPN level (its output, the ``'shared'`` maps, also feeds OANet's stuff branch),
then a 1x1 conv for the objectness logits (``A`` channels) and a 1x1 conv for the box deltas
(``4 A`` channels, channel ``a * 4 + k`` for anchor ``a`` and coordinate ``k``). The flattened
outputs are ordered (y, x, a), exactly as the anchors of :mod:`oanet_jax.ops.anchors`.

`generate_proposals` is detectron2's ``find_top_rpn_proposals`` with static shapes: per-level top-k
by logit, decode, drop non-finite boxes, clip to the image, drop small boxes, NMS per level (level
as the class of a batched NMS), then the global top ``post_nms_topk`` by logit. Dropped entries are
never removed from arrays; they carry ``valid=False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from oanet_jax.modeling.layers import Conv2D
from oanet_jax.ops import boxes as box_ops
from oanet_jax.ops import nms as nms_ops

Array = jax.Array

__all__ = ["RPNHead", "generate_proposals"]

# detectron2 (StandardRPNHead) and torchvision (RPNHead) initialise all three convs with N(0, 0.01)
# weights and zero biases.
rpn_init = nn.initializers.normal(stddev=0.01)


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU, then 1x1 objectness and 1x1 box-delta convs, on every level.

    The same weights are applied to every level. Parameter names: ``conv`` (3x3), ``objectness``
    (1x1, ``num_anchors`` outputs) and ``deltas`` (1x1, ``4 * num_anchors`` outputs, a-major), as
    torchvision's ``conv.0.0`` / ``cls_logits`` / ``bbox_pred``.
    """

    num_anchors: int
    """Anchors per feature-map location ``A`` (sizes x aspect ratios of one level; 3 by default)."""
    channels: int = 256
    """Output channels of the shared 3x3 conv (equal to the input channels in detectron2 and
    torchvision, i.e. the FPN width)."""
    dtype: Any = jnp.float32
    """Compute dtype of the convolutions; objectness and deltas are returned in float32."""
    param_dtype: Any = jnp.float32
    """Dtype of the stored parameters."""

    @nn.compact
    def __call__(self, features: Sequence[Array]) -> dict[str, list[Array]]:
        """Applies the head to every level.

        Args:
          features: one [B, Hl, Wl, C] array per level (P2..P6), any float dtype.

        Returns:
          A dict of per-level lists (level order as ``features``):
            'objectness': [B, Hl * Wl * A] float32 logits, ordered (y, x, a);
            'deltas': [B, Hl * Wl * A, 4] float32 (dx, dy, dw, dh), ordered (y, x, a);
            'shared': [B, Hl, Wl, channels] `dtype`, the ReLU(conv3x3) maps (stuff-branch input).
        """
        a = self.num_anchors
        kw = dict(
            kernel_init=rpn_init,
            bias_init=nn.initializers.zeros_init(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        conv = Conv2D(self.channels, 3, name="conv", **kw)
        objectness = Conv2D(a, 1, name="objectness", **kw)
        deltas = Conv2D(4 * a, 1, name="deltas", **kw)

        out: dict[str, list[Array]] = {"objectness": [], "deltas": [], "shared": []}
        for x in features:
            b, h, w = x.shape[:3]
            t = nn.relu(conv(x))
            out["shared"].append(t)
            out["objectness"].append(objectness(t).astype(jnp.float32).reshape(b, h * w * a))
            out["deltas"].append(deltas(t).astype(jnp.float32).reshape(b, h * w * a, 4))
        return out


def _level_candidates(
    logits: Array,
    deltas: Array,
    anchors: Array,
    k: int,
    box_weights: Sequence[float],
    clamp: float,
) -> tuple[Array, Array]:
    """Top-k anchors of one level by logit, decoded.

    Args:
      logits: [B, N] float32.
      deltas: [B, N, 4] float32.
      anchors: [N, 4] float32.
      k: static, at most N.
      box_weights: coder weights.
      clamp: dw/dh clamp.

    Returns:
      scores [B, k] float32 (descending), boxes [B, k, 4] float32 (decoded, unclipped).
    """
    scores, idx = lax.top_k(logits, k)
    d = jnp.take_along_axis(deltas, idx[..., None], axis=1)
    a = jnp.take(anchors, idx, axis=0)
    return scores, box_ops.decode(d, a, box_weights, clamp)


def generate_proposals(
    objectness: Sequence[Array],
    deltas: Sequence[Array],
    anchors: Sequence[Array],
    image_shape: Array,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float,
    min_size: float = 0.0,
    box_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clamp: float = box_ops.DEFAULT_SCALE_CLAMP,
) -> dict[str, Array]:
    """RPN proposals with detectron2's ``find_top_rpn_proposals`` semantics and static shapes.

    Per image: on each level keep the ``min(pre_nms_topk, Nl)`` anchors with the highest logits and
    decode them; a box (or logit) that is not finite is dropped (checked before clipping, as
    detectron2); boxes are clipped to ``image_shape`` and dropped when their width or height is
    ``<= min_size`` (detectron2's ``nonempty(min_size)``; torchvision keeps sides equal to
    ``min_size``); NMS at ``nms_thresh`` runs per level (the level is the class of a batched NMS);
    the ``post_nms_topk`` survivors with the highest logits are returned in descending order.

    NaN logits are treated as ``-inf`` before the per-level top-k (they never take a top-k slot);
    detectron2 would select and then drop them (or raise, in training). No gradient flows through
    the proposals. Jit with ``pre_nms_topk`` and ``post_nms_topk`` static (``nms_thresh``,
    ``min_size`` may be traced; ``box_weights`` and ``clamp`` must be Python numbers).

    Args:
      objectness: per level [B, Nl] float logits, (y, x, a) order (`RPNHead` output).
      deltas: per level [B, Nl, 4] float deltas (dx, dy, dw, dh).
      anchors: per level [Nl, 4] float anchors (x1, y1, x2, y2) of the padded image.
      image_shape: [B, 2] int (h, w) of each un-padded resized image; boxes are clipped to it.
      pre_nms_topk: static int, candidates kept per level and image before NMS.
      post_nms_topk: static int ``K``, proposals per image after NMS.
      nms_thresh: IoU threshold of the NMS (a box is suppressed when IoU > nms_thresh).
      min_size: boxes with a side ``<= min_size`` (after clipping) are dropped.
      box_weights: (wx, wy, ww, wh) of the box coder (detectron2 RPN: (1, 1, 1, 1)).
      clamp: upper bound of dw/dh before ``exp``.

    Returns:
      A dict:
        'boxes': [B, K, 4] float32 (x1, y1, x2, y2), clipped; 0 where not valid;
        'logits': [B, K] float32 objectness logits, descending; -inf where not valid;
        'valid': [B, K] bool, True for the first ``min(K, kept)`` entries of each image;
        'levels': [B, K] int32 level index (0 = first level given); 0 where not valid.
    """
    if not (len(objectness) == len(deltas) == len(anchors)):
        raise ValueError(
            f"need one objectness/deltas/anchors entry per level, got {len(objectness)}, "
            f"{len(deltas)}, {len(anchors)}"
        )
    if pre_nms_topk < 1 or post_nms_topk < 1:
        raise ValueError(f"top-k must be >= 1, got {pre_nms_topk}, {post_nms_topk}")

    all_scores, all_boxes, all_levels = [], [], []
    for lvl, (logit, delta, anchor) in enumerate(zip(objectness, deltas, anchors, strict=True)):
        n = anchor.shape[0]
        if logit.shape[1:] != (n,) or delta.shape[1:] != (n, 4):
            raise ValueError(
                f"level {lvl}: objectness {logit.shape} / deltas {delta.shape} do not match "
                f"{n} anchors"
            )
        logit = lax.stop_gradient(logit.astype(jnp.float32))
        logit = jnp.where(jnp.isnan(logit), -jnp.inf, logit)
        delta = lax.stop_gradient(delta.astype(jnp.float32))
        k = min(int(pre_nms_topk), n)
        s, b = _level_candidates(logit, delta, anchor.astype(jnp.float32), k, box_weights, clamp)
        all_scores.append(s)
        all_boxes.append(b)
        all_levels.append(jnp.full((k,), lvl, jnp.int32))
    scores = jnp.concatenate(all_scores, axis=1)  # [B, N]
    boxes = jnp.concatenate(all_boxes, axis=1)  # [B, N, 4]
    levels = jnp.concatenate(all_levels, axis=0)  # [N]

    valid = jnp.all(jnp.isfinite(boxes), axis=-1) & jnp.isfinite(scores)
    boxes = box_ops.clip(boxes, jnp.asarray(image_shape)[:, None, :])
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    valid = valid & (w > min_size) & (h > min_size)
    boxes = jnp.where(valid[..., None], boxes, 0.0)

    def nms_fn(b: Array, s: Array, v: Array) -> tuple[Array, Array]:
        return nms_ops.batched_nms(b, s, levels, nms_thresh, max_output=int(post_nms_topk), valid=v)

    keep, keep_valid = jax.vmap(nms_fn)(boxes, scores, valid)
    out_boxes = jnp.take_along_axis(boxes, keep[..., None], axis=1)
    out_scores = jnp.take_along_axis(scores, keep, axis=1)
    return {
        "boxes": jnp.where(keep_valid[..., None], out_boxes, 0.0),
        "logits": jnp.where(keep_valid, out_scores, -jnp.inf),
        "valid": keep_valid,
        "levels": jnp.where(keep_valid, levels[keep], 0).astype(jnp.int32),
    }
