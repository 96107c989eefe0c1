"""Speed of oanet-jax side by side with its peers on this machine (medians, warm-up excluded).

Sections (each a module beside this script, runnable on its own too):
  ops    RoIAlign (512 boxes over P2..P5 of a 1024x1024 image) and NMS (10,000 boxes) vs
         torchvision's C++ kernels            -> scripts/bench_roi_align.py, scripts/bench_nms.py
  pq     PQ of 500 synthetic 640x480 images vs panopticapi's pq_compute -> scripts/bench_pq.py
  model  jitted ResNet-50 OANet inference on one 800x1344 image vs torchvision's
         maskrcnn_resnet50_fpn                 -> scripts/bench_model.py
  train  ResNet-50 train step at 1024x1024 vs torchvision's maskrcnn_resnet50_fpn training step
                                               -> scripts/bench_train.py

Usage: python scripts/benchmark.py SECTION [SECTION ...] [--out docs/benchmarks]
Each section prints its result as JSON and writes it to OUT/SECTION.json with the machine's
description, so docs/BENCHMARKS.md can cite the file it came from.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402,F401  (torch before tensorflow: the other order segfaults here)


def machine() -> dict:
    """A description of the machine the numbers come from."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax_devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": datetime.date.today().isoformat(),
    }


def run_ops() -> dict:
    """RoIAlign and NMS vs torchvision."""
    from bench_nms import bench_nms
    from bench_roi_align import bench_roi_align

    return {
        "roi_align": bench_roi_align(),
        "nms": [bench_nms(max_output=1000), bench_nms(max_output=10000)],
    }


def run_pq() -> dict:
    """PQ evaluator vs panopticapi."""
    from bench_pq import bench_pq

    return bench_pq()


def run_model() -> dict:
    """Full-model inference vs torchvision Mask R-CNN."""
    from bench_model import bench_model

    return bench_model()


def run_train() -> dict:
    """Train step vs torchvision Mask R-CNN."""
    from bench_train import bench_train

    return bench_train()


SECTIONS = {"ops": run_ops, "pq": run_pq, "model": run_model, "train": run_train}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("sections", nargs="+", choices=sorted(SECTIONS))
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks"))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.sections:
        result = {"section": name, "machine": machine(), "result": SECTIONS[name]()}
        text = json.dumps(result, indent=1, default=float)
        print(text)
        (out / f"{name}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
