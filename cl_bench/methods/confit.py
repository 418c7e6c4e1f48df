"""ConFiT (Jie, Deng, Li, "Alleviating Representational Shift for Continual Fine-tuning", CVPRW 2022,
arXiv 2204.10535): Xconv BN + hierarchical fine-tuning of a pre-trained CNN.

The paper's body was not readable here; everything beyond its abstract follows the official code
(``JieShibo/ConFiT`` @9a396b1, ``main.py``), as summarised in ``shared/research/methods_cnn.md`` §1:

* **Scenario.** Task-incremental: one shared head whose logits are sliced to the task's classes (=
  one head per task; :class:`~cl_bench.modules.heads.IncrementalLinearHead` grows one block per task),
  task-local cross-entropy, SGD lr 0.01 without momentum or weight decay, a new optimizer per task, no
  augmentation (presets set ``transform.train=none``).
* **Per-task BN** (``task_bn``, ``main.py`` l.101-132): after each task every BatchNorm's weight, bias,
  running mean and variance, and the pre-conv means, are stored; testing task ``i`` restores task ``i``'s.
* **Xconv BN** (``xconv_bn``, :mod:`cl_bench.methods.xconv_bn`): for an old task ``i < T`` the running
  means of BNs fed by a convolution are recomputed from task ``i``'s stored pre-conv means through the
  *current* conv weights; the current task keeps its tracked means (``main.py`` l.133-134).
* **Hierarchical fine-tuning** (``hierarchical``, ``main.py`` l.78-90): epochs ``[0, E//5)`` train the
  head only, ``[E//5, E//2)`` also every BatchNorm's weight and bias (downsample BNs included), and
  ``[E//2, E)`` everything. BN layers stay in train mode throughout (running statistics keep updating).
  As in the code, stage A always covers epoch 0 and a stage whose start is epoch 0 is skipped (E < 5
  has no BN-only stage; E = 1 trains the head only). ``stage_epochs=[b, c]`` sets other boundaries.
* **Batches.** Each epoch drops its last partial batch, as the code's ``DataLoader(shuffle=True,
  drop_last=True)`` (``trainer.drop_last=false`` keeps it).

Ablations: ``xconv_bn=false`` is task-specific BN with the stored means; ``task_bn=false`` (which needs
``xconv_bn=false``) shares BN across tasks; ``hierarchical=false`` trains everything from epoch 0.

Class-incremental use (ours; the paper is task-incremental): without a task id, ``cil_bn=shared`` uses
the BN state after the last task for every image; ``cil_bn=predicted_task`` first predicts the task with
that state, then re-scores each image within its predicted task under that task's (Xconv-recovered) BN
state.

The hierarchy is declarative: each stage is a phase (:class:`~cl_bench.methods.base.Phase`) that names the
parameters it trains (``trainable``). The phases of a task continue one optimizer (and schedule) that holds
every parameter, as the code's one optimizer per task: parameters a stage does not train have no gradient,
and SGD (also with momentum or weight decay) skips them, so they stay bit-identical.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.base import Capabilities, ContinualModule, Phase, TaskContext
from cl_bench.methods.xconv_bn import BATCH_NORMS, XconvBatchNorm

CIL_BN_MODES = ("shared", "predicted_task")
STAGES = ("head", "bn", "all")


class ConFiT(ContinualModule):
    """Per-task BN with Xconv-recovered means, trained with the three-stage hierarchical schedule.

    Args (beyond :class:`~cl_bench.methods.base.ContinualModule`'s, which refuses ``backbone_lr`` here: every
    parameter trains at ``lr``):
        batch_size, momentum, weight_decay, scheduler: batches of 128, SGD without momentum or weight decay
            at a constant learning rate (official ``main.py``, CIFAR-100; its 10 epochs and lr 0.01 are the
            base's defaults).
        hierarchical: head -> +BN affine -> all stages (``False``: all parameters from epoch 0).
        stage_epochs: first epochs of the BN stage and of the full stage; ``None``: ``[E//5, E//2]``.
        task_bn: store and restore BN state per task.
        xconv_bn: recover old tasks' BN means through the current convs (needs ``task_bn``).
        cil_bn: BN state used without a task id: ``shared`` or ``predicted_task``.
    """

    CAPABILITIES = Capabilities(task_conditioned=True)
    backbone_needs: ClassVar[frozenset[str]] = frozenset({"conv_batchnorm"})  # Xconv BN, per-task BN
    refused_base_args: ClassVar[frozenset[str]] = frozenset({"backbone_lr"})

    def __init__(
        self,
        backbone: Backbone,
        batch_size: int = 128,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        scheduler: str = "none",
        hierarchical: bool = True,
        stage_epochs: list[int] | None = None,
        task_bn: bool = True,
        xconv_bn: bool = True,
        cil_bn: str = "shared",
        **base_args: Any,
    ) -> None:
        super().__init__(
            backbone,
            batch_size=batch_size,
            momentum=momentum,
            weight_decay=weight_decay,
            scheduler=scheduler,
            **base_args,
        )
        if xconv_bn and not task_bn:
            raise ConfigError(
                "method.xconv_bn=true needs method.task_bn=true: the stored pre-conv means assume the "
                "task's own BN state upstream (set xconv_bn=false for shared BN)"
            )
        if cil_bn not in CIL_BN_MODES:
            raise ConfigError(f"method.cil_bn={cil_bn!r}: choose one of {list(CIL_BN_MODES)}")
        if stage_epochs is not None and (
            len(stage_epochs) != 2 or not 0 <= stage_epochs[0] <= stage_epochs[1]
        ):
            raise ConfigError(
                f"method.stage_epochs={stage_epochs}: give [first BN-stage epoch, first full-stage epoch] "
                "with 0 <= first <= second, or null for the paper's [epochs//5, epochs//2]"
            )
        self.hierarchical = hierarchical
        self.stage_epochs = (
            (self.epochs // 5, self.epochs // 2) if stage_epochs is None else tuple(stage_epochs)
        )
        self.task_bn = task_bn
        self.xconv_bn = xconv_bn
        self.cil_bn = cil_bn
        self.bn_state = XconvBatchNorm(backbone, self._probe_input(backbone), track=xconv_bn)
        #: The (task, recovered) BN state currently loaded for inference; ``None``: the live training state.
        self._loaded: tuple[int, bool] | None = None
        #: The task's optimizer and schedule, continued by its phases (``None`` outside a task).
        self._task_optimization: tuple[torch.optim.Optimizer, Any] | None = None

    @staticmethod
    def _probe_input(backbone: Backbone) -> torch.Tensor:
        first_conv = next(m for m in backbone.modules() if isinstance(m, nn.Conv2d))
        size = backbone.data_config.input_size
        return torch.zeros(1, first_conv.in_channels, size, size)

    # ----------------------------------------------------------------- hierarchical fine-tuning
    def stage(self, epoch: int) -> str:
        """``head``, ``bn`` or ``all``: what trains in ``epoch`` (see the module docstring)."""
        if not self.hierarchical:
            return "all"
        bn_start, all_start = self.stage_epochs
        if 1 <= all_start <= epoch:
            return "all"
        if 1 <= bn_start <= epoch:
            return "bn"
        return "head"

    def bn_affine_parameters(self) -> list[nn.Parameter]:
        """Weight and bias of every BatchNorm of the backbone (downsample BNs included)."""
        return [
            p
            for m in self.backbone.modules()
            if isinstance(m, BATCH_NORMS)
            for p in (m.weight, m.bias)
            if p is not None
        ]

    def stage_parameters(self, stage: str) -> tuple[nn.Parameter, ...]:
        """What trains in ``stage``: the head always, BN affine from ``bn``, everything in ``all``."""
        if stage == "all":
            return tuple(self.parameters())
        bn = self.bn_affine_parameters() if stage == "bn" else []
        return (*bn, *self.head.parameters())

    def set_stage(self, stage: str) -> None:
        """Set ``requires_grad`` for ``stage`` (what the runner does around each phase)."""
        trainable = {id(p) for p in self.stage_parameters(stage)}
        for p in self.parameters():
            p.requires_grad_(id(p) in trainable)

    def phases(self, ctx: TaskContext) -> list[Phase]:
        """One phase per stage of the hierarchy, in order, each as many epochs as :meth:`stage` gives it."""
        counts: dict[str, int] = {}
        for epoch in range(self.epochs):
            stage = self.stage(epoch)
            counts[stage] = counts.get(stage, 0) + 1
        return [
            Phase(
                stage,
                epochs,
                ctx.train_set,
                self.batch_size,
                trainable=self.stage_parameters(stage),
                drop_last=True,
            )
            for stage, epochs in counts.items()
        ]

    def param_groups(self) -> list[dict[str, Any]]:
        """Every parameter, frozen or not, so that later stages train without a new optimizer."""
        return [{"params": list(self.parameters()), "lr": self.lr, "name": "all"}]

    def configure_optimizers(self) -> Any:
        """One optimizer (and schedule over all of the task's epochs) per task, continued by its phases."""
        if self._task_optimization is None:
            optimizer = self.make_optimizer()
            scheduler = None
            if self.scheduler_name != "none":
                scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.epochs))
            self._task_optimization = (optimizer, scheduler)
        optimizer, scheduler = self._task_optimization
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ----------------------------------------------------------------- task hooks
    def on_task_start(self, ctx: TaskContext) -> None:
        super().on_task_start(ctx)
        if self.task_bn and self.bn_state.snapshots:
            self.bn_state.load(len(self.bn_state.snapshots) - 1, recover=False)
        self.bn_state.forget_recoveries()
        self._loaded = None

    def on_task_end(self, ctx: TaskContext) -> None:
        self._task_optimization = None
        if self.task_bn:
            self.bn_state.snapshot(ctx.task.index)
        self._loaded = None

    # ----------------------------------------------------------------- inference
    def _use_task_state(self, task: int) -> None:
        """Load ``task``'s BN state for inference (Xconv-recovered for tasks before the last one)."""
        last = len(self.bn_state.snapshots) - 1
        key = (task, self.xconv_bn and task < last)
        if self._loaded != key:
            self.bn_state.load(*key)
            self._loaded = key

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        if self.training or not self.task_bn or not self.bn_state.snapshots:
            return super().forward(x, task)
        last = len(self.bn_state.snapshots) - 1
        if task is not None:
            self._use_task_state(task)
            return super().forward(x, task)
        self._use_task_state(last)
        logits = super().forward(x)
        if self.cil_bn == "shared":
            return logits
        return self._rescore_in_predicted_task(x, logits)

    def _rescore_in_predicted_task(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Logits of each image's predicted task under that task's BN state; ``-inf`` elsewhere."""
        sizes = self.head.task_sizes
        stops = torch.tensor(sizes, device=logits.device).cumsum(0)
        predicted = torch.bucketize(logits.argmax(dim=1), stops, right=True)
        out = torch.full_like(logits, float("-inf"))
        for task in predicted.unique().tolist():
            rows = predicted == task
            start, stop = int(stops[task]) - sizes[task], int(stops[task])
            self._use_task_state(task)
            out[rows, start:stop] = super().forward(x[rows], task)[:, start:stop]
        return out
