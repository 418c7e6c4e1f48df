"""Learning one task: the task hooks around the method's phases, each phase one Lightning fit.

``method.batch_size`` (a phase's ``batch_size``) is the global batch: under DDP each of the ``N`` processes
trains on ``1/N`` of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from cl_bench import signals
from cl_bench.config import TrainerConfig
from cl_bench.debug import trainer_options
from cl_bench.errors import ConfigError, TrainingDivergedError
from cl_bench.methods.base import ContinualModule, HeadTraining, Phase, TaskContext
from cl_bench.modules.feature_fit import fit_on_features

log = logging.getLogger(__name__)

#: Lightning's messages that say nothing about a cl_bench run; silenced around each fit only.
QUIET_LIGHTNING = (
    ".*does not have many workers.*",
    ".*LeafSpec.*",
    r".*module\(s\) in eval mode at the start of training.*",
    # DDP: per-process epoch losses are logged as they are (rank 0's), and timm's class token gets a
    # strided grad
    ".*sync_dist=True.*",
    ".*Grad strides do not match bucket view strides.*",
    # a phase that yields whole batches (classifier alignment) has a length but no sampler
    ".*IterableDataset.*has `__len__` defined.*",
    ".*Total length of .* across ranks is zero.*",
)


class EpochLossLogger(pl.Callback):
    """Forwards each epoch's ``train/*`` metrics to ``log_epoch`` (the run's tracker)."""

    def __init__(self, log_epoch: Callable[[dict[str, float]], None], task: int, phase: str) -> None:
        self.log_epoch = log_epoch
        self.task = task
        self.phase = phase

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

    def record(self, values: dict[str, float]) -> None:
        self.log_epoch({**values, "train/task": self.task})


class HeadFit(pl.LightningModule):
    """The LightningModule of a :class:`~cl_bench.methods.base.HeadTraining` phase: one head on features."""

    def __init__(self, phase: Phase, training: HeadTraining) -> None:
        super().__init__()
        self.head = training.head
        self.training_spec = training
        self.phase_name = phase.name
        self.loss_name = "train/loss" if phase.name == "train" else f"train/{phase.name}_loss"
        #: The epoch being trained, counted here: the fast path has no trainer for ``current_epoch``.
        self.epoch = -1

    def on_train_epoch_start(self) -> None:
        self.epoch += 1

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        features, labels = batch
        loss = self.training_spec.loss(self.head(features), labels)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"the {self.phase_name} loss became {loss.item()} in epoch {self.epoch}, batch "
                f"{batch_idx}; lower that phase's learning rate or check its inputs"
            )
        self.log(self.loss_name, loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = self.training_spec.optimizer([p for p in self.head.parameters() if p.requires_grad])
        make_scheduler = self.training_spec.scheduler
        scheduler = None if make_scheduler is None else make_scheduler(optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def make_trainer(
    trainer_cfg: TrainerConfig,
    epochs: int,
    run_dir: Path,
    callbacks: list[pl.Callback],
    profile_name: str = "fit",
) -> pl.Trainer:
    """The Lightning Trainer of one phase: every phase of every method is fitted by one of these;
    ``profile_name`` names its profiler report (:func:`cl_bench.debug.trainer_options`)."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):  # its info lines: noise here
        logging.getLogger(name).setLevel(logging.WARNING)
    return pl.Trainer(
        **trainer_options(trainer_cfg, epochs, run_dir, profile_name),
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=trainer_cfg.strategy,
        sync_batchnorm=trainer_cfg.sync_batchnorm,
        precision=trainer_cfg.precision,
        deterministic=trainer_cfg.deterministic,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=trainer_cfg.enable_progress_bar,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        num_sanity_val_steps=0,
        default_root_dir=str(run_dir),
        callbacks=[*callbacks, signals.StopAtStepEnd()],  # a stop signal ends the fit after its step
    )


@contextlib.contextmanager
def trainable_only(method: ContinualModule, phase: Phase) -> Iterator[None]:
    """During the phase only ``phase.trainable`` require gradients (if the phase names them); every flag
    is restored afterwards."""
    if phase.trainable is None:
        yield
        return
    params = list(method.parameters())
    for extra in phase.trainable:  # e.g. a head that is not a submodule
        if all(extra is not p for p in params):
            params.append(extra)
    flags = [p.requires_grad for p in params]
    chosen = {id(p) for p in phase.trainable}
    for p in params:
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


#: Trainer precisions the head-only fast path reproduces, with their autocast dtype.
FAST_PATH_PRECISIONS: dict[str, torch.dtype | None] = {
    "32-true": None,
    "32": None,
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
}


