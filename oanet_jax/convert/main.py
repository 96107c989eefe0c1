"""`oanet-convert`: a torchvision checkpoint the user already has -> an orbax checkpoint of OANet.

    oanet-convert IN.pth OUT_DIR [--config configs/base.py] [--classes auto|all|coco80]
        [--seed 0] [--force]

(also ``python -m oanet_jax.convert.main`` or ``python scripts/convert_torchvision.py``).

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
...}`` (host numpy arrays in the config's param dtype); read it back with
`oanet_jax.convert.checkpoint_io.load_variables` or
``orbax.checkpoint.StandardCheckpointer().restore(OUT_DIR)``.
"""

from __future__ import annotations

import argparse
import pathlib
import runpy
from collections.abc import Sequence
from typing import Any

import ml_collections

__all__ = ["load_config", "main", "parse_args"]


def _default_config_path() -> str:
    """configs/base.py of the installed `configs` package (found from any working directory)."""
    import configs

    return str(pathlib.Path(configs.__file__).resolve().parent / "base.py")


def load_config(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file (e.g. configs/base.py), as ``--config`` of oanet-train.

    As ml_collections' `config_flags`, ``path:arg`` calls ``get_config(arg)``. The file runs as a
    script (`runpy.run_path`); it imports other configs as ``from configs import base`` (the
    `configs` package is installed), so no import path is changed.

    Raises:
      FileNotFoundError: no file at `path`.
    """
    file, *arg = path.split(":", 1)
    if not pathlib.Path(file).is_file():
        raise FileNotFoundError(f"cannot load config file {file}")
    return runpy.run_path(file, run_name="_oanet_config")["get_config"](*arg)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    p = argparse.ArgumentParser(
        prog="oanet-convert", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("input", help="torchvision state dict file (.pth) saved with torch.save")
    p.add_argument("out_dir", help="output orbax checkpoint directory")
    p.add_argument(
        "--config",
        default=None,
        help="config file (default: configs/base.py of the installed configs package)",
    )
    p.add_argument("--classes", choices=("auto", "all", "coco80"), default="auto")
    p.add_argument("--seed", type=int, default=0, help="init seed of the stuff head and SRM")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT_DIR")
    args = p.parse_args(argv)
    if args.config is None:
        args.config = _default_config_path()
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the conversion and prints a summary; returns the summary (console entry point)."""
    import torch  # noqa: F401  (torch before anything that may import tensorflow)

    from oanet_jax.convert import checkpoint_io

    args = parse_args(argv)
    out = pathlib.Path(args.out_dir)
    if out.exists() and not args.force:
        raise SystemExit(f"{out} exists; pass --force to overwrite it")
    config = load_config(args.config)
    state = checkpoint_io.load_state_dict(args.input)
    variables, summary = checkpoint_io.convert_file(state, config, args.classes, args.seed)
    summary["out_dir"] = checkpoint_io.save_variables(variables, args.out_dir, force=args.force)
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
