"""The paper's claims measured on the synthetic benchmark: `oanet-study` (scripts/study.py).

`plan` names the runs (arms x seeds x benchmark settings), `worker` trains and evaluates one of
them in its own process, `report` writes docs/RESULTS.md from the finished runs, `main` runs the
plan (finished runs skipped) and regenerates the report.
"""
