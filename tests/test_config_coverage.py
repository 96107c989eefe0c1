"""Every leaf of `config.model`, `config.loss` (and `config.eval`) of configs/base.py is used.

The test runs the code that consumes the config -- a list of phases: build the model and trace
its training and inference forward passes, build and trace the training step -- while recording
which config leaves are read, and fails listing every leaf nobody read.

What counts as a read:

* a ConfigDict attribute or item access (``config.loss.seg_weight``, ``m["rpn"]``), recorded as
  its dotted path, except the ones made by `oanet_jax.modeling.build.section_to_dataclass`,
  which copies every field of a `config.model` section into its dataclass by construction;
* for those sections, a read of the dataclass field (``self.rpn_config.nms_thresh``) by code in
  the `oanet_jax` package, recorded as ``model.rpn.nms_thresh`` (reads by dataclass or flax
  machinery, e.g. ``__eq__`` or ``__hash__``, do not count).

Each phase names the config sections whose leaves it is responsible for; the checked sections
are the union of the phases'. Tracing is abstract (``jax.eval_shape``) at a 128 x 128 input size
with the base config's other values; the evaluation phase builds the evaluation during training
and the evaluation runner on the real COCO sample's ground truth.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest
from ml_collections.config_dict import config_dict as config_dict_lib

import oanet_jax
from configs import base, tiny
from oanet_jax.common.metric_writer import MetricWriter
from oanet_jax.data import spec as data_spec
from oanet_jax.eval.evaluator import EvalRunner
from oanet_jax.modeling import build
from oanet_jax.modeling.config import SECTIONS, RPNConfig
from oanet_jax.train import optimizer as optimizer_lib
from oanet_jax.train import step as step_lib
from oanet_jax.train.periodic_eval import PeriodicEvaluation
from oanet_jax.train.state import TrainState

PACKAGE_DIR = os.path.dirname(oanet_jax.__file__) + os.sep
COCO_SAMPLE = (
    pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_panoptic_sample"
)
CONFIG_DICT_FILE = config_dict_lib.__file__
BATCH = 2


@dataclasses.dataclass(frozen=True)
class Phase:
    """One consumer of the config."""

    name: str
    """Shown in failures."""
    run: Callable[[ml_collections.ConfigDict], None]
    """Runs the consumer on a full config."""
    covers: tuple[str, ...]
    """Top-level config sections whose every leaf must be read by some phase."""


def _abstract_batch(config: ml_collections.ConfigDict, train: bool) -> dict:
    """The batch spec's train batch, or the image inputs of inference."""
    spec = data_spec.batch_spec(config.data, BATCH, train=True)
    return spec if train else {k: spec[k] for k in ("image", "image_shape")}


def _abstract_variables(model: nn.Module, batch: dict) -> dict:
    key = jax.random.key(0)
    init = functools.partial(model.init, train=True)
    return jax.eval_shape(lambda k, b: init({"params": k, "sampling": k}, b), key, batch)


def trace_model(config: ml_collections.ConfigDict) -> None:
    """Builds the model; traces its training and inference forward passes."""
    model = build.build_model(config)
    train_batch = _abstract_batch(config, train=True)
    variables = _abstract_variables(model, train_batch)
    rngs = {"sampling": jax.random.key(1)}
    jax.eval_shape(lambda v, b: model.apply(v, b, train=True, rngs=rngs), variables, train_batch)
    infer_batch = _abstract_batch(config, train=False)
    jax.eval_shape(lambda v, b: model.apply(v, b, train=False), variables, infer_batch)


def trace_train_step(config: ml_collections.ConfigDict) -> None:
    """Builds the model and an abstract train state; traces `oanet_jax.train.step.train_step`."""
    model = build.build_model(config)
    batch = _abstract_batch(config, train=True)
    variables = _abstract_variables(model, batch)
    tx = optimizer_lib.make_optimizer(
        config.train, variables["params"], int(config.model.freeze_at)
    )
    params = nn.meta.unbox(variables["params"])
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        batch_stats=nn.meta.unbox(variables.get("batch_stats", {})),
        opt_state=jax.eval_shape(tx.init, params),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    step = functools.partial(step_lib.train_step, model=model, config=config)
    jax.eval_shape(step, state, batch)


