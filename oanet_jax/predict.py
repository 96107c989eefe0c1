"""Panoptic predictions of arbitrary images: score order vs SRM order side by side.

`predict_images` runs the jitted inference (`eval.inference.make_inference_fn`, batch of 1) on
image files preprocessed with the eval transform of the input pipeline (`preprocess_image`),
maps each ordering's id map back to the original image (`data.transforms`) and draws the panels
(`panoptic.visualize`). `main` is the command line (``scripts/predict.py``):

    python scripts/predict.py --config configs/synthetic.py --checkpoint runs/synthetic \
        --out predictions data/synthetic/val/images/000001000001.png

``--checkpoint`` is a training work directory (latest checkpoint), its ``checkpoints/`` folder,
or one step's folder ``<workdir>/checkpoints/<step>``; a checkpoint of another architecture than
the config's raises `CheckpointMismatchError` before anything is predicted.

Inputs (`collect_images`): each argument is an image file or a folder, whose image files (by
extension, not searched recursively) are taken in sorted order. Files that are not images by
their extension (``dir/*`` picking up a JSON, a sub-folder) are skipped and listed; a missing or
unreadable image is a bad input: reported by name, then skipped (``--on_bad_image=skip``, the
default; exit status 1 at the end) or the run stops there (``--on_bad_image=fail``).

Output names (`output_names`), never colliding: the input's path relative to the common folder of
all inputs, without its extension (one folder of inputs: ``<stem>``; ``a/x.jpg b/x.png``:
``a/x``, ``b/x``, mirrored as sub-folders of ``--out``); a name taken by an earlier input
(``x.jpg x.png`` in one folder) gets the first free ``_2``, ``_3``, ... suffix. For each input
it writes ``<out>/<name>_panoptic.png`` (panels: score-ordered merge, SRM-ordered merge, the
pixels whose segment changed) and ``<out>/<name>_segments.json``. The written PNGs are printed on
stdout, one a line; a summary (each input and its output, and what was not predicted and why) on
stderr. Given an exported artifact (``oanet-export --format jax``) as ``--checkpoint``,
`predict_exported` runs it (no ``--config`` needed) and writes COCO panoptic PNG + JSON
(``<out>/panoptic_<ordering>.json``) and one overlay per image. orbax/absl INFO lines are hidden;
``-v 0`` shows them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from oanet_jax.common.console import setup_console
from oanet_jax.common.files import write_json
from oanet_jax.data import transforms
from oanet_jax.data.coco_panoptic import CategoryTable
from oanet_jax.eval.ground_truth import data_path
from oanet_jax.eval.inference import make_inference_fn

__all__ = [
    "BadImageError",
    "PredictionReport",
    "collect_images",
    "image_extensions",
    "image_id_of",
    "load_category_table",
    "main",
    "output_names",
    "predict_exported",
    "predict_images",
    "preprocess_image",
    "render_panels",
    "resolve_checkpoint",
]

ON_BAD_IMAGE = ("skip", "fail")


@dataclasses.dataclass
class PredictionReport:
    """What a prediction run did with its inputs.

    Attributes:
      written: (input path, written PNG) per predicted image, in input order.
      failed: (input path, reason) per bad input (missing or unreadable image).
      skipped: (input path, reason) per input that is not an image to predict (a non-image
        file, a sub-folder of a folder argument, a repeated file); not an error.
    """

    written: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def summary(self, out_dir: str) -> str:
        """The human-readable account printed at the end of a run (see the module docstring)."""
        total = len(self.written) + len(self.failed)
        lines = [f"Predicted {len(self.written)} of {total} images into {out_dir}."]
        lines += [f"  {src} -> {png}" for src, png in self.written]
        if self.failed:
            lines.append(f"Not predicted, bad input ({len(self.failed)}):")
            lines += [f"  {src}: {why}" for src, why in self.failed]
        if self.skipped:
            lines.append(f"Skipped, not an image to predict ({len(self.skipped)}):")
            lines += [f"  {src}: {why}" for src, why in self.skipped]
        return "\n".join(lines)


class BadImageError(RuntimeError):
    """A missing or unreadable input image with ``on_bad_image='fail'``.

    Attributes:
      path: the input.
      report: what was written (and not) before the run stopped.
    """

    def __init__(self, path: str, reason: str, report: PredictionReport):
        super().__init__(f"{path}: {reason} (stopped: on_bad_image='fail')")
        self.path = path
        self.report = report


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with the dot) of the image formats PIL can open."""
    from PIL import Image

    return frozenset(e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def collect_images(arguments: Sequence[str]) -> tuple[list[str], PredictionReport]:
    """The image files named by the command-line arguments (see the module docstring).

    Args:
      arguments: files and folders.

    Returns:
      (images, report): the image files in argument order (a folder's in sorted order, each file
      once); ``report.failed`` lists the missing paths, ``report.skipped`` the non-images (by
      extension), sub-folders of folder arguments and repeated files.
    """
    extensions = image_extensions()
    report = PredictionReport()
    images: list[str] = []
    seen: set[str] = set()

    def take(path: str) -> None:
        ext = os.path.splitext(path)[1].lower()
        if ext not in extensions:
            report.skipped.append((path, f"not an image file (extension {ext or 'none'!r})"))
        elif os.path.realpath(path) in seen:
            report.skipped.append((path, "given twice; predicted once"))
        else:
            seen.add(os.path.realpath(path))
            images.append(path)

    for arg in arguments:
        if os.path.isdir(arg):
            try:
                names = sorted(os.listdir(arg))
            except OSError as e:
                report.failed.append((arg, f"cannot list the folder ({type(e).__name__}: {e})"))
                continue
            for name in names:
                path = os.path.join(arg, name)
                if os.path.isdir(path):
                    report.skipped.append((path, "a folder inside a folder argument: not searched"))
                else:
                    take(path)
        elif os.path.isfile(arg):
            take(arg)
        else:
            report.failed.append((arg, "no such file or folder"))
    return images, report


def output_names(image_paths: Sequence[str]) -> list[str]:
    """Unique output names of the inputs (the rule of the module docstring).

    Args:
      image_paths: the input files, in order.

    Returns:
      One name per input ('/'-separated, no extension); no two equal, even ignoring case.
    """
    absolute = [os.path.abspath(p) for p in image_paths]
    if not absolute:
        return []
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    names: list[str] = []
    taken: set[str] = set()
    for path in absolute:
        stem = os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, "/")
        name, index = stem, 2
        while name.casefold() in taken:
            name, index = f"{stem}_{index}", index + 1
        taken.add(name.casefold())
        names.append(name)
    return names


