"""Evaluation report: ``results.json``, a Markdown table ``results.md`` and scalars.

Scalars go through the one scalar writer (`common.metric_writer.MetricWriter`: TensorBoard event
files and a JSON-lines log) with the tags ``panoptic_<ordering>/<PQ metric>``, ``bbox/<AP>``,
``segm/<AP>`` and ``stuff/mIoU``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from oanet_jax.common.files import write_json
from oanet_jax.common.metric_writer import MetricWriter
from oanet_jax.eval.instances import COCO_METRICS
from oanet_jax.eval.panoptic import PQ_METRICS

__all__ = ["result_scalars", "results_markdown", "write_report"]


def results_markdown(results: Mapping[str, Any]) -> str:
    """A Markdown report of an evaluation's results (panoptic per ordering, AP, mIoU, per class).

    Sections whose metric is absent from `results` (an evaluator not run) are left out.
    """
    lines = [f"# Evaluation at step {results['step']} ({results['num_images']} images)", ""]
    panoptic = results.get("panoptic", {})
    if panoptic:
        lines += ["| ordering | " + " | ".join(PQ_METRICS) + " |"]
        lines += ["|---" * (len(PQ_METRICS) + 1) + "|"]
        for ordering, r in panoptic.items():
            lines.append(f"| {ordering} | " + " | ".join(f"{r[m]:.1f}" for m in PQ_METRICS) + " |")
        lines.append("")
    kinds = [k for k in ("bbox", "segm") if k in results]
    if kinds:
        lines += ["| instances | " + " | ".join(COCO_METRICS) + " |"]
        lines += ["|---" * (len(COCO_METRICS) + 1) + "|"]
        for kind in kinds:
            r = results[kind]
            lines.append(f"| {kind} | " + " | ".join(f"{r[m]:.1f}" for m in COCO_METRICS) + " |")
        lines.append("")
    if "stuff" in results:
        s = results["stuff"]
        lines += [f"Stuff mIoU: {s['mIoU']:.1f} (over {s['n']} stuff classes with ground truth)"]
        lines.append("")
    orderings = list(panoptic)
    if orderings:
        lines += _per_class_lines(panoptic, orderings)
    return "\n".join(lines).rstrip("\n") + "\n"


def _absent(entry: Mapping[str, Any]) -> bool:
    """True for a category with no ground-truth and no predicted segment (TP + FP + FN = 0)."""
    return "TP" in entry and entry["TP"] + entry["FP"] + entry["FN"] == 0


def _per_class_lines(panoptic: Mapping[str, Any], orderings: list[str]) -> list[str]:
    """The per-class PQ table: '-' where a category is absent from an ordering's ground truth and
    predictions (panopticapi's PQ 0.0 there is no score, and the averages leave it out); the
    categories absent from every ordering are left out and counted below the table."""
    lines = ["| category | thing | " + " | ".join(f"PQ ({o})" for o in orderings) + " |"]
    lines += ["|---" * (len(orderings) + 2) + "|"]
    left_out = dashes = 0
    for name, info in panoptic[orderings[0]]["per_class"].items():
        entries = [panoptic[o]["per_class"][name] for o in orderings]
        if all(_absent(e) for e in entries):
            left_out += 1
            continue
        cells = ["-" if _absent(e) else f"{e['PQ']:.1f}" for e in entries]
        dashes += cells.count("-")
        thing = "yes" if info["isthing"] else "no"
        lines.append(f"| {name} | {thing} | " + " | ".join(cells) + " |")
    notes = []
    if left_out:
        notes.append(
            f"{left_out} categories with neither a ground-truth nor a predicted segment are left "
            "out (as from the averages)."
        )
    if dashes:
        notes.append("'-': no ground-truth and no predicted segment in that ordering.")
    return lines + ([""] + notes if notes else [])


def result_scalars(results: Mapping[str, Any]) -> dict[str, float]:
    """The scalar tags of an evaluation's results (see the module docstring)."""
    scalars = {}
    for ordering, r in results.get("panoptic", {}).items():
        for m in PQ_METRICS:
            scalars[f"panoptic_{ordering}/{m}"] = r[m]
    for kind in ("bbox", "segm"):
        for m in COCO_METRICS:
            if kind in results:
                scalars[f"{kind}/{m}"] = results[kind][m]
    if "stuff" in results:
        scalars["stuff/mIoU"] = results["stuff"]["mIoU"]
    return scalars


def write_report(
    results: dict[str, Any], out_dir: str, writer: MetricWriter | None = None
) -> dict[str, str]:
    """Writes ``out_dir/results.json`` and ``out_dir/results.md``, and the scalars to `writer`.

    Args:
      results: the evaluation's results ('step', 'num_images', metrics); its 'files' entry is
        updated with the two report files before it is written.
      out_dir: the evaluation's folder (created).
      writer: scalar writer (at step ``results['step']``); None: no scalars.

    Returns:
      {'results_json': path, 'results_md': path}.
    """
    files = {
        "results_json": os.path.join(out_dir, "results.json"),
        "results_md": os.path.join(out_dir, "results.md"),
    }
    results.setdefault("files", {}).update(files)
    write_json(files["results_json"], results, indent=1)
    with open(files["results_md"], "w") as f:
        f.write(results_markdown(results))
    if writer is not None:
        writer.write(int(results["step"]), result_scalars(results))
    return files
