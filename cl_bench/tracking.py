"""Experiment trackers behind one interface: ``logger=wandb`` (default, offline), ``csv``, ``tensorboard``,
``mlflow`` or ``none``.

What every tracker receives (:class:`Tracker`):

* after every task, on a ``task`` step axis (0-based index of the task just learned): each seen task's
  accuracy as its own scalar, ``acc/task_03`` (the scenario's accuracy), ``til_acc/task_03`` (task id given)
  and ``<name>/task_03`` for each extra matrix of the method (``task_selection_acc``, SAFE's learners...),
  plus the running aggregates under ``eval/`` (:func:`task_metrics`); W&B also gets the matrices so far
  as tables (``matrix/acc``...) and heatmap images (``heatmap/acc``...), TensorBoard and MLflow the
  heatmaps, so a crashed run keeps them;
* the epoch metrics that methods log (``train/loss``...) against a run-wide ``train/epoch`` counter;
* at the end, the final metrics (W&B run summary; ``final/*`` elsewhere), the status and the error if any.

The per-task Lightning ``Trainer`` gets no logger (``logger=False``): its step counter restarts with every
task and its ``finalize`` would close an MLflow run after the first task. The runner drives the chosen
Lightning logger (:class:`LightningTracker`) itself with run-wide steps instead.

Identity (W&B and MLflow): the run name is the method plus the command-line overrides whose value differs
from the preset (:func:`run_name`: ``seq_ft method.lr=0.1 seed=1``); the group is the benchmark protocol
(:func:`protocol`: dataset, scenario, split, backbone), the same in every sweep; a Hydra multirun's runs are
tagged ``sweep-<sweep folder>``, smoke runs ``smoke``. W&B starts in a background thread (importing wandb and
its service costs seconds): what is logged meanwhile is queued and sent once it is up.
"""

from __future__ import annotations

import logging
import os
import secrets
import string
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from cl_bench.config import LoggerBackend, LoggerMode
from cl_bench.metrics import mean_task_accuracy

log = logging.getLogger(__name__)

#: Metrics of ``results.json`` reported as the run's final values.
FINAL_METRICS = ("last_acc", "avg_inc_acc", "avg_forgetting", "bwt", "peak_mem_mb")
#: Group choices left out of a run's name: the preset and protocol themselves (the group names the
#: protocol), the method (the name's first word), and
#: where files go, how the run is tracked, launched, debugged or placed on devices.
NAME_SKIPPED_GROUPS = (
    "experiment",
    "protocol",
    "tuned",
    "method",
    "launcher",
    "sweep",
    "logger",
    "paths",
    "debug",
    "trainer",
)
#: Value keys (and their sub-keys) left out of a run's name, for the same reasons (``debug.*`` values stay:
#: a data subset changes the numbers).
NAME_SKIPPED_KEYS = (
    "paths",
    "logger",
    "hydra",
    "trainer",
    "resume",
    "quiet",
    "save_model",
    "save_checkpoints",
)
#: Trainer keys that change results (kept in the run's name although ``trainer.*`` is not).
NAME_KEPT_TRAINER_KEYS = (
    "trainer.precision",
    "trainer.max_epochs",
    "trainer.limit_train_batches",
    "trainer.gradient_clip_val",
    "trainer.gradient_clip_algorithm",
    "trainer.accumulate_grad_batches",
)


# ------------------------------------------------------------------------------------------------ identity


def protocol(cfg: DictConfig) -> str:
    """The benchmark protocol: ``dataset-scenario-split-backbone``, e.g. ``cifar100-cil-b50inc5-vit_b16``."""
    sc = cfg.scenario
    split = ""
    if sc.init_classes is not None:
        split += f"b{sc.init_classes}"
    if sc.increment is not None:
        split += f"inc{sc.increment}"
    if sc.increment is None and sc.n_tasks is not None:
        split += f"{sc.n_tasks}tasks"
    if sc.class_order is not None:
        split += f"-{len(sc.class_order)}classes"
    return f"{cfg.dataset.get('name')}-{sc.type}-{split}-{cfg.backbone.get('name')}"


def _skipped_key(key: str) -> bool:
    if key in NAME_KEPT_TRAINER_KEYS:
        return False
    return any(key == p or key.startswith((f"{p}.", f"{p}/")) for p in NAME_SKIPPED_KEYS)


