"""The continual base every method extends: the contract between a method, the runner and the evaluator.

The runner drives a method through these hooks, once per task ``t``::

    on_task_start(ctx)            # grow the head, reset per-task state
    for phase in phases(ctx):     # each phase is one Lightning fit (DDP, precision, callbacks apply to all)
        fit(phase)                #   -> training_step / configure_optimizers, with ``self.phase`` set
    on_task_end(ctx)              # pure task-end computations: prototypes, statistics, ridge solves

and the evaluator reads :attr:`ContinualModule.capabilities` and calls ``predict(x)`` (no task id),
``forward(x, task)`` (task id given), or, for a frozen backbone, ``embed`` once per test image and then
``classify(features, task)``. The contract a new method implements, with the smallest complete example, is
in ``cl_bench/methods/README.md``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from cl_bench import distributed
from cl_bench.backbones.base import Backbone
from cl_bench.data.batch_transforms import BatchAugment, augment_batch
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


@dataclass(frozen=True)
class Capabilities:
    """What a method's inference depends on; the evaluator and the runner read nothing else about it."""

    #: The backbone is not trained (now): the evaluator embeds each test image once and reuses it.
    frozen_backbone: bool = False
    #: Train one task of all classes instead of the scenario's tasks (joint upper bound).
    single_task: bool = False
    #: ``forward(x, task)`` / ``classify(f, task)`` depend on the task id (a task-aware pass for TIL).
    task_conditioned: bool = False
    #: ``predict`` returns the task chosen for each image (task-specific parameters picked at test time).
    selects_task: bool = False
    #: The method learns correctly when tasks revisit the same classes (``scenario=dil``: every task holds all
    #: classes in a new domain; the head is sized at task 0 and never grows). Methods without it are refused
    #: under DIL before anything is built (:func:`cl_bench.compatibility.check_method_fits_scenario`).
    domain_incremental: bool = False


@dataclass
class Prediction:
    """What :meth:`ContinualModule.predict` returns for a batch without task ids."""

    #: ``[B, seen classes]``, in class-order positions.
    logits: torch.Tensor
    #: ``[B]`` long: the task each image's task-specific parameters were chosen from (``selects_task``).
    chosen_task: torch.Tensor | None = None
    #: Named alternative predictions reported beside the method's own and never used to choose it (e.g.
    #: SAFE's fast learner alone): the evaluator writes ``<name>_acc`` among the extra matrices.
    alternatives: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class HeadTraining:
    """A phase that trains one head alone on features held in memory (no backbone pass).

    The runner fits ``head`` with ``loss(head(features), labels)``; such phases may also be run by the
    head-only fast path (:func:`cl_bench.learning.run_phase`) without Lightning.
    """

    head: nn.Module
    #: ``loss(logits, labels)``.
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    #: ``optimizer(parameters)``: a fresh optimiser over the head's trainable parameters.
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    #: ``scheduler(optimizer)``, stepped per epoch (may return ``None``); ``None``: a constant learning rate.
    scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler | None] | None = None


