"""Writes the synthetic occlusion dataset (the embedded default) in COCO panoptic format.

Example (the layout `configs/synthetic.py` expects):

    python scripts/make_synthetic.py --out data/synthetic --num-images 1000 --seed 0 --size 128 128
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from oanet_jax.data import synthetic  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-images", type=int, required=True, help="number of training images")
    p.add_argument(
        "--num-val-images", type=int, default=None, help="validation images (default max(1, N//10))"
    )
    p.add_argument("--seed", type=int, default=0, help="non-negative dataset seed")
    p.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    p.add_argument("--format", choices=("png", "jpg"), default="png", help="RGB image format")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Generates the dataset and prints a summary; returns the statistics."""
    args = parse_args(argv)
    num_val = (
        args.num_val_images if args.num_val_images is not None else max(1, args.num_images // 10)
    )
    stats = synthetic.generate(
        args.out, args.num_images, num_val, args.seed, tuple(args.size), args.format
    )
    h, w = args.size
    print(f"wrote {args.out}: {args.num_images} train + {num_val} val images of {h}x{w}")
    for split in ("train", "val"):
        s = stats[split]
        per_class = ", ".join(f"{k} {v}" for k, v in s["instances_per_class"].items())
        stuff = ", ".join(f"{k} {v}" for k, v in s["stuff_segments_per_class"].items())
        print(
            f"  {split}: {s['num_instances']} thing instances ({per_class}); "
            f"stuff segments ({stuff}); dropped placements {s['dropped_instances']}; "
            f"void pixels {100 * s['void_fraction']:.1f}%"
        )
    total = sum(stats["instances_per_class"].values())
    print(
        "  instances per class: "
        + ", ".join(
            f"{k} {v} ({100 * v / max(1, total):.1f}%)"
            for k, v in stats["instances_per_class"].items()
        )
    )
    print(
        f"  instances overlapping another class: {100 * stats['overlap_fraction']:.1f}% "
        f"(target 20-40%)"
    )
    print(f"  time: {stats['seconds']:.1f} s")
    return stats


if __name__ == "__main__":
    main()
