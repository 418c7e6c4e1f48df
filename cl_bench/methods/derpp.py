"""Dark Experience Replay (DER) and DER++: Buzzega et al. 2020, "Dark Experience for General Continual
Learning: a Strong, Simple Baseline" (NeurIPS 2020), Sec. 3, Algorithms 1 (DER) and 2 (DER++).

The reservoir buffer (:class:`~cl_bench.modules.replay.ReservoirBuffer`, the same stream policy as
:mod:`cl_bench.methods.er`) keeps, per example, its label and the **logits the network gave it when it was
inserted** (the logits of that step's forward pass, before the update, as Mammoth's ``models/derpp.py``).
Each step minimises::

    CE(current batch) + alpha * MSE(f(x'), z') + beta * CE(f(x''), y'')

with ``(x', z')`` and ``(x'', y'')`` two independent uniform draws of ``replay_batch_size`` buffered
examples, each through its own forward pass and augmented again. ``beta = 0`` is DER (the second draw and
its forward pass are skipped).

The logits are **full width**, as Mammoth's fixed-size classifier: the head
(:class:`ReservedLinearHead`) holds a block for every class of the scenario from the first task on, the
stored logits cover all of them (classes of later tasks included) and the MSE is the mean over every column
and example (``F.mse_loss``), so old examples' future-class logits are held too and ``alpha`` means
Mammoth's strength. Future blocks are trained only by the MSE (and weight decay) until their task starts;
they are invisible to evaluation, which scores the seen classes. The CE terms follow
:meth:`ExperienceReplay.scoped_cross_entropy` over the seen classes: all of them in the class-incremental
setting, each example's own task block in the task-incremental one (or with ``loss_scope=task``); the MSE is
on every column in both, as Mammoth in task-IL.

Deviation from Mammoth: its cross-entropy runs over its head's every output (future classes included,
whose logits it pushes down); here it covers the seen classes only (the repository's ``loss_scope``
convention, shared with ER).

Defaults (``cl_bench/conf/method/derpp.yaml``): Mammoth's seq-cifar100 ``derpp`` configuration with a
500-example buffer, ``alpha`` 0.3 and ``beta`` 0.5; ``replay_batch_size`` = ``batch_size`` (Mammoth's
``--minibatch_size`` default); the optimiser settings are the repository's ``seq_ft`` protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.base import TaskContext
from cl_bench.methods.er import ExperienceReplay
from cl_bench.modules.heads import IncrementalLinearHead
from cl_bench.modules.replay import ReservoirBuffer


class ReservedLinearHead(IncrementalLinearHead):
    """Task blocks for every class of the scenario, created at once by :meth:`reserve` (Mammoth's
    fixed-size classifier): :meth:`add_task` then opens the next block, ``forward`` scores the classes of
    the opened blocks (what evaluation sees) and :meth:`forward_all` every class (what DER++ stores)."""

    def __init__(self, in_features: int, bias: bool = True) -> None:
        super().__init__(in_features, bias)
        #: How many blocks :meth:`add_task` has opened.
        self.open_tasks = 0

    @property
    def num_classes(self) -> int:
        """Classes of the opened blocks."""
        return sum(self.task_sizes[: self.open_tasks])

    def reserve(self, task_sizes: Sequence[int]) -> None:
        """Create the blocks of every task (``task_sizes``, in order) unless they exist."""
        if not len(self.blocks):
            for n_classes in task_sizes:
                super().add_task(n_classes)
        elif self.task_sizes != list(task_sizes):
            raise ValueError(f"blocks {self.task_sizes} were reserved, not {list(task_sizes)}")

    def add_task(self, n_classes: int) -> nn.Linear:
        """Open the next reserved block (it must have ``n_classes`` outputs)."""
        if self.open_tasks >= len(self.blocks):
            raise RuntimeError("reserve() the scenario's task blocks before its tasks start")
        block = self.blocks[self.open_tasks]
        if block.out_features != n_classes:
            raise ValueError(
                f"task block {self.open_tasks} has {block.out_features} classes, not {n_classes}"
            )
        self.open_tasks += 1
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([block(x) for block in self.blocks[: self.open_tasks]], dim=1)

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every reserved class."""
        return super().forward(x)


class DERPlusPlus(ExperienceReplay):
    """DER++ (``beta > 0``) or DER (``beta = 0``): replay with logit matching (module docstring).

    Args:
        alpha: weight of the MSE between the network's and the stored logits of buffered examples.
        beta: weight of the cross-entropy on buffered examples' labels (0: DER).
        (the rest as :class:`~cl_bench.methods.er.ExperienceReplay`)
    """

    def __init__(
        self,
        backbone: Backbone,
        alpha: float = 0.3,
        beta: float = 0.5,
        **base_args: Any,
    ) -> None:
        super().__init__(backbone, **base_args)
        if alpha < 0 or beta < 0:
            raise ConfigError(f"method.alpha={alpha} and method.beta={beta} must be >= 0")
        self.alpha = alpha
        self.beta = beta

    def build_head(self) -> ReservedLinearHead:
        return ReservedLinearHead(self.backbone.feat_dim)

    def build_buffer(self, buffer_size: int) -> ReservoirBuffer:
        return ReservoirBuffer(buffer_size, store_logits=True)

    def on_task_start(self, ctx: TaskContext) -> None:
        """Reserve every task's head block (first task), then open this task's."""
        self.head.reserve([task.num_classes for task in ctx.scenario.tasks])
        super().on_task_start(ctx)

    def structure(self) -> dict[str, Any]:
        """The base's, plus how many reserved head blocks are open (the blocks come with the
        ``state_dict``)."""
        return {**super().structure(), "open_tasks": self.head.open_tasks}

    def restore_structure(self, structure: dict[str, Any]) -> None:
        """Open as many head blocks as the saved run had, so the next task opens the next block."""
        super().restore_structure(structure)
        self.head.open_tasks = int(structure["open_tasks"])

    def all_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every class of the scenario (the stored and matched ones)."""
        return self.head.forward_all(self.embed(x))

    def seen_cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """:meth:`scoped_cross_entropy` on the seen classes' columns of full-width ``logits``."""
        return self.scoped_cross_entropy(logits[:, : self.head.num_classes], targets)

    def logit_matching(self, slots: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Mean squared error of buffered examples' full-width ``logits`` against their stored logits, over
        every column and example (Mammoth's ``F.mse_loss``)."""
        return F.mse_loss(logits.float(), self.buffer.logits[slots])

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        logits = self.all_logits(x)
        ce = self.seen_cross_entropy(logits, y)
        loss = ce
        if len(self.buffer):
            buf_x, _, slots = self.replay_batch(self.replay_batch_size)
            mse = self.logit_matching(slots, self.all_logits(buf_x.to(x)))
            loss = loss + self.alpha * mse
            self.log("train/mse", mse, on_step=False, on_epoch=True, batch_size=len(slots))
            if self.beta > 0:
                buf_x, buf_y, _ = self.replay_batch(self.replay_batch_size)
                buf_ce = self.seen_cross_entropy(self.all_logits(buf_x.to(x)), buf_y)
                loss = loss + self.beta * buf_ce
                self.log("train/buffer_ce", buf_ce, on_step=False, on_epoch=True, batch_size=len(buf_y))
        self.check_finite(loss, batch_idx)
        self.log("train/ce", ce, on_step=False, on_epoch=True, batch_size=len(y))
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        assert self.task is not None
        self.buffer.add(index, y, self.task.index, logits=logits.detach().float())
        return loss