def trainer_torch_flags(deterministic: bool) -> None:
    """What ``pl.Trainer(deterministic=...)`` sets for the whole process, for a fast-path phase that builds
    no Trainer: torch's deterministic algorithms and, when on, cuDNN benchmarking off and cuBLAS's
    reproducible workspace."""
    if deterministic:
        torch.backends.cudnn.benchmark = False
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(deterministic)


def head_fast_path(phase: Phase, trainer_cfg: TrainerConfig) -> bool:
    """Whether ``phase`` trains by :func:`fit_on_features` instead of a Lightning fit: a head-only phase,
    ``trainer.head_fast_path``, one process, a precision the plain loop reproduces and none of the Lightning
    knobs it does not (batch limit, clipping, accumulation, profiler)."""
    return (
        phase.head_only
        and trainer_cfg.head_fast_path
        and trainer_cfg.limit_train_batches is None
        and trainer_cfg.gradient_clip_val is None
        and trainer_cfg.accumulate_grad_batches == 1
        and trainer_cfg.profiler is None
        and str(trainer_cfg.precision) in FAST_PATH_PRECISIONS
        and trainer_cfg.devices in (1, "1")
        and trainer_cfg.num_nodes == 1
        and trainer_cfg.strategy == "auto"
    )


def run_phase(
    method: ContinualModule,
    phase: Phase,
    ctx: TaskContext,
    trainer_cfg: TrainerConfig,
    run_dir: Path,
    callbacks: list[pl.Callback],
) -> None:
    """Fit ``phase``: the method itself with Lightning, or a :class:`HeadFit` for a head-only phase
    (``phase.head_only``: a head on in-memory features), by the head-only fast path
    (:func:`~cl_bench.modules.feature_fit.fit_on_features`: the same optimiser, schedule, batches and
    weights, no Lightning fit) where :func:`head_fast_path` allows, else with Lightning."""
    fast = head_fast_path(phase, trainer_cfg)
    trainer = None
    if fast:
        trainer_torch_flags(trainer_cfg.deterministic)
    else:
        name = f"task_{ctx.task.index:02d}_{phase.name}"
        trainer = make_trainer(trainer_cfg, phase.epochs, run_dir, callbacks, name)
    processes = 1 if trainer is None else trainer.world_size
    batch_size = phase.batch_size
    if batch_size is not None:
        if batch_size % processes:
            raise ConfigError(
                f"the batch size {batch_size} of phase {phase.name!r} is the global batch and must divide "
                f"evenly among the {processes} DDP processes: choose a multiple of {processes} "
                "(method.batch_size)"
            )
        batch_size //= processes
    assert phase.data is not None
    loader = ctx.loader(
        phase.data, batch_size, phase.shuffle, in_memory=phase.head_only, drop_last=phase.drop_last
    )
    module = HeadFit(phase, phase.head_training) if phase.head_training is not None else method
    method.phase = phase
    try:
        with trainable_only(method, phase), warnings.catch_warnings():
            for message in QUIET_LIGHTNING:
                warnings.filterwarnings("ignore", message=message)
            if trainer is not None:
                trainer.fit(module, train_dataloaders=loader)
            else:
                assert isinstance(module, HeadFit)
                loggers = [c for c in callbacks if isinstance(c, EpochLossLogger)]

                def record(_epoch: int, loss: float, name: str = module.loss_name) -> None:
                    for logger in loggers:
                        logger.record({name: loss})

                dtype = FAST_PATH_PRECISIONS[str(trainer_cfg.precision)]
                epochs = min(phase.epochs, trainer_cfg.max_epochs or phase.epochs)  # as trainer_options caps
                fit_on_features(module, loader, epochs, dtype, on_epoch_end=record)
    finally:
        method.phase = None


def learn_task(
    method: ContinualModule,
    ctx: TaskContext,
    trainer_cfg: TrainerConfig,
    device: torch.device,
    run_dir: Path,
    log_epoch: Callable[[dict[str, float]], None],
    callbacks: Sequence[pl.Callback] = (),
) -> float:
    """Task start hook, the method's phases (each one fit, with ``callbacks`` too), task end hook; returns
    the seconds it took."""
    start = time.perf_counter()
    method.on_task_start(ctx)
    method.to(device)  # after on_task_start: parameters it created move too
    for phase in method.phases(ctx):
        if not phase.trains:
            continue
        phase_callbacks = [EpochLossLogger(log_epoch, ctx.task.index, phase.name), *callbacks]
        run_phase(method, phase, ctx, trainer_cfg, run_dir, phase_callbacks)
        method.to(device)
    method.on_task_end(ctx)
    return time.perf_counter() - start
