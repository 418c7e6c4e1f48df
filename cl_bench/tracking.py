"""Weights & Biases logging: offline by default (no account needed), ``online`` or ``disabled`` by config.

One W&B run per experiment run: ``group`` gathers a sweep's runs (in a Hydra multirun it is the sweep
folder's name, see :func:`wandb_group`), ``job_type`` is the method, and
``dataset``, ``method``, ``backbone``, ``seed`` and ``order_seed`` are top-level config fields so runs can be
filtered on a dashboard. Per-task metrics use ``task`` as their x-axis (``eval/*``), training losses a
global epoch counter (``train/*`` against ``train/epoch``); the accuracy matrix is logged as a table and the
final metrics go to the run summary. Offline runs live in ``RUN_DIR/wandb/`` and upload with
``wandb sync RUN_DIR/wandb/offline-run-*``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cl_bench.config import LoggerConfig, LoggerMode

log = logging.getLogger(__name__)


def wandb_group(group: str | None) -> str | None:
    """The W&B group: ``logger.group``, except in a Hydra multirun, where every run of the sweep gets the
    sweep folder's name (``sweep-<hydra.sweep.dir name>``) unless ``logger.group=`` is on the command line."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return group
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or any(
        override.startswith("logger.group=") for override in hydra_cfg.overrides.task
    ):
        return group
    return f"sweep-{Path(hydra_cfg.sweep.dir).name}"


class WandbTracker:
    """Thin wrapper over ``wandb``. If W&B cannot start, the run goes on without it after a warning."""

    def __init__(
        self, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], run_id: str | None = None
    ) -> None:
        """``run_id``: continue that W&B run (a resumed experiment), else start a new one."""
        self.mode = LoggerMode(cfg.mode)
        self.run: Any = None
        self._epoch = 0
        if self.mode == LoggerMode.disabled:
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            self.run = self._init(wandb, cfg, run_dir, config, run_id)
        except Exception as exc:  # a broken W&B set-up must not cost the experiment
            log.warning("W&B could not start (%s); continuing without it (logger.mode=disabled)", exc)

    def _init(
        self, wandb: Any, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], run_id: str | None
    ) -> Any:
        run = wandb.init(
            id=run_id,
            resume="allow" if run_id else None,
            mode=self.mode.value,
            dir=str(run_dir),
            project=cfg.project,
            entity=cfg.entity,
            group=wandb_group(cfg.group),
            name=cfg.name,
            job_type=cfg.job_type,
            tags=list(cfg.tags),
            config=config,
            reinit="finish_previous",
        )
        run.define_metric("task")
        run.define_metric("eval/*", step_metric="task")
        run.define_metric("train/epoch")
        run.define_metric("train/*", step_metric="train/epoch")
        return run

    @property
    def run_id(self) -> str | None:
        """The W&B run id (``None`` without W&B)."""
        return None if self.run is None else self.run.id

    def log_train_epoch(self, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log({**metrics, "train/epoch": self._epoch})
            self._epoch += 1

    def log_task(self, task: int, metrics: dict[str, float | None]) -> None:
        if self.run is not None:
            self.run.log({"task": task, **{f"eval/{k}": v for k, v in metrics.items() if v is not None}})

    def finish(
        self, summary: dict[str, Any], acc_matrix: Sequence[Sequence[float | None]], status: str
    ) -> None:
        """Store the accuracy matrix as a table and the final metrics in the summary, then close the run."""
        if self.run is None:
            return
        import wandb

        columns = ["after_task", *(f"task_{j}" for j in range(len(acc_matrix[0]) if acc_matrix else 0))]
        self.run.log(
            {"acc_matrix": wandb.Table(columns=columns, data=[[t, *row] for t, row in enumerate(acc_matrix)])}
        )
        for key, value in summary.items():
            self.run.summary[key] = value
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "complete" else 1)
        self.run = None
