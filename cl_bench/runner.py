"""One continual experiment: build it from the config, then learn and evaluate the tasks in order.

After each task the method is evaluated on every seen task's test set and ``results.json`` is rewritten
(``status: incomplete``), so an error or a kill never loses the finished tasks; a checkpoint then lets the
same command resume at the next task (:mod:`cl_bench.checkpointing`). The run folder is locked from the start
(:mod:`cl_bench.locking`); SIGTERM/SIGUSR1 stop the run gracefully (:mod:`cl_bench.signals`).

The pieces live in their own modules: :mod:`cl_bench.experiment` builds the experiment,
:mod:`cl_bench.run_folder` owns the run folder (resume or start, lock, environment facts),
:mod:`cl_bench.learning` learns one task (its phases, one Lightning fit each), :mod:`cl_bench.devices` holds
the device, precision and memory helpers.

Under DDP (``trainer=ddp``) every process runs this loop; only rank 0 writes files and logs to W&B
(:mod:`cl_bench.distributed`).
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from cl_bench import debug, distributed, signals
from cl_bench.checkpointing import (
    FORMAT,
    CorruptCheckpoint,
    config_hash,
    remove_checkpoints,
    rng_state,
    save_checkpoint,
    set_aside,
    set_rng_state,
)
from cl_bench.config import validate_config
from cl_bench.devices import peak_memory_mb
from cl_bench.errors import ConfigError, StorageError
from cl_bench.evaluation import EvaluationRows
from cl_bench.experiment import Experiment, build_experiment, tracker_config
from cl_bench.learning import learn_task
from cl_bench.methods.base import ContinualModule
from cl_bench.progress import RunProgress
from cl_bench.results import RESULTS_FILE, build_results, write_results
from cl_bench.run_folder import (
    claim_run_folder,
    follower_folder,
    resolve_run_dir,
    unregister,
    write_config,
    write_environment,
)
from cl_bench.saved_model import MODEL_FILE, save_model
from cl_bench.tracking import Tracker, build_tracker
from cl_bench.validation import validate_numbers

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """What the run has produced so far."""

    acc_rows: list[list[float]] = field(default_factory=list)
    til_rows: list[list[float]] = field(default_factory=list)
    #: Per-task metrics beyond accuracy that the method reports (``task_selection_acc``), rows by name.
    extra_rows: dict[str, list[list[float]]] = field(default_factory=dict)
    task_time_s: list[float] = field(default_factory=list)
    #: Training epochs logged to the tracker (its run-wide ``train/epoch`` step), so that a resumed run's
    #: epochs continue the interrupted run's axis instead of restarting at 0.
    epochs_logged: int = 0

    def record(self, rows: EvaluationRows, task_incremental: bool) -> None:
        """Append one evaluation's rows (no task-incremental row where there is none: DIL)."""
        self.acc_rows.append(rows.til if task_incremental else rows.cil)
        if rows.til:
            self.til_rows.append(rows.til)
        for name, row in rows.extra.items():
            self.extra_rows.setdefault(name, []).append(row)