def preprocess_image(image: np.ndarray, config: Any, image_id: int = 0) -> dict[str, np.ndarray]:
    """One RGB image as a batch of 1, with the eval transform of the input pipeline.

    Args:
      image: uint8 [H, W, 3] RGB.
      config: full config (``config.data``: resize, normalisation, padding).
      image_id: id carried in the batch.

    Returns:
      The pipeline's batch dict with leading dimension 1 ('image' [1, Hp, Wp, 3] uint8,
      'image_shape' [1, 2], 'orig_shape' [1, 2], ...; no ground truth).
    """
    image = np.asarray(image, np.uint8)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3] RGB uint8, got shape {image.shape}")
    h, w = image.shape[:2]
    record = {
        "image": image,
        "image_id": int(image_id),
        "semantic": np.full((h, w), 255, np.uint8),
        "boxes": np.zeros((0, 4), np.float32),
        "classes": np.zeros((0,), np.int32),
        "is_crowd": np.zeros((0,), bool),
        "masks": np.zeros((0, h, w), np.uint8),
    }
    cfg = transforms.TransformConfig.from_config(config.data)
    example = transforms.transform_record(
        record, cfg, short_size=int(config.data.min_size_test), flip=False
    )
    return {k: np.asarray(v)[None] for k, v in example.items()}


