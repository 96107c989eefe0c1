"""RoI heads of the instance branch: box head, box predictor, mask head, and their inference.

Architecture and initialisation follow detectron2's Base-RCNN-FPN (``FastRCNNConvFCHead`` with
2 fc, ``FastRCNNOutputLayers``, ``MaskRCNNConvUpsampleHead``):

* `BoxHead`: flatten the ``[7, 7, C]`` pooled features, ``num_fc`` x (fc + ReLU); fc kernels
  ``c2_xavier_fill`` (U(+-sqrt(3 / fan_in))), biases 0.
* `BoxPredictor`: ``cls_score`` (C + 1 logits, BACKGROUND LAST, weights N(0, 0.01)) and
  ``bbox_pred`` (class-specific deltas, N(0, 0.001)), biases 0.
* `MaskHead`: ``num_convs`` x (3x3 conv + ReLU), 2x2 stride-2 transposed conv + ReLU, 1x1 conv to
  one logit map per thing class; convs and deconv ``c2_msra_fill`` (He normal, fan_out), the
  predictor N(0, 0.001), biases 0.

Every variable carries logical axis names: Dense kernels ``[in, out]`` ``('embed', 'mlp')`` and
biases ``('mlp',)``; conv kernels ``('conv_h', 'conv_w', 'conv_in', 'conv_out')`` (see
`oanet_jax.modeling.layers`); the transposed-conv kernel, stored ``[kh, kw, out, in]`` (below),
``('conv_h', 'conv_w', 'conv_out', 'conv_in')``.

Weight conversion from torchvision (``maskrcnn_resnet50_fpn``; detectron2 is the same except that
its class axis has no background row to move or drop). ``W`` is the torch tensor, ``Cin`` the
pooled channels, ``C`` the number of thing classes (torchvision has C + 1 with background at 0):

* ``box_head.fc6.weight [fc, Cin*7*7]`` is laid out for torch's ``(c, y, x)`` flatten, ours is
  ``(y, x, c)``: ``fc1.kernel = W.reshape(fc, Cin, 7, 7).transpose(2, 3, 1, 0).reshape(-1, fc)``;
  ``fc2.kernel = fc7.weight.T``; biases unchanged.
* ``box_predictor.cls_score``: move the background row from first to last,
  ``cls_score.kernel = np.roll(W, -1, axis=0).T``, ``bias = np.roll(b, -1)``.
* ``box_predictor.bbox_pred [(C+1)*4, fc]`` (class-major, ``c * 4 + k``): drop the background's
  four rows, ``bbox_pred.kernel = W[4:].T``, ``bias = b[4:]``.
* ``mask_head.mask_fcn{i}`` (torchvision >= 0.13 names them ``mask_head.{i-1}.0``):
  ``kernel = W.transpose(2, 3, 1, 0)``.
* ``mask_predictor.conv5_mask`` (``ConvTranspose2d``, weight ``[in, out, 2, 2]``): ``deconv`` is a
  flax ``ConvTranspose(transpose_kernel=True, padding='VALID')`` whose kernel is stored
  ``[kh, kw, out, in]``, so ``deconv.kernel = W.transpose(2, 3, 1, 0)`` -- the very same
  transpose as a ``Conv2d`` weight, NO spatial flip. (Checked numerically against torch: with
  ``transpose_kernel=False`` flax would want ``W.transpose(2, 3, 0, 1)[::-1, ::-1]``, i.e. the
  spatially flipped kernel, because ``lax.conv_transpose`` then correlates the dilated input with
  the kernel as given, while torch's transposed conv is the gradient of a correlation.) With this
  layout flax's fan_out (``in * kh * kw``) also equals torch's, so ``c2_msra_fill`` matches.
* ``mask_predictor.mask_fcn_logits [C+1, in, 1, 1]``: drop the background channel,
  ``predictor.kernel = W[1:].transpose(2, 3, 1, 0)``, ``bias = b[1:]``.

Compute runs in ``dtype`` (bf16 allowed); class logits, box deltas and mask logits are returned in
float32, and all of `postprocess_detections` (softmax, decoding, NMS) is float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oanet_jax.modeling.layers import Conv2D, msra_fill, xavier_fill
from oanet_jax.ops import boxes as box_ops
from oanet_jax.ops import nms as nms_ops

__all__ = [
    "DENSE_BIAS_AXES",
    "DENSE_KERNEL_AXES",
    "DECONV_KERNEL_AXES",
    "BoxHead",
    "BoxPredictor",
    "Deconv2x2",
    "MaskHead",
    "postprocess_detections",
    "select_class_masks",
]

Array = jax.Array
Dtype = Any

DENSE_KERNEL_AXES = ("embed", "mlp")
DENSE_BIAS_AXES = ("mlp",)
# The deconv kernel [kh, kw, out, in], as flax ConvTranspose(transpose_kernel=True) stores it.
DECONV_KERNEL_AXES = ("conv_h", "conv_w", "conv_out", "conv_in")
DECONV_BIAS_AXES = ("conv_out",)

_zeros = nn.initializers.zeros_init()


def _dense(features: int, init: Any, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=nn.with_logical_partitioning(init, DENSE_KERNEL_AXES),
        bias_init=nn.with_logical_partitioning(_zeros, DENSE_BIAS_AXES),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class BoxHead(nn.Module):
    """``num_fc`` x (fc + ReLU) on flattened pooled RoI features (detectron2 2fc head)."""

    fc_dim: int = 1024
    """Width of every fully connected layer."""
    num_fc: int = 2
    """Number of fc + ReLU layers; named ``fc1`` ... ``fc{num_fc}``."""
    dtype: Dtype = jnp.float32
    """Compute dtype (also the output dtype)."""
    param_dtype: Dtype = jnp.float32
    """Dtype of the stored parameters."""

    @nn.compact
    def __call__(self, pooled: Array) -> Array:
        """Embeds each RoI.

        Args:
          pooled: [B, K, P, P, C] any float dtype (P = 7 by default), RoIAlign output.

        Returns:
          [B, K, fc_dim] `dtype`, post-ReLU features. The flatten order is (y, x, c).
        """
        x = pooled.reshape(*pooled.shape[:2], -1)
        for i in range(self.num_fc):
            x = _dense(self.fc_dim, xavier_fill, self.dtype, self.param_dtype, f"fc{i + 1}")(x)
            x = nn.relu(x)
        return x


class BoxPredictor(nn.Module):
    """Class scores (background last) and class-specific box deltas (detectron2 layout)."""

    num_classes: int
    """Number of thing classes C (without background)."""
    dtype: Dtype = jnp.float32
    """Compute dtype; both outputs are returned in float32."""
    param_dtype: Dtype = jnp.float32
    """Dtype of the stored parameters."""

    @nn.compact
    def __call__(self, x: Array) -> dict[str, Array]:
        """Predicts classification logits and regression deltas.

        Args:
          x: [B, K, D] any float dtype, `BoxHead` features.

        Returns:
          dict with 'class_logits' [B, K, C + 1] float32 (index C is background) and
          'box_deltas' [B, K, C, 4] float32 (dx, dy, dw, dh) per class, to be decoded with the
          RoI box weights (10, 10, 5, 5).
        """
        c = self.num_classes
        logits = _dense(
            c + 1, nn.initializers.normal(0.01), self.dtype, self.param_dtype, "cls_score"
        )(x)
        deltas = _dense(
            4 * c, nn.initializers.normal(0.001), self.dtype, self.param_dtype, "bbox_pred"
        )(x)
        return {
            "class_logits": logits.astype(jnp.float32),
            "box_deltas": deltas.astype(jnp.float32).reshape(*x.shape[:-1], c, 4),
        }


class Deconv2x2(nn.Module):
    """The mask head's 2x2, stride-2 transposed convolution, as one matrix product.

    With kernel = stride = 2 the output pixels do not overlap: ``y[2i + a, 2j + b, o] =
    sum_c x[i, j, c] * kernel[a, b, o, c] + bias[o]``, PyTorch ``ConvTranspose2d(k=2, s=2)``
    semantics. Parameters are stored as flax's ``ConvTranspose(transpose_kernel=True,
    padding='VALID')`` stores them (kernel [2, 2, out, in], bias [out]; same names, shapes and
    initialisation), so checkpoints and the torchvision converter are unchanged. Computed as an
    einsum and a depth-to-space reshape instead of a dilated convolution: the same arithmetic,
    but XLA's CPU backward of the dilated form took 2.8 s where this takes a fraction (32 RoIs of
    14 x 14 x 256, see docs/BENCHMARKS.md, profile).
    """

    features: int
    """Output channels."""
    dtype: Dtype = jnp.float32
    """Compute dtype."""
    param_dtype: Dtype = jnp.float32
    """Dtype of the stored parameters."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """[N, H, W, Cin] -> [N, 2H, 2W, features] in `dtype`."""
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(msra_fill, DECONV_KERNEL_AXES),
            (2, 2, self.features, x.shape[-1]),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(_zeros, DECONV_BIAS_AXES),
            (self.features,),
            self.param_dtype,
        )
        x, kernel, bias = (v.astype(self.dtype) for v in (x, kernel, bias))
        n, h, w, _ = x.shape
        y = jnp.einsum("nhwc,aboc->nhawbo", x, kernel)  # [N, H, 2, W, 2, out]
        return y.reshape(n, 2 * h, 2 * w, self.features) + bias


class MaskHead(nn.Module):
    """Mask R-CNN FCN mask head: convs, 2x deconv, 1x1 class-specific mask logits."""

    num_classes: int
    """Number of thing classes C: one output mask per class."""
    conv_dim: int = 256
    """Channels of the 3x3 convs and of the transposed conv."""
    num_convs: int = 4
    """Number of 3x3 conv + ReLU layers; named ``mask_fcn1`` ... ``mask_fcn{num_convs}``."""
    dtype: Dtype = jnp.float32
    """Compute dtype; the mask logits are returned in float32."""
    param_dtype: Dtype = jnp.float32
    """Dtype of the stored parameters."""

    @nn.compact
    def __call__(self, pooled: Array) -> Array:
        """Predicts per-class mask logits in each RoI's frame.

        Args:
          pooled: [B, K, P, P, Cin] any float dtype (P = 14 by default), RoIAlign output.

        Returns:
          [B, K, 2P, 2P, num_classes] float32 logits (28 x 28 by default).
        """
        lead = pooled.shape[:2]
        x = pooled.reshape(-1, *pooled.shape[2:])
        for i in range(self.num_convs):
            x = Conv2D(
                self.conv_dim,
                3,
                kernel_init=msra_fill,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"mask_fcn{i + 1}",
            )(x)
            x = nn.relu(x)
        x = Deconv2x2(self.conv_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="deconv")(
            x
        )
        x = nn.relu(x)
        x = Conv2D(
            self.num_classes,
            1,
            kernel_init=nn.initializers.normal(0.001),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="predictor",
        )(x)
        return x.astype(jnp.float32).reshape(*lead, *x.shape[1:])


def _postprocess_single(
    scores: Array,
    boxes: Array,
    valid: Array,
    nms_thresh: float | Array,
    max_detections: int,
    max_candidates: int,
) -> tuple[Array, Array, Array, Array]:
    """One image: scores [K, C], boxes [K, C, 4], valid [K, C] -> top-D NMS survivors."""
    k, c = scores.shape
    flat = jnp.where(valid, scores, -jnp.inf).reshape(k * c)
    cand_scores, cand_idx = jax.lax.top_k(flat, min(max_candidates, k * c))
    cand_boxes = boxes.reshape(k * c, 4)[cand_idx]
    cand_classes = (cand_idx % c).astype(jnp.int32)
    cand_valid = cand_scores > -jnp.inf
    keep, keep_valid = nms_ops.batched_nms(
        cand_boxes,
        cand_scores,
        cand_classes,
        nms_thresh,
        max_output=max_detections,
        valid=cand_valid,
    )
    out_boxes = jnp.where(keep_valid[:, None], cand_boxes[keep], 0.0)
    out_scores = jnp.where(keep_valid, cand_scores[keep], 0.0)
    out_classes = jnp.where(keep_valid, cand_classes[keep], 0)
    return out_boxes, out_scores, out_classes, keep_valid


def postprocess_detections(
    class_logits: Array,
    box_deltas: Array,
    proposals: Array,
    proposal_valid: Array,
    image_shape: Array,
    *,
    score_thresh: float | Array = 0.05,
    nms_thresh: float | Array = 0.5,
    max_detections: int = 100,
    box_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
    clamp: float = box_ops.DEFAULT_SCALE_CLAMP,
    min_size: float = 0.0,
    max_candidates: int = 2048,
) -> dict[str, Array]:
    """Turns box-predictor outputs into final detections (detectron2 ``fast_rcnn_inference``).

    Per image: softmax over the C + 1 logits (float32), drop the background column, decode the
    class-specific deltas against the proposals, clip to ``image_shape``, keep the (proposal,
    class) candidates with score > ``score_thresh`` and both sides > ``min_size``, class-aware
    NMS, and return the ``max_detections`` best by score, in descending score order.

    Static shapes: the NMS input is the top ``max_candidates`` of the K * C candidate scores
    (non-passing candidates scored -inf). The result is exactly the unbounded algorithm's when at
    most ``max_candidates`` candidates pass the filters, and also whenever NMS on those
    candidates already keeps ``max_detections`` boxes (greedy NMS visits boxes in descending
    score, so dropping the lowest-scored candidates cannot change the first D kept). It can
    differ only when more than ``max_candidates`` pass AND fewer than D survive among them.

    Differences from torchvision's ``RoIHeads.postprocess_detections``: background is the LAST
    logit (detectron2's convention) and ``box_deltas`` has no background class; torchvision drops
    boxes with a side < 1e-2 (``min_size=1e-2`` here reproduces it except for sides exactly
    equal to 1e-2, which torchvision keeps and this drops); detectron2 drops sides <= 0
    (``min_size=0``). Exact score ties may be ordered differently (ours: lower candidate first).

    Args:
      class_logits: [B, K, C + 1] float, background last.
      box_deltas: [B, K, C, 4] float, class-specific (dx, dy, dw, dh).
      proposals: [B, K, 4] float, the RoIs (x1, y1, x2, y2) the deltas refer to.
      proposal_valid: [B, K] bool; False marks padding RoIs (never detected).
      image_shape: [B, 2] int (h, w) of each un-padded image; boxes are clipped to it.
      score_thresh: keep candidates with score strictly greater (may be a traced scalar).
      nms_thresh: IoU threshold of the per-class NMS, suppress when IoU > it (may be traced).
      max_detections: static D, detections per image.
      box_weights: (wx, wy, ww, wh) of the box coder.
      clamp: upper bound of dw/dh (after dividing by their weights) before exp.
      min_size: keep boxes whose width and height (after clipping) are > min_size.
      max_candidates: static bound on the candidates fed to NMS (see above).

    Returns:
      dict with 'boxes' [B, D, 4] float32, 'scores' [B, D] float32, 'classes' [B, D] int32
      (0..C-1), 'valid' [B, D] bool. Entries past the number of detections have valid False,
      zero boxes and scores, and class 0.
    """
    num_classes = box_deltas.shape[-2]
    if class_logits.shape[-1] != num_classes + 1:
        raise ValueError(
            f"class_logits has {class_logits.shape[-1]} classes, expected C + 1 = "
            f"{num_classes + 1} for box_deltas {box_deltas.shape}"
        )
    if max_detections < 1 or max_candidates < 1:
        raise ValueError("max_detections and max_candidates must be >= 1")
    scores = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[..., :num_classes]
    boxes = box_ops.decode(box_deltas, proposals[..., None, :], box_weights, clamp)
    boxes = box_ops.clip(boxes, jnp.asarray(image_shape)[:, None, None, :])
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    valid = (
        jnp.asarray(proposal_valid, bool)[..., None]
        & (scores > score_thresh)
        & (widths > min_size)
        & (heights > min_size)
    )
    out_boxes, out_scores, out_classes, out_valid = jax.vmap(
        lambda s, b, v: _postprocess_single(s, b, v, nms_thresh, max_detections, max_candidates)
    )(scores, boxes, valid)
    return {"boxes": out_boxes, "scores": out_scores, "classes": out_classes, "valid": out_valid}


def select_class_masks(mask_logits: Array, classes: Array) -> Array:
    """Mask probabilities of each detection's predicted class.

    Args:
      mask_logits: [B, D, M, M, C] float, class-specific mask logits (M = 28 by default).
      classes: [B, D] int, predicted class in 0..C-1 (clipped into range, so padding entries are
        safe).

    Returns:
      [B, D, M, M] float32 sigmoid probabilities.
    """
    c = mask_logits.shape[-1]
    idx = jnp.clip(jnp.asarray(classes, jnp.int32), 0, c - 1)[:, :, None, None, None]
    picked = jnp.take_along_axis(mask_logits, idx, axis=-1)[..., 0]
    return jax.nn.sigmoid(picked.astype(jnp.float32))