def changed_overrides(cfg: DictConfig, overrides: Sequence[str]) -> list[str]:
    """The ``overrides`` (Hydra's, as typed) that name a run: not skipped (:data:`NAME_SKIPPED_GROUPS`,
    :data:`NAME_SKIPPED_KEYS`) and, for ``key=value`` overrides, whose value differs from the config composed
    without the value overrides (the preset). Group choices (``backbone=NAME``) are kept as they are."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cl_bench.cli import CONFIG_DIR

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    groups = [o for o in parsed if Path(CONFIG_DIR, o.key_or_group).is_dir()]
    values = [o for o in parsed if o not in groups and not _skipped_key(o.key_or_group)]
    baseline: DictConfig | None = None
    if values:
        try:
            from hydra import compose

            baseline = compose(config_name="config", overrides=[o.input_line for o in groups])
        except Exception as exc:  # no Hydra app around this run: every value override counts
            log.debug("could not compose the preset to name the run (%s)", exc)
    kept = [o.input_line for o in groups if o.key_or_group.split("/")[0] not in NAME_SKIPPED_GROUPS]
    for override in values:
        key = override.key_or_group
        if baseline is not None and not override.is_delete():
            mine = OmegaConf.select(cfg, key, default=None)
            preset = OmegaConf.select(baseline, key, default=None)
            if OmegaConf.is_config(mine):
                mine = OmegaConf.to_container(mine, resolve=True)
            if OmegaConf.is_config(preset):
                preset = OmegaConf.to_container(preset, resolve=True)
            if mine == preset:
                continue
        kept.append(override.input_line.lstrip("+"))
    return kept


def run_name(cfg: DictConfig) -> str:
    """The method, then the overrides of this run that differ from the preset (:func:`changed_overrides`)."""
    from hydra.core.hydra_config import HydraConfig

    name = str(cfg.method.get("name"))
    if not HydraConfig.initialized():
        return name
    return " ".join([name, *changed_overrides(cfg, HydraConfig.get().overrides.task)])


def sweep_tag() -> str | None:
    """``sweep-<sweep folder name>`` in a Hydra multirun, else ``None``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return f"sweep-{Path(HydraConfig.get().sweep.dir).name}"


@dataclass
class RunIdentity:
    """How a tracker names and files the run."""

    name: str
    group: str
    tags: list[str]


def run_identity(cfg: DictConfig) -> RunIdentity:
    """``logger.name``/``logger.group`` where set, else :func:`run_name`/:func:`protocol`; the tags plus the
    sweep tag and ``smoke``."""
    tags = [str(t) for t in cfg.logger.get("tags", [])]
    extra = [sweep_tag(), "smoke" if cfg.debug.smoke else None]
    tags += [t for t in extra if t is not None and t not in tags]
    return RunIdentity(
        name=cfg.logger.name or run_name(cfg), group=cfg.logger.group or protocol(cfg), tags=tags
    )


# ----------------------------------------------------------------------------------------------- metrics


def _task_key(j: int, n_tasks: int) -> str:
    return f"task_{j:0{max(2, len(str(n_tasks - 1)))}d}"


def matrices(doc: dict[str, Any]) -> dict[str, list[list[float | None]]]:
    """The run's per-task matrices by metric prefix: ``acc``, ``til_acc`` and each extra matrix (an empty one,
    DIL's ``til_acc``, is left out)."""
    found = {"acc": doc["acc_matrix"], "til_acc": doc["til_acc_matrix"], **doc["extra_matrices"]}
    return {prefix: matrix for prefix, matrix in found.items() if matrix}


