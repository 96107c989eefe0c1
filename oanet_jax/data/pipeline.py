"""tf.data input pipeline: records -> wire batches the device finishes into the batch spec.

Sources (``config.data.source``):

* ``'coco_panoptic'``: any dataset in COCO panoptic format read by
  :class:`oanet_jax.data.coco_panoptic.CocoPanopticReader`. Record indices flow through tf.data;
  per record, a small ``tf.numpy_function`` does the host-side metadata work
  (:meth:`~oanet_jax.data.coco_panoptic.CocoPanopticReader.read_meta`: JSON checks, file headers,
  segment table and its hash, instance run lengths) and the pixels are handled by TF ops
  (:func:`oanet_jax.data.tf_transforms.transform_example`: decode, hashed segment lookup, the
  PNG-vs-JSON check on a record's first visit), outside the GIL, so the map scales with host
  cores; examples are padded to the wire shapes in ``padded_batch``.
* ``'tfds'``: TFDS ``coco/2017_panoptic`` prepared by the user under ``config.data.tfds_data_dir``
  (:mod:`oanet_jax.data.tfds` maps a TFDS example to the same record dict as the reader),
  made into a wire example on the host by :func:`oanet_jax.data.transforms.wire_from_record` in
  ``tf.numpy_function``.

Batches are dicts of numpy arrays (``as_numpy_iterator``) in the wire format of
:mod:`oanet_jax.data.spec`: images uint8 and label maps at their source size on a static canvas
(``data.source_size``; automatic: the split's largest image), instance masks as run lengths or an
instance map, B = per-host batch. The device finishes them
(:func:`oanet_jax.data.device_transform.finish_batch`: resize, flip, padding to ``image_size``,
boxes, mask crops) into the batch spec, equal to the host reference
:func:`oanet_jax.data.transforms.transform_record` (up to one grey level of the image).

Order and determinism: raw-folder source, see :mod:`oanet_jax.data.ordering` (a pure function of
``(seed, position)``; ``start_step = k`` yields exactly batches ``k, k + 1, ...``). TFDS source:
host ``h`` reads a contiguous slice of the split (``n // P`` examples in training, near-even
slices in eval), training shuffles it with a seeded ``shuffle(shuffle_buffer)`` (deterministic
for a seed, reshuffled each epoch) and repeats; flip and scale come from ``(seed, q * P + h)``,
``q`` the per-host position; a resume skips ``start_step * B`` encoded examples before decoding.
The parallel maps run with ``deterministic=True``.
"""

from __future__ import annotations

import atexit
import collections
import copy
import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import tensorflow as tf

from oanet_jax.data import coco_panoptic, spec, tf_transforms
from oanet_jax.data import tfds as tfds_lib
from oanet_jax.data.ordering import TrainPlan, augmentation, eval_indices
from oanet_jax.data.transforms import (
    TransformConfig,
    check_wire_limits,
    checked_resize_shape,
    wire_from_record,
)

_LOG = logging.getLogger(__name__)

# The automatic source canvas where the split's image sizes are not known up front (TFDS):
# COCO's largest image side is 640.
TFDS_SOURCE_SIZE = (640, 640)


class _ExitGuard:
    """Lets the interpreter exit while a pipeline iterator is still alive.

    tf.data keeps calling the Python transform from its own threads to fill its buffers. If the
    interpreter starts finalising while such a call is in flight (or about to start), that
    thread can no longer take the GIL and the iterator's destructor waits for it forever: a
    script that ends without deleting its iterator hangs at exit. At exit (``atexit``, while
    Python is fully alive) new calls return a padding example at once (nobody consumes it), and
    we wait until no call is in flight and none started for a short quiet period (the buffers
    are full, so tf.data stops calling), bounded by ``timeout`` seconds.
    """

    def __init__(self, quiet: float = 0.1, timeout: float = 10.0):
        self._lock = threading.Lock()
        self._active = 0
        self._last = 0.0
        self._stopping = False
        self._quiet = quiet
        self._timeout = timeout

    def enter(self) -> bool:
        """Registers a call; False (not registered) once the interpreter is exiting."""
        with self._lock:
            self._last = time.monotonic()
            if self._stopping:
                return False
            self._active += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._active -= 1
            self._last = time.monotonic()

    def drain(self) -> None:
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            with self._lock:
                idle = self._active == 0 and time.monotonic() - self._last > self._quiet
            if idle:
                return
            time.sleep(0.01)