def predict_images(
    config: Any,
    model: Any,
    variables: Any,
    image_paths: Sequence[str],
    out_dir: str,
    *,
    table: CategoryTable,
    orderings: Sequence[str] = ("score", "srm"),
    min_display_side: int = 384,
    on_bad_image: str = "skip",
    report: PredictionReport | None = None,
) -> PredictionReport:
    """Panoptic predictions of image files, drawn side by side per ordering (plus a diff panel).

    For each image, writes ``<out_dir>/<name>_panoptic.png`` (`output_names`: never the same
    name for two inputs): one panel per ordering (category colours, instance outlines, "name
    score" labels; an instance keeps its colour across panels) and, with two orderings, a panel of
    the pixels whose segment differs between them; and ``<out_dir>/<name>_segments.json`` with
    each ordering's segments_info (dataset category ids).

    Args:
      config: full config.
      model: the OANet module.
      variables: its variables.
      image_paths: image files (any PIL-readable format; converted to RGB).
      out_dir: output folder (created).
      table: the category table (names, colours, dataset ids).
      orderings: merge orderings, one panel each.
      min_display_side: small images are upscaled (integer factor) to this shorter side.
      on_bad_image: a file that cannot be read as an image is reported (logged with its name and
        the error) and skipped ('skip') or raises `BadImageError` ('fail').
      report: the report to add to (e.g. `collect_images`'s); default a new one.

    Returns:
      The report: each written PNG with its input, and the inputs that failed.

    Raises:
      BadImageError: with ``on_bad_image='fail'``, at the first unreadable file (its ``report``
        holds what was written before).
    """
    from PIL import Image

    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
    report = PredictionReport() if report is None else report
    os.makedirs(out_dir, exist_ok=True)
    infer = make_inference_fn(model, config, orderings, batch_size=1)
    variables = infer.put_variables(variables)
    names = output_names(image_paths)
    for index, (path, name) in enumerate(zip(image_paths, names, strict=True)):
        try:
            image = _read_rgb(path)  # decodes: a truncated file raises here
        except Exception as e:  # noqa: BLE001 - any decoding failure is this file's fault
            reason = f"cannot read the image ({type(e).__name__}: {e})"
            report.failed.append((path, reason))
            if on_bad_image == "fail":
                raise BadImageError(path, reason, report) from e
            logging.warning("%s: %s; skipped.", path, reason)
            continue
        batch = preprocess_image(image, config, image_id=index)
        out = jax.device_get(infer(variables, batch))
        maps, segments = {}, {}
        for o in orderings:
            pan = jax.tree.map(lambda x: x[0], out["panoptic"][o])
            maps[o], segments[o] = transforms.prediction_to_original(
                pan["id_map"],
                pan["segments"],
                batch["image_shape"][0],
                batch["orig_shape"][0],
                table,
            )
        png = os.path.join(out_dir, f"{name}_panoptic.png")
        os.makedirs(os.path.dirname(png), exist_ok=True)
        Image.fromarray(render_panels(image, maps, segments, table, min_display_side)).save(png)
        write_json(os.path.join(out_dir, f"{name}_segments.json"), segments, indent=1)
        report.written.append((path, png))
        logging.info("wrote %s", png)
    return report


