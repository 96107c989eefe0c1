"""The run-comparison helper reads metrics.jsonl files and writes its SVG and Markdown table."""

import json
import xml.dom.minidom

from oanet_jax.bench import curves


def _write_run(path, losses, pq):
    path.mkdir()
    rows = []
    for step, total in losses.items():
        rows.append({"step": step, "total": total, "mask": total / 4, "step_time": 2.0})
        if step in pq:
            rows.append({"step": step, "eval/panoptic_srm/PQ": pq[step], "eval/bbox/AP": 1.0})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_runs_table_and_svg(tmp_path):
    _write_run(tmp_path / "a", {10: 3.0, 20: 2.0}, {20: 40.0})
    _write_run(tmp_path / "b", {10: 3.1, 20: 2.2, 30: 1.5}, {20: 41.5})
    svg = tmp_path / "fig" / "cmp.svg"
    table = curves.main(
        ["--run", f"f32={tmp_path / 'a'}", "--run", f"bf16={tmp_path / 'b'}"]
        + ["--svg", str(svg), "--loss-steps", "10,30", "--title", "x < y"]
    )
    assert "| 10 | 3.000 | 3.100 |" in table and "| 30 | - | 1.500 |" in table
    assert "| loss term at step 20 | f32 | bf16 |" in table
    assert "| mask | 0.5000 | 0.5500 |" in table
    assert "| 20 | bf16 | 41.5 | - |" in table
    assert "| f32 | 20 | 40 |" in table and "| bf16 | 30 | 60 |" in table
    doc = xml.dom.minidom.parse(str(svg))  # well-formed XML, title escaped
    assert len(doc.getElementsByTagName("polyline")) == 4
    assert len(doc.getElementsByTagName("circle")) == 2