@dataclass(frozen=True)
class Phase:
    """One stage of learning a task, run as one Lightning fit of ``epochs`` epochs over ``data``.

    Without ``head_training`` the method itself is fitted: its ``training_step`` and
    ``configure_optimizers`` run with ``self.phase`` set to this phase (a method with several phases
    switches on ``self.phase.name``). The phases of a task that shuffle the same dataset continue one
    generator seeded by (seed, task) (:meth:`TaskContext.loader`).
    """

    name: str
    epochs: int
    #: What the fit iterates (images, cached features, or a dataset yielding whole batches: ``batch_size``
    #: ``None``); ``None``: nothing to train on, the phase is skipped.
    data: Dataset | None
    batch_size: int | None
    #: The parameters this phase trains: only these require gradients during the fit (the others' flags
    #: are restored afterwards); ``None``: the flags as the method set them.
    trainable: tuple[nn.Parameter, ...] | None = None
    #: Train one head alone on in-memory features instead of the method (see :class:`HeadTraining`).
    head_training: HeadTraining | None = None
    shuffle: bool = True
    #: Drop the last partial batch of each epoch (ConFiT's official loader does); ``trainer.drop_last``
    #: overrides it for every phase of a run.
    drop_last: bool = False

    @property
    def head_only(self) -> bool:
        """The phase trains one head alone on in-memory features (``head_training``): the runner may fit it
        by a head-only fast path instead of a Lightning fit."""
        return self.head_training is not None

    @property
    def trains(self) -> bool:
        """Whether there is anything to fit (epochs, and data that is not empty)."""
        return self.data is not None and self.epochs > 0 and len(self.data) > 0  # type: ignore[arg-type]


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
    #: ``trainer.drop_last``: drop (or keep) every training phase's last partial batch; ``None``: each
    #: phase's own choice (:attr:`Phase.drop_last`, the method's official loader).
    drop_last: bool | None = None
    #: Each shuffled dataset (by id, kept alive with it) and its generator (:meth:`loader`).
    _shuffle_generators: dict[int, tuple[Dataset, torch.Generator]] = field(
        init=False, repr=False, default_factory=dict
    )

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh generator seeded by (run seed, task): the task's random choices are repeatable."""
        return torch.Generator(device=device).manual_seed(self.seed * 1000 + self.task.index)

    def loader(
        self,
        dataset: Dataset,
        batch_size: int | None,
        shuffle: bool,
        in_memory: bool = False,
        drop_last: bool = False,
    ) -> DataLoader:
        """A DataLoader. Shuffled ones draw from one generator per dataset, seeded by (seed, task) and
        continued by every later phase of the task on the same dataset, so each phase's order is repeatable.
        ``in_memory``: tensors already made (maybe on the GPU): no worker processes, no pinning.
        ``drop_last``: drop the last partial batch (unless :attr:`drop_last` overrides it; ignored for a
        dataset yielding whole batches)."""
        drop_last = drop_last if self.drop_last is None else self.drop_last
        generator = None
        if shuffle:
            _, generator = self._shuffle_generators.setdefault(id(dataset), (dataset, self.generator()))
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=0 if in_memory else self.num_workers,
            generator=generator,
            drop_last=drop_last and batch_size is not None,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available() and not in_memory,
        )

    def shard_loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        """An unshuffled loader over this process's share of the batches (all of them in a one-process run;
        :mod:`cl_bench.distributed`): gather or sum what it yields across the processes."""
        return distributed.shard_loader(dataset, batch_size, self.num_workers, torch.cuda.is_available())


