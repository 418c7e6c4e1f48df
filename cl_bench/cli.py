"""``cl-bench``: the Hydra entry point. ``cl-bench --help`` lists the config groups and their options."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

import cl_bench.config  # noqa: F401  (registers the schemas with Hydra's ConfigStore)
from cl_bench import distributed
from cl_bench.errors import ClBenchError

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")
log = logging.getLogger("cl_bench")


def format_report(doc: dict[str, Any], run_dir: str) -> str:
    """A plain-text table of the accuracy matrix and the final metrics."""
    matrix = doc["acc_matrix"]
    n = len(matrix[0]) if matrix else 0
    lines = [
        "",
        "accuracy (%) on task j (columns) after task t (rows):",
        "t\\j " + "".join(f"{j:>8d}" for j in range(n)),
    ]
    for t, row in enumerate(matrix):
        lines.append(f"{t:>3d} " + "".join(f"{'':>8s}" if v is None else f"{v:8.2f}" for v in row))

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    lines += [
        "",
        f"last accuracy          {fmt(doc['last_acc'])}",
        f"avg incremental acc    {fmt(doc['avg_inc_acc'])}",
        f"avg forgetting         {fmt(doc['avg_forgetting'])}",
        f"backward transfer      {fmt(doc['bwt'])}",
        f"time per task (s)      {' '.join(f'{t:.1f}' for t in doc['task_time_s'])}",
        f"peak memory (MB)       {doc['peak_mem_mb']:.0f}",
        f"run folder             {run_dir}",
    ]
    return "\n".join(lines)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from cl_bench.runner import resolve_run_dir, run_experiment

    try:
        doc = run_experiment(cfg)
    except ClBenchError as exc:
        log.error("%s", exc)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweep goes on with its other jobs and reports this one as failed
        print(f"cl-bench: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if distributed.is_main_process():
        print(format_report(doc, str(doc["config"]["paths"]["run_dir"] or resolve_run_dir(cfg))))
    return doc
