"""The run folder's results: ``results.json`` (the schema below) and the accuracy matrices as CSV.

``results.json`` has exactly these top-level keys (accuracies in percent, see :mod:`cl_bench.metrics`):

* ``acc_matrix``: rows = after task t, columns = task j, ``null`` where j > t. It is the scenario's
  accuracy: class-incremental for ``scenario=cil``, task-incremental for ``scenario=til``. For
  ``scenario=dil`` the columns are the domains and every entry is filled: after each task every domain's test
  set is evaluated (also those not learnt yet), as the official DIL code tests on all domains.
* ``til_acc_matrix``: the task-aware accuracy (task id given, argmax within the task's classes); ``[]`` for
  ``scenario=dil`` (the task id names only the domain).
* ``extra_matrices``: further per-task metrics of the method, by name, in the same layout (``{}`` for most
  methods); e.g. ``task_selection_acc``: the percentage of task j's test images for which the method chose
  task j's parameters.
* ``last_acc``, ``avg_inc_acc``, ``avg_forgetting``, ``bwt``: from ``acc_matrix`` (under DIL ``last_acc`` and
  ``avg_inc_acc`` cover all domains' test images: the official top-1 on the union of the domains' test sets).
* ``class_order``: dataset class ids in the order they are learned.
* ``task_time_s``: wall seconds per task (training plus task-end work, evaluation excluded).
* ``peak_mem_mb``: peak GPU memory allocated if a GPU was used, else the process's peak resident memory.
* ``status``: ``complete``, or ``incomplete`` while running or after an error (the rows so far are kept).
* ``error``: what stopped the run (``"TypeError: ..."``, the first line first), ``null`` otherwise.
* ``config``: the resolved run config (``config.debug.smoke`` is true for a smoke run, whose numbers mean
  nothing).

Every write goes to a temporary file that is synced to disk and then replaces the old one, so neither a crash
nor a power loss leaves a torn file; a full disk is reported naming the file (:mod:`cl_bench.storage`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cl_bench import metrics
from cl_bench.storage import write_text

RESULT_KEYS = (
    "acc_matrix",
    "til_acc_matrix",
    "extra_matrices",
    "last_acc",
    "avg_inc_acc",
    "avg_forgetting",
    "bwt",
    "class_order",
    "task_time_s",
    "peak_mem_mb",
    "status",
    "error",
    "config",
)
RESULTS_FILE = "results.json"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (its folder made if needed) by :func:`cl_bench.storage.write_text`: a
    temporary file, fsync, rename, one retry; :class:`~cl_bench.errors.StorageError` naming the file after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def padded(rows: Sequence[Sequence[float]], n_tasks: int) -> list[list[float | None]]:
    """Lower-triangular rows padded with ``None`` to ``n_tasks`` columns."""
    return [[*map(float, row), *([None] * (n_tasks - len(row)))] for row in rows]


def build_results(
    acc_rows: Sequence[Sequence[float]],
    til_rows: Sequence[Sequence[float]],
    task_sizes: Sequence[int],
    class_order: Sequence[int],
    task_time_s: Sequence[float],
    peak_mem_mb: float,
    status: str,
    config: dict[str, Any],
    extra_rows: dict[str, Sequence[Sequence[float]]] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The ``results.json`` document for the rows finished so far (metrics are ``null`` with no rows)."""
    n_tasks = len(task_sizes)
    acc = padded(acc_rows, n_tasks)
    summary = (
        metrics.summarize(acc, task_sizes)
        if acc
        else dict.fromkeys(("last_acc", "avg_inc_acc", "avg_forgetting", "bwt"))
    )
    doc = {
        "acc_matrix": acc,
        "til_acc_matrix": padded(til_rows, n_tasks),
        "extra_matrices": {name: padded(rows, n_tasks) for name, rows in (extra_rows or {}).items()},
        **summary,
        "class_order": [int(c) for c in class_order],
        "task_time_s": [float(t) for t in task_time_s],
        "peak_mem_mb": float(peak_mem_mb),
        "status": status,
        "error": error,
        "config": config,
    }
    assert tuple(doc) == RESULT_KEYS
    return doc


def write_matrix_csv(path: Path, matrix: Sequence[Sequence[float | None]]) -> None:
    rows = [["after_task", *(f"task_{j}" for j in range(len(matrix[0]) if matrix else 0))]]
    rows += [[t, *("" if v is None else f"{v:.4f}" for v in row)] for t, row in enumerate(matrix)]
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    write_text_atomic(path, buf.getvalue())


def write_results(run_dir: Path, doc: dict[str, Any]) -> Path:
    """Write ``results.json``, ``acc_matrix.csv``, ``til_acc_matrix.csv`` and ``<name>_matrix.csv`` per extra
    matrix into ``run_dir``."""
    write_matrix_csv(run_dir / "acc_matrix.csv", doc["acc_matrix"])
    write_matrix_csv(run_dir / "til_acc_matrix.csv", doc["til_acc_matrix"])
    for name, matrix in doc["extra_matrices"].items():
        write_matrix_csv(run_dir / f"{name}_matrix.csv", matrix)
    path = run_dir / RESULTS_FILE
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")
    return path