def task_metrics(task: int, doc: dict[str, Any]) -> dict[str, float]:
    """The scalars logged after learning task ``task``, from the ``results.json`` document so far.

    ``<matrix>/task_NN``: the accuracy on each seen task NN; ``eval/acc_after_task`` (= ``last_acc``, weighted
    by test-set size), ``eval/avg_inc_acc``, ``eval/forgetting``, ``eval/bwt``; ``eval/task_acc`` (on the task
    just learned), ``eval/mean_task_acc`` and ``eval/til_mean_task_acc`` (unweighted over seen tasks), the
    mean over seen tasks of each extra matrix (``eval/task_selection_acc``), and ``eval/task_time_s``.
    """
    n_tasks = len(doc["acc_matrix"][0])
    out: dict[str, float] = {}
    for prefix, matrix in matrices(doc).items():
        row = matrix[task]
        out.update({f"{prefix}/{_task_key(j, n_tasks)}": float(row[j]) for j in range(task + 1)})
    aggregates = {
        "acc_after_task": doc["last_acc"],
        "avg_inc_acc": doc["avg_inc_acc"],
        "forgetting": doc["avg_forgetting"],
        "bwt": doc["bwt"],
        "task_acc": doc["acc_matrix"][task][task],
        "mean_task_acc": mean_task_accuracy(doc["acc_matrix"], task),
        "til_mean_task_acc": mean_task_accuracy(doc["til_acc_matrix"], task)
        if doc["til_acc_matrix"]
        else None,
        **{name: mean_task_accuracy(m, task) for name, m in doc["extra_matrices"].items()},
        "task_time_s": doc["task_time_s"][task] if task < len(doc["task_time_s"]) else None,
    }
    out.update({f"eval/{k}": float(v) for k, v in aggregates.items() if v is not None})
    return out


def square(matrix: Sequence[Sequence[float | None]]) -> list[list[float | None]]:
    """The matrix padded with empty rows to ``n_tasks x n_tasks`` (the tasks not learned yet)."""
    n = len(matrix[0]) if matrix else 0
    return [list(row) for row in matrix] + [[None] * n for _ in range(n - len(matrix))]


def _heatmaps(doc: dict[str, Any], task: int, draw: Callable[[str, Any], None]) -> None:
    """Draw each matrix after ``task`` as a heatmap figure and hand it to ``draw(name, figure)``."""
    import matplotlib.pyplot as plt

    from cl_bench.figures import matrix_figure

    for name, matrix in matrices(doc).items():
        fig = matrix_figure(square(matrix), f"{name} after task {task}")
        try:
            draw(name, fig)
        finally:
            plt.close(fig)


# ----------------------------------------------------------------------------------------------- trackers


class Tracker:
    """The interface the runner uses; this base class tracks nothing (``logger=none``).

    A tracker that fails (a full disk, an unreachable server) costs a warning, never the experiment.
    """

    #: The tracker's run id, stored in checkpoints so that a resumed experiment continues the same run.
    run_id: str | None = None
    #: Epochs logged so far in this run (a resumed run restores it): the ``train/epoch`` step.
    epochs_logged: int = 0
    _failed: bool = False

    def log_train_epoch(self, metrics: dict[str, float]) -> None:
        """One epoch's ``train/*`` metrics (with ``train/task``; :class:`cl_bench.learning.EpochLossLogger`
        sends them), numbered by the run-wide ``train/epoch``."""
        self._safely(self._log_epoch, {**metrics, "train/epoch": float(self.epochs_logged)})
        self.epochs_logged += 1

    def log_task(self, task: int, doc: dict[str, Any]) -> None:
        """After task ``task`` was learned and evaluated: ``doc`` is the ``results.json`` document so far."""
        self._safely(self._log_task, task, doc)

    def finish(self, doc: dict[str, Any], status: str, error: str | None = None) -> None:
        """Close the run with the final metrics of ``doc``, its status and the error that stopped it."""
        self._safely(self._finish, doc, status, error)

    def _safely(self, action: Callable[..., None], *args: Any) -> None:
        try:
            action(*args)
        except Exception as exc:
            if not self._failed:
                log.warning(
                    "%s could not log (%s: %s); the run goes on, its results.json is complete",
                    type(self).__name__,
                    type(exc).__name__,
                    exc,
                )
            self._failed = True

    def _log_epoch(self, metrics: dict[str, float]) -> None:
        """Send one epoch's metrics (with ``train/epoch``)."""

    def _log_task(self, task: int, doc: dict[str, Any]) -> None:
        """Send the metrics after task ``task``."""

    def _finish(self, doc: dict[str, Any], status: str, error: str | None) -> None:
        """Send the final metrics and close the run."""