def _read_rgb(path: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB of an image file (any PIL-readable format)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def render_panels(
    image: np.ndarray,
    maps: Mapping[str, np.ndarray],
    segments: Mapping[str, Sequence[Mapping[str, Any]]],
    table: CategoryTable,
    min_display_side: int = 384,
) -> np.ndarray:
    """One panel per ordering side by side, plus the changed pixels with two orderings.

    Args:
      image: uint8 [H, W, 3] original image.
      maps: ordering -> [H, W] id map at the original size.
      segments: ordering -> segments_info (dataset ids) of that map.
      table: the category table.
      min_display_side: small images are upscaled (integer factor) to this shorter side.

    Returns:
      uint8 [h, w, 3] the panels (an instance keeps its colour across panels).
    """
    from oanet_jax.panoptic import visualize

    titles = {"score": "score order (heuristic)", "srm": "SRM order (OANet)"}
    orderings = list(maps)
    colors = visualize.segment_colors([s for o in orderings for s in segments[o]], table)
    scale = visualize.display_scale(image.shape, min_display_side)
    panels = [
        visualize.render_panoptic(
            image,
            maps[o],
            segments[o],
            table,
            colors=colors,
            scale=scale,
            title=f"{titles.get(o, o)}: {len(segments[o])} segments",
        )
        for o in orderings
    ]
    if len(orderings) == 2:
        a, b = orderings
        changed = int(np.sum(maps[a] != maps[b]))
        panels.append(
            visualize.difference_panel(
                image,
                maps[a],
                maps[b],
                scale=scale,
                title=f"changed: {changed} px ({100.0 * changed / maps[a].size:.1f}%)",
            )
        )
    return visualize.side_by_side(panels)


def image_id_of(path: str, index: int) -> int:
    """The COCO image id of an image file: its stem when all digits (``000000000139.jpg`` ->
    139, the COCO and synthetic naming), else `index`."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return int(stem) if stem.isdigit() else int(index)


def predict_exported(
    model: Any,
    image_paths: Sequence[str],
    out_dir: str,
    *,
    overlays: bool = True,
    min_display_side: int = 384,
) -> tuple[str, list[str]]:
    """Panoptic predictions of image files of any size with an exported artifact.

    Each image is resized and padded to the exported shape (`preprocess_image` with the
    artifact's config), the images run in batches of the exported batch size (the last one
    padded), and each id map is mapped back to the original size
    (`transforms.prediction_to_original`). Writes COCO panoptic predictions,
    ``<out_dir>/panoptic_<ordering>.json`` and its PNGs in ``<out_dir>/panoptic_<ordering>/``
    (image ids from the file names, `image_id_of`; dataset category ids), and with `overlays`
    ``<out_dir>/<name>_panoptic.png`` (the drawn segments, `render_panels`), with the names of
    `output_names` (never colliding; the PNGs of the COCO folder use the name with '/' as '__').

    Args:
      model: `oanet_jax.export.load`'s `ExportedModel`.
      image_paths: image files (any PIL-readable format; converted to RGB).
      out_dir: output folder (created).
      overlays: also draw the overlay images.
      min_display_side: small images are upscaled (integer factor) to this shorter side.

    Returns:
      (the panoptic JSON path, the overlay PNG paths).

    Raises:
      ValueError: an image whose resize does not fit the exported shape (named).
    """
    import ml_collections
    from PIL import Image

    from oanet_jax.panoptic import io as pan_io

    config = ml_collections.ConfigDict(model.manifest["config"])
    categories = model.manifest["categories"]
    table = CategoryTable.from_categories(categories)
    ordering = model.ordering
    batch_size, hp, wp, _ = model.input_shape
    folder = os.path.join(out_dir, f"panoptic_{ordering}")
    os.makedirs(folder, exist_ok=True)
    annotations, overlay_paths = [], []
    paths = list(image_paths)
    names = output_names(paths)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = np.zeros((batch_size, hp, wp, 3), np.uint8)
        shapes = np.tile(np.asarray([[hp, wp]], np.int32), (batch_size, 1))
        origs = shapes.copy()
        originals = []
        for i, path in enumerate(chunk):
            image = _read_rgb(path)
            try:
                batch = preprocess_image(image, config, image_id=start + i)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from e
            images[i] = batch["image"][0]
            shapes[i] = batch["image_shape"][0]
            origs[i] = batch["orig_shape"][0]
            originals.append(image)
        out = model(images, shapes, origs)
        for i, path in enumerate(chunk):
            segments = {
                "id": out["segment_id"][i],
                "category": out["category"][i],
                "isthing": out["isthing"][i],
                "score": out["score"][i],
                "valid": out["valid"][i],
            }
            id_map, info = transforms.prediction_to_original(
                out["id_map"][i], segments, shapes[i], origs[i], table
            )
            stem = names[start + i].replace("/", "__")
            info = pan_io.write_prediction(folder, f"{stem}.png", id_map, info)
            annotations.append(
                {
                    "image_id": image_id_of(path, start + i),
                    "file_name": f"{stem}.png",
                    "segments_info": info,
                }
            )
            if overlays:
                png = os.path.join(out_dir, f"{names[start + i]}_panoptic.png")
                os.makedirs(os.path.dirname(png), exist_ok=True)
                panel = render_panels(
                    originals[i], {ordering: id_map}, {ordering: info}, table, min_display_side
                )
                Image.fromarray(panel).save(png)
                overlay_paths.append(png)
                logging.info("wrote %s", png)
    json_path = os.path.join(out_dir, f"panoptic_{ordering}.json")
    pan_io.write_predictions_json(json_path, annotations, categories)
    return json_path, overlay_paths


def load_category_table(config_data: Any, categories_json: str | None = None) -> CategoryTable:
    """The category table for prediction without ground truth.

    Args:
      config_data: ``config.data``.
      categories_json: a JSON file with a list of COCO panoptic category dicts, or a dict with a
        'categories' list (a panoptic JSON). Default: the first existing file among the eval and
        train panoptic JSONs of the config and ``<data.root>/categories.json``.

    Returns:
      The table.

    Raises:
      FileNotFoundError: no candidate file exists.
    """
    if categories_json:
        candidates = [categories_json]
    else:
        candidates = [
            data_path(config_data.root, config_data.eval.panoptic_json),
            data_path(config_data.root, config_data.train.panoptic_json),
            data_path(config_data.root, "categories.json"),
        ]
    for path in candidates:
        if path and os.path.isfile(path):
            with open(path) as f:
                loaded = json.load(f)
            cats = loaded["categories"] if isinstance(loaded, dict) else loaded
            return CategoryTable.from_categories(cats)
    raise FileNotFoundError(f"no category file found among {candidates}")


def resolve_checkpoint(path: str) -> tuple[str, int | None]:
    """(workdir, step or None for the latest) from a workdir, checkpoints/ or checkpoints/<step>.

    Raises:
      FileNotFoundError: `path` is none of the three.
    """
    p = pathlib.Path(path).resolve()
    if (p / "checkpoints").is_dir():
        return str(p), None
    if p.name == "checkpoints":
        return str(p.parent), None
    if p.name.isdigit() and p.parent.name == "checkpoints":
        return str(p.parent.parent), int(p.name)
    raise FileNotFoundError(
        f"{path} is neither a work directory with checkpoints/, a checkpoints/ folder, nor "
        "checkpoints/<step>"
    )


# ----------------------------------------------------------------------------- command line


def _define_flags() -> dict[str, Any]:
    """The CLI flags, defined on the first `main` call only (importing this module defines none,
    so the library functions can be imported next to other CLIs' flags)."""
    return {
        "config": config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py)."),
        "checkpoint": flags.DEFINE_string(
            "checkpoint",
            None,
            "Work directory, its checkpoints/ folder, checkpoints/<step>, or an exported artifact "
            "(oanet-export --format jax; then --config and --categories come from its manifest).",
        ),
        "out": flags.DEFINE_string("out", "predictions", "Output folder."),
        "categories": flags.DEFINE_string(
            "categories",
            None,
            "JSON with the category list (default: from the config's data files).",
        ),
        "orderings": flags.DEFINE_list("orderings", None, "Merge orderings (default config.eval)."),
        "on_bad_image": flags.DEFINE_enum(
            "on_bad_image",
            "skip",
            list(ON_BAD_IMAGE),
            "A missing or unreadable image: reported and skipped (exit status 1 at the end), or "
            "the run stops there ('fail').",
        ),
    }


def _run(argv: list[str], f: dict[str, Any]) -> None:
    """Restores the checkpoint and draws the predictions of the images given as arguments."""
    if not argv[1:]:
        raise app.UsageError("give at least one IMAGE or folder")
    setup_console()
    jax.config.parse_flags_with_absl()
    from oanet_jax import export
    from oanet_jax.config_check import validate_config

    out_dir, on_bad = f["out"].value, f["on_bad_image"].value
    images, report = collect_images(argv[1:])
    if not images or (report.failed and on_bad == "fail"):
        print(report.summary(out_dir), file=sys.stderr, flush=True)
        if report.failed and on_bad == "fail":
            src, why = report.failed[0]
            raise SystemExit(f"error: {src}: {why} (stopped: --on_bad_image=fail)")
        raise app.UsageError("no image among the inputs")
    if export.is_artifact(f["checkpoint"].value):
        model = export.load(f["checkpoint"].value)
        wanted = f["orderings"].value
        if wanted and list(wanted) != [model.ordering]:
            raise app.UsageError(
                f"the artifact was exported with the {model.ordering!r} ordering, not {wanted}"
            )
        json_path, paths = predict_exported(model, images, out_dir)
        for p in paths:
            print(p)
        print(json_path)
        return
    from oanet_jax.modeling.build import build_model
    from oanet_jax.train.checkpoint import restore_variables
    from oanet_jax.train.state import abstract_variables

    config = f["config"].value
    if config is None:
        raise app.UsageError("--config is required with a checkpoint (not an exported artifact)")
    validate_config(config, "predict")
    workdir, step = resolve_checkpoint(f["checkpoint"].value)
    model = build_model(config)
    variables, step = restore_variables(workdir, step, expected=abstract_variables(config, model))
    logging.info("restored step %d from %s", step, workdir)
    table = load_category_table(config.data, f["categories"].value)
    try:
        predict_images(
            config,
            model,
            variables,
            images,
            out_dir,
            table=table,
            orderings=tuple(f["orderings"].value or config.eval.orderings),
            on_bad_image=on_bad,
            report=report,
        )
    except BadImageError as e:
        for _, png in e.report.written:
            print(png)
        print(e.report.summary(out_dir), file=sys.stderr, flush=True)
        raise SystemExit(f"error: {e}") from None
    for _, png in report.written:
        print(png)
    print(report.summary(out_dir), file=sys.stderr, flush=True)
    if report.failed:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point: parses the flags (``argv`` default ``sys.argv``) and predicts."""
    setup_console()
    f = _define_flags()
    flags.mark_flags_as_required(["checkpoint"])
    app.run(lambda args: _run(args, f), argv=argv)
