"""One continual experiment: build it from the config, then learn and evaluate the tasks in order.

After each task the method is evaluated on every seen task's test set and ``results.json`` is rewritten
(``status: incomplete``), so an error or a kill never loses the finished tasks; ``checkpoint.pt`` then lets
the same command resume at the next task (:mod:`cl_bench.checkpointing`).

The pieces live in their own modules: :mod:`cl_bench.experiment` builds the experiment,
:mod:`cl_bench.run_folder` owns the run folder (resume lookup, environment facts, final model),
:mod:`cl_bench.learning` learns one task (its phases, one Lightning fit each), :mod:`cl_bench.devices` holds
the device, precision and memory helpers.

Under DDP (``trainer=ddp``) every process runs this loop; only rank 0 writes files and logs to W&B
(:mod:`cl_bench.distributed`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from cl_bench import debug, distributed
from cl_bench.checkpointing import (
    CHECKPOINT_FILE,
    RunCheckpoint,
    acquire_lock,
    load_checkpoint,
    release_lock,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cl_bench.config import validate_config
from cl_bench.devices import peak_memory_mb
from cl_bench.errors import ConfigError
from cl_bench.evaluation import EvaluationRows
from cl_bench.experiment import Experiment, build_experiment, tracker_config
from cl_bench.learning import learn_task
from cl_bench.methods.base import ContinualModule
from cl_bench.progress import RunProgress
from cl_bench.results import RESULTS_FILE, build_results, write_results
from cl_bench.run_folder import (
    FINAL_MODEL_FILE,
    check_fresh,
    resolve_run_dir,
    resume_folder,
    save_model,
    write_config,
    write_environment,
)
from cl_bench.tracking import Tracker, build_tracker

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """What the run has produced so far."""

    acc_rows: list[list[float]] = field(default_factory=list)
    til_rows: list[list[float]] = field(default_factory=list)
    #: Per-task metrics beyond accuracy that the method reports (``task_selection_acc``), rows by name.
    extra_rows: dict[str, list[list[float]]] = field(default_factory=dict)
    task_time_s: list[float] = field(default_factory=list)

    def record(self, rows: EvaluationRows, task_incremental: bool) -> None:
        """Append one evaluation's rows."""
        self.acc_rows.append(rows.til if task_incremental else rows.cil)
        self.til_rows.append(rows.til)
        for name, row in rows.extra.items():
            self.extra_rows.setdefault(name, []).append(row)


def check_process_layout(cfg: DictConfig) -> None:
    """Refuse several processes per run inside a local ``-m`` sweep: Lightning would relaunch the whole
    command, sweep included, for every extra process."""
    devices = cfg.trainer.devices
    n_devices = len(devices) if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices) else devices
    if not (isinstance(n_devices, int) and n_devices * cfg.trainer.num_nodes > 1):
        return
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        if not distributed.launched_externally():
            raise ConfigError(
                f"trainer.devices={devices} in a local -m sweep: Lightning would start every extra process "
                "by rerunning the whole sweep. Run each experiment on its own (no -m), or submit the sweep "
                "with launcher=slurm and hydra.launcher.tasks_per_node equal to trainer.devices."
            )