def build_evaluation(config: ml_collections.ConfigDict) -> None:
    """Sets up evaluation during training and the evaluation runner (evaluators, inference).

    The eval split is the real COCO panoptic sample, its category list cut to the model's
    numbers of thing and stuff classes (all 80 + 53 for the base config), so the ground truth
    loads; nothing is compiled or run.
    """
    sample = COCO_SAMPLE
    if not sample.exists():
        pytest.skip(f"COCO sample not found at {sample}")
    workdir = tempfile.mkdtemp()
    gt = json.loads((sample / "panoptic_examples.json").read_text())
    categories = json.loads((sample / "panoptic_coco_categories.json").read_text())
    things = [c for c in categories if c["isthing"]][: config.model.num_thing_classes]
    stuff = [c for c in categories if not c["isthing"]][: config.model.num_stuff_classes]
    gt["categories"] = things + stuff
    gt_file = os.path.join(workdir, "gt.json")
    with open(gt_file, "w") as f:
        json.dump(gt, f)
    config.data.root = ""
    config.data.eval.panoptic_json = gt_file
    config.data.eval.panoptic_dir = str(sample / "panoptic_examples")
    config.data.eval.instances_json = ""
    model = build.build_model(config)
    with MetricWriter(None, None, enabled=False) as writer:
        PeriodicEvaluation(config, workdir, model, writer).close()
    EvalRunner(config, model)
    shutil.rmtree(workdir)


PHASES: list[Phase] = [
    Phase("model forward (train, inference)", trace_model, covers=("model",)),
    Phase("train step", trace_train_step, covers=("model", "loss")),
    Phase("evaluation (during training, runner)", build_evaluation, covers=("eval",)),
]
"""The consumers of the config."""


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
    for key in config:
        path = f"{prefix}{key}"
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, path + ".")
        else:
            yield path


def _config_dicts(config: ml_collections.ConfigDict, prefix: str = "") -> dict[int, str]:
    """id of every nested ConfigDict -> its dotted path (with a trailing dot)."""
    out = {id(config): prefix}
    for key in config:
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            out |= _config_dicts(value, f"{prefix}{key}.")
    return out


def _caller(depth: int, skip_file: str | None = None):
    """The frame `depth` levels above the caller of `_caller`, past frames of `skip_file`."""
    frame = sys._getframe(depth + 1)
    while frame is not None and skip_file is not None and frame.f_code.co_filename == skip_file:
        frame = frame.f_back
    return frame


def unread_leaves(config: ml_collections.ConfigDict, phases: list[Phase]) -> list[str]:
    """Runs `phases` on `config`; returns the leaves of their covered sections never read."""
    paths = _config_dicts(config)
    read: set[str] = set()
    converter = build.section_to_dataclass.__code__
    original_getitem = ml_collections.ConfigDict.__getitem__

    def getitem(self: ml_collections.ConfigDict, key: str):
        value = original_getitem(self, key)
        prefix = paths.get(id(self))
        if prefix is not None and _caller(1, CONFIG_DICT_FILE).f_code is not converter:
            read.add(f"{prefix}{key}")
        return value

    def recording_getattribute(section: str, fields: frozenset[str]):
        def getattribute(self, name: str):
            value = object.__getattribute__(self, name)
            if name in fields and _caller(1).f_code.co_filename.startswith(PACKAGE_DIR):
                read.add(f"model.{section}.{name}")
            return value

        return getattribute

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ml_collections.ConfigDict, "__getitem__", getitem)
        for section, cls in SECTIONS.items():
            fields = frozenset(f.name for f in dataclasses.fields(cls))
            patch.setattr(cls, "__getattribute__", recording_getattribute(section, fields))
        for phase in phases:
            phase.run(config)

    covered = {section for phase in phases for section in phase.covers}
    leaves = [
        f"{section}.{leaf}" for section in sorted(covered) for leaf in _leaves(config[section])
    ]
    return [leaf for leaf in leaves if leaf not in read]


def _traceable(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` at a 128 x 128 input (cheap to trace), the model values untouched."""
    config.data.image_size = (128, 128)
    config.data.max_instances = 4
    config.data.mask_size = 16
    return config


def test_every_base_config_leaf_is_read():
    unread = unread_leaves(_traceable(base.get_config()), PHASES)
    assert not unread, "config leaves no phase reads:\n  " + "\n  ".join(unread)


def _add_top_level_model_field(config, monkeypatch) -> str:
    config.model.unused_knob = 3
    return "model.unused_knob"


def _add_loss_field(config, monkeypatch) -> str:
    config.loss.unused_weight = 1.0
    return "loss.unused_weight"


def _add_section_field(config, monkeypatch) -> str:
    """A field in both `config.model.rpn` and its dataclass (so build accepts it), never read."""

    @dataclasses.dataclass(frozen=True)
    class RPNConfigWithUnusedKnob(RPNConfig):
        unused_knob: int = 0
        """Read by nothing."""

    monkeypatch.setitem(SECTIONS, "rpn", RPNConfigWithUnusedKnob)
    config.model.rpn.unused_knob = 1
    return "model.rpn.unused_knob"


@pytest.mark.parametrize(
    "add_field", [_add_top_level_model_field, _add_loss_field, _add_section_field]
)
def test_an_unused_field_is_reported(add_field):
    """The check can fail: a field read by nothing is listed (tiny config, cheaper to trace)."""
    with pytest.MonkeyPatch.context() as patch:
        config = tiny.get_config()
        unused = add_field(config, patch)
        unread = unread_leaves(config, PHASES)
    assert unread == [unused]
