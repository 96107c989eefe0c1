"""Converts a torchvision checkpoint the user already has into an orbax checkpoint of OANet weights.

    python scripts/convert_torchvision.py IN.pth OUT_DIR [--config configs/base.py]
        [--classes auto|all|coco80] [--seed 0] [--force]

IN.pth is a state dict saved with ``torch.save`` (nothing is downloaded): either

* a torchvision ``maskrcnn_resnet50_fpn`` (v1) state dict (keys ``backbone.body.*``,
  ``backbone.fpn.*``, ``rpn.head.*``, ``roi_heads.*``): converted with
  `oanet_jax.convert.torchvision.convert_maskrcnn` into the FULL OANet variable tree of the model
  that ``--config`` builds; the stuff head and the SRM, which torchvision does not have, are
  freshly initialised from ``--seed``. Classes (``--classes``): ``all`` keeps torchvision's N
  classes in order (label l -> our class l - 1; needs ``num_thing_classes == N``), ``coco80``
  picks the 80 COCO thing categories (our contiguous thing class t = COCO id
  ``COCO_THING_IDS[t]``, as COCO panoptic's category table), ``auto`` (default) chooses ``all``
  when the counts agree and ``coco80`` for an 80-class model and a 91-output checkpoint.
* a torchvision ImageNet ResNet-18/34/50/101 state dict (``conv1.weight``, ``layer1.*``...,
  ``fc.*`` dropped): the depth is detected from the keys and the backbone built with the config's
  norm/freeze_at/dtypes; the tree is ``{'params': {'backbone': ...}, 'batch_stats':
  {'backbone': ...}}`` (a subtree of OANet's variables, to overlay on a fresh init).

Files wrapping the state dict under ``'model'`` or ``'state_dict'``, and DDP's ``module.`` key
prefix, are accepted. Every tensor must be accounted for (see the converter); any mismatch stops
with a `ConversionError` listing the keys.

OUT_DIR receives an orbax ``StandardCheckpointer`` checkpoint of ``{'params': ..., 'batch_stats':
...}`` (host numpy arrays in the config's param dtype); read it back with `load_variables` or
``orbax.checkpoint.StandardCheckpointer().restore(OUT_DIR)``.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402  (imported before anything that may import tensorflow)

from oanet_jax.convert import torchvision as convert  # noqa: E402
from oanet_jax.modeling import build  # noqa: E402

# (block kind, blocks in layer1..layer4) -> torchvision ResNet name.
RESNET_DEPTHS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("input", help="torchvision state dict file (.pth) saved with torch.save")
    p.add_argument("out_dir", help="output orbax checkpoint directory")
    p.add_argument("--config", default=str(ROOT / "configs" / "base.py"), help="config file")
    p.add_argument("--classes", choices=("auto", "all", "coco80"), default="auto")
    p.add_argument("--seed", type=int, default=0, help="init seed of the stuff head and SRM")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT_DIR")
    return p.parse_args(argv)


def load_config(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file (e.g. configs/base.py)."""
    spec = importlib.util.spec_from_file_location("_oanet_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a state dict file (weights only, on CPU) into numpy arrays.

    Args:
      path: a file written by ``torch.save(state_dict)`` (possibly wrapped under 'model' or
        'state_dict', keys possibly prefixed 'module.').

    Returns:
      key -> numpy array (floating tensors as float32).
    """
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in obj.items()}


def detect_kind(keys: Sequence[str]) -> str:
    """'maskrcnn', or the ResNet name ('resnet18' ... 'resnet101') of a classification dict.

    Args:
      keys: the state dict's keys.

    Returns:
      'maskrcnn' | 'resnet18' | 'resnet34' | 'resnet50' | 'resnet101'.

    Raises:
      ValueError: an unrecognised layout.
    """
    keys = set(keys)
    if "backbone.body.conv1.weight" in keys and any(k.startswith("roi_heads.") for k in keys):
        return "maskrcnn"
    if "conv1.weight" in keys:
        return _resnet_name(keys, prefix="")
    raise ValueError(
        "unrecognised state dict: expected torchvision maskrcnn_resnet50_fpn keys "
        "(backbone.body.*, rpn.*, roi_heads.*) or a torchvision ResNet (conv1.*, layer1.*...)"
    )


def _resnet_name(keys: set[str], prefix: str) -> str:
    block = "bottleneck" if f"{prefix}layer1.0.conv3.weight" in keys else "basic"
    counts = []
    for layer in range(1, 5):
        pattern = re.compile(rf"^{re.escape(prefix)}layer{layer}\.(\d+)\.")
        idx = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
        counts.append(max(idx) + 1 if idx else 0)
    name = RESNET_DEPTHS.get((block, tuple(counts)))
    if name is None:
        raise ValueError(f"unrecognised ResNet: {block} blocks {tuple(counts)} in layer1..layer4")
    return name


def class_indices(choice: str, model_classes: int, tv_classes: int) -> list[int] | None:
    """torchvision label of each of our thing classes for ``--classes`` (None: identity).

    Args:
      choice: 'auto' | 'all' | 'coco80'.
      model_classes: the config's num_thing_classes T.
      tv_classes: torchvision's class outputs N + 1 (background included).

    Returns:
      None (our class t is label t + 1) or a list of T labels.
    """
    if choice == "auto":
        if model_classes == tv_classes - 1:
            choice = "all"
        elif model_classes == len(convert.COCO_THING_IDS) and tv_classes == 91:
            choice = "coco80"
        else:
            raise ValueError(
                f"the checkpoint has {tv_classes - 1} classes, the config {model_classes}: "
                "choose --classes or set model.num_thing_classes"
            )
    if choice == "all":
        return None
    if model_classes != len(convert.COCO_THING_IDS):
        raise ValueError(
            f"--classes coco80 needs model.num_thing_classes = 80, not {model_classes}"
        )
    return list(convert.COCO_THING_IDS)


def convert_file(
    state: Mapping[str, np.ndarray], config: ml_collections.ConfigDict, classes: str, seed: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Converts a loaded state dict; returns (variables, summary)."""
    kind = detect_kind(list(state))
    summary: dict[str, Any] = {"kind": kind, "tensors": len(state)}
    if kind == "maskrcnn":
        body = _resnet_name(set(state), prefix="backbone.body.")
        if body != config.model.backbone:
            raise ValueError(
                f"the checkpoint's backbone is {body}, the config's {config.model.backbone}"
            )
        model = build.build_model(config)
        tv_classes = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
        indices = class_indices(classes, model.num_thing_classes, tv_classes)
        variables = convert.convert_maskrcnn(
            state, model, class_indices=indices, rng=jax.random.key(seed)
        )
        summary["classes"] = "all" if indices is None else f"{len(indices)} of {tv_classes - 1}"
        summary["left_at_init"] = list(convert.NOT_IN_TORCHVISION)
    else:
        m = config.model
        backbone = build.BACKBONES[kind](
            norm=m.norm,
            freeze_at=m.freeze_at,
            dtype=build.DTYPES[m.compute_dtype],
            param_dtype=build.DTYPES[m.param_dtype],
        )
        converted = convert.convert_resnet(state, backbone)
        variables = {collection: {"backbone": tree} for collection, tree in converted.items()}
        summary["left_at_init"] = [
            n
            for n in (*convert.TORCHVISION_MODULES, *convert.NOT_IN_TORCHVISION)
            if n != "backbone"
        ]
        if kind != m.backbone:
            summary["note"] = f"the config's backbone is {m.backbone}; this checkpoint is {kind}"
    summary["elements"] = {
        collection: {name: _num_elements(t) for name, t in tree.items()}
        for collection, tree in variables.items()
    }
    return variables, summary


def _num_elements(tree: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def save_variables(variables: dict[str, Any], out_dir: str, force: bool = False) -> str:
    """Writes `variables` as an orbax StandardCheckpointer checkpoint; returns the absolute path."""
    import orbax.checkpoint as ocp

    path = str(pathlib.Path(out_dir).resolve())
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, variables, force=force)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return path


def load_variables(out_dir: str) -> dict[str, Any]:
    """Reads a checkpoint written by this script: ``{'params': ..., 'batch_stats': ...}``."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(str(pathlib.Path(out_dir).resolve()))
    finally:
        checkpointer.close()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the conversion and prints a summary; returns the summary."""
    args = parse_args(argv)
    out = pathlib.Path(args.out_dir)
    if out.exists() and not args.force:
        raise SystemExit(f"{out} exists; pass --force to overwrite it")
    config = load_config(args.config)
    state = load_state_dict(args.input)
    variables, summary = convert_file(state, config, args.classes, args.seed)
    summary["out_dir"] = save_variables(variables, args.out_dir, force=args.force)
    print(f"converted {args.input} ({summary['kind']}, {summary['tensors']} tensors)")
    if "classes" in summary:
        print(f"  classes: {summary['classes']}")
    for collection, sizes in summary["elements"].items():
        print(f"  {collection}: " + ", ".join(f"{n} {v:,}" for n, v in sizes.items()))
    print(f"  left at initialisation: {', '.join(summary['left_at_init']) or 'none'}")
    if "note" in summary:
        print(f"  note: {summary['note']}")
    print(f"  wrote {summary['out_dir']}")
    return summary


if __name__ == "__main__":
    main()
