"""Jitted inference: the model's forward pass and the panoptic merge of every ordering, one call.

Per batch, on device and with static shapes: the inference forward pass, the stuff argmax over
the STUFF channels of the bilinearly upsampled stuff logits (`panoptic.merge.stuff_labels`),
computed once and shared by the merge of every ordering ('score': detection score, the heuristic
baseline; 'srm': the spatial ranking module's Eq. 3 score, OANet) and by the stuff mIoU. The merge
options come from ``config.eval`` (``thing_pixels``: with 'void' the pixels whose argmax over all
classes is a thing are -2 in the shared map, void in the merge and no stuff prediction for the
mIoU; ``stuff_area_limit`` per ``stuff_area_unit``, in ``stuff_area_pixels``: 'original' sends
'orig_shape' to the device with the batch).
The batch is split over ``gcd(batch, local devices)`` local devices of a 1-D 'data' mesh.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from oanet_jax.panoptic import io as pan_io
from oanet_jax.panoptic.merge import ORDERINGS, merge_panoptic, order_keys, stuff_labels

__all__ = ["STUFF_AREA_PIXELS", "InferenceFn", "eval_mesh", "make_inference_fn"]

STUFF_AREA_PIXELS = ("original", "merge")  # config.eval.stuff_area_pixels

# ``postprocess(outputs, batch) -> extra outputs``, traced inside the jitted call.
Postprocess = Callable[[dict[str, Any], Mapping[str, jax.Array]], Mapping[str, Any]]


def eval_mesh(batch_size: int) -> Mesh:
    """A 1-D 'data' mesh over ``gcd(batch_size, local device count)`` local devices."""
    devices = jax.local_devices()
    n = math.gcd(int(batch_size), len(devices))
    return Mesh(np.asarray(devices[:n]), ("data",))


class InferenceFn:
    """``infer(variables, batch) -> outputs``: see `make_inference_fn`.

    Attributes:
      mesh: the evaluation mesh.
      orderings: the merge orderings.
      batch_keys: the batch entries sent to the device.
      function: the traced ``infer(variables, batch) -> outputs`` before `jax.jit` and the
        mesh shardings (`oanet_jax.export` serializes it for one device).
    """

    def __init__(
        self,
        jitted: Callable[..., dict[str, Any]],
        mesh: Mesh,
        orderings: tuple[str, ...],
        batch_keys: tuple[str, ...],
        function: Callable[..., dict[str, Any]],
    ):
        self._jitted = jitted
        self.function = function
        self.mesh = mesh
        self.orderings = orderings
        self.batch_keys = batch_keys
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.data = NamedSharding(mesh, PartitionSpec("data"))

    def put_variables(self, variables: Any) -> Any:
        """The variables replicated on the mesh (do it once per evaluation, not per batch)."""
        return jax.device_put(variables, self.replicated)

    def __call__(self, variables: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Runs one batch (asynchronously: ``jax.device_get`` the result to wait).

        Args:
          variables: model variables (ideally from `put_variables`).
          batch: host batch; 'image' [B, Hp, Wp, 3], 'image_shape' [B, 2] and any other entry of
            `batch_keys` are sent to the device, the rest is ignored.

        Returns:
          The device outputs (see `make_inference_fn`).
        """

        def host_or_device(x: Any, dtype: Any = None) -> Any:
            # Arrays already on the device (a finished wire batch) stay there.
            return x if isinstance(x, jax.Array) else np.asarray(x, dtype)

        inputs = {
            "image": host_or_device(batch["image"]),  # uint8 (the batch spec), normalised there
            "image_shape": host_or_device(batch["image_shape"], np.int32),
        }
        for key in self.batch_keys:
            if key not in inputs:
                inputs[key] = host_or_device(batch[key])
        return self._jitted(
            jax.device_put(variables, self.replicated), jax.device_put(inputs, self.data)
        )