def _new_wandb_id() -> str:
    """An id in W&B's format (8 lowercase letters and digits), chosen here so it is known before W&B is up."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbTracker(Tracker):
    """Weights & Biases (``logger.mode``: offline, online or disabled), started in a background thread.

    If W&B cannot start, the run goes on without it after a warning. ``run_id``: continue that W&B run (a
    resumed experiment), else start a new one with a fresh id.
    """

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        config: dict[str, Any],
        identity: RunIdentity,
        run_id: str | None = None,
    ) -> None:
        self.run_id = run_id or _new_wandb_id()
        self._run: Any = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._queue: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
        self._defined: set[str] = set()
        os.environ.setdefault("WANDB_SILENT", "true")
        kwargs = {
            "id": self.run_id,
            "resume": "allow" if run_id else None,
            "mode": str(cfg.mode),
            "dir": str(run_dir),
            "project": cfg.project,
            "entity": cfg.entity,
            "group": identity.group,
            "name": identity.name,
            "job_type": cfg.job_type,
            "tags": identity.tags,
            "config": config,
        }
        self._thread = threading.Thread(target=self._start, args=(kwargs,), name="wandb-start", daemon=True)
        self._thread.start()

    def _start(self, kwargs: dict[str, Any]) -> None:
        run = None
        try:
            import wandb

            # console capture off: the run's log is the Hydra log file in the run folder
            settings = wandb.Settings(console="off")
            run = wandb.init(**kwargs, settings=settings, reinit="finish_previous")
            run.define_metric("task")
            run.define_metric("train/epoch")
            run.define_metric("train/*", step_metric="train/epoch")
        except Exception as exc:  # a broken W&B set-up must not cost the experiment
            log.warning("W&B could not start (%s); continuing without it (logger.mode=disabled)", exc)
            run = None
        with self._lock:
            self._run = run
            self._ready.set()
            queued, self._queue = self._queue, []
            for data, doc in queued:
                self._safely(self._send, data, doc)

    def _send(self, data: dict[str, Any], doc: dict[str, Any] | None) -> None:
        """Log ``data`` (plus, with ``doc``, the matrices as tables and heatmaps); the lock is held."""
        if self._run is None:
            return
        if doc is not None:
            import wandb

            task = int(data["task"])
            for prefix in {k.split("/")[0] for k in data if "/" in k} | {"matrix", "heatmap"}:
                if prefix not in self._defined and prefix != "train":
                    self._run.define_metric(f"{prefix}/*", step_metric="task")
                    self._defined.add(prefix)
            for name, matrix in matrices(doc).items():
                n = len(matrix[0]) if matrix else 0
                columns = ["after_task", *(_task_key(j, n) for j in range(n))]
                data[f"matrix/{name}"] = wandb.Table(
                    columns=columns, data=[[t, *row] for t, row in enumerate(matrix[: task + 1])]
                )

            def draw(name: str, fig: Any) -> None:
                data[f"heatmap/{name}"] = wandb.Image(fig)

            _heatmaps(doc, task, draw)
        self._run.log(data)

    def _log(self, data: dict[str, Any], doc: dict[str, Any] | None = None) -> None:
        with self._lock:
            if self._ready.is_set():
                self._send(data, doc)
            else:
                self._queue.append((data, doc))

    def _log_epoch(self, metrics: dict[str, float]) -> None:
        self._log(metrics)

    def _log_task(self, task: int, doc: dict[str, Any]) -> None:
        self._log({"task": task, **task_metrics(task, doc)}, doc)

    def _finish(self, doc: dict[str, Any], status: str, error: str | None) -> None:
        """Wait for W&B to be up, send what is queued, store the final metrics and close the run."""
        self._thread.join()
        with self._lock:
            if self._run is None:
                return
            for key in FINAL_METRICS:
                self._run.summary[key] = doc[key]
            self._run.summary["status"] = status
            if error:
                self._run.summary["error"] = error
            self._run.finish(exit_code=0 if status == "complete" else 1)
            self._run = None


class LightningTracker(Tracker):
    """One of Lightning's loggers (CSV, TensorBoard, MLflow), driven with run-wide steps: ``task`` for the
    per-task metrics, ``train/epoch`` for the epoch metrics."""

    def __init__(self, logger: Any, config: dict[str, Any], run_id: str | None = None) -> None:
        self.logger = logger
        self.logger.log_hyperparams(config)
        self.run_id = run_id or getattr(logger, "run_id", None)

    def _log_epoch(self, metrics: dict[str, float]) -> None:
        self.logger.log_metrics(metrics, step=int(metrics["train/epoch"]))

    def _log_task(self, task: int, doc: dict[str, Any]) -> None:
        self.logger.log_metrics({"task": float(task), **task_metrics(task, doc)}, step=task)
        self._log_heatmaps(task, doc)
        self.logger.save()

    def _log_heatmaps(self, task: int, doc: dict[str, Any]) -> None:
        from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger

        if isinstance(self.logger, TensorBoardLogger):
            writer = self.logger.experiment
            _heatmaps(
                doc, task, lambda name, fig: writer.add_figure(f"heatmap/{name}", fig, task, close=False)
            )
        elif isinstance(self.logger, MLFlowLogger):
            client, run_id = self.logger.experiment, self.logger.run_id
            _heatmaps(
                doc,
                task,
                lambda name, fig: client.log_figure(run_id, fig, f"heatmap/{name}_task_{task:02d}.png"),
            )

    def _finish(self, doc: dict[str, Any], status: str, error: str | None) -> None:
        from pytorch_lightning.loggers import MLFlowLogger

        final = {f"final/{k}": float(doc[k]) for k in FINAL_METRICS if doc[k] is not None}
        if final:
            self.logger.log_metrics(final, step=max(len(doc["acc_matrix"]) - 1, 0))
        if isinstance(self.logger, MLFlowLogger):
            client, run_id = self.logger.experiment, self.logger.run_id
            client.set_tag(run_id, "status", status)
            if error:
                client.set_tag(run_id, "error", error[:5000])
        self.logger.finalize("success" if status == "complete" else "failed")


def lightning_logger(
    cfg: DictConfig, run_dir: Path, identity: RunIdentity, run_id: str | None
) -> pl.loggers.Logger:
    """Lightning's CSV, TensorBoard or MLflow logger for ``cfg`` (a ``LoggerConfig``)."""
    backend = LoggerBackend(cfg.backend)
    if backend == LoggerBackend.csv:
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=cfg.save_dir or str(run_dir / "csv"), name="")
    if backend == LoggerBackend.tensorboard:
        from pytorch_lightning.loggers import TensorBoardLogger

        return TensorBoardLogger(
            save_dir=cfg.save_dir or str(run_dir / "tensorboard"), name="", default_hp_metric=False
        )
    from pytorch_lightning.loggers import MLFlowLogger

    uri = cfg.tracking_uri
    if uri is None or uri.startswith("file:") or "://" not in uri:  # a local file store (save_dir, or a
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # path): MLflow 3.x needs this switch
    return MLFlowLogger(
        experiment_name=cfg.project,
        run_name=identity.name,
        tracking_uri=cfg.tracking_uri,
        save_dir=cfg.save_dir or str(run_dir / "mlruns"),
        tags={"group": identity.group, **{tag: "true" for tag in identity.tags}},
        run_id=run_id,
    )


