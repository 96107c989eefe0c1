"""The Markdown report's per-class PQ table (oanet_jax/eval/report.py, issue 14 item 9).

A category with neither a ground-truth nor a predicted segment has no PQ (panopticapi reports 0.0
and leaves it out of its averages): the table leaves it out (absent from every ordering) or shows
'-' (absent from one ordering), while the averages stay equal to panopticapi's. Before the fix the
COCO sample's report listed all 133 categories, 125 of them with a misleading PQ of 0.0.
"""

from __future__ import annotations

import pytest

from oanet_jax.data.coco_panoptic import CategoryTable
from oanet_jax.eval.panoptic import summarize_pq
from oanet_jax.eval.report import results_markdown
from oanet_jax.panoptic import pq

pan_eval = pytest.importorskip("panopticapi.evaluation")

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 3, "name": "dog", "isthing": 1},
    {"id": 10, "name": "sky", "isthing": 0},
    {"id": 11, "name": "grass", "isthing": 0},
]
# (iou, tp, fp, fn) per category id; absent ids have no segment at all.
SCORE = {1: (1.6, 2, 1, 0), 2: (0.0, 0, 0, 1), 10: (0.9, 1, 0, 0)}
SRM = {1: (1.7, 2, 0, 0), 2: (0.0, 0, 0, 1), 3: (0.0, 0, 1, 0), 10: (0.9, 1, 0, 0)}


def _stats(counts):
    ours, ref = pq.PQStat(), pan_eval.PQStat()
    for cat, (iou, tp, fp, fn) in counts.items():
        for stat in (ours[cat], ref[cat]):
            stat.iou, stat.tp, stat.fp, stat.fn = iou, tp, fp, fn
    return ours, ref


def test_per_class_table_leaves_out_absent_categories():
    table = CategoryTable.from_categories(CATEGORIES)
    by_id = {c["id"]: c for c in CATEGORIES}
    panoptic = {}
    for ordering, counts in (("score", SCORE), ("srm", SRM)):
        ours, ref = _stats(counts)
        result = ours.summarize(CATEGORIES)
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            expected, per_class = ref.pq_average(by_id, isthing=isthing)
            assert result[name] == pytest.approx(expected, abs=1e-12), (ordering, name)
            if name == "All":  # panopticapi's per-class values, plus the counts
                for cat, values in per_class.items():
                    assert {k: result["per_class"][cat][k] for k in values} == values
        panoptic[ordering] = summarize_pq(result, table)
    assert panoptic["score"]["per_class"]["grass"] == {
        "category_id": 11,
        "isthing": False,
        **{m: 0.0 for m in ("PQ", "SQ", "RQ")},
        **{m: 0 for m in ("TP", "FP", "FN")},
    }
    md = results_markdown({"step": 7, "num_images": 2, "panoptic": panoptic})
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ")}
    assert rows["person"] == "| person | yes | 64.0 | 85.0 |"
    assert rows["car"] == "| car | yes | 0.0 | 0.0 |"  # a ground-truth segment missed: PQ 0
    assert rows["dog"] == "| dog | yes | - | 0.0 |"  # a false positive in the srm order only
    assert rows["sky"] == "| sky | no | 90.0 | 90.0 |"
    assert "grass" not in rows  # in neither ground truth nor predictions
    assert "1 categories with neither a ground-truth nor a predicted segment are left out" in md
    assert "'-': no ground-truth and no predicted segment in that ordering." in md
    # The averages over the categories present (n), as panopticapi: unchanged by the table.
    assert panoptic["score"]["n"] == 3 and panoptic["srm"]["n"] == 4
    assert panoptic["score"]["PQ"] == pytest.approx(100 * (0.64 + 0.0 + 0.9) / 3)
