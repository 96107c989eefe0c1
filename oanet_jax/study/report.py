"""docs/RESULTS.md from the study's finished runs: tables beside the paper's, claim checks, figures.

Everything in the report is computed here from ``OUT/runs/*/seed*/result.json`` and the datasets'
statistics; rerunning `oanet-study` rewrites it. Means and sample standard deviations (ddof 1) are
over seeds; "spread" is the larger of the two compared rows' standard deviations. The claim
checks compare paired per-seed differences (same seed = same data and initialisation) with that
spread.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from oanet_jax.bench.input import SAMPLE
from oanet_jax.study import plan, worker

__all__ = ["COCO_SAMPLE", "contact_share", "hidden_share", "load_results", "write"]

COCO_SAMPLE = str(SAMPLE)  # the two real COCO val2017 images (bench.input's sample)
METRICS = ("PQ", "PQ_th", "PQ_st", "SQ", "RQ")

# The paper's ResNet-50 numbers (PQ, PQ-Th, PQ-St; Table 3 also SQ and DQ = RQ).
PAPER = {
    "table3": {
        "baseline": (37.2, 45.4, 24.9, 77.1, 45.7),
        "w/ pano-instance GT": (36.1, 43.5, 24.9, 76.1, 44.5),
        "w/ spatial ranking module": (39.0, 48.3, 24.9, 77.1, 47.8),
    },
    "table1": {0.25: (37.2, 45.4, 24.9), 0.5: (36.5, 43.5, 25.9), 1.0: None},
    "table2": {"stuff": (36.7, 43.8, 25.9), "all": (37.2, 45.4, 24.9)},
    "table4": {
        "none": (36.5, 44.4, 24.6),
        "backbone": (37.0, 44.8, 25.2),
        "backbone_fpn": (37.2, 45.4, 24.9),
    },
    "table5": {"1x1": (38.4, 47.4, 24.9), "3x3": (38.7, 47.8, 24.9), "large": (39.0, 48.3, 24.9)},
}


def load_results(out: str) -> dict[str, dict[int, dict[str, Any]]]:
    """{arm name: {seed: result.json}} of the finished runs under ``out``."""
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(glob.glob(os.path.join(out, "runs", "*", "seed*", worker.RESULT_FILE))):
        with open(path) as f:
            r = json.load(f)
        found.setdefault(r["arm"], {})[int(r["seed"])] = r
    return found


def contact_share(index_map: np.ndarray, thing_category: Mapping[int, int]) -> tuple[int, int]:
    """Thing segments that touch (4-neighbour) a thing segment of another class.

    Panoptic segments never overlap, so this is what can be measured of occlusion on panoptic
    data alone (the COCO sample has no amodal masks): an occluded instance touches its occluder.

    Args:
      index_map: int [H, W] segment id per pixel (0 void).
      thing_category: {segment id: category id} of the thing segments.

    Returns:
      (segments touching another class, thing segments).
    """
    touching: set[int] = set()
    for a, b in (
        (index_map[:-1, :], index_map[1:, :]),
        (index_map[:, :-1], index_map[:, 1:]),
    ):
        edge = a != b
        for u, v in zip(a[edge].tolist(), b[edge].tolist(), strict=True):
            cu, cv = thing_category.get(u), thing_category.get(v)
            if cu is not None and cv is not None and cu != cv:
                touching.update((u, v))
    return len(touching), len(thing_category)


def _panoptic_contact(data: Mapping[str, Any], png_dir: str) -> tuple[int, int]:
    """`contact_share` summed over a COCO panoptic split (its JSON dict and PNG folder)."""
    from PIL import Image

    from oanet_jax.panoptic.io import rgb_to_id

    isthing = {int(c["id"]): bool(c["isthing"]) for c in data["categories"]}
    touching = total = 0
    for ann in data["annotations"]:
        ids = rgb_to_id(np.asarray(Image.open(os.path.join(png_dir, ann["file_name"]))))
        things = {
            int(s["id"]): int(s["category_id"])
            for s in ann["segments_info"]
            if isthing[int(s["category_id"])] and not s.get("iscrowd", 0)
        }
        t, n = contact_share(ids, things)
        touching, total = touching + t, total + n
    return touching, total


def hidden_share(instances: Mapping[str, Any], panoptic: Mapping[str, Any]) -> tuple[int, int]:
    """Thing instances that show less than half of their full mask, of all thing instances.

    Needs a split whose instance annotations and panoptic segments share ids (the synthetic
    generator's): the visible area is the panoptic segment's, 0 when no segment has the id (a
    fully hidden instance). Such an instance is dropped by the merge's overlap threshold (0.5)
    once its occluders are pasted, even when its full mask is predicted exactly and ranked in the
    true order; a visible mask never overlaps another.

    Args:
      instances: a COCO instances JSON dict ('annotations' with 'id', 'image_id', 'area',
        'iscrowd').
      panoptic: the COCO panoptic JSON dict of the same split.

    Returns:
      (instances with visible area < 0.5 * full area, non-crowd instances with a positive area).
    """
    visible = {
        (int(a["image_id"]), int(seg["id"])): float(seg["area"])
        for a in panoptic["annotations"]
        for seg in a["segments_info"]
    }
    hidden = total = 0
    for ann in instances["annotations"]:
        if ann.get("iscrowd", 0) or float(ann["area"]) <= 0:
            continue
        total += 1
        shown = visible.get((int(ann["image_id"]), int(ann["id"])), 0.0)
        hidden += shown < 0.5 * float(ann["area"])
    return hidden, total


def _coco_sample_contact() -> tuple[int, int] | None:
    """`contact_share` of the COCO sample (None when it is not there)."""
    folder = os.path.abspath(COCO_SAMPLE)
    json_path = os.path.join(folder, "panoptic_examples.json")
    if not os.path.exists(json_path):
        return None
    with open(json_path) as f:
        data = json.load(f)
    if "categories" not in data:
        with open(os.path.join(folder, "panoptic_coco_categories.json")) as f:
            data["categories"] = json.load(f)
    return _panoptic_contact(data, os.path.join(folder, "panoptic_examples"))


# ------------------------------------------------------------------------------ numbers


def _values(runs: Mapping[int, Mapping[str, Any]], getter) -> list[float]:
    out = []
    for seed in sorted(runs):
        try:
            out.append(float(getter(runs[seed])))
        except (KeyError, TypeError):
            continue
    return out


def _pq(ordering: str, metric: str):
    return lambda r: r["eval"]["panoptic"][ordering][metric]


def _ms(values: Sequence[float], digits: int = 1) -> str:
    """'mean ± std' (n > 1), 'value' (n = 1) or 'not run'."""
    v = [x for x in values if np.isfinite(x)]
    if not v:
        return "not run"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{np.mean(v):.{digits}f} ± {np.std(v, ddof=1):.{digits}f}"


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def _spread(*series: Sequence[float]) -> float:
    """The largest sample std of the series with two values or more (NaN when none has)."""
    stds = [_std(v) for v in series if len(v) > 1]
    return max(stds) if stds else float("nan")


def _paired(
    a: Mapping[int, Mapping[str, Any]], b: Mapping[int, Mapping[str, Any]], ga, gb
) -> list[float]:
    """Per-seed differences gb(b) - ga(a) over the seeds both have."""
    return [float(gb(b[s]) - ga(a[s])) for s in sorted(set(a) & set(b))]


def _verdict(diffs: Sequence[float], spread: float, paper: str) -> str:
    """One claim check: the mean paired difference, against the seed spread and the paper's
    difference (``paper`` like '+2.9 PQ-Th'; its sign is compared, 0 meaning 'unchanged')."""
    if not diffs:
        return "not measured (runs missing)"
    mean = float(np.mean(diffs))
    per_seed = ", ".join(f"{d:+.1f}" for d in diffs)
    try:
        ref = float(paper.split()[0])
    except ValueError:
        ref = None
    if not np.isfinite(spread):
        return f"{mean:+.1f} (one seed: {per_seed}; no spread to compare with); paper {paper}"
    beyond = abs(mean) > spread
    size = "more" if beyond else "not more"
    if ref is None:
        agree = ""
    elif ref == 0.0:
        agree = ": agrees (unchanged)" if not beyond else ": disagrees (the paper: unchanged)"
    elif not beyond:
        agree = ": no measurable difference, where the paper has one"
    else:
        agree = ": agrees in sign" if mean * ref > 0 else ": the opposite sign, disagrees"
    return (
        f"{mean:+.1f} (per seed {per_seed}), {size} than the seed spread {spread:.1f}; "
        f"paper {paper}{agree}"
    )


# ------------------------------------------------------------------------------- tables


def _row(title: str, runs, ordering: str, paper: Sequence[float] | None = None, n=5) -> str:
    cells = [_ms(_values(runs, _pq(ordering, m))) for m in METRICS[:n]]
    seeds = len(runs)
    paper_cells = [f"{v:.1f}" for v in paper] if paper else ["-"] * n
    return f"| {title} | {seeds} | " + " | ".join(cells + paper_cells) + " |"


def _header(n: int, paper_cols: Sequence[str]) -> list[str]:
    cols = ["", "seeds", *METRICS[:n], *(f"paper {c}" for c in paper_cols)]
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def _get(results, name):
    return results.get(name, {})


def _table3(results) -> list[str]:
    p = PAPER["table3"]
    full, pred, pano, pano_gt = (
        _get(results, n) for n in ("full_gt", "full_pred", "pano", "pano_gt")
    )
    lines = [
        "## Table 3: the spatial ranking module, full vs visible instance masks",
        "",
        "Each arm is trained once per seed; its evaluation merges the same detections twice, "
        "ordered by detection score (the heuristic baseline) and by the SRM's ranking score "
        "(Eq. 3). 'full masks' = the instances JSON's amodal, overlapping masks; 'visible masks' "
        "= no instances JSON, the instance masks are the panoptic segments (the paper's "
        "\"w/ pano-instance GT\"; `data.instance_masks='panoptic'` gives the same masks).",
        "",
        *_header(5, ("PQ", "PQ-Th", "PQ-St", "SQ", "DQ")),
        _row("baseline: full masks, score order", full, "score", p["baseline"]),
        _row("w/ pano-instance GT: visible masks, score order", pano, "score",
             p["w/ pano-instance GT"]),
        _row("w/ SRM: full masks, SRM (trained on GT)", full, "srm",
             p["w/ spatial ranking module"]),
        _row("full masks, SRM trained on predicted masks", pred, "srm"),
        _row("visible masks, SRM trained on predicted masks", pano, "srm"),
        _row("visible masks, SRM trained on GT (seams only)", pano_gt, "srm"),
        "",
    ]  # fmt: skip
    return lines


def _check(a, ga, b, gb, paper: str) -> str:
    """`_verdict` of ``gb(b) - ga(a)`` per seed against the spread of both rows."""
    return _verdict(_paired(a, b, ga, gb), _spread(_values(a, ga), _values(b, gb)), paper)


def _claims(results) -> list[str]:
    full, pano, pred = (_get(results, n) for n in ("full_gt", "pano", "full_pred"))
    lines = ["## The claims, checked", ""]
    srm_gain = {"PQ_th": "+2.9 PQ-Th", "PQ_st": "+0.0 PQ-St", "PQ": "+1.8 PQ"}
    for label, runs in (("full masks, SRM on GT", full), ("full masks, SRM on predicted", pred)):
        for m, paper in srm_gain.items():
            check = _check(runs, _pq("score", m), runs, _pq("srm", m), paper)
            lines.append(f"- {label}: SRM minus score ordering, {m}: {check}.")
    for m in ("PQ_th", "PQ"):
        check = _check(pano, _pq("score", m), pano, _pq("srm", m), "n/a (not in the paper)")
        lines.append(
            f"- panoptic-only data, SRM trained on predicted masks minus score ordering, {m}: "
            f"{check}."
        )
    paper_visible = {"PQ_th": "-1.9 PQ-Th", "PQ": "-1.1 PQ"}
    paper_visible_srm = {"PQ_th": "-4.8 PQ-Th", "PQ": "-2.9 PQ"}
    for m in ("PQ_th", "PQ"):
        check = _check(full, _pq("score", m), pano, _pq("score", m), paper_visible[m])
        lines.append(f"- visible minus full masks, both with score ordering, {m}: {check}.")
        check = _check(full, _pq("srm", m), pano, _pq("score", m), paper_visible_srm[m])
        lines.append(f"- visible masks + score minus full masks + SRM, {m}: {check}.")
    lines.append("")
    return lines


def _conflicts(results) -> list[str]:
    lines = [
        "## What the SRM is trained on: genuine overlaps and resampling seams",
        "",
        "Per training image, the SRM's supervised pixels (canvas pixels at stride 4 under "
        "instances of two or more different thing classes) that are genuine overlaps and "
        "resampling seams (a conflict at most two canvas pixels thick, "
        "`modeling.srm.split_conflicts`), means over training and seeds.",
        "",
        "| arm | SRM trained on | GT genuine | GT seam | predicted genuine | predicted seam |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("full_gt", "full_pred", "pano", "pano_gt"):
        runs = _get(results, name)
        if not runs:
            continue
        cells = [
            _ms(_values(runs, lambda r, k=k: r["train"]["srm_px"][k]), 1)
            for k in ("srm_gt_genuine_px", "srm_gt_seam_px", "srm_pred_genuine_px",
                      "srm_pred_seam_px")
        ]  # fmt: skip
        mode = next(iter(runs.values()))["srm_train_masks"]
        lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _ablation(results, title, intro, rows, ordering, paper_key, note="") -> list[str]:
    lines = [title, "", intro, "", *_header(3, ("PQ", "PQ-Th", "PQ-St"))]
    for label, name, paper in rows:
        p = PAPER[paper_key].get(paper)
        lines.append(_row(label, _get(results, name), ordering, p, n=3))
    if note:
        lines += ["", note]
    lines.append("")
    return lines


def _merge(results) -> list[str]:
    runs = _get(results, "full_gt")
    lines = [
        "## Merge options",
        "",
        "The final checkpoints of 'full masks, SRM on GT' merged with each option (SRM ordering; "
        "the first row is `config.eval`'s default: thing pixels to the best stuff class, stuff "
        "area limit per class in original-image pixels).",
        "",
        "| merge | PQ | PQ_th | PQ_st | PQ minus default, per seed |",
        "|---|---|---|---|---|",
        "| default | "
        + " | ".join(_ms(_values(runs, _pq("srm", m))) for m in METRICS[:3])
        + " | |",
    ]
    for name in worker.MERGE_VARIANTS:
        cells = [
            _ms(_values(runs, lambda r, m=m, n=name: r["merge_variants"][n]["srm"][m]))
            for m in METRICS[:3]
        ]
        diffs = _paired(
            runs, runs, _pq("srm", "PQ"), lambda r, n=name: r["merge_variants"][n]["srm"]["PQ"]
        )
        cells.append(", ".join(f"{d:+.2f}" for d in diffs) or "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _occlusion(results) -> list[str]:
    lines = [
        "## How often each ordering gets the occluder right",
        "",
        "`eval.occlusion.OcclusionOrderEvaluator` on the validation split: pairs of ground-truth "
        "instances of different thing classes whose full masks overlap; 'detected' when both "
        "have a kept detection (score >= 0.5, mask IoU >= 0.5 with the full mask); an ordering "
        "is wrong when it does not rank the true occluder (the one visible in the overlap) "
        "strictly higher. Sums over seeds.",
        "",
        "| arm | what | setting | pairs | detected | score order wrong | SRM order wrong | "
        "SRM fixes | SRM breaks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in plan.ARMS:
        runs = _get(results, arm.name)
        if not runs:
            continue
        occ = [r["eval"]["occlusion"] for r in runs.values()]
        tot = {
            k: sum(o[k] for o in occ)
            for k in ("pairs", "detected", "score_wrong", "srm_wrong", "srm_fixes", "srm_breaks")
        }
        n = max(tot["detected"], 1)
        lines.append(
            f"| {arm.name} | {arm.title} | {arm.setting} | {tot['pairs']} | {tot['detected']} | "
            f"{100 * tot['score_wrong'] / n:.1f}% | {100 * tot['srm_wrong'] / n:.1f}% | "
            f"{tot['srm_fixes']} | {tot['srm_breaks']} |"
        )  # fmt: skip
    lines.append("")
    return lines


def _setting_stats(out: str, setting: str) -> dict[str, Any]:
    stats = []
    for path in sorted(glob.glob(os.path.join(out, "data", f"{setting}-seed*.stats.json"))):
        with open(path) as f:
            stats.append(json.load(f))
    if not stats:
        return {}
    contact, hidden = [0, 0], [0, 0]
    for path in sorted(glob.glob(os.path.join(out, "data", f"{setting}-seed*"))):
        if os.path.isdir(path):
            with open(os.path.join(path, "val", "panoptic.json")) as f:
                data = json.load(f)
            t, n = _panoptic_contact(data, os.path.join(path, "val", "panoptic"))
            contact = [contact[0] + t, contact[1] + n]
            with open(os.path.join(path, "val", "instances.json")) as f:
                t, n = hidden_share(json.load(f), data)
            hidden = [hidden[0] + t, hidden[1] + n]
    return {
        "overlap": [100 * s["overlap_fraction"] for s in stats],
        "contact": 100 * contact[0] / max(1, contact[1]),
        "hidden": 100 * hidden[0] / max(1, hidden[1]),
    }


def _knobs(out: str, results) -> list[str]:
    coco = _coco_sample_contact()
    coco_txt = (
        f"{coco[0]} of {coco[1]} thing segments ({100 * coco[0] / max(1, coco[1]):.0f}%)"
        if coco
        else "not available"
    )
    lines = [
        "## The benchmark's difficulty and its knobs",
        "",
        "Settings (`study.plan.SETTINGS`, fixed before any result was seen): `near_prob` is the "
        "chance that an instance is placed next to one of another class, `depth_consistency` the "
        "chance that it follows the depth rule (lower in the image = in front). 'overlap' is "
        "the share of thing instances whose full mask overlaps one of another class (generator "
        "statistics, train + val); 'contact' the share of visible thing segments of the "
        "validation split touching a thing segment of another class, the one overlap measure "
        "that panoptic data allows: in the two COCO val2017 images of the sample it is "
        f"{coco_txt}. 'hidden' is the share of validation thing instances that show less than "
        "half of their full mask (`hidden_share`). The score-order errors come from the "
        "full-mask model of each setting.",
        "",
        "| setting | near_prob | depth_consistency | overlap | contact | hidden | "
        "score order wrong | full + score PQ | full + SRM PQ | visible + score PQ | "
        "best (margin, spread) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, knobs in plan.SETTINGS.items():
        suffix = "" if setting == "default" else f"@{setting}"
        full, pano = _get(results, f"full_gt{suffix}"), _get(results, f"pano{suffix}")
        st = _setting_stats(out, setting)
        occ = [r["eval"]["occlusion"] for r in full.values()]
        det = sum(o["detected"] for o in occ)
        wrong = f"{100 * sum(o['score_wrong'] for o in occ) / det:.1f}%" if det else "-"
        cand = {
            "full + score": _values(full, _pq("score", "PQ")),
            "full + SRM": _values(full, _pq("srm", "PQ")),
            "visible + score": _values(pano, _pq("score", "PQ")),
        }
        best = "-"
        have = {k: v for k, v in cand.items() if v}
        if len(have) == 3:
            order = sorted(have, key=lambda k: -np.mean(have[k]))
            margin = np.mean(have[order[0]]) - np.mean(have[order[1]])
            spread = _spread(have[order[0]], have[order[1]])
            best = f"{order[0]} (+{margin:.1f} over {order[1]}, spread {spread:.1f})"
        overlap = _ms(st.get("overlap", []), 0) + "%" if st else "-"
        contact = f"{st['contact']:.0f}%" if st else "-"
        hidden = f"{st['hidden']:.1f}%" if st else "-"
        lines.append(
            f"| {setting} | {knobs.near_prob} | {knobs.depth_consistency} | {overlap} | "
            f"{contact} | {hidden} | {wrong} | "
            + " | ".join(_ms(v) for v in cand.values())
            + f" | {best} |"
        )
    lines.append("")
    return lines


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _explain(out: str, results) -> list[str]:
    """Per benchmark setting: which of the three contenders wins, and the measurements of why."""
    lines = [
        "## What the numbers say",
        "",
        "Written from the runs, like the tables (no number here is typed by hand). Per benchmark "
        "setting: which of full masks + score order, full masks + SRM and visible masks + score "
        "order wins, then what the other tables measure about why. 'Spread' is the larger sample "
        "std over seeds of the two rows compared.",
        "",
    ]
    for setting in plan.SETTINGS:
        suffix = "" if setting == "default" else f"@{setting}"
        full, pano = _get(results, f"full_gt{suffix}"), _get(results, f"pano{suffix}")
        if not full or not pano:
            lines.append(
                f"- **{setting}**: not measured yet (needs full_gt{suffix} and pano{suffix})."
            )
            continue
        cand = {
            "full masks + score": (full, _pq("score", "PQ")),
            "full masks + SRM": (full, _pq("srm", "PQ")),
            "visible masks + score": (pano, _pq("score", "PQ")),
        }
        means = {k: _mean(_values(r, g)) for k, (r, g) in cand.items()}
        first, second, third = sorted(means, key=lambda k: -means[k])
        margin = means[first] - means[second]
        spread = _spread(_values(*cand[first]), _values(*cand[second]))
        beyond = "beyond" if margin > spread else "within"
        occ = [r["eval"]["occlusion"] for r in full.values()]
        det = max(1, sum(o["detected"] for o in occ))
        score_wrong = 100 * sum(o["score_wrong"] for o in occ) / det
        srm_wrong = 100 * sum(o["srm_wrong"] for o in occ) / det
        srm_gain = _mean(_paired(full, full, _pq("score", "PQ_th"), _pq("srm", "PQ_th")))
        pano_order = _mean(_paired(pano, pano, _pq("score", "PQ"), _pq("srm", "PQ")))
        d_rq = _mean(_paired(full, pano, _pq("srm", "RQ_th"), _pq("score", "RQ_th")))
        d_sq = _mean(_paired(full, pano, _pq("srm", "SQ_th"), _pq("score", "SQ_th")))
        hidden = _setting_stats(out, setting).get("hidden")
        text = (
            f"- **{setting}**: {first} wins with PQ {means[first]:.1f} ({second} "
            f"{means[second]:.1f}, {third} {means[third]:.1f}), +{margin:.1f} over {second}, "
            f"{beyond} the seed spread {spread:.1f}. Order: with full masks the detection score "
            f"ranks the wrong instance on top in {score_wrong:.0f}% of the detected overlapping "
            f"pairs of different classes and the SRM in {srm_wrong:.0f}%, worth {srm_gain:+.1f} "
            f"PQ_th. Visible masks: ranking them by the SRM instead of the score changes their PQ "
            f"by {pano_order:+.1f}. Visible masks + score minus full masks "
            f"+ SRM: {d_rq:+.1f} RQ_th (thing segments matched) and {d_sq:+.1f} SQ_th (their "
            "quality)"
        )
        text += (
            "; a full-mask model's segment of an occluded instance is what the masks pasted "
            "before it leave of its own mask, so their errors add to its own, while a "
            "visible-mask model predicts the segment itself."
            if d_sq > 0
            else "."
        )
        if hidden is not None:
            text += (
                f" {hidden:.0f}% of the validation thing instances show less than half of their "
                "full mask: the merge's overlap threshold (0.5, paper 4.2) drops such an instance "
                "once its occluder is pasted, even if its full mask is exact and ranked in the "
                "true order, so even a perfect full-mask model loses those segments; visible "
                "masks never overlap."
            )
        lines.append(text)
    lines.append("")
    return lines


def _figures(out: str, results, figures: str, results_path: str) -> list[str]:
    lines = ["## Figures", ""]
    rel = os.path.relpath(figures, os.path.dirname(os.path.abspath(results_path)))
    curves = _curves(out, results, os.path.join(figures, "study_curves.svg"))
    if curves:
        lines += [
            f"![training curves]({rel}/study_curves.svg)",
            "",
            "Total training loss of the core arms (seed 0) and their final PQ (SRM ordering).",
            "",
        ]
    n = _reversals(out, results, os.path.join(figures, "study_reversals.png"))
    if n:
        lines += [
            f"![ranking reversals]({rel}/study_reversals.png)",
            "",
            "Like the paper's Fig. 7/8: validation pairs where the SRM's ranking score reverses "
            "the detection-score order ('full masks, SRM on GT', seed 0). Each box is labelled "
            "with its class, detection score s and ranking score r; green = the true occluder, "
            "red = the occluded one. The first rows are pairs the SRM gets right, the last row "
            "(if any) pairs it gets wrong.",
            "",
        ]
    return lines


def _curves(out: str, results, path: str) -> bool:
    from oanet_jax.bench.curves import Run, write_svg

    runs = []
    for name in ("full_gt", "full_pred", "pano", "pano_gt"):
        r = _get(results, name).get(0)
        if r is None:
            continue
        curve = r["train"]["curve"]
        final = {"step": r["step"], "eval/panoptic_srm/PQ": r["eval"]["panoptic"]["srm"]["PQ"]}
        runs.append(Run(name=name, train=curve, eval=[final], train_s=r["train_seconds"]))
    if not runs:
        return False
    write_svg(runs, path, title="study: core arms, seed 0")
    return True


def _reversals(out: str, results, path: str, per_kind: tuple[int, int] = (6, 3)) -> int:
    """Draws the reversal examples of full_gt seed 0; returns how many were drawn."""
    from PIL import Image, ImageDraw

    r = _get(results, "full_gt").get(0)
    if r is None:
        return 0
    examples = r["eval"]["occlusion"]["examples"]
    chosen = [e for e in examples if e["srm_right"]][: per_kind[0]]
    chosen += [e for e in examples if not e["srm_right"]][: per_kind[1]]
    if not chosen:
        return 0
    root = worker.data_root(out, "default", 0)
    with open(os.path.join(root, "val", "panoptic.json")) as f:
        data = json.load(f)
    files = {int(im["id"]): im["file_name"] for im in data["images"]}
    names = {int(c["id"]): c["name"] for c in data["categories"]}
    scale, cols = 3, 3
    tiles = []
    for e in chosen:
        image = Image.open(os.path.join(root, "val", "images", files[e["image_id"]])).convert("RGB")
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        draw = ImageDraw.Draw(image)
        for inst in e["instances"]:
            colour = (0, 200, 0) if inst["role"] == "top" else (230, 0, 0)
            box = [v * scale for v in inst["box"]]
            draw.rectangle(box, outline=colour, width=2)
            text = f"{names[inst['category_id']]} s{inst['score']:.2f} r{inst['srm_score']:.2f}"
            y = box[1] - 12 if inst["role"] == "top" else box[3] + 1
            draw.rectangle([box[0], y, box[0] + 6 * len(text) + 2, y + 11], fill=(255, 255, 255))
            draw.text((box[0] + 1, y), text, fill=colour)
        mark = "SRM right" if e["srm_right"] else "SRM wrong"
        draw.rectangle([0, 0, 6 * len(mark) + 4, 12], fill=(0, 0, 0))
        draw.text((2, 0), mark, fill=(255, 255, 255))
        tiles.append(image)
    w, h = tiles[0].size
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for k, tile in enumerate(tiles):
        sheet.paste(tile, ((k % cols) * w, (k // cols) * h))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sheet.save(path)
    return len(tiles)


# -------------------------------------------------------------------------------- write


def _intro(out: str, preset: plan.Preset, results, failed) -> list[str]:
    from oanet_jax.bench.timing import cpu_name

    done = sum(len(v) for v in results.values())
    total = len(plan.ARMS) * len(preset.seeds)
    seconds = sum(r["seconds"] for v in results.values() for r in v.values())
    cfg = worker.build_config(preset, plan.ARMS[0], 0, out)
    d, m, t = cfg.data, cfg.model, cfg.train
    lines = [
        "# The paper's claims on the synthetic benchmark",
        "",
        f"Written by `oanet-study --preset {preset.name}` (`scripts/study.py`; do not edit by "
        f"hand) on {datetime.date.today().isoformat()}, machine: {cpu_name()}, "
        f"{os.cpu_count()} cores, CPU only. Runs finished: {done} of {total} "
        f"({len(preset.seeds)} seeds x {len(plan.ARMS)} arms), "
        f"{seconds / 60:.0f} min of runs.",
        "",
        "What is shrunk against the paper (ResNet-50, COCO, 90k iterations of batch 16 at "
        f"800 px): a {m.backbone} backbone with {m.norm}, FPN {m.fpn_channels} channels, "
        f"{d.synthetic_num_images} training and {d.synthetic_num_val_images} validation images "
        f"of {d.synthetic_size[0]}x{d.synthetic_size[1]} from the synthetic occlusion generator "
        f"(`oanet_jax.data.synthetic`: 4 thing and 3 stuff classes), {t.num_steps} steps of "
        f"batch {t.batch_size}, stuff area limit {cfg.eval.stuff_area_limit} px. Seeds "
        f"{', '.join(map(str, preset.seeds))}: each seed draws its own dataset and "
        "initialisation. Metrics in percent, mean ± sample std over seeds.",
        "",
    ]
    versions: dict[str, int] = {}
    for v in results.values():
        for r in v.values():
            c = r.get("commit")
            key = c.split("+")[0][:12] + c[40:] if c else "commit not recorded"
            key += f" on {r.get('machine', 'a machine not recorded')}"
            versions[key] = versions.get(key, 0) + 1
    lines += [
        "Code and machine of the runs (the record keeps runs of earlier sessions; one seed "
        "gives slightly different numbers on a CPU with another instruction set): "
        + ", ".join(f"{k} ({n} runs)" for k, n in sorted(versions.items()))
        + ".",
        "",
    ]
    if failed:
        lines += [
            "Failed runs (see their log.txt): " + ", ".join(f"{a} seed {s}" for a, s in failed),
            "",
        ]
    missing = [
        f"{a.name} seed {s}" for a, s in plan.runs(preset) if s not in results.get(a.name, {})
    ]
    if missing:
        lines += [
            f"Not run yet: {', '.join(missing)}. `oanet-study --preset {preset.name}` runs them "
            "(the recorded runs are restored, not trained again; `--budget MINUTES` ends a "
            "sitting between runs).",
            "",
        ]
    return lines


def write(
    out: str,
    preset: plan.Preset,
    results_path: str,
    figures: str,
    failed: Sequence[tuple[str, int]] = (),
) -> str:
    """Writes the report (and its figures) from the finished runs; returns its text."""
    results = load_results(out)
    lines = _intro(out, preset, results, failed)
    lines += _table3(results)
    lines += _claims(results)
    lines += _conflicts(results)
    lines += _knobs(out, results)
    lines += _occlusion(results)
    lines += _explain(out, results)
    lines += _ablation(
        results,
        "## Table 1: lambda (loss balance, Eq. 1)",
        "Score ordering (the paper's Table 1 is the baseline without the SRM).",
        [("0.25", "full_gt", 0.25), ("0.5", "lambda_0.5", 0.5), ("1.0", "lambda_1.0", 1.0)],
        "score",
        "table1",
        "The paper's lambda = 1 did not converge with its learning-rate policy.",
    )
    lines += _ablation(
        results,
        "## Table 2: stuff-branch supervision",
        "Score ordering; 'stuff' supervises the 3 stuff classes only, 'all' the stuff and thing "
        "classes (object context).",
        [("stuff", "stuff_only", "stuff"), ("all", "full_gt", "all")],
        "score",
        "table2",
    )
    lines += _ablation(
        results,
        "## Table 4: feature sharing",
        "Score ordering. 'no sharing': the stuff branch has its own ResNet, FPN and 3x3 conv; "
        "'res1-res5': it shares the ResNet; '+ skip-connection': ResNet, FPN and the RPN's 3x3 "
        "conv (`config.model.sharing`).",
        [
            ("no sharing", "share_none", "none"),
            ("res1-res5", "share_backbone", "backbone"),
            ("+ skip-connection", "full_gt", "backbone_fpn"),
        ],
        "score",
        "table4",
    )
    lines += _ablation(
        results,
        "## Table 5: the SRM's convolution",
        "SRM ordering.",
        [("1 x 1", "kernel_1x1", "1x1"), ("3 x 3", "kernel_3x3", "3x3"),
         ("1 x 7 + 7 x 1", "full_gt", "large")],
        "srm",
        "table5",
    )  # fmt: skip
    lines += _merge(results)
    lines += _figures(out, results, figures, results_path)
    text = "\n".join(lines).rstrip("\n") + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
    with open(results_path, "w") as f:
        f.write(text)
    return text
