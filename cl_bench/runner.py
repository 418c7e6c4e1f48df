"""One continual experiment: build data, scenario, backbone and method, then learn the tasks in order.

After each task the method is evaluated on every seen task's test set and ``results.json`` is rewritten
(``status: incomplete``), so an error or a kill never loses the finished tasks; ``checkpoint.pt`` then lets
the same command resume at the next task (:mod:`cl_bench.checkpointing`).

Under DDP (``trainer=ddp``) every process runs this loop; only rank 0 writes files and logs to W&B
(:mod:`cl_bench.distributed`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from cl_bench import debug, distributed
from cl_bench.checkpointing import (
    CHECKPOINT_FILE,
    RunCheckpoint,
    acquire_lock,
    find_resumable,
    is_resumable,
    load_checkpoint,
    release_lock,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cl_bench.config import build_from_config, validate_config
from cl_bench.data.base import ClassificationData, TaskDataset
from cl_bench.data.transforms import build_transforms
from cl_bench.errors import ConfigError
from cl_bench.evaluation import Evaluator
from cl_bench.methods.base import ContinualModule, TaskContext
from cl_bench.progress import RunProgress
from cl_bench.results import RESULTS_FILE, build_results, write_results, write_text_atomic
from cl_bench.scenario import Scenario, build_scenario
from cl_bench.tracking import Tracker, build_tracker

log = logging.getLogger(__name__)

for _name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
# DDP: per-process epoch losses are logged as they are (rank 0's), and timm's class token gets a strided grad
warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
warnings.filterwarnings("ignore", message=".*Grad strides do not match bucket view strides.*")


@dataclass
class RunState:
    """What the run has produced so far."""

    acc_rows: list[list[float]] = field(default_factory=list)
    til_rows: list[list[float]] = field(default_factory=list)
    #: Per-task metrics beyond accuracy that the method reports (``task_selection_acc``), rows by name.
    extra_rows: dict[str, list[list[float]]] = field(default_factory=dict)
    task_time_s: list[float] = field(default_factory=list)


def select_device(accelerator: str) -> torch.device:
    """The device for task-end work and evaluation (Lightning places the model itself during ``fit``);
    under DDP each process's own GPU."""
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={accelerator} but no CUDA device is visible; use trainer=cpu"
            )
        return torch.device("cuda", distributed.local_rank())
    if accelerator == "auto" and torch.cuda.is_available():
        return torch.device("cuda", distributed.local_rank())
    if accelerator in ("auto", "cpu"):
        return torch.device("cpu")
    raise ConfigError(f"trainer.accelerator={accelerator!r}: use auto, cpu or gpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA, else the process's peak resident set size (Linux: KiB).

    The CPU figure is the process's peak since it started: in a multirun whose jobs share one process
    (Hydra's basic launcher) a job reports at least the peak of the jobs before it.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment_info(device: torch.device) -> dict[str, Any]:
    """Versions and machine facts stored beside the results for reproducibility."""
    import timm

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--verify", "-q", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        commit = out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "git_commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "pytorch_lightning": pl.__version__,
        "host": platform.node(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
    }


def task_datasets(
    data: ClassificationData, scenario: Scenario, train_tf: Any, eval_tf: Any
) -> tuple[list[TaskDataset], list[TaskDataset], list[TaskDataset]]:
    """Per task: train images (train transform), the same with the eval transform, and test images."""
    label_map = scenario.label_map
    train, train_eval, test = [], [], []
    for task in scenario.tasks:
        classes = np.asarray(task.original_classes)
        train_idx = np.flatnonzero(np.isin(data.train.labels, classes))
        test_idx = np.flatnonzero(np.isin(data.test.labels, classes))
        train.append(TaskDataset(data.train, train_idx, label_map, train_tf))
        train_eval.append(TaskDataset(data.train, train_idx, label_map, eval_tf))
        test.append(TaskDataset(data.test, test_idx, label_map, eval_tf))
    return train, train_eval, test


def make_trainer(
    cfg: DictConfig, method: ContinualModule, run_dir: Path, callbacks: list[pl.Callback], task: int = 0
) -> pl.Trainer:
    """The Trainer of one task; its logger is off, the tracker gets its metrics (:mod:`cl_bench.tracking`)."""
    return pl.Trainer(
        **debug.trainer_options(cfg, method, run_dir, task),
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        sync_batchnorm=cfg.trainer.sync_batchnorm,
        precision=cfg.trainer.precision,
        deterministic=cfg.trainer.deterministic,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        num_sanity_val_steps=0,
        default_root_dir=str(run_dir),
        callbacks=callbacks,
    )


def resolve_run_dir(cfg: DictConfig) -> Path:
    if cfg.paths.run_dir:
        return Path(cfg.paths.run_dir)
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ConfigError("paths.run_dir is not set and no Hydra run is active: set paths.run_dir=DIR")
    return Path(HydraConfig.get().runtime.output_dir)


def tracker_config(cfg: DictConfig, config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config plus flat top-level fields to filter runs by on a dashboard."""
    return {
        **config,
        "dataset_name": cfg.dataset.get("name"),
        "method_name": cfg.method.get("name"),
        "backbone_name": cfg.backbone.get("name"),
        "scenario_type": str(cfg.scenario.type),
        "order_seed": cfg.scenario.order_seed,
        "seed": cfg.seed,
    }


def resume_folder(
    cfg: DictConfig, run_dir: Path, config: dict[str, Any], ignore_lock: bool = False
) -> Path | None:
    """The interrupted run to continue (``resume``), or ``None`` to start afresh in ``run_dir``."""
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        folder = Path(cfg.resume)
        if not is_resumable(folder, config, ignore_lock):
            raise ConfigError(
                f"resume={folder}: no interrupted run of this config there (it needs {CHECKPOINT_FILE} and "
                "the same config.yaml, and no live process running in it). Use resume=auto or resume=never."
            )
        return folder
    if is_resumable(run_dir, config, ignore_lock):
        return run_dir
    if cfg.paths.run_dir:  # an explicit folder: resume only there
        return None
    return find_resumable([Path(cfg.paths.output_dir)], config, ignore_lock)


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
    elif (run_dir / RESULTS_FILE).exists():
        raise ConfigError(
            f"{run_dir / RESULTS_FILE} already exists: this folder holds an earlier run. Choose another "
            "hydra.run.dir (or paths.run_dir), or move that run away first."
        )
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
    main = distributed.is_main_process()
    if main and not resume:
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(config))

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data: ClassificationData = build_from_config("dataset", cfg.dataset)
    data.name = cfg.dataset.get("name", data.name)
    data = debug.subset_per_class(data, cfg.debug.samples_per_class)
    backbone = debug.build_backbone(cfg)
    method: ContinualModule = build_from_config("method", cfg.method, backbone=backbone)
    split = build_scenario(cfg.scenario, data.num_classes)
    scenario = split.merged() if method.single_task else split
    train_tf, eval_tf = build_transforms(backbone.data_config, cfg.transform, data.hflip_invariant)
    train_sets, train_eval_sets, test_sets = task_datasets(data, scenario, train_tf, eval_tf)

    device = select_device(cfg.trainer.accelerator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    amp_dtype = autocast_dtype(cfg.trainer.precision, device)
    evaluator = Evaluator(
        scenario,
        debug.limit_eval(test_sets, cfg.trainer.limit_eval_batches, cfg.trainer.eval_batch_size),
        batch_size=cfg.trainer.eval_batch_size,
        num_workers=cfg.trainer.num_workers,
        autocast_dtype=amp_dtype,
        til_tasks=split,
    )
    if main:
        write_text_atomic(run_dir / "environment.json", json.dumps(environment_info(device), indent=2) + "\n")
    #: Objects a checkpoint refers to by name: the resuming run rebuilds them from the same config.
    external: dict[str, Any] = {"data": data, "data.train": data.train, "data.test": data.test}
    external.update({"train_transform": train_tf, "eval_transform": eval_tf})
    for name, sets in (("train", train_sets), ("train_eval", train_eval_sets), ("test", test_sets)):
        external.update({f"{name}_set[{i}]": ds for i, ds in enumerate(sets)})
    state = RunState()
    wandb_id = None
    if resume:
        checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILE, external, device)
        method = checkpoint.method
        state = checkpoint.state
        wandb_id = checkpoint.wandb_id
        set_rng_state(checkpoint.rng)
        log.info("resuming after task %d of %d", checkpoint.tasks_done, len(scenario.tasks))
    log.info(
        "%s | %s | %s | %d classes in %d tasks (%s), order seed %s | run folder %s",
        data.name,
        cfg.backbone.get("name"),
        cfg.method.get("name"),
        scenario.num_classes,
        len(scenario.tasks),
        scenario.type.value,
        cfg.scenario.order_seed,
        run_dir,
    )

    tracker = build_tracker(cfg, run_dir, tracker_config(cfg, config), run_id=wandb_id, enabled=main)
    progress = RunProgress.for_run(cfg, [len(s) for s in train_sets], enabled=main)

    def document(status: str, error: str | None = None) -> dict[str, Any]:
        return build_results(
            state.acc_rows,
            state.til_rows,
            evaluator.task_sizes,
            scenario.class_order,
            state.task_time_s[: len(state.acc_rows)],
            peak_memory_mb(device),
            status,
            config,
            state.extra_rows,
            error,
        )

    status, error = "incomplete", None
    try:
        for task in scenario.tasks[len(state.acc_rows) :]:
            ctx = TaskContext(
                task=task,
                scenario=scenario,
                train_set=train_sets[task.index],
                train_eval_set=train_eval_sets[task.index],
                num_workers=cfg.trainer.num_workers,
                eval_batch_size=cfg.trainer.eval_batch_size,
                seed=cfg.seed,
                autocast_dtype=amp_dtype,
            )
            task_start = time.perf_counter()
            learn_task(
                cfg,
                method,
                ctx,
                device,
                run_dir,
                [tracker.callback(task.index), progress.callback(task.index)],
                state,
            )
            rows = evaluator.evaluate_rows(method, task.index)
            state.acc_rows.append(rows.til if scenario.task_incremental else rows.cil)
            state.til_rows.append(rows.til)
            for name, row in rows.extra.items():
                state.extra_rows.setdefault(name, []).append(row)
            doc = document("incomplete")
            if main:
                write_results(run_dir, doc)
            task_acc = doc["acc_matrix"][-1][task.index]
            log.info(
                "task %d/%d: acc on this task %.2f, on all seen tasks %.2f, %.1fs",
                task.index + 1,
                len(scenario.tasks),
                task_acc,
                doc["last_acc"],
                state.task_time_s[-1],
            )
            tracker.log_task(task.index, doc)
            progress.task_done(task.index, time.perf_counter() - task_start)
            if main and cfg.save_checkpoints and task.index + 1 < len(scenario.tasks):
                checkpoint_run(run_dir, method, state, tracker, config, external)
        if main and cfg.save_model:
            save_model(run_dir / "final_model.pt", method, scenario, config)
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


def learn_task(
    cfg: DictConfig,
    method: ContinualModule,
    ctx: TaskContext,
    device: torch.device,
    run_dir: Path,
    callbacks: list[pl.Callback],
    state: RunState,
) -> None:
    """Task start hook, Lightning fit (if the method trains on this task), task end hook; times them.

    ``method.batch_size`` is the global batch: under DDP each of the ``N`` processes trains on ``1/N`` of it.
    """
    start = time.perf_counter()
    method.on_task_start(ctx)
    method.to(device)  # after on_task_start: parameters it created move too
    train_set = method.train_dataset(ctx)
    if train_set is not None and method.epochs > 0 and len(train_set) > 0:
        trainer = make_trainer(cfg, method, run_dir, callbacks, ctx.task.index)
        processes = trainer.world_size
        if method.batch_size % processes:
            raise ConfigError(
                f"method.batch_size={method.batch_size} is the global batch and must divide evenly among the "
                f"{processes} DDP processes: choose a multiple of {processes}"
            )
        loader = ctx.loader(train_set, method.batch_size // processes, shuffle=True)
        trainer.fit(method, train_dataloaders=loader)
        method.to(device)
    method.on_task_end(ctx)
    state.task_time_s.append(time.perf_counter() - start)


def _to_cpu(value: Any) -> Any:
    """Tensors (also inside a module's extra state: lists and dicts of tensors) detached and on the CPU."""
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def save_model(path: Path, method: ContinualModule, scenario: Scenario, config: dict[str, Any]) -> None:
    """Save the final method state (``torch.load(path, weights_only=True)`` reads it back)."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "state_dict": {k: _to_cpu(v) for k, v in method.state_dict().items()},
            "class_order": list(scenario.class_order),
            "task_boundaries": [[t.start, t.stop] for t in scenario.tasks],
            "method": config["method"].get("_target_"),
            "backbone": config["backbone"],
        },
        tmp,
    )
    tmp.replace(path)