_EXIT_GUARD = _ExitGuard()
atexit.register(_EXIT_GUARD.drain)


def _numpy_map(fn: Callable[..., dict], inputs: list[tf.Tensor], cfg: TransformConfig):
    """Wraps ``fn(*numpy_inputs) -> example dict`` as a tf.numpy_function with static shapes."""
    signature = spec.wire_signature(cfg)
    stopped = []  # the padding example returned once the interpreter is exiting

    def flat(*args):
        if not _EXIT_GUARD.enter():
            if not stopped:
                pad = spec.wire_padding_example(cfg)
                stopped.append([np.asarray(pad[k], spec.WIRE_DTYPES[k]) for k in spec.WIRE_KEYS])
            return stopped[0]
        try:
            ex = fn(*args)
            return [np.asarray(ex[k], spec.WIRE_DTYPES[k]) for k in spec.WIRE_KEYS]
        finally:
            _EXIT_GUARD.leave()

    dtypes = [signature[k].dtype for k in spec.WIRE_KEYS]
    outs = tf.numpy_function(flat, inputs, dtypes, stateful=False)
    result = {}
    for k, t in zip(spec.WIRE_KEYS, outs, strict=True):
        t.set_shape(signature[k].shape)
        result[k] = t
    return result


def _meta_list(m: dict[str, Any]) -> list[np.ndarray]:
    """The metadata dict as the numpy_function's outputs, in ``META_KEYS`` order."""
    out = []
    for k in tf_transforms.META_KEYS:
        dtype = tf_transforms.META_SIGNATURE[k][0]
        if dtype == tf.string:
            out.append(np.array(m[k], dtype=object))  # object: keeps trailing NUL bytes
        else:
            out.append(np.asarray(m[k], dtype.as_numpy_dtype))
    return out


def _record_meta(
    record: dict[str, Any], index: int, cfg: TransformConfig, short_size: int, flip: bool
) -> dict[str, Any]:
    """The TF transform's inputs from ``reader.read_meta(index)`` and the example's plan.

    Raises:
        ValueError: more instances than ``max_instances`` or a resized image larger than
            ``image_size`` (as :func:`oanet_jax.data.transforms.transform_record`).
        DataError: the example does not fit the wire format (``wire_limit``: an image larger
            than ``source_size``, more mask runs than ``max_mask_runs``).
    """
    height, width = int(record["height"]), int(record["width"])
    image_id = int(record["image_id"])
    new_h, new_w, scale = checked_resize_shape(
        cfg, image_id, record["file_name"], len(record["classes"]), height, width, short_size
    )
    check_wire_limits(
        cfg, image_id, record["file_name"], height, width, int(record["run_lengths"].size)
    )
    return {
        **record,
        "ok": True,
        "index": index,
        "orig_shape": (height, width),
        "new_shape": (new_h, new_w),
        "scale": scale,
        "flip": bool(flip),
        "from_runs": record["table_pos"].size > 0 and record["table_pos"][0] < 0,
        "verified": False,
        **tf_transforms.slot_tables(
            record["table_ids"], record["table_classes"], record["table_pos"]
        ),
    }


class _SkipCounter:
    """Thread-safe count of examples dropped by ``skip_bad_records`` (TFDS source), by reason.

    Same reporting interface as the reader: :meth:`skipped_by_reason` and ``first_skips``.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self.first_skips: dict[str, str] = {}

    def add(self, reason: str, message: str) -> None:
        with self._lock:
            self._counts[reason] = self._counts.get(reason, 0) + 1
            self.first_skips.setdefault(reason, message)
            count = sum(self._counts.values())
        _LOG.warning("skipping bad record (%d so far): %s", count, message)

    def skipped_by_reason(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._counts.items()))


class _PipelineClosed(Exception):
    """Raised by a closed pipeline's Python stages, so that a blocked consumer returns."""


class PipelineControl:
    """What one pipeline's Python stages share with its consumer (:class:`NumpyBatches`).

    Every Python function the pipeline calls from tf.data's threads runs through :meth:`call`,
    which remembers the exceptions it raises (so that the consumer can re-raise the original
    error instead of TensorFlow's ``InvalidArgumentError`` wrapper) and, once :meth:`close` was
    called, raises at once (so that a consumer thread blocked in ``next`` gets an answer).

    Attributes:
        split: 'train' or 'eval' (for messages).
        skip_bad_records: whether bad records are skipped (for the hint of a data error).
        skips: the skip accounting of the source (``skipped_by_reason()`` and ``first_skips``),
            set by the builder; None until then.
    """

    def __init__(self, split: str, skip_bad_records: bool):
        self.split = split
        self.skip_bad_records = bool(skip_bad_records)
        self.skips: Any = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._errors: collections.deque[BaseException] = collections.deque(maxlen=16)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, remembering what it raises; raises at once after :meth:`close`."""
        try:
            if self._closed.is_set():
                raise _PipelineClosed("input pipeline closed")
            return fn(*args)
        except Exception as e:
            with self._lock:
                self._errors.append(e)
            raise

    def close(self) -> None:
        """Makes every later Python stage raise, which ends a blocked ``next`` promptly."""
        self._closed.set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def original_error(self, err: tf.errors.OpError) -> BaseException | None:
        """The remembered exception that ``err`` (TensorFlow's wrapper) reports, or None."""
        message = str(getattr(err, "message", err))
        with self._lock:
            errors = list(self._errors)
        for e in reversed(errors):
            if str(e) and str(e) in message:
                return e
        return errors[-1] if errors else None

    def skipped_by_reason(self) -> dict[str, int]:
        """Records skipped so far by this process's pipeline, per reason ({} without skips)."""
        return {} if self.skips is None else self.skips.skipped_by_reason()


class NumpyBatches:
    """Iterator of numpy batch dicts over a pipeline, with errors reported as the user's own.

    A Python exception raised inside the pipeline (a :class:`DataError` naming the file and the
    record, :class:`AllRecordsSkippedError`, ...) reaches the caller as itself, with one note of
    context (where it was raised, the TensorFlow error type) instead of TensorFlow's wrapper and
    its traceback; a :class:`DataError` gets the ``skip_bad_records`` hint when skipping is off.
    """

    def __init__(self, ds: tf.data.Dataset, control: PipelineControl):
        self._iterator = ds.as_numpy_iterator()
        self.control = control

    def __iter__(self) -> NumpyBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            return next(self._iterator)
        except tf.errors.OpError as err:
            original = self.control.original_error(err)
            if original is None:
                raise
            if isinstance(original, _PipelineClosed):
                raise StopIteration from None
            raise _with_context(original, err, self.control) from None

    def skipped_records(self) -> dict[str, int]:
        """Records skipped so far, per reason (``data.skip_bad_records``; {} when none)."""
        return self.control.skipped_by_reason()

    def close(self) -> None:
        """Stops the pipeline's Python stages: a ``next`` blocked in another thread returns."""
        self.control.close()


def _with_context(
    original: BaseException, wrapper: tf.errors.OpError, control: PipelineControl
) -> BaseException:
    """``original`` with a one-line note of where it was raised (and the skip hint)."""
    err = copy.copy(original)  # the remembered object may be re-raised by a later ``next``
    err.__traceback__ = None
    err.__notes__ = [
        f"(raised in the tf.data input pipeline of split {control.split!r}; TensorFlow "
        f"reported it as {type(wrapper).__name__})"
    ]
    if isinstance(original, coco_panoptic.DataError) and not control.skip_bad_records:
        err.__notes__.append(
            "Set --config.data.skip_bad_records=True to skip such records (counted per reason "
            "in the run report and in metrics.jsonl) instead of stopping."
        )
    return err


class _PassGuard:
    """The training filter of skipped records: raises once a full pass has yielded nothing.

    Called in stream order (``filter`` is sequential) with each example's stream position and
    validity. Positions ``[e * L, (e + 1) * L)`` are pass ``e`` of this host's records (``L``
    per pass); when all ``L`` of a pass are invalid, every record of the host's share is bad and
    the stream would never yield: :class:`AllRecordsSkippedError` instead of a silent hang.
    """

    def __init__(self, per_pass: int, what: str, control: PipelineControl):
        self.per_pass = int(per_pass)
        self.what = what
        self.control = control
        self._pass = -1
        self._bad = 0

    def __call__(self, position: Any, valid: Any) -> np.bool_:
        epoch = int(position) // self.per_pass
        if epoch != self._pass:
            self._pass, self._bad = epoch, 0
        if not bool(valid):
            self._bad += 1
            if self._bad >= self.per_pass:
                raise coco_panoptic.AllRecordsSkippedError(self.message())
        return np.bool_(valid)

    def message(self) -> str:
        skips = self.control.skips
        counts = self.control.skipped_by_reason()
        first = dict(getattr(skips, "first_skips", {}) or {})
        reasons = "; ".join(
            f"{reason} x{count}: {first.get(reason, '?')}" for reason, count in counts.items()
        )
        return (
            f"all {self.per_pass} records of {self.what} were skipped (data.skip_bad_records="
            f"True): a full pass over the data yielded no example; first reasons: "
            f"{reasons or 'none recorded'}"
        )


def _finish(
    ds: tf.data.Dataset,
    batch_size: int,
    prefetch: int,
    guard: _PassGuard | None,
    cfg: TransformConfig | None = None,
) -> tf.data.Dataset:
    """Filter (skipped records, through ``guard``), batch, prefetch.

    ``ds`` yields ``(position, example)``; without a guard nothing is dropped. Batches are padded
    to the spec when ``cfg`` is given.
    """
    if guard is not None:

        def keep(position: tf.Tensor, ex: dict[str, tf.Tensor]) -> tf.Tensor:
            flag = tf.numpy_function(
                lambda q, v: guard.control.call(guard, q, v),
                [position, ex["example_valid"]],
                tf.bool,
                stateful=True,
            )
            flag.set_shape([])
            return flag

        ds = ds.filter(keep)
    ds = ds.map(lambda position, ex: ex)
    if cfg is None:
        ds = ds.batch(batch_size, drop_remainder=True)
    else:  # the TF transform's examples: padded here, in the batch copy
        ds = ds.padded_batch(
            batch_size,
            padded_shapes=tf_transforms.padded_shapes(cfg),
            padding_values=tf_transforms.padding_values(cfg),
            drop_remainder=True,
        )
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    return ds.prefetch(prefetch if prefetch > 0 else tf.data.AUTOTUNE)


def dataset_from_reader(
    reader: coco_panoptic.CocoPanopticReader,
    cfg: TransformConfig,
    *,
    training: bool,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    train_sizes: Sequence[int] = (800,),
    test_size: int = 800,
    random_flip: bool = True,
    skip_bad_records: bool = False,
    prefetch: int = 2,
    control: PipelineControl | None = None,
) -> tf.data.Dataset:
    """Batched tf.data.Dataset over a reader (see the module docstring for order and keys).

    Args:
        reader: a :class:`CocoPanopticReader` (or any object with ``__len__``, ``read(index)``
            and ``maybe_read(index)`` returning a record dict).
        cfg: transform config.
        training: infinite shuffled stream with random scale/flip, else one ordered, padded pass.
        batch_size: per-host batch B.
        seed: data seed.
        start_step: training batches to skip (resume); must be 0 in eval.
        process_index: h.
        process_count: P.
        train_sizes: ``min_size_train``.
        test_size: ``min_size_test``.
        random_flip: flip in training.
        skip_bad_records: a bad record (``DataError``) is dropped (training) or becomes a padding
            example with ``example_valid = False`` (eval); the reader logs and counts it in
            ``reader.summary``. Otherwise the DataError (naming file and record) stops the
            pipeline. In training, a resume at step k restarts at stream position
            ``k * B``; if records were dropped before it, the resumed batches are shifted by that
            many examples relative to the uninterrupted run. A training pass whose every
            record is skipped raises :class:`AllRecordsSkippedError` (instead of a stream that
            never yields).
        prefetch: batches to prefetch (<= 0: autotune).
        control: the :class:`PipelineControl` its Python stages report to (default: a new
            one; :func:`numpy_batches` passes the one its iterator reads).

    Returns:
        tf.data.Dataset of batch dicts.
    """
    if control is None:
        control = PipelineControl("train" if training else "eval", skip_bad_records)
    control.skips = reader
    largest = getattr(reader, "largest_image_shape", None)
    cfg = cfg.with_source_size(largest() if largest else TFDS_SOURCE_SIZE)

    plan = None
    if training:
        plan = TrainPlan(
            len(reader),
            int(seed),
            int(process_index),
            int(process_count),
            tuple(int(v) for v in train_sizes),
            bool(random_flip),
        )
        ds = tf.data.Dataset.counter(start=int(start_step) * int(batch_size), dtype=tf.int64)
    else:
        if start_step:
            raise ValueError("start_step is only meaningful in training")
        indices = eval_indices(len(reader), process_index, process_count, batch_size)
        ds = tf.data.Dataset.from_tensor_slices(indices)

    def meta(q) -> list[np.ndarray]:
        return control.call(meta_of, q)

    def meta_of(q) -> list[np.ndarray]:
        if not _EXIT_GUARD.enter():
            return _meta_list(tf_transforms.empty_meta())
        try:
            if plan is not None:
                index, flip, size, _ = plan(int(q))
            else:
                index, flip, size = int(q), False, int(test_size)
            if index < 0:  # eval padding
                return _meta_list(tf_transforms.empty_meta())
            read = reader.maybe_read_meta if skip_bad_records else reader.read_meta
            record = read(index)
            if record is None:  # a bad record, counted by the reader
                return _meta_list(tf_transforms.empty_meta())
            try:
                meta = _record_meta(record, index, cfg, size, flip)
            except coco_panoptic.DataError as err:
                reader.skip_or_raise(err, index)  # raises unless skipping
                return _meta_list(tf_transforms.empty_meta())
            meta["verified"] = index in verified
            return _meta_list(meta)
        finally:
            _EXIT_GUARD.leave()

    verified: set[int] = set()  # records whose PNG matched their JSON once (set.add: atomic)

    def mark_verified(index) -> np.bool_:
        verified.add(int(index))
        return np.bool_(True)

    def segment_check(index, extra, missing) -> np.bool_:
        return control.call(segment_raise, index, extra, missing)

    def segment_raise(index, extra, missing) -> np.bool_:
        index = int(index)
        err = reader.segment_mismatch_error(
            reader.image_ids[index], reader.panoptic_png(index), np.sort(extra), np.sort(missing)
        )
        reader.skip_or_raise(err, index)  # raises unless skipping
        return np.bool_(False)

    def mapper(q):
        dtypes = [tf_transforms.META_SIGNATURE[k][0] for k in tf_transforms.META_KEYS]
        flat = tf.numpy_function(meta, [q], dtypes, stateful=False)
        m = {}
        for k, t in zip(tf_transforms.META_KEYS, flat, strict=True):
            t.set_shape(tf_transforms.META_SIGNATURE[k][1])
            m[k] = t
        return q, tf_transforms.transform_example(m, cfg, segment_check, mark_verified)

    ds = ds.map(mapper, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    guard = None
    if training and skip_bad_records:
        what = f"split {control.split!r} ({reader_name(reader)})"
        if process_count > 1:
            what = f"host {process_index}'s share of {what}"
        guard = _PassGuard(plan.per_host_epoch, what, control)
    return _finish(ds, batch_size, prefetch, guard, cfg=cfg)


def reader_name(reader: Any) -> str:
    """The file a reader reads (its panoptic JSON), or its type name, for messages."""
    return str(getattr(reader, "panoptic_json", type(reader).__name__))


def dataset_from_tfds_features(
    features_ds: tf.data.Dataset,
    cfg: TransformConfig,
    label_to_contiguous: np.ndarray,
    isthing: np.ndarray,
    *,
    training: bool,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    num_examples: int | None = None,
    num_eval_batches: int | None = None,
    train_sizes: Sequence[int] = (800,),
    test_size: int = 800,
    random_flip: bool = True,
    shuffle_buffer: int = 1024,
    skip_bad_records: bool = False,
    prefetch: int = 2,
    control: PipelineControl | None = None,
) -> tf.data.Dataset:
    """Batched dataset from this host's TFDS ``coco/2017_panoptic`` examples.

    ``features_ds`` yields TFDS feature dicts whose ``image`` and ``panoptic_image`` are either
    decoded uint8 tensors or encoded bytes (``tfds.decode.SkipDecoding``; then decoded here with
    PIL, as the reader does, after the resume skip, so skipping is cheap and both sources give
    identical pixels). Training: ``shuffle(shuffle_buffer, seed)`` (reshuffled
    every epoch, deterministic for a seed), repeat, per-host position q; flip/scale from
    ``(seed, q * P + h)``; ``start_step`` skips ``start_step * B`` elements before decoding.
    Eval: in order, padded to ``num_eval_batches`` batches with ``example_valid = False``.

    Args:
        features_ds: this host's examples (already sharded).
        cfg: transform config.
        label_to_contiguous: int32 [L], from :func:`oanet_jax.data.tfds.tfds_label_mapping`.
        isthing: bool [C].
        training: see :func:`dataset_from_reader`.
        batch_size: per-host batch B.
        seed: data seed.
        start_step: training batches to skip.
        process_index: h (for the augmentation position).
        process_count: P.
        num_examples: this host's example count (eval: for padding when ``num_eval_batches`` is
            None; training with ``skip_bad_records``: the pass length after which a pass that
            yielded nothing raises :class:`AllRecordsSkippedError`).
        num_eval_batches: batches every host yields in eval.
        train_sizes: ``min_size_train``.
        test_size: ``min_size_test``.
        random_flip: flip in training.
        shuffle_buffer: tf.data shuffle buffer (training).
        skip_bad_records: a bad example is dropped (training) / padded (eval) instead of failing.
        prefetch: batches to prefetch.
        control: see :func:`dataset_from_reader`.

    Returns:
        tf.data.Dataset of batch dicts.
    """
    label_to_contiguous = np.asarray(label_to_contiguous, np.int32)
    isthing = np.asarray(isthing, np.bool_)
    sizes = tuple(int(v) for v in train_sizes)
    counter = _SkipCounter()
    cfg = cfg.with_source_size(TFDS_SOURCE_SIZE)
    if control is None:
        control = PipelineControl("train" if training else "eval", skip_bad_records)
    control.skips = counter

    def decode(value: Any) -> np.ndarray:
        if isinstance(value, (bytes, np.bytes_)) or (
            isinstance(value, np.ndarray) and value.dtype.kind in "SO"
        ):
            # Encoded (SkipDecoding): PIL, the reader's decoder, so both sources give the same
            # pixels (TF's and PIL's JPEG decoders differ by a few levels).
            with PIL.Image.open(io.BytesIO(bytes(np.asarray(value).item()))) as im:
                return np.asarray(im.convert("RGB"))
        return np.asarray(value, np.uint8)

    def make(*args):
        return control.call(make_example, *args)

    def make_example(q, image, pan, image_id, seg_ids, labels, crowd):
        features = {
            "image": decode(image),
            "panoptic_image": decode(pan),
            "image/id": image_id,
            "panoptic_objects": {"id": seg_ids, "label": labels, "is_crowd": crowd},
        }
        if training:
            flip, size_index = augmentation(
                seed, int(q) * process_count + process_index, len(sizes), random_flip
            )
            size = sizes[size_index]
        else:
            flip, size = False, int(test_size)
        try:
            record = tfds_lib.tfds_features_to_record(features, label_to_contiguous, isthing)
            return wire_from_record(record, cfg, short_size=size, flip=flip)
        except ValueError as err:
            if not skip_bad_records:
                raise
            counter.add(getattr(err, "reason", "invalid_example"), str(err))
            return spec.wire_padding_example(cfg)

    def mapper(q, f):
        objects = f["panoptic_objects"]
        inputs = [
            q,
            f["image"],
            f["panoptic_image"],
            tf.cast(f["image/id"], tf.int64),
            tf.cast(objects["id"], tf.int64),
            tf.cast(objects["label"], tf.int64),
            tf.cast(objects["is_crowd"], tf.bool),
        ]
        return q, _numpy_map(make, inputs, cfg)

    ds = features_ds
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
        ds = ds.enumerate().skip(int(start_step) * int(batch_size))
    else:
        if start_step:
            raise ValueError("start_step is only meaningful in training")
        ds = ds.enumerate()
    ds = ds.map(mapper, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if not training:
        if num_eval_batches is None:
            if num_examples is None:
                raise ValueError("eval needs num_examples or num_eval_batches")
            num_eval_batches = max(1, -(-int(num_examples) // batch_size))
        pad = {k: tf.constant(v) for k, v in spec.wire_padding_example(cfg).items()}
        padding = tf.data.Dataset.from_tensors((tf.constant(-1, tf.int64), pad)).repeat()
        ds = ds.concatenate(padding).take(int(num_eval_batches) * batch_size)
    guard = None
    if training and skip_bad_records and num_examples:
        guard = _PassGuard(int(num_examples), f"split {control.split!r} (TFDS)", control)
    return _finish(ds, batch_size, prefetch, guard)


def make_reader(config_data: Any, split: str) -> coco_panoptic.CocoPanopticReader:
    """The reader of one split of a COCO-panoptic-format dataset described by ``config.data``.

    Paths in ``config.data.{train,eval}`` are relative to ``config.data.root`` (absolute paths are
    kept); an empty ``instances_json`` means masks from the panoptic segments, and so does
    ``config.data.instance_masks == 'panoptic'`` for the train split (Table 3's "w/ pano-instance
    GT": visible segments as instance masks even when an instances JSON exists; the eval split
    keeps its instances JSON, whose full masks the instance AP evaluation needs).

    Args:
        config_data: ``config.data``.
        split: 'train' or 'eval'.

    Returns:
        A :class:`CocoPanopticReader` with ``max_instances``, ``skip_bad_records`` and
        ``keep_empty_images`` from the config.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    s = config_data[split]
    root = config_data.root
    instance_masks = str(config_data.instance_masks)
    if instance_masks not in ("full", "panoptic"):
        raise ValueError(f"data.instance_masks={instance_masks!r}; expected 'full' or 'panoptic'")
    instances_json = s.instances_json
    if split == "train" and instance_masks == "panoptic":
        instances_json = ""
    return coco_panoptic.CocoPanopticReader(
        coco_panoptic.join_root(root, s.image_dir),
        coco_panoptic.join_root(root, s.panoptic_json),
        coco_panoptic.join_root(root, s.panoptic_dir),
        instances_json=coco_panoptic.join_root(root, instances_json),
        skip_bad_records=bool(config_data.skip_bad_records),
        keep_empty_images=bool(config_data.keep_empty_images),
        max_instances=int(config_data.max_instances),
    )


def build_dataset(
    config: Any,
    split: str,
    *,
    training: bool,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    reader: Any | None = None,
    control: PipelineControl | None = None,
) -> tf.data.Dataset:
    """The input pipeline of one host (see the module docstring for keys, order, determinism).

    Args:
        config: full config (uses ``config.data``; ``config.model.num_thing_classes`` for TFDS).
        split: 'train' or 'eval' (TFDS: 'train' / 'validation').
        training: infinite shuffled, augmented stream (drop_remainder) vs one ordered pass with
            the last batch padded (``example_valid``).
        batch_size: per-host batch B (global batch / process_count).
        seed: data seed.
        start_step: training steps already taken: the stream starts at batch ``start_step``.
        process_index: this host, default ``jax.process_index()``.
        process_count: hosts, default ``jax.process_count()``.
        reader: an already constructed reader to use instead of :func:`make_reader` (raw source).
        control: the :class:`PipelineControl` of the pipeline (see :func:`numpy_batches`).

    Returns:
        tf.data.Dataset yielding batch dicts of static shape.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    d = config.data
    if d.source == "tfds":
        host = tfds_lib.tfds_host_split(
            config,
            split,
            training=training,
            process_index=int(process_index),
            process_count=int(process_count),
        )
        return dataset_from_tfds_features(
            host.features,
            TransformConfig.from_config(d),
            host.label_to_contiguous,
            host.isthing,
            training=training,
            batch_size=batch_size,
            seed=seed,
            start_step=start_step,
            process_index=int(process_index),
            process_count=int(process_count),
            num_examples=host.num_examples,
            num_eval_batches=max(1, -(-host.max_host_examples // batch_size)),
            train_sizes=tuple(d.min_size_train),
            test_size=int(d.min_size_test),
            random_flip=bool(d.random_flip),
            shuffle_buffer=int(d.shuffle_buffer),
            skip_bad_records=bool(d.skip_bad_records),
            prefetch=int(d.prefetch),
            control=control,
        )
    if d.source != "coco_panoptic":
        raise ValueError(f"unknown data.source {d.source!r} (coco_panoptic | tfds)")
    if reader is None:
        reader = make_reader(d, split)
    return dataset_from_reader(
        reader,
        TransformConfig.from_config(d),
        training=training,
        batch_size=batch_size,
        seed=seed,
        start_step=start_step,
        process_index=int(process_index),
        process_count=int(process_count),
        train_sizes=tuple(d.min_size_train),
        test_size=int(d.min_size_test),
        random_flip=bool(d.random_flip),
        skip_bad_records=bool(d.skip_bad_records),
        prefetch=int(d.prefetch),
        control=control,
    )


def numpy_batches(config: Any, split: str, **kwargs: Any) -> NumpyBatches:
    """:func:`build_dataset` as a :class:`NumpyBatches` iterator.

    The iterator re-raises errors of the pipeline's Python stages as themselves (a DataError
    first, with one line of context and the ``skip_bad_records`` hint), reports the records
    skipped so far (``skipped_records()``) and can be closed from another thread.

    Args:
        config: full config.
        split: 'train' or 'eval'.
        **kwargs: the keyword arguments of :func:`build_dataset` (``training``, ``batch_size``,
            ``seed``, ...), except ``control``.

    Returns:
        The iterator.
    """
    control = PipelineControl(split, bool(config.data.skip_bad_records))
    ds = build_dataset(config, split, control=control, **kwargs)
    return NumpyBatches(ds, control)
