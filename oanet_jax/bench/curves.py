"""Training runs side by side: loss curves (SVG) and a Markdown table from their metrics.jsonl.

Usage (the bfloat16 figure and table of docs/BENCHMARKS.md)::

    python -m oanet_jax.bench.curves --run float32=workdir/synthetic \
        --run bfloat16=workdir/synthetic_bf16 --svg docs/figures/bf16_vs_f32.svg

reads each workdir's ``metrics.jsonl`` (written by `oanet_jax.train.loop`: a line of training
metrics every ``log_every_steps`` steps, a line of ``eval/...`` metrics at each evaluation),
writes a two-panel SVG (total loss and PQ against the step) and prints a Markdown table of the
losses at a few steps, the evaluations, and the training time. The SVG is written by hand, so
nothing beyond the standard library is needed.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any
from xml.sax.saxutils import escape

__all__ = ["Run", "load_run", "markdown_table", "write_svg", "main"]

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
EVAL_KEYS = (
    ("PQ (SRM)", "eval/panoptic_srm/PQ"),
    ("PQ (score)", "eval/panoptic_score/PQ"),
    ("PQ_th (SRM)", "eval/panoptic_srm/PQ_th"),
    ("PQ_st (SRM)", "eval/panoptic_srm/PQ_st"),
    ("box AP", "eval/bbox/AP"),
    ("mask AP", "eval/segm/AP"),
    ("stuff mIoU", "eval/stuff/mIoU"),
)
LOSS_TERMS = ("total", "rpn_cls", "rpn_box", "cls", "box", "mask", "seg", "srm")


class Run(dict):
    """One run: 'name', 'train' rows, 'eval' rows (step-sorted), 'train_s' (summed step time)."""


def load_run(name: str, workdir: str | pathlib.Path) -> Run:
    """Reads ``workdir/metrics.jsonl``.

    Args:
      name: the run's label.
      workdir: the training workdir.

    Returns:
      A `Run`. ``train_s`` adds up ``step_time`` (seconds per step, averaged over each logging
      interval) times the interval's steps: the training time without evaluations and
      checkpoints, first step's compilation included.
    """
    path = pathlib.Path(workdir) / "metrics.jsonl"
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        step = int(row["step"])
        if any(k.startswith("eval/") for k in row):
            evals[step] = row
        elif "total" in row:
            train[step] = row
    train_rows = [train[s] for s in sorted(train)]
    seconds, previous = 0.0, 0
    for row in train_rows:
        seconds += float(row.get("step_time", 0.0)) * (int(row["step"]) - previous)
        previous = int(row["step"])
    return Run(
        name=name,
        train=train_rows,
        eval=[evals[s] for s in sorted(evals)],
        train_s=seconds,
    )


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _at(rows: Sequence[Mapping[str, Any]], step: int) -> Mapping[str, Any] | None:
    return next((r for r in rows if int(r["step"]) == step), None)


def markdown_table(runs: Sequence[Run], loss_steps: Sequence[int]) -> str:
    """Markdown: total loss at `loss_steps`, every loss term at the last common step, evals.

    Args:
      runs: the runs (from `load_run`).
      loss_steps: steps at which to list the total loss (those logged by every run).

    Returns:
      Markdown text (three tables).
    """
    names = [r["name"] for r in runs]
    lines = ["| step | " + " | ".join(f"total loss, {n}" for n in names) + " |"]
    lines.append("|---:|" + "---:|" * len(runs))
    for s in loss_steps:
        cells = [_fmt((_at(r["train"], s) or {}).get("total")) for r in runs]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    common = set.intersection(*({int(x["step"]) for x in r["train"]} for r in runs))
    if common:
        last = max(common)
        lines += ["", f"| loss term at step {last} | " + " | ".join(names) + " |"]
        lines.append("|---|" + "---:|" * len(runs))
        for term in LOSS_TERMS:
            cells = [_fmt((_at(r["train"], last) or {}).get(term), 4) for r in runs]
            lines.append(f"| {term} | " + " | ".join(cells) + " |")
    eval_steps = sorted({int(e["step"]) for r in runs for e in r["eval"]})
    if eval_steps:
        head = ["step", "run"] + [label for label, _ in EVAL_KEYS]
        lines += ["", "| " + " | ".join(head) + " |", "|---:|---|" + "---:|" * len(EVAL_KEYS)]
        for s in eval_steps:
            for r in runs:
                row = _at(r["eval"], s) or {}
                cells = [_fmt(row.get(key), 1) for _, key in EVAL_KEYS]
                lines.append(f"| {s} | {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "| run | steps trained | training time (s, summed step time) |"]
    lines.append("|---|---:|---:|")
    for r in runs:
        steps = int(r["train"][-1]["step"]) if r["train"] else 0
        lines.append(f"| {r['name']} | {steps} | {r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    count = math.ceil((hi - start) / step - 1e-9)
    return [start + i * step for i in range(count + 1)]


def _panel(
    x0: float,
    y0: float,
    w: float,
    h: float,
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str,
    ylabel: str,
    markers: bool,
    legend_top: bool = True,
) -> list[str]:
    points = [p for pts in series.values() for p in pts]
    if not points:
        return []
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xt, yt = _ticks(0.0, max(xs)), _ticks(min(0.0, min(ys)), max(ys))
    xmax, ymin, ymax = max(xt[-1], max(xs)), yt[0], max(yt[-1], max(ys))

    def sx(v: float) -> float:
        return x0 + w * v / xmax

    def sy(v: float) -> float:
        return y0 + h - h * (v - ymin) / (ymax - ymin)

    out = [
        f'<text x="{x0 + w / 2:.1f}" y="{y0 - 12:.1f}" text-anchor="middle" '
        f'font-weight="bold">{escape(title)}</text>',
        f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#444"/>',
    ]
    for t in xt:
        out.append(
            f'<line x1="{sx(t):.1f}" y1="{y0}" x2="{sx(t):.1f}" y2="{y0 + h}" stroke="#ddd"/>'
            f'<text x="{sx(t):.1f}" y="{y0 + h + 16:.1f}" text-anchor="middle">{t:g}</text>'
        )
    for t in yt:
        out.append(
            f'<line x1="{x0}" y1="{sy(t):.1f}" x2="{x0 + w}" y2="{sy(t):.1f}" stroke="#ddd"/>'
            f'<text x="{x0 - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>'
        )
    out.append(
        f'<text x="{x0 + w / 2:.1f}" y="{y0 + h + 36:.1f}" text-anchor="middle">step</text>'
        f'<text x="{x0 - 44:.1f}" y="{y0 + h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 {x0 - 44:.1f} {y0 + h / 2:.1f})">{escape(ylabel)}</text>'
    )
    for i, (name, pts) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        dash = ' stroke-dasharray="6 3"' if i % 2 else ""
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(
            f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.8"{dash}/>'
        )
        if markers:
            out += [
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in pts
            ]
        ly = (y0 + 16 if legend_top else y0 + h - 10 - 18 * (len(series) - 1)) + 18 * i
        out.append(
            f'<line x1="{x0 + w - 120}" y1="{ly - 4}" x2="{x0 + w - 96}" y2="{ly - 4}" '
            f'stroke="{colour}" stroke-width="2"{dash}/>'
            f'<text x="{x0 + w - 90}" y="{ly}">{escape(name)}</text>'
        )
    return out


def write_svg(runs: Sequence[Run], path: str | pathlib.Path, title: str = "") -> None:
    """Two panels: the logged total loss per step, and PQ (SRM ordering) at each evaluation."""
    loss = {r["name"]: [(int(x["step"]), float(x["total"])) for x in r["train"]] for r in runs}
    pq = {
        r["name"]: [
            (int(e["step"]), float(e[EVAL_KEYS[0][1]])) for e in r["eval"] if EVAL_KEYS[0][1] in e
        ]
        for r in runs
    }
    width, height = 960, 420
    body = _panel(70, 50, 380, 300, loss, "total training loss", "loss", markers=False)
    body += _panel(
        560, 50, 380, 300, pq, "PQ (SRM ordering), val", "PQ", markers=True, legend_top=False
    )
    if title:
        body.append(
            f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle" fill="#555">'
            f"{escape(title)}</text>"
        )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">\n'
        f'<rect width="{width}" height="{height}" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n"
    )
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(svg)


def main(argv: Sequence[str] | None = None) -> str:
    """CLI: writes the SVG and prints (and returns) the Markdown table."""
    p = argparse.ArgumentParser(prog="python -m oanet_jax.bench.curves", description=__doc__)
    p.add_argument("--run", action="append", required=True, help="NAME=WORKDIR (repeatable)")
    p.add_argument("--svg", default=None, help="write the loss / PQ figure here")
    p.add_argument("--title", default="", help="caption under the figure")
    p.add_argument(
        "--loss-steps", default="10,50,100,200,300,400", help="steps of the total-loss table"
    )
    args = p.parse_args(argv)
    runs = []
    for spec in args.run:
        name, _, workdir = spec.partition("=")
        if not workdir:
            p.error(f"--run wants NAME=WORKDIR, got {spec!r}")
        runs.append(load_run(name, workdir))
    if args.svg:
        write_svg(runs, args.svg, args.title)
    table = markdown_table(runs, [int(s) for s in args.loss_steps.split(",") if s])
    print(table, end="")
    return table


if __name__ == "__main__":
    main()
