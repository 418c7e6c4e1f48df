"""scripts/results_table.py --runs: one row per labelled run folder, extra metrics included."""

from __future__ import annotations

import sys
from pathlib import Path

from cl_bench.results import build_results, write_results

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _results_table():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import results_table
    finally:
        sys.path.remove(str(SCRIPTS))
    return results_table


def test_runs_table_rows_extras_and_missing_runs(tmp_path: Path) -> None:
    run = tmp_path / "lnt"
    doc = build_results(
        [[80.0], [60.0, 70.0]],
        [[80.0], [75.0, 72.0]],
        task_sizes=[10, 10],
        class_order=list(range(4)),
        task_time_s=[1.0, 2.0],
        peak_mem_mb=1.0,
        status="complete",
        config={},
        extra_rows={"task_selection_acc": [[100.0], [90.0, 80.0]]},
    )
    write_results(run, doc)
    text = _results_table().runs_table([f"lnt lr=0.1={run}", f"gone={tmp_path / 'gone'}"], "method")
    rows = text.splitlines()
    assert rows[2].startswith("| lnt lr=0.1 | 65.00 | 73.50 | 72.50 | 20.00 |")  # task id given: 73.50
    assert rows[2].endswith("| complete | task_selection_acc 85.00 |")
    assert rows[3].startswith("| gone |") and "missing" in rows[3]
