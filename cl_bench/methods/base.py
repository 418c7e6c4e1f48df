"""The continual base every method extends.

The runner drives a method through these hooks, once per task ``t``::

    on_task_start(ctx)            # grow the head, reset per-task state
    train_dataset(ctx)            # what Lightning fits on (images, cached features, or None: no training)
    Trainer(max_epochs=epochs).fit(...)  -> training_step / configure_optimizers
    on_task_end(ctx)              # prototypes, statistics, snapshots
    forward(x, task=None)         # logits over every class seen so far, in class-order positions

Methods whose backbone never changes (``frozen_backbone = True``) also split inference into ``embed`` and
``classify`` so that the evaluator and the method compute each image's features once and reuse them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from cl_bench import distributed
from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError, TrainingDivergedError
from cl_bench.modules.heads import IncrementalLinearHead
from cl_bench.scenario import Scenario, Task

log = logging.getLogger(__name__)

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
SCHEDULERS = ("cosine", "none")
LOSS_SCOPES = ("seen", "task")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed-precision context for inference passes (a no-op for ``dtype=None``)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@dataclass
class TaskContext:
    """What a method may use while learning task ``task``.

    ``train_set`` carries the train-time augmentation; ``train_eval_set`` holds the same images with the
    evaluation transform (for prototypes, class statistics and cached features).
    """

    task: Task
    scenario: Scenario
    train_set: Dataset
    train_eval_set: Dataset
    num_workers: int = 0
    eval_batch_size: int = 256
    seed: int = 0
    #: Autocast dtype for inference passes (``trainer.precision``), the same as the evaluator's.
    autocast_dtype: torch.dtype | None = None

    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        """A DataLoader; shuffled ones draw from a generator seeded by (seed, task) for reproducibility."""
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.task.index) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )

    def shard_loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        """An unshuffled loader over this process's share of the batches (all of them in a one-process run;
        :mod:`cl_bench.distributed`): gather or sum what it yields across the processes."""
        return distributed.shard_loader(dataset, batch_size, self.num_workers, torch.cuda.is_available())


class ContinualModule(pl.LightningModule):
    """Backbone + incremental classifier with task hooks; subclasses override what their paper changes.

    Args:
        backbone: the feature extractor (provided by the runner).
        epochs: training epochs per task.
        batch_size: training batch size.
        lr: learning rate of the head (and of the backbone unless ``backbone_lr`` is set).
        backbone_lr: learning rate of the backbone's trainable parameters (slow learners use a smaller one).
        optimizer: ``sgd``, ``adam`` or ``adamw``.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        scheduler: ``cosine`` (annealed to 0 over the task's epochs) or ``none``.
        loss_scope: ``seen``: cross-entropy over every class seen so far; ``task``: over the current task's
            classes only (task-local CE). Task-incremental scenarios always use ``task``.
    """

    #: The backbone is never trained: features are cached, the backbone stays in eval mode.
    frozen_backbone: ClassVar[bool] = False
    #: Train one task of all classes instead of the scenario's tasks (joint upper bound).
    single_task: ClassVar[bool] = False
    #: ``forward(x, task)`` depends on the task id (the evaluator then runs a task-aware pass for TIL).
    task_conditioned: ClassVar[bool] = False
    #: ``predict`` returns the task chosen for each image (task-specific parameters picked at test time).
    selects_task: ClassVar[bool] = False
    #: Backbone traits the method cannot run without (:data:`cl_bench.compatibility.BACKBONE_TRAITS`): a run
    #: on a backbone without them stops before training, a sweep skips it; :meth:`needs` may narrow them.
    backbone_needs: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def needs(cls, settings: dict[str, Any]) -> frozenset[str]:
        """The backbone traits needed with these keyword arguments (default: :attr:`backbone_needs`)."""
        return cls.backbone_needs

    def __init__(
        self,
        backbone: Backbone,
        epochs: int = 10,
        batch_size: int = 64,
        lr: float = 0.01,
        backbone_lr: float | None = None,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        scheduler: str = "cosine",
        loss_scope: str = "seen",
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"method.optimizer={optimizer!r}: choose one of {sorted(OPTIMIZERS)}")
        if scheduler not in SCHEDULERS:
            raise ConfigError(f"method.scheduler={scheduler!r}: choose one of {list(SCHEDULERS)}")
        if loss_scope not in LOSS_SCOPES:
            raise ConfigError(f"method.loss_scope={loss_scope!r}: choose one of {list(LOSS_SCOPES)}")
        if epochs < 0 or batch_size < 1 or lr < 0:
            raise ConfigError("method.epochs must be >= 0, method.batch_size >= 1 and method.lr >= 0")
        self.backbone = backbone
        self.head = self.build_head()
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.backbone_lr = lr if backbone_lr is None else backbone_lr
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.scheduler_name = scheduler
        self.loss_scope = loss_scope
        self.task: Task | None = None
        self.task_incremental = False
        if self.frozen_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    # ----------------------------------------------------------------- structure
    def build_head(self) -> nn.Module:
        """The classifier; the default grows one linear block per task."""
        return IncrementalLinearHead(self.backbone.feat_dim)

    def train(self, mode: bool = True) -> ContinualModule:
        """Lightning calls ``train()`` at fit start; a frozen backbone stays in eval."""
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self

    # ----------------------------------------------------------------- task hooks
    def on_task_start(self, ctx: TaskContext) -> None:
        """Called before training task ``ctx.task``: records it and grows the head by its classes."""
        self.task = ctx.task
        self.task_incremental = ctx.scenario.task_incremental
        self.head.add_task(ctx.task.num_classes)

    def train_dataset(self, ctx: TaskContext) -> Dataset | None:
        """The dataset Lightning fits on for this task (``None`` or ``epochs == 0``: no gradient training)."""
        return ctx.train_set

    def on_task_end(self, ctx: TaskContext) -> None:
        """Called after training task ``ctx.task`` and before it is evaluated."""

    # ----------------------------------------------------------------- inference
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled embedding."""
        return self.backbone(x)

    def classify(self, features: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Logits over all seen classes from embeddings."""
        return self.head(features)

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Logits over all seen classes; ``task`` is the task id when the scenario provides it."""
        return self.classify(self.embed(x), task)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits without a task id and, for methods that choose task-specific parameters at test time, the
        task chosen for each image (``[B]`` long; ``None``: no such choice; methods that set ``selects_task``
        return it). The evaluator reports how often the choice is the image's task (task-selection
        accuracy)."""
        return self(x), None

    def alternative_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named alternative predictions reported beside the method's own (e.g. SAFE's fast learner alone),
        never used to choose it: the evaluator writes the accuracy of each as ``<name>_acc`` among the extra
        matrices. Called right after :meth:`predict` on the same batch (methods without a frozen backbone)."""
        return {}

    @torch.no_grad()
    def extract_features(
        self, ctx: TaskContext, dataset: Dataset, embed: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (``embed``, default :meth:`embed`) and labels of ``dataset``: one pass, eval mode, on
        the module's device, kept on CPU. Under DDP each process embeds its share of the batches and all
        of them receive every embedding, in dataset order."""
        embed = self.embed if embed is None else embed
        was_training = self.training
        self.eval()
        batches = []
        for x, y in ctx.shard_loader(dataset, ctx.eval_batch_size):
            with autocast(self.device, ctx.autocast_dtype):
                batches.append((embed(x.to(self.device)).float().cpu(), torch.as_tensor(y)))
        self.train(was_training)
        batches = distributed.gather_batches(batches)
        return torch.cat([f for f, _ in batches]), torch.cat([y for _, y in batches])

    @staticmethod
    def features_dataset(features: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
        return TensorDataset(features, labels)

    # ----------------------------------------------------------------- training
    def task_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Restrict logits and targets to the classes the loss sees (``loss_scope``)."""
        assert self.task is not None
        if self.task_incremental or self.loss_scope == "task":
            return logits[:, self.task.start : self.task.stop], targets - self.task.start
        return logits, targets

    def check_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Stop with a clear error on a NaN/inf loss (the runner keeps the results already written)."""
        if not torch.isfinite(loss):
            task = self.task.index if self.task else "?"
            raise TrainingDivergedError(
                f"the training loss became {loss.item()} at task {task}, epoch {self.current_epoch}, batch "
                f"{batch_idx}. Lower method.lr (now {self.lr}) or method.backbone_lr "
                f"(now {self.backbone_lr}), "
                "or check the inputs for NaNs."
            )

    def training_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of a training batch; ``inputs`` are what :meth:`train_dataset` yields (images here)."""
        return self(inputs)

    def regularizer(self) -> torch.Tensor | None:
        """A term added to the training cross-entropy (EWC/SI/MAS penalties); ``None``: nothing."""
        return None

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits, targets = self.task_logits(self.training_logits(x), y)
        loss = F.cross_entropy(logits, targets)
        penalty = self.regularizer()
        if penalty is not None:
            self.log("train/ce", loss, on_step=False, on_epoch=True, batch_size=len(y))
            self.log("train/penalty", penalty, on_step=False, on_epoch=True, batch_size=len(y))
            loss = loss + penalty
        self.check_finite(loss, batch_idx)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups with their learning rates: backbone at ``backbone_lr``, the rest at ``lr``."""
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids]
        groups = [
            {"params": backbone, "lr": self.backbone_lr, "name": "backbone"},
            {"params": rest, "lr": self.lr, "name": "head"},
        ]
        return [g for g in groups if g["params"]]

    def make_optimizer(self, groups: list[dict[str, Any]] | None = None) -> torch.optim.Optimizer:
        """``method.optimizer`` over ``groups`` (default :meth:`param_groups`), with the method's weight decay
        and (SGD) momentum."""
        groups = self.param_groups() if groups is None else groups
        if not groups:
            raise ConfigError(
                f"{type(self).__name__} has no trainable parameters but method.epochs={self.epochs}"
            )
        kwargs: dict[str, Any] = {"weight_decay": self.weight_decay}
        if self.optimizer_name == "sgd":
            kwargs["momentum"] = self.momentum
        return OPTIMIZERS[self.optimizer_name](groups, lr=self.lr, **kwargs)

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
        """The per-epoch schedule of a task (``cosine``: annealed to 0 over the task's epochs)."""
        if self.scheduler_name == "none":
            return None
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.epochs))

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer()
        scheduler = self.make_scheduler(optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