#: A W&B run id as :class:`~cl_bench.tracking.WandbTracker` makes them (a checkpoint's is untrusted input).
_WANDB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def restored_state(checkpoint: dict[str, Any], n_tasks: int) -> RunState:
    """The checkpoint's :class:`RunState`, checked against its ``tasks_done`` and the run's task count (a
    checkpoint is untrusted input); ``ValueError``/``TypeError`` name what does not fit."""
    state = RunState(**checkpoint["run_state"])
    done = checkpoint["tasks_done"]
    if not (isinstance(done, int) and 1 <= done < n_tasks):
        raise ValueError(f"tasks_done={done!r} for a run of {n_tasks} tasks")
    rows = {"acc_rows": state.acc_rows, "task_time_s": state.task_time_s}
    if state.til_rows:
        rows["til_rows"] = state.til_rows
    for name, value in rows.items():
        if not isinstance(value, list) or len(value) != done:
            raise ValueError(f"run_state.{name} does not hold {done} rows")
    for name, value in state.extra_rows.items():  # a metric some evaluations lacked has fewer rows
        if not isinstance(value, list) or len(value) > done:
            raise ValueError(f"run_state.extra_rows[{name!r}] holds more than {done} rows")
    for row in [*state.acc_rows, *state.til_rows, *(r for v in state.extra_rows.values() for r in v)]:
        if not (isinstance(row, list) and all(isinstance(v, (int, float)) for v in row)):
            raise TypeError("a results row is not a list of numbers")
    run_id = checkpoint["wandb_id"]
    if run_id is not None and not (isinstance(run_id, str) and _WANDB_ID.fullmatch(run_id)):
        raise ValueError(f"wandb_id {str(run_id)[:80]!r} is not a W&B run id")
    return state


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
    cfg = debug.cap_method(cfg)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(config, dict)
    validate_numbers(config)
    check_process_layout(cfg)
    with signals.handling():
        if not distributed.is_main_process():
            return _follow(cfg, config)
        claim = claim_run_folder(cfg, resolve_run_dir(cfg), config)  # the folder's lock is held from here
        run_dir = claim.run_dir
        config["paths"]["run_dir"] = str(run_dir)  # the folder the results are in (resumed: the earlier one)
        # the processes Lightning starts at the first fit inherit these and follow this run
        os.environ[distributed.RUN_DIR_VARIABLE] = str(run_dir.resolve())
        os.environ[distributed.RESUMED_VARIABLE] = str(int(claim.checkpoint is not None))
        try:
            try:
                doc = _run(cfg, run_dir, config, claim.checkpoint)
            except CorruptCheckpoint as exc:  # the checkpoint does not fit this method: start over
                set_aside(run_dir, str(exc))
                os.environ[distributed.RESUMED_VARIABLE] = "0"
                doc = _run(cfg, run_dir, config, None)
            if doc["status"] == "complete":
                with signals.deferred():
                    unregister(cfg, config, run_dir)
            return doc
        finally:
            os.environ.pop(distributed.RUN_DIR_VARIABLE, None)
            os.environ.pop(distributed.RESUMED_VARIABLE, None)
            with signals.deferred():
                claim.release()


def _follow(cfg: DictConfig, config: dict[str, Any]) -> dict[str, Any]:
    """A DDP process of rank > 0: the same experiment as rank 0, in rank 0's run folder, writing nothing."""
    from cl_bench.devices import select_device

    device = select_device(cfg.trainer.accelerator)
    if distributed.RUN_DIR_VARIABLE in os.environ:  # started by rank 0 (Lightning's launcher)
        run_dir = Path(os.environ[distributed.RUN_DIR_VARIABLE])
        resumed: bool | None = os.environ.get(distributed.RESUMED_VARIABLE) == "1"
    else:  # started beside rank 0 (SLURM, torchrun): make rank 0's choice from the same files
        run_dir, resumed = resolve_run_dir(cfg), None
    run_dir, checkpoint = follower_folder(cfg, run_dir, config, resumed, device)
    config["paths"]["run_dir"] = str(run_dir)
    log.info("DDP process of rank %d follows the run in %s", distributed.launch_rank(), run_dir)
    logging.getLogger("cl_bench").setLevel(logging.WARNING)  # rank 0 reports progress
    return _run(cfg, run_dir, config, checkpoint)


