"""Export: the whole panoptic inference as one serialized function, and its loader.

``export`` (``scripts/export.py``, ``oanet-export``) restores a training checkpoint and writes
the inference of `oanet_jax.eval.inference.make_inference_fn` (uint8 images and their valid sizes
in; normalisation, the network and one panoptic merge ordering, 'srm' or 'score') for a fixed
padded input shape:

    oanet-export --config configs/synthetic.py --workdir runs/synthetic --out exported/synthetic \
        --format jax --batch 1 --platforms cpu,cuda --ordering srm

Formats (``--format``):

* ``jax``: a folder with ``function.jaxexport`` (`jax.export` StableHLO of the function, lowered
  for every platform of ``--platforms`` in one artifact, one device), ``params.npz`` (the
  variables tree flattened in `jax.tree_util` order: entry ``"%05d" % i`` is leaf i, its tree
  path in the manifest) and ``manifest.json`` (config, category table, input shapes and dtypes,
  normalisation, resize, ordering, outputs, platforms, versions). `load` reads it with jax and
  numpy only: this module imports neither flax, the model, the training code nor TensorFlow at
  import time (only `export_checkpoint` and `main` do, when called).
* ``saved_model``: a TF SavedModel via `jax.experimental.jax2tf` (native serialization for the
  platforms of ``--platforms``) whose ``serving_default`` signature takes ``images`` uint8
  [B, Hp, Wp, 3], ``image_shapes`` int32 [B, 2] and ``orig_shapes`` int32 [B, 2] and returns the
  outputs below; the parameters are variables of the SavedModel; ``manifest.json`` sits beside
  ``saved_model.pb``.

Outputs of both formats (the padded model frame; `oanet_jax.predict.predict_exported` maps them
back to the original images): 'id_map' int32 [B, Hp, Wp] (0 = void) and the segment table, one
row per detection slot then per stuff class ([B, D + S] each): 'segment_id' int32 (the id in
'id_map'), 'category_id' int32 (dataset id), 'category' int32 (contiguous id), 'isthing' bool,
'score' float32 (detection score, 0 for stuff), 'area' int32 (pixels in 'id_map'), 'valid' bool
(the segment is in the map).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform as _platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
    "FORMATS",
    "MANIFEST",
    "ArtifactError",
    "ExportedModel",
    "export_checkpoint",
    "export_variables",
    "load",
    "main",
]

FORMATS = ("jax", "saved_model")
MANIFEST = "manifest.json"
FUNCTION_FILE = "function.jaxexport"
PARAMS_FILE = "params.npz"
ARTIFACT_FORMAT = "oanet-jax-export"
ARTIFACT_VERSION = 1
# Exported outputs: name -> (dtype, shape with 'B', 'Hp', 'Wp', 'N' = D + S), see the docstring.
OUTPUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "id_map": ("int32", ("B", "Hp", "Wp")),
    "segment_id": ("int32", ("B", "N")),
    "category_id": ("int32", ("B", "N")),
    "category": ("int32", ("B", "N")),
    "isthing": ("bool", ("B", "N")),
    "score": ("float32", ("B", "N")),
    "area": ("int32", ("B", "N")),
    "valid": ("bool", ("B", "N")),
}
INPUT_NAMES = ("images", "image_shapes", "orig_shapes")


class ArtifactError(ValueError):
    """An exported artifact that cannot be used here (missing file or platform, bad manifest)."""


# ----------------------------------------------------------------------------- loading


def current_platform() -> str:
    """The `jax.export` platform name of the default backend: 'cpu', 'cuda', 'rocm' or 'tpu'."""
    backend = jax.default_backend()
    if backend == "gpu":
        version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
        return "rocm" if "rocm" in version else "cuda"
    return backend


def _read_manifest(path: str) -> dict[str, Any]:
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ArtifactError(f"{path}: no {MANIFEST}; not an exported oanet-jax artifact")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(
            f"{manifest_path}: 'format' is {manifest.get('format')!r}, expected {ARTIFACT_FORMAT!r}"
        )
    if int(manifest.get("format_version", -1)) > ARTIFACT_VERSION:
        raise ArtifactError(
            f"{manifest_path}: format_version {manifest.get('format_version')} is newer than this "
            f"loader's {ARTIFACT_VERSION}"
        )
    return manifest


def is_artifact(path: str) -> bool:
    """True when `path` is a folder with an exported artifact's manifest."""
    return os.path.isfile(os.path.join(path, MANIFEST))


