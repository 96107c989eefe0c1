"""Tests of oanet_jax/common: the one scalar writer and the one atomic JSON writer."""

import glob
import json
import math
import os
import pathlib

import numpy as np
import pytest

from oanet_jax.common.files import write_json
from oanet_jax.common.metric_writer import MetricWriter


def _events(folder):
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    events = {}
    for f in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        for raw in tf.data.TFRecordDataset(f):
            event = event_pb2.Event.FromString(raw.numpy())
            for v in event.summary.value:
                assert v.metadata.plugin_data.plugin_name == "scalars"
                events[(event.step, v.tag)] = float(tf.make_ndarray(v.tensor))
    return events


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
    path, tb = str(tmp_path / "metrics.jsonl"), str(tmp_path / "tb")
    with MetricWriter(path, tb) as writer:
        writer.write(5, {"total": 1.25, "lr": 0.02}, prefix="train/")
        writer.write(10, {"total": float("nan"), "lr": 0.002}, prefix="train/")
    records = [json.loads(x) for x in pathlib.Path(path).read_text().splitlines()]
    assert records[0] == {"step": 5, "total": 1.25, "lr": 0.02}
    assert records[1]["step"] == 10 and np.isnan(records[1]["total"])
    events = _events(tb)
    assert events[(5, "train/total")] == 1.25
    assert events[(10, "train/lr")] == np.float32(0.002)
    assert np.isnan(events[(10, "train/total")])


def test_metric_writer_appends_and_disabled_writes_nothing(tmp_path):
    path = str(tmp_path / "m.jsonl")
    with MetricWriter(path, None) as w:
        w.write(1, {"a": 1})
    with MetricWriter(path, None) as w:
        w.write(2, {"a": 2})
    assert [json.loads(x)["step"] for x in pathlib.Path(path).read_text().splitlines()] == [1, 2]
    with MetricWriter(str(tmp_path / "off.jsonl"), str(tmp_path / "off"), enabled=False) as w:
        w.write(1, {"a": 1})
    assert not os.path.exists(tmp_path / "off.jsonl") and not os.path.exists(tmp_path / "off")


def test_write_json_atomic_numpy_and_failure_keeps_old(tmp_path):
    path = tmp_path / "sub" / "x.json"
    write_json(path, {"a": np.int64(3), "b": np.float32(0.5), "c": np.arange(3), "d": True})
    assert json.loads(path.read_text()) == {"a": 3, "b": 0.5, "c": [0, 1, 2], "d": True}
    write_json(path, {"a": 1}, indent=1)
    assert path.read_text() == '{\n "a": 1\n}'
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"a": 1}  # old content intact, no temp file left
    assert sorted(os.listdir(path.parent)) == ["x.json"]
    assert math.isnan(json.loads('{"v": NaN}')["v"])