def _run(
    cfg: DictConfig, run_dir: Path, config: dict[str, Any], checkpoint: dict[str, Any] | None
) -> dict[str, Any]:
    """The continual loop: learn each task, evaluate every seen task, write the results, checkpoint."""
    main = distributed.is_main_process()
    if main and checkpoint is None:
        write_config(run_dir, config)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    exp = build_experiment(cfg)
    if main:
        write_environment(run_dir, exp.device)
    method, state, run_id = exp.method, RunState(), None
    if checkpoint is not None:  # the freshly built method takes the saved state
        try:
            method.load_method_state(checkpoint["method"])
            state = restored_state(checkpoint, len(exp.scenario.tasks))
            set_rng_state(checkpoint["rng"])
        except (KeyError, RuntimeError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise CorruptCheckpoint(
                f"the checkpoint in {run_dir} does not fit this method ({type(exc).__name__}: {exc})"
            ) from exc
        method.to(exp.device)
        run_id = checkpoint["wandb_id"]
        log.info("resuming after task %d of %d", checkpoint["tasks_done"], len(exp.scenario.tasks))
    log_start(cfg, exp, run_dir)
    tracker = build_tracker(cfg, run_dir, tracker_config(cfg, config), run_id=run_id, enabled=main)
    tracker.epochs_logged = state.epochs_logged
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
            log_task(tracker, doc, task.index, len(tasks), seconds, exp.scenario.domain_incremental)
            progress.task_done(task.index, time.perf_counter() - start)
            if main and cfg.save_checkpoints and task.index + 1 < len(tasks):
                checkpoint_run(run_dir, method, state, tracker, config)
        status = "complete"  # every row is in: nothing after this downgrades the results
        if main:
            # the run is done (no checkpoint left to resume): a stop signal from here on lets it finish
            with signals.deferred():
                write_results(run_dir, document(status))
                remove_checkpoints(run_dir)
                if cfg.save_model:
                    boundaries = [[t.start, t.stop] for t in tasks]
                    save_model(
                        run_dir / MODEL_FILE, method, list(exp.scenario.class_order), boundaries, config
                    )
    except BaseException as exc:
        stop = signals.stop_from(exc)
        error = f"stopped by {stop.name}" if stop else type(exc).__name__ + (f": {exc}" if str(exc) else "")
        if main and stop is not None:
            log.error(
                "stopped by %s after %d of %d task(s); results in %s; the same command resumes the run",
                stop.name,
                len(state.acc_rows),
                len(tasks),
                run_dir / RESULTS_FILE,
            )
        raise
    finally:
        with signals.deferred():
            progress.close()
            doc = document(status, error)
            if main:
                try:
                    write_results(run_dir, doc)
                except (OSError, StorageError) as exc:  # a full disk: the last results.json stays whole
                    log.error("could not write %s (%s)", run_dir / RESULTS_FILE, exc)
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


def log_task(
    tracker: Tracker, doc: dict[str, Any], task: int, n_tasks: int, seconds: float, domains: bool = False
) -> None:
    """The console line and the tracker's metrics after task ``task`` (``domains``: DIL, whose accuracy
    covers every domain)."""
    task_acc = doc["acc_matrix"][-1][task]
    log.info(
        "task %d/%d: acc on this task %.2f, on all %s %.2f, %.1fs",
        task + 1,
        n_tasks,
        task_acc,
        "domains" if domains else "seen tasks",
        doc["last_acc"],
        seconds,
    )
    tracker.log_task(task, doc)


def checkpoint_run(
    run_dir: Path, method: ContinualModule, state: RunState, tracker: Tracker, config: dict[str, Any]
) -> None:
    """Write the checkpoint of the tasks finished so far (:mod:`cl_bench.checkpointing`). A disk that
    refuses it twice stops the run with :class:`~cl_bench.errors.StorageError` (the results so far stay)
    rather than training on without a way to resume."""
    state.epochs_logged = tracker.epochs_logged
    payload = {
        "format": FORMAT,
        "tasks_done": len(state.acc_rows),
        "method": method.method_state(),
        "run_state": asdict(state),
        "rng": rng_state(),
        "wandb_id": tracker.run_id,
        "config_hash": config_hash(config),
    }
    with signals.deferred():
        save_checkpoint(run_dir, payload)
    signals.check()
