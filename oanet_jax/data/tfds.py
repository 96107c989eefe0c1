"""TFDS adapter: ``coco/2017_panoptic`` examples -> the reader's records.

:func:`tfds_host_split` opens this host's slice of a split prepared by the user under
``config.data.tfds_data_dir`` (images and panoptic PNGs left encoded, ``tfds.decode.SkipDecoding``,
so a resume skips cheaply; the pipeline decodes them with PIL, as the reader does).
:func:`tfds_features_to_record` maps one decoded TFDS example to the same record dict as
:class:`oanet_jax.data.coco_panoptic.CocoPanopticReader`, so both sources share one transform.
:func:`tfds_label_mapping` maps TFDS labels to the contiguous class ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from oanet_jax.data import coco_panoptic, ordering, spec
from oanet_jax.panoptic.io import rgb_to_id

if TYPE_CHECKING:
    import tensorflow as tf


def tfds_label_mapping(
    label_names: Sequence[str],
    categories: coco_panoptic.CategoryTable | None = None,
    num_thing_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Maps TFDS ``ClassLabel`` indices of ``coco/2017_panoptic`` to contiguous ids.

    TFDS names its 133 labels after the categories of the panoptic JSON in file order (sorted by
    COCO id). With a :class:`CategoryTable`, labels are matched to it by name. Without one, label
    k is contiguous id k and the first ``num_thing_classes`` labels are things: true for COCO,
    whose thing ids (1..90) all precede its stuff ids (92..200), so "sorted by id" is "things
    first, each group sorted by id", the contiguous order of ``CategoryTable``.

    Args:
        label_names: TFDS label names, index = TFDS label.
        categories: optional category table to match names against.
        num_thing_classes: T, used when ``categories`` is None.

    Returns:
        (label_to_contiguous int32 [L], isthing bool [C]) with C the number of contiguous classes.
    """
    if categories is not None:
        index = {name: i for i, name in enumerate(categories.names)}
        missing = [name for name in label_names if name not in index]
        if missing:
            raise ValueError(f"TFDS labels not in the category table: {missing[:10]}")
        mapping = np.asarray([index[name] for name in label_names], np.int32)
        return mapping, np.asarray(categories.isthing, np.bool_)
    if num_thing_classes is None:
        raise ValueError("pass either a CategoryTable or num_thing_classes")
    num = len(label_names)
    return np.arange(num, dtype=np.int32), np.arange(num) < int(num_thing_classes)


def tfds_features_to_record(
    features: dict[str, Any], label_to_contiguous: np.ndarray, isthing: np.ndarray
) -> dict[str, Any]:
    """Maps one decoded TFDS ``coco/2017_panoptic`` example to a reader record.

    The semantic map and the instances come from the panoptic PNG (segment id
    ``R + 256 G + 256^2 B``, 0 = void), exactly as the reader does without an instances JSON:
    every segment paints its contiguous class into ``semantic`` (crowd included), every thing
    segment (crowd included, ``is_crowd`` set) becomes an instance with its binary mask and its
    tight box (``x2 = max col + 1``). TFDS's normalised ``bbox`` and ``area`` are not used.

    Args:
        features: numpy dict shaped like TFDS's: ``image`` uint8 [H, W, 3], ``panoptic_image``
            uint8 [H, W, 3], ``image/id`` int64 [], optional ``image/filename`` bytes/str,
            ``panoptic_objects``: {``id`` int64 [K], ``label`` int64 [K], ``is_crowd`` bool [K],
            ``bbox`` float32 [K, 4], ``area`` int64 [K]}.
        label_to_contiguous: int32 [L] TFDS label -> contiguous class id.
        isthing: bool [C] per contiguous class.

    Returns:
        Record dict with ``image``, ``image_id``, ``file_name``, ``semantic``, ``boxes``,
        ``classes``, ``is_crowd``, ``masks`` uint8 [N, H, W], ``segment_ids`` int32 [N],
        ``ann_ids`` int64 [N] (-1: no instances JSON).

    Raises:
        ValueError: a label outside the table, a segment id absent from the PNG, or PNG pixels
            whose id has no segment (message names the image id).
    """
    image = np.asarray(features["image"], np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = image[:, :, :3]
    image_id = int(np.asarray(features["image/id"]))
    file_name = features.get("image/filename", "")
    if isinstance(file_name, (bytes, np.bytes_)):
        file_name = file_name.decode()
    file_name = str(file_name)
    pan = np.asarray(features["panoptic_image"])
    if pan.shape[:2] != image.shape[:2]:
        raise ValueError(
            f"image id {image_id}: panoptic image {pan.shape[:2]} != image {image.shape[:2]}"
        )
    pan_ids = rgb_to_id(pan).astype(np.int64)
    objects = features["panoptic_objects"]
    seg_ids = np.asarray(objects["id"], np.int64).reshape(-1)
    labels = np.asarray(objects["label"], np.int64).reshape(-1)
    crowd = np.asarray(objects["is_crowd"], np.bool_).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= len(label_to_contiguous)):
        raise ValueError(f"image id {image_id}: TFDS label out of range: {labels.tolist()}")
    classes = np.asarray(label_to_contiguous, np.int64)[labels]

    # id -> segment slot via a sorted search (vectorised over pixels).
    order = np.argsort(seg_ids, kind="stable")
    sorted_ids = seg_ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, pan_ids), 0, max(len(sorted_ids) - 1, 0))
    found = (sorted_ids[pos] == pan_ids) if len(sorted_ids) else np.zeros_like(pan_ids, bool)
    stray = (~found) & (pan_ids != 0)
    if stray.any():
        raise ValueError(
            f"image id {image_id}: panoptic PNG has segment ids without annotation: "
            f"{np.unique(pan_ids[stray])[:10].tolist()}"
        )
    slot = np.where(found, order[pos] if len(order) else 0, -1)  # [H, W] segment index or -1
    lut = np.append(classes, spec.IGNORE_LABEL).astype(np.uint8)
    semantic = lut[slot]  # slot -1 -> last entry (void)

    thing = np.asarray(isthing, np.bool_)[classes] if classes.size else np.zeros(0, bool)
    inst = np.nonzero(thing)[0]
    masks = (slot[None, :, :] == inst[:, None, None]).astype(np.uint8)  # [N, H, W]
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    if len(inst) and not rows.any(axis=1).all():
        empty = seg_ids[inst[~rows.any(axis=1)]].tolist()
        raise ValueError(f"image id {image_id}: thing segments {empty} have no pixels")
    height, width = image.shape[:2]
    y1 = rows.argmax(axis=1)
    y2 = height - rows[:, ::-1].argmax(axis=1)
    x1 = cols.argmax(axis=1)
    x2 = width - cols[:, ::-1].argmax(axis=1)
    return {
        "image": image,
        "image_id": np.int64(image_id),
        "file_name": file_name,
        "semantic": semantic,
        "boxes": np.stack([x1, y1, x2, y2], axis=1).astype(np.float32).reshape(-1, 4),
        "classes": classes[inst].astype(np.int32),
        "is_crowd": crowd[inst],
        "masks": masks,
        "segment_ids": seg_ids[inst].astype(np.int32),
        "ann_ids": np.full((len(inst),), -1, np.int64),
    }