class ContinualModule(pl.LightningModule):
    """Backbone + incremental classifier with task hooks; subclasses override what their paper changes.

    The arguments below are the *shared training keywords*; their defaults here hold for every method whose
    paper or official code says nothing else. A method's constructor lists a shared keyword only when its
    default differs from the one it would inherit (and cites where the value comes from, in a comment or in
    its docstring's Args), and forwards all others with ``**base_args: Any`` to ``super().__init__``; it never
    re-lists a keyword with the inherited default (``tests/test_method_defaults.py`` checks this). A method
    that trains nothing takes none of them (SimpleCIL); one that has no use for a keyword names it in
    :attr:`refused_base_args`.

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

    #: What the method's inference depends on (:class:`Capabilities`); methods whose capabilities change
    #: with their state (RanPAC's backbone freezes after task 0) override :attr:`capabilities` instead.
    CAPABILITIES: ClassVar[Capabilities] = Capabilities()
    #: Augmentation of uint8 image batches on the device (``transform.on_device``; the runner sets it).
    batch_transform: BatchAugment | None = None
    #: Backbone traits the method cannot run without (:data:`cl_bench.compatibility.BACKBONE_TRAITS`): a run
    #: on a backbone without them stops before training, a sweep skips it; :meth:`needs` may narrow them.
    backbone_needs: ClassVar[frozenset[str]] = frozenset()
    #: The method setting (``key=value``) with which :meth:`needs` asks nothing of the backbone, if one
    #: exists: the refusal on another backbone names it (``peft=none``).
    any_backbone_setting: ClassVar[str | None] = None
    #: Shared training keywords the method does not take because nothing it trains would use them
    #: (``backbone_lr`` when no backbone parameter trains at it): config validation reports them as unknown
    #: keys (:func:`cl_bench.config.target_parameters`) and the constructor refuses a value other than the
    #: default.
    refused_base_args: ClassVar[frozenset[str]] = frozenset()

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
        self._refuse_unused_base_args(locals())
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"method.optimizer={optimizer!r}: choose one of {sorted(OPTIMIZERS)}")
        if scheduler not in SCHEDULERS:
            raise ConfigError(f"method.scheduler={scheduler!r}: choose one of {list(SCHEDULERS)}")
        if loss_scope not in LOSS_SCOPES:
            raise ConfigError(f"method.loss_scope={loss_scope!r}: choose one of {list(LOSS_SCOPES)}")
        for key, value, least in (("epochs", epochs, 0), ("batch_size", batch_size, 1), ("lr", lr, 0)):
            if value < least:
                raise ConfigError(f"method.{key}={value}: must be >= {least}")
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
        #: The phase being fitted (``None`` between fits).
        self.phase: Phase | None = None
        if self.CAPABILITIES.frozen_backbone:
            freeze(self.backbone)

    def _refuse_unused_base_args(self, arguments: dict[str, Any]) -> None:
        """Raise :class:`ConfigError` if a keyword of :attr:`refused_base_args` was given a value."""
        defaults = inspect.signature(ContinualModule.__init__).parameters
        given = sorted(n for n in self.refused_base_args if arguments[n] != defaults[n].default)
        if given:
            raise ConfigError(
                f"method.{given[0]}: {type(self).__name__} does not take it (nothing it trains would use "
                "it); remove it"
            )

    @property
    def capabilities(self) -> Capabilities:
        return self.CAPABILITIES

    # ----------------------------------------------------------------- structure
    def build_head(self) -> nn.Module:
        """The classifier; the default grows one linear block per task."""
        return IncrementalLinearHead(self.backbone.feat_dim)

    def eval_mode_modules(self) -> Iterable[nn.Module]:
        """Modules that stay in eval mode whatever ``train()`` is told (dropout, drop-path and BatchNorm
        statistics off): the backbone while it is frozen."""
        return (self.backbone,) if self.capabilities.frozen_backbone else ()

    def train(self, mode: bool = True) -> ContinualModule:
        """Lightning calls ``train()`` at fit start; :meth:`eval_mode_modules` stay in eval."""
        super().train(mode)
        for module in self.eval_mode_modules():
            module.eval()
        return self

    # ----------------------------------------------------------------- task hooks
    def on_task_start(self, ctx: TaskContext) -> None:
        """Called before training task ``ctx.task``: records it and grows the head by its new classes (under
        DIL only the first domain brings any)."""
        self.task = ctx.task
        self.task_incremental = ctx.scenario.task_incremental
        if ctx.task.new_classes:
            self.head.add_task(ctx.task.new_classes)

    def train_dataset(self, ctx: TaskContext) -> Dataset | None:
        """The dataset the default phase fits on (``None`` or ``epochs == 0``: no gradient training)."""
        return ctx.train_set

    def phases(self, ctx: TaskContext) -> Iterable[Phase]:
        """The task's training phases, in order; each is one Lightning fit. The default: one phase
        ``train`` of ``epochs`` epochs on :meth:`train_dataset` with the method's optimiser.

        May be a generator: code between two ``yield`` runs after the earlier phase was fitted (e.g. the
        class statistics that SLCA's alignment phase samples from)."""
        return [Phase("train", self.epochs, self.train_dataset(ctx), self.batch_size)]

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

    def predict(self, x: torch.Tensor) -> Prediction:
        """The prediction without a task id (:class:`Prediction`): logits, and for methods that choose
        task-specific parameters at test time the chosen task of each image (the evaluator reports how often
        it is the image's task), and any alternative predictions to report beside the method's own."""
        return Prediction(self(x))

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
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning hook: uint8 image batches get the batch-level augmentation on the device."""
        return augment_batch(self.batch_transform, batch)

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
        """Logits of a training batch; ``inputs`` are what the phase's data yields (images here)."""
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
                f"{type(self).__name__} has no trainable parameters in phase {self.phase_name!r} of "
                f"{self.phase_epochs} epochs"
            )
        kwargs: dict[str, Any] = {"weight_decay": self.weight_decay}
        if self.optimizer_name == "sgd":
            kwargs["momentum"] = self.momentum
        return OPTIMIZERS[self.optimizer_name](groups, lr=self.lr, **kwargs)

    @property
    def phase_name(self) -> str:
        return self.phase.name if self.phase is not None else "train"

    @property
    def phase_epochs(self) -> int:
        """The epochs of the phase being fitted (``epochs`` outside a fit)."""
        return self.phase.epochs if self.phase is not None else self.epochs

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
        """The per-epoch schedule of a phase (``cosine``: annealed to 0 over the phase's epochs)."""
        if self.scheduler_name == "none":
            return None
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.phase_epochs))

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer()
        scheduler = self.make_scheduler(optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ================================================================= state: checkpoints and saved models
    # A method's state is tensors and plain data only (``torch.load(weights_only=True)`` reads it back): its
    # ``state_dict()``, the structure a freshly built method of the same config grows before loading
    # (:meth:`structure` / :meth:`restore_structure`), every parameter's ``requires_grad`` and every
    # submodule's train/eval mode, and (for resuming) the attributes listed in ``training_state_attributes``.

    #: Attributes outside ``state_dict()`` that a resumed run needs (not a saved model): tensors, plain data
    #: (numbers, strings, lists, dicts, None) or objects with ``state_dict()`` and ``load_state_dict()``.
    training_state_attributes: ClassVar[tuple[str, ...]] = ()

    def structure(self) -> dict[str, Any]:
        """Plain data from which :meth:`restore_structure` rebuilds what this method has grown (heads that
        size themselves from the saved tensors need nothing here). Subclasses extend the dict."""
        task = self.task
        return {
            "task": None
            if task is None
            else [task.index, task.start, task.stop, list(task.original_classes), task.domain],
            "task_incremental": self.task_incremental,
        }

    def restore_structure(self, structure: dict[str, Any]) -> None:
        """Grow a freshly built method to ``structure`` (before its ``state_dict`` is loaded)."""
        task = structure["task"]
        # saved before DIL existed: four fields, no domain
        self.task = None if task is None else Task(task[0], task[1], task[2], tuple(task[3]), *task[4:5])
        self.task_incremental = bool(structure["task_incremental"])

    def method_state(self, training: bool = True) -> dict[str, Any]:
        """The method's state; ``training=False``: what prediction needs (``final_model.pt``)."""
        state: dict[str, Any] = {
            "structure": self.structure(),
            "state_dict": {k: _detached(v, cpu=True) for k, v in self.state_dict().items()},
            "requires_grad": {name: p.requires_grad for name, p in self.named_parameters()},
            "training": {name: m.training for name, m in self.named_modules()},
        }
        if training:
            state["attributes"] = {
                name: _export_attribute(getattr(self, name)) for name in self.training_state_attributes
            }
        return state

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`method_state` into this freshly built method (of the same config)."""
        self.restore_structure(state["structure"])
        self.load_state_dict(state["state_dict"])
        parameters = dict(self.named_parameters())
        for name, flag in state["requires_grad"].items():
            parameters[name].requires_grad_(bool(flag))
        modules = dict(self.named_modules())
        for name, flag in state["training"].items():
            modules[name].training = bool(flag)
        for name, value in state.get("attributes", {}).items():
            if name not in self.training_state_attributes:
                raise KeyError(f"{type(self).__name__} does not declare the attribute {name!r}")
            current = getattr(self, name, None)
            if hasattr(current, "load_state_dict") and not isinstance(current, nn.Module):
                current.load_state_dict(value)
            else:
                setattr(self, name, value)


def _detached(value: Any, cpu: bool = False) -> Any:
    """Tensors (also inside lists, tuples and dicts) detached and cloned, on the CPU if ``cpu``."""
    if torch.is_tensor(value):
        value = value.detach()
        return value.cpu().clone() if cpu else value.clone()
    if isinstance(value, dict):
        return {k: _detached(v, cpu) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v, cpu) for v in value)
    return value


def _export_attribute(value: Any) -> Any:
    """A declared attribute as tensors and plain data (objects: their ``state_dict()``)."""
    if hasattr(value, "state_dict") and not isinstance(value, nn.Module):
        return _detached(value.state_dict())
    return _detached(value)


def freeze(module: nn.Module) -> None:
    """No gradients and eval mode for ``module`` (a frozen backbone, a teacher, a slow learner)."""
    module.requires_grad_(False)
    module.eval()