def build_tracker(
    cfg: DictConfig, run_dir: Path, config: dict[str, Any], run_id: str | None = None, enabled: bool = True
) -> Tracker:
    """The tracker that ``cfg.logger`` selects (``cfg``: the run config). ``enabled=False`` (DDP processes
    other than rank 0) or ``logger.mode=disabled`` with W&B: no tracker. ``run_id``: continue that run."""
    backend = LoggerBackend(cfg.logger.backend)
    if not enabled or backend == LoggerBackend.none:
        return Tracker()
    if backend == LoggerBackend.wandb and LoggerMode(cfg.logger.mode) == LoggerMode.disabled:
        return Tracker()
    identity = run_identity(cfg)
    if backend == LoggerBackend.wandb:
        return WandbTracker(cfg.logger, run_dir, config, identity, run_id)
    try:
        logger = lightning_logger(cfg.logger, run_dir, identity, run_id)
    except ModuleNotFoundError as exc:
        from cl_bench.errors import ConfigError

        raise ConfigError(
            f"logger={backend}: {exc}. Install it (pip install -e '.[dev]' brings tensorboardX and "
            "mlflow-skinny) or choose another logger=wandb|csv|tensorboard|mlflow|none"
        ) from exc
    return LightningTracker(logger, config, run_id)
