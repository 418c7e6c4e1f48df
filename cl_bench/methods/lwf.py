"""Learning without Forgetting: Li & Hoiem, "Learning without Forgetting" (ECCV 2016; TPAMI 2017), Sec. 3,
the knowledge-distillation loss ``L_old`` on the old tasks' outputs with temperature ``T = 2``.

Before each task after the first, the network (backbone + head with the old classes' blocks) is copied as a
frozen teacher in eval mode. Each training step on the new task's images minimises::

    CE(new task) + alpha * KL( softmax(z_teacher / T) || softmax(z_student / T) )

with the KL averaged over the batch, as Avalanche's ``LwF`` (``avalanche/training/regularization.py``;
defaults ``alpha=1``, ``temperature=2``, no ``T^2`` factor). The KL has the gradients of Li & Hoiem's
modified cross-entropy (it only subtracts the teacher's constant entropy), and is zero when the student
reproduces the teacher.

Teacher inputs (``teacher_inputs``): ``unaugmented`` (default) records the teacher's logits once per task on
the task's training images under the evaluation transform, before the ``train`` phase, and pairs each
augmented training image with its own image's recorded logits: Li & Hoiem record ``Y_o`` for the new images
before training, and Mammoth's ``lwf`` ``begin_task`` computes them on the not-augmented images.
``augmented``: the teacher runs on the student's augmented batch at every step (Avalanche).

Old head blocks:

* class-incremental (``loss_scope=seen``): one softmax over all old classes' logits (Avalanche's single
  head, "previously active units"); the cross-entropy is over all seen classes, so old blocks are trained by
  both terms;
* task-incremental, or ``loss_scope=task``: one softmax per old task over its own block, summed over the old
  tasks (Li & Hoiem's multi-head ``L_old`` summed over old tasks, and Avalanche's per-task-head sum); the
  cross-entropy reaches only the new block, so old blocks move only under distillation (and weight decay).

Warm-up: before each task after the first, only the new task's head block is trained for
``warmup_epochs`` epochs (default ``None``: ``epochs``, Mammoth's ``n_epochs``) on the frozen backbone (eval
mode) with plain SGD at ``lr`` (no momentum or weight decay), as Mammoth's ``lwf`` ``begin_task`` and Li &
Hoiem's warm-up step: a head-only phase ``warmup`` before the phase ``train`` (``warmup_epochs=0``: none, as
Avalanche). The features of the task's training images are computed once; each warm-up epoch draws a new
order of them.

Defaults (``cl_bench/conf/method/lwf.yaml``): ``alpha`` 1 and ``temperature`` 2 (Avalanche; Li & Hoiem's
``lambda_o = 1``, ``T = 2``; Mammoth's ``alpha`` is 0.5), a warm-up of ``epochs`` epochs and un-augmented
teacher inputs (Mammoth, Li & Hoiem); the optimiser settings are the repository's ``seq_ft`` protocol.

Deviations: the warm-up's features and the recorded teacher logits use the evaluation transform (Mammoth's
warm-up runs the backbone on augmented images every epoch; its teacher inputs are the not-augmented
tensors).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.base import ContinualModule, HeadTraining, Phase, TaskContext
from cl_bench.scenario import Task

TEACHER_INPUTS = ("unaugmented", "augmented")


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T))`` averaged over the batch."""
    log_student = F.log_softmax(student.float() / temperature, dim=1)
    target = F.softmax(teacher.float() / temperature, dim=1)
    return F.kl_div(log_student, target, reduction="batchmean")


class WithTeacherLogits(Dataset):
    """``(x, y, teacher_logits[i])`` for item ``i`` of ``dataset``: each image with its recorded logits."""

    def __init__(self, dataset: Dataset, teacher_logits: torch.Tensor) -> None:
        if len(dataset) != len(teacher_logits):  # type: ignore[arg-type]
            raise ValueError("one row of teacher logits per training image is needed")
        self.dataset = dataset
        self.teacher_logits = teacher_logits

    def __len__(self) -> int:
        return len(self.teacher_logits)

    def __getitem__(self, index: int) -> tuple[Any, Any, torch.Tensor]:
        x, y = self.dataset[index]
        return x, y, self.teacher_logits[index]


