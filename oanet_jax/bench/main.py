"""`oanet-benchmark SECTION [SECTION ...]`: speed side by side with the peers on this machine.

Sections (one module each in `oanet_jax.bench`, each with ``run() -> dict``):
  ops    RoIAlign (512 boxes over P2..P5 of a 1024x1024 image) and NMS (10,000 boxes) vs
         torchvision's C++ kernels
  pq     PQ of 500 synthetic 640x480 images: panopticapi's pq_compute vs our file path, the
         in-memory path and the jitted on-device path
  model  jitted ResNet-50 OANet inference on one 800x1344 image vs torchvision's
         maskrcnn_resnet50_fpn
  train  ResNet-50 train step at 1024x1024 vs torchvision's maskrcnn_resnet50_fpn training step
  flops  FLOPs per training image (XLA cost analysis, by module) at 512x512, batch 2, 8 boxes per
         image vs torchvision's maskrcnn_resnet50_fpn (FlopCounterMode); counts, not times
  profile the train step broken into its parts (time and XLA FLOPs of each) beside torchvision's
         pieces, a plain ResNet-50 + FPN on both sides, and the avoidable costs of issue 10
         (512x512, batch 2 by default: `--set size=1024 --set batch=1`)
  input  the training stream at paper defaults on the real COCO sample replicated 128 times vs
         bare single-threaded PIL decoding of the same JPEG + PNG files: images/s, per core,
         ratio (first epoch, and a whole cached epoch), bytes per example
  comms  bytes of all-reduce / all-gather / reduce-scatter per ResNet-50 train step on a
         64-device mesh of fake CPU devices (compiled, not run), data parallel vs parameters
         sharded on 'model', with XLA's FLOPs per device beside; counts, not times

Every timed section times with `oanet_jax.bench.timing` (medians, warm-up excluded; the flops
and comms sections count, they do not time). Each prints its result as JSON and writes it to
OUT/SECTION.json with a description of the machine, so that docs/BENCHMARKS.md cites the file
each figure comes from. Needs the test extras (torch).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib
import json
import os
import pathlib

SECTIONS = ("ops", "pq", "model", "train", "flops", "profile", "input", "comms")


def machine() -> dict:
    """A description of the machine the numbers come from."""
    import jax
    import torch

    from oanet_jax.bench import timing

    cpu = timing.cpu_name()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax_devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": datetime.date.today().isoformat(),
    }


def main(argv: list[str] | None = None) -> None:
    """Runs the named sections (console entry point)."""
    import torch  # noqa: F401  (torch before tensorflow: the other order segfaults here)

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("sections", nargs="+", choices=SECTIONS)
    parser.add_argument("--out", default="docs/benchmarks", help="folder of the JSON results")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="keyword argument of every named section's run() (a Python literal), e.g. size=512",
    )
    args = parser.parse_args(argv)
    kwargs = {}
    for item in args.set:
        name, _, value = item.partition("=")
        kwargs[name.strip()] = ast.literal_eval(value.strip())
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.sections:
        section = importlib.import_module(f"oanet_jax.bench.{name}")
        result = {"section": name, "machine": machine(), "result": section.run(**kwargs)}
        text = json.dumps(result, indent=1, default=float)
        print(text)
        (out / f"{name}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