def make_inference_fn(
    model: Any,
    config: Any,
    orderings: Sequence[str] = ORDERINGS,
    *,
    batch_size: int | None = None,
    postprocess: Postprocess | None = None,
    batch_keys: Sequence[str] = (),
) -> InferenceFn:
    """One jitted inference + panoptic merge (every ordering) function, batch split over devices.

    Args:
      model: the OANet module (`build_model(config)`).
      config: full config (``model.num_thing_classes``, ``data.image_size``, ``eval.*``).
      orderings: merge orderings ('score', 'srm'), all merged in the same jitted call.
      batch_size: the batch the function will see (default ``config.eval.batch_size``); the batch
        dimension is sharded over ``gcd(batch_size, local devices)`` devices.
      postprocess: optional ``fn(outputs, batch) -> dict`` traced inside the jitted call after
        the merge; its entries are added to the outputs (e.g. the on-device PQ statistics
        'pq_stats' from the ground truth in `batch_keys`).
      batch_keys: extra batch entries (besides 'image' and 'image_shape') sent to the device for
        `postprocess`, each with the batch as leading dimension.

    Returns:
      ``infer(variables, batch) -> dict`` of device arrays:
        'boxes' [B, D, 4] float32 (resized-image pixels), 'scores' [B, D], 'classes' [B, D] int32
        contiguous thing ids, 'valid' [B, D] bool, 'masks' [B, D, 28, 28] float32 box-frame
        probabilities, 'srm_scores' [B, D];
        'stuff_labels' [B, Hp, Wp] int32: argmax stuff index 0..S-1 (contiguous class T + s) of
        the bilinearly upsampled stuff logits, -1 outside ``image_shape``, -2 on thing pixels
        with ``eval.thing_pixels='void'`` (shared by the merges);
        'panoptic': {ordering: merge_panoptic's dict ('id_map' [B, Hp, Wp] in the smallest unsigned
        dtype holding its ids, `pan_io.smallest_id_dtype`; 'segments')};
        plus the entries of `postprocess`.

    Raises:
      ValueError: an unknown ordering.
    """
    for o in orderings:
        if o not in ORDERINGS:
            raise ValueError(f"unknown merge ordering {o!r}; expected one of {ORDERINGS}")
    orderings = tuple(orderings)
    e = config.eval
    num_things = int(config.model.num_thing_classes)
    image_size = (int(config.data.image_size[0]), int(config.data.image_size[1]))
    merge_kwargs = dict(
        image_size=image_size,
        num_thing_classes=num_things,
        mask_threshold=float(config.model.test.mask_threshold),
        overlap_threshold=float(e.overlap_threshold),
        instance_score_thresh=float(config.model.test.instance_score_thresh),
        stuff_area_limit=int(e.stuff_area_limit),
        stuff_area_unit=str(e.stuff_area_unit),
        thing_pixels=str(e.thing_pixels),
    )
    if e.stuff_area_pixels not in STUFF_AREA_PIXELS:
        raise ValueError(
            f"eval.stuff_area_pixels must be one of {STUFF_AREA_PIXELS}: {e.stuff_area_pixels!r}"
        )
    original_areas = e.stuff_area_pixels == "original"
    if original_areas and "orig_shape" not in batch_keys:
        batch_keys = (*batch_keys, "orig_shape")

    def infer(variables: Any, batch: Mapping[str, jax.Array]) -> dict[str, Any]:
        out = model.apply(
            variables, {"image": batch["image"], "image_shape": batch["image_shape"]}, train=False
        )
        image_shape = batch["image_shape"]
        stuff_logits = out["stuff_logits"]
        stride = image_size[0] // stuff_logits.shape[1]
        semantic = stuff_labels(
            stuff_logits,
            image_shape,
            image_size=image_size,
            num_thing_classes=num_things,
            stride=stride,
            thing_pixels=merge_kwargs["thing_pixels"],
        )
        panoptic = {
            ordering: merge_panoptic(
                out["masks"],
                out["boxes"],
                out["classes"],
                out["scores"],
                out["valid"],
                order_keys(out["scores"], out["srm_scores"], ordering),
                stuff_logits,
                image_shape,
                stuff_stride=stride,
                stuff_label_map=semantic,
                orig_shape=batch["orig_shape"] if original_areas else None,
                **merge_kwargs,
            )
            for ordering in orderings
        }
        outputs = {
            "boxes": out["boxes"],
            "scores": out["scores"],
            "classes": out["classes"],
            "valid": out["valid"],
            "masks": out["masks"],
            "srm_scores": out["srm_scores"],
            "stuff_labels": semantic,
            "panoptic": panoptic,
        }
        if postprocess is not None:
            extra = dict(postprocess(outputs, batch))
            clash = set(extra) & set(outputs)
            if clash:
                raise ValueError(f"postprocess outputs {sorted(clash)} clash with the inference's")
            outputs.update(extra)
        # Ids leave the device in the smallest dtype that holds them (uint8 for COCO's 100
        # detections + 53 stuff classes): a quarter of int32's transfer and host passes.
        for merged in outputs["panoptic"].values():
            num_ids = merged["segments"]["id"].shape[-1]
            merged["id_map"] = merged["id_map"].astype(pan_io.smallest_id_dtype(num_ids))
        return outputs

    mesh = eval_mesh(int(batch_size or e.batch_size))
    replicated = NamedSharding(mesh, PartitionSpec())
    data = NamedSharding(mesh, PartitionSpec("data"))
    jitted = jax.jit(infer, in_shardings=(replicated, data))
    return InferenceFn(jitted, mesh, orderings, tuple(batch_keys), infer)