class FrozenTeacher(nn.Module):
    """A frozen eval-mode copy of backbone and head: ``head(backbone(x))``."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.head = copy.deepcopy(head)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Stays in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class LwF(ContinualModule):
    """Fine-tuning with distillation from the previous model on the old classes (module docstring).

    Args:
        alpha: weight of the distillation term.
        temperature: softmax temperature ``T`` of both teacher and student.
        warmup_epochs: epochs of new-head-only training on frozen features before each task after the
            first (0: none; ``None``: ``epochs``).
        teacher_inputs: ``unaugmented``: teacher logits recorded once per task on the evaluation-transform
            images; ``augmented``: the teacher runs on each augmented training batch.
        (the rest as :class:`~cl_bench.methods.base.ContinualModule`)
    """

    def __init__(
        self,
        backbone: Backbone,
        alpha: float = 1.0,
        temperature: float = 2.0,
        warmup_epochs: int | None = None,
        teacher_inputs: str = "unaugmented",
        **base_args: Any,
    ) -> None:
        super().__init__(
            backbone,
            **base_args,
        )
        if alpha < 0:
            raise ConfigError(f"method.alpha={alpha} must be >= 0")
        if temperature <= 0:
            raise ConfigError(f"method.temperature={temperature} must be > 0")
        if warmup_epochs is not None and warmup_epochs < 0:
            raise ConfigError(f"method.warmup_epochs={warmup_epochs} must be >= 0 (or null: method.epochs)")
        if teacher_inputs not in TEACHER_INPUTS:
            raise ConfigError(
                f"method.teacher_inputs={teacher_inputs!r}: choose one of {list(TEACHER_INPUTS)}"
            )
        self.alpha = alpha
        self.temperature = temperature
        self.warmup_epochs = self.epochs if warmup_epochs is None else warmup_epochs
        self.teacher_inputs = teacher_inputs
        self.old_tasks: tuple[Task, ...] = ()
        # Kept in a tuple so that it is not a submodule: no optimiser, state_dict or train() reaches it.
        self._teacher: tuple[FrozenTeacher, ...] = ()

    @property
    def teacher(self) -> FrozenTeacher | None:
        return self._teacher[0] if self._teacher else None

    # ----------------------------------------------------------------- task hooks
    def on_task_start(self, ctx: TaskContext) -> None:
        """Snapshot the teacher (old classes only), then grow the head."""
        self.old_tasks = ctx.scenario.tasks[: ctx.task.index]
        self._teacher = (FrozenTeacher(self.backbone, self.head),) if self.old_tasks else ()
        super().on_task_start(ctx)

    def phases(self, ctx: TaskContext) -> list[Phase]:
        """``warmup`` (tasks after the first, ``warmup_epochs > 0``), then ``train``."""
        if not (self.old_tasks and self.warmup_epochs > 0 and self.epochs > 0):
            return list(super().phases(ctx))
        return [self.warmup_phase(ctx), *super().phases(ctx)]

    def train_dataset(self, ctx: TaskContext) -> Dataset | None:
        """The training images, each with its recorded teacher logits (``teacher_inputs=unaugmented``)."""
        if self.teacher is None or self.teacher_inputs == "augmented" or self.epochs == 0:
            return ctx.train_set
        teacher = self.teacher.to(self.device)
        logits, _ = self.extract_features(ctx, ctx.train_eval_set, embed=teacher)
        return WithTeacherLogits(ctx.train_set, logits)

    def warmup_phase(self, ctx: TaskContext) -> Phase:
        """Only the new head block, on frozen-backbone features, cross-entropy over its classes, plain SGD."""
        assert self.task is not None
        block = self.head.blocks[-1]
        features, labels = self.extract_features(ctx, ctx.train_eval_set)
        training = HeadTraining(
            block, loss=F.cross_entropy, optimizer=lambda params: torch.optim.SGD(params, lr=self.lr)
        )
        data = self.features_dataset(features, labels - self.task.start)
        return Phase("warmup", self.warmup_epochs, data, self.batch_size, head_training=training)

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    # ----------------------------------------------------------------- training
    def distillation_loss(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """KD on the old classes: one softmax over all, or one per old task (TIL, ``loss_scope=task``)."""
        if not (self.task_incremental or self.loss_scope == "task"):
            stop = teacher_logits.shape[1]
            return distillation(logits[:, :stop], teacher_logits, self.temperature)
        return sum(
            distillation(logits[:, t.start : t.stop], teacher_logits[:, t.start : t.stop], self.temperature)
            for t in self.old_tasks
        )  # type: ignore[return-value]

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """``batch``: ``(x, y)``, or ``(x, y, recorded teacher logits)`` (``teacher_inputs=unaugmented``)."""
        x, y = batch[0], batch[1]
        logits = self.training_logits(x)
        ce = F.cross_entropy(*self.task_logits(logits, y))
        loss = ce
        if self.teacher is not None:
            teacher_logits = batch[2] if len(batch) == 3 else self.teacher(x)
            kd = self.distillation_loss(logits, teacher_logits)
            loss = ce + self.alpha * kd
            self.log("train/kd", kd, on_step=False, on_epoch=True, batch_size=len(y))
        self.check_finite(loss, batch_idx)
        self.log("train/ce", ce, on_step=False, on_epoch=True, batch_size=len(y))
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss
