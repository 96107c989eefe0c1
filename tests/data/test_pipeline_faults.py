"""Bad training data through the real tf.data pipeline (issue 14, items 1 and 4).

* every record bad with ``skip_bad_records``: the stream raises ``AllRecordsSkippedError``
  ("all N records of split 'train' were skipped; first reasons: ...") after one pass instead of
  never yielding (also when resumed mid-pass);
* some records bad: batches come, and the skipped records are counted per reason;
* skipping off: the ``DataError`` itself reaches the caller (file and record first), with one line
  of context instead of TensorFlow's ``InvalidArgumentError`` wrapper, and the
  ``skip_bad_records`` hint;
* a closed stream answers a ``next`` blocked in another thread.
"""

from __future__ import annotations

import glob
import os
import pathlib
import shutil
import threading
import traceback

import pytest

pytest.importorskip("torch")  # imported before tensorflow (conftest too)

from configs import tiny  # noqa: E402
from oanet_jax.data import coco_panoptic, pipeline, synthetic  # noqa: E402

NUM_IMAGES = 8


@pytest.fixture(scope="module")
def good_root(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("faults") / "data"
    synthetic.generate(str(out), num_images=NUM_IMAGES, num_val_images=2, seed=0, size=(64, 64))
    return out


def _copy_without_images(good: pathlib.Path, dst: pathlib.Path, count: int) -> pathlib.Path:
    """A copy of the dataset with the first ``count`` training images deleted."""
    shutil.copytree(good, dst)
    for f in sorted(glob.glob(str(dst / "train" / "images" / "*")))[:count]:
        os.remove(f)
    return dst


def _config(root: pathlib.Path, skip: bool):
    c = tiny.get_config()
    c.data.root = str(root)
    c.data.skip_bad_records = skip
    c.data.prefetch = 1
    return c


def _next_within(it, seconds: float = 120.0):
    """``next(it)`` in a thread: (batch, None) or (None, exception); fails if it hangs."""
    out: dict = {}

    def run():
        try:
            out["batch"] = next(it)
        except BaseException as e:  # noqa: BLE001 - returned to the test
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"next() did not return within {seconds} s (a hang)"
    return out.get("batch"), out.get("error")


@pytest.mark.parametrize("start_step", [0, 1])
def test_every_record_bad_raises_after_one_pass(good_root, tmp_path, start_step):
    root = _copy_without_images(good_root, tmp_path / "bad", NUM_IMAGES)
    it = pipeline.numpy_batches(
        _config(root, skip=True),
        "train",
        training=True,
        batch_size=4,
        seed=0,
        start_step=start_step,  # resumed mid-pass: the next full pass decides
    )
    batch, err = _next_within(it)
    assert batch is None and isinstance(err, coco_panoptic.AllRecordsSkippedError), err
    msg = str(err)
    assert msg.startswith(f"all {NUM_IMAGES} records of split 'train'"), msg
    assert "panoptic.json" in msg and f"first reasons: missing_image x{NUM_IMAGES}: " in msg
    assert "image file not found" in msg  # the first skipped record's own message
    assert it.skipped_records() == {"missing_image": NUM_IMAGES}


def test_some_records_bad_are_skipped_and_counted(good_root, tmp_path):
    root = _copy_without_images(good_root, tmp_path / "some", 2)
    it = pipeline.numpy_batches(
        _config(root, skip=True), "train", training=True, batch_size=2, seed=0
    )
    batches = [_next_within(it)[0] for _ in range(4)]  # 8 examples > the 6 good records
    assert all(b is not None and b["example_valid"].all() for b in batches)
    assert it.skipped_records() == {"missing_image": 2}


def test_data_error_first_with_one_line_of_context(good_root, tmp_path):
    root = _copy_without_images(good_root, tmp_path / "nohint", 0)
    victim = sorted(glob.glob(str(root / "train" / "images" / "*")))[3]
    with open(victim, "r+b") as f:  # a truncated image file
        f.truncate(40)
    it = pipeline.numpy_batches(
        _config(root, skip=False), "train", training=True, batch_size=NUM_IMAGES, seed=0
    )
    _, err = _next_within(it)
    assert type(err) is coco_panoptic.DataError, err
    assert str(err).startswith(victim) and "image_id=" in str(err)
    text = "".join(traceback.format_exception(err))
    # TensorFlow's wrapper is one line of context, not a chained traceback.
    assert text.count("InvalidArgumentError") == 1 and "During handling" not in text, text
    assert "tensorflow/" not in text and "numpy_function" not in text, text
    assert any("skip_bad_records=True" in n for n in err.__notes__), err.__notes__
    assert it.skipped_records() == {}


def test_close_answers_a_blocked_next(good_root, tmp_path):
    # Skipping on and every record bad would answer within a pass anyway: a closed pipeline
    # answers at once (StopIteration) without that pass (the loop's stop path relies on it).
    it = pipeline.numpy_batches(
        _config(good_root, skip=False), "train", training=True, batch_size=2, seed=0
    )
    assert _next_within(it)[0] is not None
    it.close()
    batches = 0
    while True:  # what tf.data had prefetched, then the end
        batch, err = _next_within(it)
        if batch is None:
            break
        batches += 1
    assert isinstance(err, StopIteration) and batches <= 4