class ExportedModel:
    """A loaded ``jax`` artifact: ``model(images, image_shapes=None, orig_shapes=None)``.

    Attributes:
      path: the artifact folder (named in every error).
      manifest: the artifact's manifest (config, 'categories', 'inputs', 'ordering', ...).
      input_shape: (B, Hp, Wp, 3), the exported padded batch shape of 'images'.
      platforms: the platforms the function was exported for.
      platform: the platform it runs on here.
    """

    def __init__(self, path: str, manifest: dict[str, Any], exported: Any, leaves: list[Any]):
        self.path = path
        self.manifest = manifest
        self.platforms = tuple(exported.platforms)
        self.platform = current_platform()
        self.input_shape = tuple(int(v) for v in manifest["inputs"]["images"]["shape"])
        self._leaves = jax.device_put(leaves)
        self._call = jax.jit(exported.call)

    @property
    def ordering(self) -> str:
        """The merge ordering baked into the function ('srm' or 'score')."""
        return str(self.manifest["ordering"])

    def _shapes_input(self, name: str, value: Any, default: np.ndarray) -> np.ndarray:
        """`value` ([B, 2] positive integers; None: `default`) as int32, checked."""
        batch = self.input_shape[0]
        if value is None:
            return default
        arr = np.asarray(value)
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{self.path}: {name} must be integer (h, w) rows, got {arr.dtype}")
        if arr.shape != (batch, 2):
            raise ValueError(
                f"{self.path}: {name} must have shape ({batch}, 2) (the exported batch of (h, w) "
                f"rows), got {arr.shape}"
            )
        if np.any(arr <= 0):
            raise ValueError(f"{self.path}: {name} must be positive, got {arr.tolist()}")
        return arr.astype(np.int32)

    def __call__(
        self, images: Any, image_shapes: Any = None, orig_shapes: Any = None
    ) -> dict[str, np.ndarray]:
        """Runs the exported inference on one padded batch.

        Args:
          images: uint8 [B, Hp, Wp, 3] RGB of exactly `input_shape`, each image at the top left
            of its padding (resize and pad with `oanet_jax.predict.preprocess_image`).
          image_shapes: int [B, 2], (h, w) of each image inside the padding; default (Hp, Wp).
          orig_shapes: int [B, 2], (H, W) of the original images before the resize (stuff areas
            are counted in original pixels when the config says so); default `image_shapes`.

        Returns:
          The outputs (numpy, see the module docstring): 'id_map' [B, Hp, Wp] and the segment
          table 'segment_id', 'category_id', 'category', 'isthing', 'score', 'area', 'valid'
          [B, N].

        Raises:
          TypeError: images not uint8, or shapes not integer.
          ValueError: a rank or shape other than the exported one, or sizes out of range.
        """
        b, hp, wp, c = self.input_shape
        if not hasattr(images, "dtype") or not hasattr(images, "shape"):
            images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(
                f"{self.path}: images must be uint8 RGB (the model normalises inside), got "
                f"{images.dtype}"
            )
        if len(images.shape) != 4:
            raise ValueError(
                f"{self.path}: images must have rank 4 [B, Hp, Wp, 3] = {self.input_shape}, got "
                f"rank {len(images.shape)} shape {tuple(images.shape)}"
            )
        if tuple(images.shape) != self.input_shape:
            raise ValueError(
                f"{self.path}: images must have the exported shape [B, Hp, Wp, 3] = "
                f"{self.input_shape}, got {tuple(images.shape)} (resize and pad with "
                "oanet_jax.predict.preprocess_image, or re-export with --batch/--height/--width)"
            )
        full = np.tile(np.asarray([[hp, wp]], np.int32), (b, 1))
        image_shapes = self._shapes_input("image_shapes", image_shapes, full)
        if np.any(image_shapes > np.asarray([hp, wp])):
            raise ValueError(
                f"{self.path}: image_shapes must fit in the padded size {(hp, wp)}, got "
                f"{image_shapes.tolist()}"
            )
        orig_shapes = self._shapes_input("orig_shapes", orig_shapes, image_shapes)
        out = self._call(self._leaves, images, image_shapes, orig_shapes)
        return {k: np.asarray(v) for k, v in jax.device_get(out).items()}