def run_experiment(cfg: DictConfig) -> dict[str, Any]:
    """Run the continual experiment described by ``cfg``; return the final ``results.json`` document."""
    validate_config(cfg)
    debug.check_options(cfg)
    check_process_layout(cfg)
    if not distributed.is_main_process():
        return _follow(cfg)
    run_dir = resolve_run_dir(cfg)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(config, dict)
    resumed = resume_folder(cfg, run_dir, config)
    if resumed is not None:
        if resumed != run_dir:
            log.info(
                "resuming the interrupted run in %s (this command's folder %s stays unused)", resumed, run_dir
            )
        run_dir = resumed
    else:
        check_fresh(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    acquire_lock(run_dir)
    # the processes Lightning starts at the first fit inherit these and follow this run
    os.environ[distributed.RUN_DIR_VARIABLE] = str(run_dir.resolve())
    os.environ[distributed.RESUMED_VARIABLE] = str(int(resumed is not None))
    try:
        return _run(cfg, run_dir, config, resumed is not None)
    finally:
        os.environ.pop(distributed.RUN_DIR_VARIABLE, None)
        os.environ.pop(distributed.RESUMED_VARIABLE, None)
        release_lock(run_dir)


def _follow(cfg: DictConfig) -> dict[str, Any]:
    """A DDP process of rank > 0: the same experiment as rank 0, in rank 0's run folder, writing nothing."""
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(config, dict)
    if distributed.RUN_DIR_VARIABLE in os.environ:  # started by rank 0 (Lightning's launcher)
        run_dir = Path(os.environ[distributed.RUN_DIR_VARIABLE])
        resume = os.environ.get(distributed.RESUMED_VARIABLE) == "1"
    else:  # started beside rank 0 (SLURM, torchrun): make rank 0's choice from the same files
        run_dir = resolve_run_dir(cfg)
        resumed = resume_folder(cfg, run_dir, config, ignore_lock=True)
        run_dir, resume = (resumed, True) if resumed is not None else (run_dir, False)
    log.info("DDP process of rank %d follows the run in %s", distributed.launch_rank(), run_dir)
    logging.getLogger("cl_bench").setLevel(logging.WARNING)  # rank 0 reports progress
    return _run(cfg, run_dir, config, resume)


def _run(cfg: DictConfig, run_dir: Path, config: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The continual loop: learn each task, evaluate every seen task, write the results, checkpoint."""
    main = distributed.is_main_process()
    if main and not resume:
        write_config(run_dir, config)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    exp = build_experiment(cfg)
    if main:
        write_environment(run_dir, exp.device)
    method, state, run_id = exp.method, RunState(), None
    if resume:
        checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILE, exp.external, exp.device)
        method, state, run_id = checkpoint.method, checkpoint.state, checkpoint.wandb_id
        set_rng_state(checkpoint.rng)
        log.info("resuming after task %d of %d", checkpoint.tasks_done, len(exp.scenario.tasks))
    log_start(cfg, exp, run_dir)
    tracker = build_tracker(cfg, run_dir, tracker_config(cfg, config), run_id=run_id, enabled=main)
    progress = RunProgress.for_run(cfg, [len(s) for s in exp.train_sets], enabled=main)
    tasks = exp.scenario.tasks

    def document(status: str, error: str | None = None) -> dict[str, Any]:
        return build_results(
            state.acc_rows,
            state.til_rows,
            exp.evaluator.task_sizes,
            exp.scenario.class_order,
            state.task_time_s[: len(state.acc_rows)],
            peak_memory_mb(exp.device),
            status,
            config,
            state.extra_rows,
            error,
        )

    status, error = "incomplete", None
    try:
        for task in tasks[len(state.acc_rows) :]:
            ctx = exp.task_context(task)
            start = time.perf_counter()
            seconds = learn_task(
                method,
                ctx,
                exp.trainer,
                exp.device,
                run_dir,
                tracker.log_train_epoch,
                [progress.callback(task.index)],
            )
            state.task_time_s.append(seconds)
            rows = exp.evaluator.evaluate_rows(method, task.index)
            state.record(rows, exp.scenario.task_incremental)
            doc = document("incomplete")
            if main:
                write_results(run_dir, doc)
            log_task(tracker, doc, task.index, len(tasks), seconds)
            progress.task_done(task.index, time.perf_counter() - start)
            if main and cfg.save_checkpoints and task.index + 1 < len(tasks):
                checkpoint_run(run_dir, method, state, tracker, config, exp.external)
        if main and cfg.save_model:
            save_model(run_dir / FINAL_MODEL_FILE, method, exp.scenario, config)
        status = "complete"
        if main:
            (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    except BaseException as exc:
        error = type(exc).__name__ + (f": {exc}" if str(exc) else "")
        raise
    finally:
        progress.close()
        doc = document(status, error)
        if main:
            write_results(run_dir, doc)
        if main and status != "complete":
            log.error(
                "run stopped after %d finished task(s); their results are in %s",
                len(state.acc_rows),
                run_dir / RESULTS_FILE,
            )
        tracker.finish(doc, status, error)
    return doc


def log_start(cfg: DictConfig, exp: Experiment, run_dir: Path) -> None:
    scenario = exp.scenario
    log.info(
        "%s | %s | %s | %d classes in %d tasks (%s), order seed %s | run folder %s",
        exp.data.name,
        cfg.backbone.get("name"),
        cfg.method.get("name"),
        scenario.num_classes,
        len(scenario.tasks),
        scenario.type.value,
        cfg.scenario.order_seed,
        run_dir,
    )


def log_task(tracker: Tracker, doc: dict[str, Any], task: int, n_tasks: int, seconds: float) -> None:
    """The console line and the tracker's metrics after task ``task``."""
    task_acc = doc["acc_matrix"][-1][task]
    log.info(
        "task %d/%d: acc on this task %.2f, on all seen tasks %.2f, %.1fs",
        task + 1,
        n_tasks,
        task_acc,
        doc["last_acc"],
        seconds,
    )
    tracker.log_task(task, doc)


def checkpoint_run(
    run_dir: Path,
    method: ContinualModule,
    state: RunState,
    tracker: Tracker,
    config: dict[str, Any],
    external: dict[str, Any],
) -> None:
    """Write ``checkpoint.pt`` for the tasks finished so far (a failure costs resumability, not the run)."""
    checkpoint = RunCheckpoint(
        tasks_done=len(state.acc_rows),
        method=method,
        state=state,
        rng=rng_state(),
        wandb_id=tracker.run_id,
        config=config,
    )
    try:
        save_checkpoint(run_dir / CHECKPOINT_FILE, checkpoint, external)
    except Exception as exc:  # e.g. an unpicklable attribute of a new method
        log.error(
            "could not write %s (%s: %s); this run cannot resume if interrupted",
            run_dir / CHECKPOINT_FILE,
            type(exc).__name__,
            exc,
        )