def _tfds_categories(config_data: Any) -> coco_panoptic.CategoryTable | None:
    """A category table for TFDS if the config names a panoptic JSON that exists, else None."""
    try:
        path = coco_panoptic.join_root(config_data.root, config_data.eval.panoptic_json)
    except AttributeError:
        return None
    if path and os.path.isfile(path):
        with open(path) as f:
            return coco_panoptic.CategoryTable.from_categories(json.load(f)["categories"])
    return None


@dataclasses.dataclass(frozen=True)
class TfdsHostSplit:
    """This host's slice of a TFDS split and what the pipeline needs to map it.

    Attributes:
        features: tf.data.Dataset of TFDS feature dicts (``image`` and ``panoptic_image`` encoded
            bytes), this host's contiguous slice, in TFDS's order.
        label_to_contiguous: int32 [L], TFDS label -> contiguous class id.
        isthing: bool [C] per contiguous class.
        num_examples: examples in this host's slice.
        max_host_examples: the largest slice over all hosts (eval: every host yields
            ``ceil(max_host_examples / B)`` batches).
    """

    features: tf.data.Dataset
    label_to_contiguous: np.ndarray
    isthing: np.ndarray
    num_examples: int
    max_host_examples: int


def tfds_host_split(
    config: Any, split: str, *, training: bool, process_index: int, process_count: int
) -> TfdsHostSplit:
    """Opens host ``process_index``'s slice of a TFDS split (see :func:`ordering.host_ranges`).

    Args:
        config: full config (``config.data.tfds_name``, ``tfds_data_dir``, ``root`` and
            ``eval.panoptic_json`` for the category table when present,
            ``config.model.num_thing_classes`` otherwise).
        split: 'train' or 'eval' (TFDS 'train' / 'validation').
        training: ``n // P`` examples per host, else near-even slices.
        process_index: h.
        process_count: P.

    Returns:
        The host's split.
    """
    import tensorflow_datasets as tfds

    d = config.data
    tfds_split = {"train": "train", "eval": "validation"}[split]
    builder = tfds.builder(d.tfds_name, data_dir=d.tfds_data_dir or None)
    total = builder.info.splits[tfds_split].num_examples
    if total < process_count:
        raise ValueError(f"{total} TFDS examples cannot be split over {process_count} hosts")
    ranges = ordering.host_ranges(total, process_count, training)
    start, end = ranges[process_index]
    features_ds = builder.as_dataset(
        split=f"{tfds_split}[{start}:{end}]",
        shuffle_files=False,
        decoders={
            "image": tfds.decode.SkipDecoding(),
            "panoptic_image": tfds.decode.SkipDecoding(),
        },
    )
    label_names = builder.info.features["panoptic_objects"]["label"].names
    mapping, isthing = tfds_label_mapping(
        label_names, _tfds_categories(d), int(config.model.num_thing_classes)
    )
    return TfdsHostSplit(
        features=features_ds,
        label_to_contiguous=mapping,
        isthing=isthing,
        num_examples=end - start,
        max_host_examples=max(e - s for s, e in ranges),
    )