def load(path: str) -> ExportedModel:
    """Loads a ``jax`` artifact written by `export_variables` (needs only jax and numpy).

    Args:
      path: the artifact folder (``manifest.json``, ``function.jaxexport``, ``params.npz``).

    Returns:
      The callable model.

    Raises:
      ArtifactError: not an artifact, a missing or mismatched file, or this process's platform
        is not among those it was exported for.
    """
    from jax import export as jax_export

    path = os.fspath(path)
    manifest = _read_manifest(path)
    if manifest.get("artifact") != "jax":
        raise ArtifactError(
            f"{path}: a {manifest.get('artifact')!r} artifact; load() reads the 'jax' format "
            "(load a SavedModel with tf.saved_model.load)"
        )
    function_path = os.path.join(path, manifest["files"]["function"])
    params_path = os.path.join(path, manifest["files"]["params"])
    for p in (function_path, params_path):
        if not os.path.isfile(p):
            raise ArtifactError(f"{path}: missing {os.path.basename(p)}")
    with open(function_path, "rb") as f:
        exported = jax_export.deserialize(bytearray(f.read()))
    here = current_platform()
    if here not in exported.platforms:
        raise ArtifactError(
            f"{path} was exported for platforms {list(exported.platforms)}, but this process runs "
            f"on {here!r}; re-export with --platforms including {here}"
        )
    specs = manifest["params"]
    with np.load(params_path, allow_pickle=False) as npz:
        if len(npz.files) != len(specs):
            raise ArtifactError(
                f"{params_path}: {len(npz.files)} arrays, the manifest lists {len(specs)}"
            )
        leaves = []
        for i, spec in enumerate(specs):
            key = f"{i:05d}"
            if key not in npz.files:
                raise ArtifactError(f"{params_path}: no array {key!r} ({spec['path']})")
            leaf = npz[key]
            if list(leaf.shape) != list(spec["shape"]) or str(leaf.dtype) != spec["dtype"]:
                raise ArtifactError(
                    f"{params_path}: {key} ({spec['path']}) is {leaf.dtype}{list(leaf.shape)}, "
                    f"expected {spec['dtype']}{spec['shape']}"
                )
            leaves.append(leaf)
    return ExportedModel(path, manifest, exported, leaves)


# ----------------------------------------------------------------------------- exporting


def _serving_function(
    infer: Callable[..., dict[str, Any]],
    treedef: Any,
    ordering: str,
    dataset_ids: Sequence[int],
) -> Callable[..., dict[str, Any]]:
    """``f(leaves, images, image_shapes, orig_shapes) -> outputs`` around `InferenceFn.function`."""
    import jax.numpy as jnp

    def serve(leaves, images, image_shapes, orig_shapes):
        variables = jax.tree_util.tree_unflatten(treedef, leaves)
        batch = {"image": images, "image_shape": image_shapes, "orig_shape": orig_shapes}
        pan = infer(variables, batch)["panoptic"][ordering]
        seg = pan["segments"]
        category = seg["category"].astype(jnp.int32)
        return {
            "id_map": pan["id_map"].astype(jnp.int32),
            "segment_id": seg["id"].astype(jnp.int32),
            "category_id": jnp.asarray(dataset_ids, jnp.int32)[category],
            "category": category,
            "isthing": seg["isthing"],
            "score": seg["score"].astype(jnp.float32),
            "area": seg["area"].astype(jnp.int32),
            "valid": seg["valid"],
        }

    return serve


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": _platform.python_version()}
    for dist in ("oanet-jax", "jax", "jaxlib", "flax", "tensorflow", "tensorflow-cpu"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_jax_artifact(
    out: str, exported: Any, leaves: Sequence[np.ndarray], manifest: Mapping[str, Any]
) -> None:
    """Writes a ``jax`` artifact folder: the serialized function, params.npz and the manifest.

    Args:
      out: the folder (created).
      exported: the `jax.export.Exported` of ``f(leaves, images, image_shapes, orig_shapes)``.
      leaves: the parameter leaves, in the order `exported` takes them.
      manifest: the manifest ('inputs', 'ordering', 'params', ...; the format, 'artifact',
        'files' and 'platforms' are added here).
    """
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, FUNCTION_FILE), "wb") as f:
        f.write(exported.serialize())
    np.savez(
        os.path.join(out, PARAMS_FILE), **{f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
    )
    files = {"function": FUNCTION_FILE, "params": PARAMS_FILE}
    _write_manifest(out, manifest, "jax", files, exported.platforms)


def _write_manifest(
    out: str,
    manifest: Mapping[str, Any],
    artifact: str,
    files: Mapping[str, str],
    platforms: Sequence[str],
) -> None:
    """``<out>/manifest.json``: `manifest` with the format, artifact kind, files and platforms."""
    full = {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        "artifact": artifact,
        "files": dict(files),
        "platforms": list(platforms),
        **manifest,
    }
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(full, f, indent=1)


def export_variables(
    config: Any,
    variables: Any,
    out: str,
    *,
    table: Any,
    export_format: str = "jax",
    batch_size: int = 1,
    image_size: tuple[int, int] | None = None,
    platforms: Sequence[str] | None = None,
    ordering: str = "srm",
    source: Mapping[str, Any] | None = None,
) -> str:
    """Exports the inference of `variables` (see the module docstring for the formats).

    Args:
      config: full config (``model``, ``data``, ``eval``).
      variables: model variables {'params', ...} (logical-partitioning boxes are unboxed).
      out: the artifact folder (created).
      table: the `CategoryTable` (dataset ids, names, colours; things first).
      export_format: 'jax' or 'saved_model'.
      batch_size: B of the exported input.
      image_size: (Hp, Wp) of the exported input (default ``config.data.image_size``). Every
        image fits when ``max(data.min_size_test, data.max_size) <= min(Hp, Wp)``; the
        predictor reports an image whose resize does not fit.
      platforms: platforms to export for (default: this process's platform).
      ordering: the merge ordering, 'srm' (OANet) or 'score'.
      source: provenance stored in the manifest (e.g. workdir and step).

    Returns:
      `out`.

    Raises:
      ValueError: an unknown format, ordering or platform, a table that does not match the
        config, or a resize that does not fit the exported image size.
    """
    import copy

    import flax.linen as nn
    from jax import export as jax_export

    from oanet_jax.data import transforms
    from oanet_jax.eval.inference import make_inference_fn
    from oanet_jax.modeling.build import build_model
    from oanet_jax.panoptic.merge import ORDERINGS

    if export_format not in FORMATS:
        raise ValueError(f"unknown export format {export_format!r}; expected one of {FORMATS}")
    if ordering not in ORDERINGS:
        raise ValueError(f"unknown merge ordering {ordering!r}; expected one of {ORDERINGS}")
    platforms = tuple(platforms or (current_platform(),))
    known = ("cpu", "cuda", "rocm", "tpu")
    for p in platforms:
        if p not in known:
            raise ValueError(f"unknown platform {p!r}; expected some of {known}")
    if table.num_things != int(config.model.num_thing_classes) or table.num_classes != int(
        config.model.num_thing_classes
    ) + int(config.model.num_stuff_classes):
        raise ValueError(
            f"category table ({table.num_things} things, {table.num_classes} classes) does not "
            f"match config.model ({config.model.num_thing_classes} things, "
            f"{config.model.num_stuff_classes} stuff)"
        )
    config = copy.deepcopy(config)
    if image_size is not None:
        config.data.image_size = (int(image_size[0]), int(image_size[1]))
    hp, wp = (int(v) for v in config.data.image_size)
    short, longest = int(config.data.min_size_test), int(config.data.max_size)
    if short > min(hp, wp):
        raise ValueError(
            f"the test resize's shorter side (data.min_size_test={short}) does not fit the "
            f"exported image size {hp}x{wp}; lower it (--config.data.min_size_test=...) or export "
            "a larger size"
        )
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")

    variables = nn.meta.unbox(variables)
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
    leaves = [np.asarray(x) for _, x in flat]
    infer = make_inference_fn(build_model(config), config, (ordering,), batch_size=batch_size)
    serve = _serving_function(infer.function, treedef, ordering, table.dataset_ids)

    t = transforms.TransformConfig.from_config(config.data)
    inputs = {
        "images": {"shape": [batch_size, hp, wp, 3], "dtype": "uint8"},
        "image_shapes": {"shape": [batch_size, 2], "dtype": "int32"},
        "orig_shapes": {"shape": [batch_size, 2], "dtype": "int32"},
    }
    manifest = {
        "ordering": ordering,
        "inputs": inputs,
        "outputs": {k: {"dtype": d, "shape": list(s)} for k, (d, s) in OUTPUTS.items()},
        "normalization": {
            "inside": True,
            "pixel_mean": list(t.pixel_mean),
            "pixel_std": list(t.pixel_std),
            "channel_order": t.channel_order,
        },
        "resize": {"min_size_test": short, "max_size": longest},
        "categories": [
            {
                "id": int(table.dataset_ids[i]),
                "name": table.names[i],
                "color": list(table.colors[i]),
                "isthing": int(table.isthing[i]),
            }
            for i in range(table.num_classes)
        ],
        "params": [
            {
                "path": jax.tree_util.keystr(path),
                "shape": list(np.shape(x)),
                "dtype": str(np.asarray(x).dtype),
            }
            for path, x in flat
        ],
        "config": json.loads(config.to_json_best_effort()),
        "source": dict(source or {}),
        "versions": _versions(),
    }
    arg_specs = (
        [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
        jax.ShapeDtypeStruct((batch_size, hp, wp, 3), np.uint8),
        jax.ShapeDtypeStruct((batch_size, 2), np.int32),
        jax.ShapeDtypeStruct((batch_size, 2), np.int32),
    )
    if export_format == "jax":
        exported = jax_export.export(jax.jit(serve), platforms=platforms)(*arg_specs)
        write_jax_artifact(out, exported, leaves, manifest)
    else:
        _write_saved_model(out, serve, leaves, arg_specs, platforms, manifest)
    return out


def _write_saved_model(
    out: str,
    serve: Callable[..., dict[str, Any]],
    leaves: Sequence[np.ndarray],
    arg_specs: Sequence[Any],
    platforms: Sequence[str],
    manifest: Mapping[str, Any],
) -> None:
    """The TF SavedModel of `serve` (jax2tf, native serialization) with the params as variables.

    The function is lowered while the SavedModel is traced, inside `_stablehlo_for_tensorflow`.
    """
    import tensorflow as tf
    from jax.experimental import jax2tf

    with _stablehlo_for_tensorflow():
        _save_tf_module(tf, jax2tf, out, serve, leaves, arg_specs, platforms)
    _write_manifest(out, manifest, "saved_model", {}, platforms)


@contextlib.contextmanager
def _stablehlo_for_tensorflow() -> Iterator[None]:
    """jax's StableHLO serialized for 12 weeks of consumer compatibility instead of 4.

    TensorFlow's ``XlaCallModule`` is built with an older StableHLO than jax: TF 2.21 reads up to
    1.13.7, while jax 0.10.2 writes the version of 4 weeks back (1.15.0; its ``chlo.top_k``
    becomes a ``vhlo.composite_v2`` TF cannot read) and the 12-week one is 1.13.7. jax.export has
    no public knob for the target version, so its serializer (private:
    ``jax._src.export._export._module_to_bytecode``) is swapped for the duration of the
    conversion; the `jax` format keeps jax's default.
    """
    from jax._src import xla_bridge
    from jax._src.export import _export
    from jax._src.lib import _jax
    from jax._src.lib.mlir.dialects import hlo

    original = _export._module_to_bytecode

    def to_bytecode(module: Any) -> bytes:
        target = hlo.get_version_from_compatibility_requirement(
            hlo.StablehloCompatibilityRequirement.WEEK_12
        )
        sdy = xla_bridge.get_backend().serialize_with_sdy
        return _jax.mlir.serialize_portable_artifact(module, target, sdy)

    _export._module_to_bytecode = to_bytecode
    try:
        yield
    finally:
        _export._module_to_bytecode = original


def _save_tf_module(
    tf: Any,
    jax2tf: Any,
    out: str,
    serve: Callable[..., dict[str, Any]],
    leaves: Sequence[np.ndarray],
    arg_specs: Sequence[Any],
    platforms: Sequence[str],
) -> None:
    """`tf.saved_model.save` of a module holding the params and the ``serving_default``."""
    tf_serve = jax2tf.convert(
        serve, with_gradient=False, native_serialization_platforms=tuple(platforms)
    )
    module = tf.Module()
    module.params = [
        tf.Variable(x, trainable=False, name=f"p{i:05d}") for i, x in enumerate(leaves)
    ]
    _, images, image_shapes, orig_shapes = arg_specs

    @tf.function(
        autograph=False,
        input_signature=[
            tf.TensorSpec(images.shape, tf.uint8, name="images"),
            tf.TensorSpec(image_shapes.shape, tf.int32, name="image_shapes"),
            tf.TensorSpec(orig_shapes.shape, tf.int32, name="orig_shapes"),
        ],
    )
    def serving_default(images, image_shapes, orig_shapes):
        return tf_serve(list(module.params), images, image_shapes, orig_shapes)

    module.serving_default = serving_default
    tf.saved_model.save(module, out, signatures={"serving_default": serving_default})


def export_checkpoint(
    config: Any,
    workdir: str,
    out: str,
    *,
    step: int | None = None,
    categories_json: str | None = None,
    **kwargs: Any,
) -> str:
    """`export_variables` of a training checkpoint (default: the latest readable one).

    Args:
      config: full config.
      workdir: the training work directory.
      out: the artifact folder.
      step: the checkpoint step (default the latest).
      categories_json: category list file (default: from the config's data files, see
        `oanet_jax.predict.load_category_table`).
      **kwargs: `export_variables`'s keyword arguments.

    Returns:
      `out`.
    """
    from oanet_jax.predict import load_category_table
    from oanet_jax.train.checkpoint import restore_variables

    variables, step = restore_variables(workdir, step)
    table = load_category_table(config.data, categories_json)
    source = {"workdir": os.path.abspath(workdir), "step": int(step)}
    return export_variables(config, variables, out, table=table, source=source, **kwargs)


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    """Entry point ``oanet-export``: parses the flags (``argv`` default ``sys.argv``), exports."""
    from absl import app, flags
    from ml_collections import config_flags

    from oanet_jax.common.console import setup_console

    setup_console()
    f = {
        "config": config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py)."),
        "workdir": flags.DEFINE_string("workdir", None, "Training work directory."),
        "checkpoint": flags.DEFINE_integer("checkpoint", None, "Step (default: the latest)."),
        "out": flags.DEFINE_string("out", None, "Output folder of the artifact."),
        "format": flags.DEFINE_enum("format", "jax", list(FORMATS), "Artifact format."),
        "batch": flags.DEFINE_integer("batch", 1, "Exported batch size B."),
        "height": flags.DEFINE_integer("height", None, "Hp (default config.data.image_size)."),
        "width": flags.DEFINE_integer("width", None, "Wp (default config.data.image_size)."),
        "platforms": flags.DEFINE_list(
            "platforms", None, "Platforms: cpu, cuda, rocm, tpu (default: this machine's)."
        ),
        "ordering": flags.DEFINE_enum("ordering", "srm", ["srm", "score"], "Merge ordering."),
        "categories": flags.DEFINE_string(
            "categories", None, "JSON with the category list (default: from the data files)."
        ),
    }
    flags.mark_flags_as_required(["config", "workdir", "out"])

    def run(args: list[str]) -> None:
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments {args[1:]}")
        setup_console()
        jax.config.parse_flags_with_absl()
        config = f["config"].value
        size = None
        if f["height"].value or f["width"].value:
            size = (
                f["height"].value or int(config.data.image_size[0]),
                f["width"].value or int(config.data.image_size[1]),
            )
        out = export_checkpoint(
            config,
            f["workdir"].value,
            f["out"].value,
            step=f["checkpoint"].value,
            categories_json=f["categories"].value,
            export_format=f["format"].value,
            batch_size=f["batch"].value,
            image_size=size,
            platforms=f["platforms"].value,
            ordering=f["ordering"].value,
        )
        print(out)

    app.run(run, argv=argv)
