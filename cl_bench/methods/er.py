"""Experience Replay (ER): Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning"
(arXiv 1902.10486), Sec. 3: experience replay (their Algorithm 1) with the reservoir-sampling memory.

A buffer of ``buffer_size`` examples is filled by reservoir sampling (:class:`ReservoirBuffer`) over the
stream of training examples: every example of a training batch is offered once, after the step's loss
(so with ``E`` epochs an example is offered ``E`` times, as in Mammoth's ``er``; with one epoch this is the
paper's single pass). Every step with a non-empty buffer (from the first task's second step on, as Mammoth)
concatenates the current batch with ``replay_batch_size`` examples drawn uniformly without replacement from
the buffer (re-read from the image source and augmented again) and takes one SGD step on the cross-entropy
of the joint batch (as Mammoth's ``models/er.py``):

* class-incremental (``loss_scope=seen``): over every class seen so far;
* task-incremental, or ``loss_scope=task``: each example over its own task's classes (its task's head
  block), old or current, so replayed examples keep training their own task's block.

Defaults (``cl_bench/conf/method/er.yaml``): ``buffer_size`` 500 and ``replay_batch_size`` = ``batch_size`` as
Mammoth's seq-cifar10 ``er`` configuration (``--minibatch_size`` defaults to the batch size); the optimiser
settings are the repository's ``seq_ft`` protocol so the baselines differ only by their method.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cl_bench.backbones.base import Backbone
from cl_bench.data.base import TaskDataset
from cl_bench.errors import ConfigError
from cl_bench.methods.base import ContinualModule, TaskContext
from cl_bench.modules.replay import IndexedDataset, ReservoirBuffer, load_examples, replayable


class ExperienceReplay(ContinualModule):
    """Fine-tuning on the current batch joined with a reservoir-sampled replay batch (module docstring).

    Args:
        buffer_size: the number of buffered examples ``M`` (the method's memory cost).
        replay_batch_size: buffer examples per step; ``None``: ``batch_size``.
        (the rest as :class:`~cl_bench.methods.base.ContinualModule`)
    """

    def __init__(
        self,
        backbone: Backbone,
        buffer_size: int = 500,
        replay_batch_size: int | None = None,
        **base_args: Any,
    ) -> None:
        super().__init__(
            backbone,
            **base_args,
        )
        if buffer_size < 1:
            raise ConfigError(f"method.buffer_size={buffer_size} must be >= 1")
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ConfigError(f"method.replay_batch_size={replay_batch_size} must be >= 1 (or null)")
        self.replay_batch_size = self.batch_size if replay_batch_size is None else replay_batch_size
        self.buffer = self.build_buffer(buffer_size)
        #: ``[start, stop)`` of the task owning each class position (set when a task starts).
        self.class_task_range = torch.zeros(0, 2, dtype=torch.long)
        self.replay_source: TaskDataset | None = None

    def build_buffer(self, buffer_size: int) -> ReservoirBuffer:
        return ReservoirBuffer(buffer_size)

    # ----------------------------------------------------------------- task hooks
    def on_task_start(self, ctx: TaskContext) -> None:
        super().on_task_start(ctx)
        ranges = [[t.start, t.stop] for t in ctx.scenario.tasks for _ in range(t.num_classes)]
        self.class_task_range = torch.tensor(ranges, dtype=torch.long)

    def train_dataset(self, ctx: TaskContext) -> Dataset:
        """The task's training images with their image-source index, so that steps can buffer them."""
        self.replay_source = replayable(ctx.train_set)
        return IndexedDataset(self.replay_source)

    # ----------------------------------------------------------------- training
    def scoped_cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the seen classes, or (TIL / ``loss_scope=task``) over each example's task."""
        if not (self.task_incremental or self.loss_scope == "task"):
            return F.cross_entropy(logits, targets)
        ranges = self.class_task_range.to(targets.device)[targets]
        positions = torch.arange(logits.shape[1], device=logits.device)
        inside = (positions >= ranges[:, :1]) & (positions < ranges[:, 1:])
        return F.cross_entropy(logits.masked_fill(~inside, float("-inf")), targets)

    def replay_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(inputs, labels, slots)`` of ``min(n, len(buffer))`` buffered examples, freshly augmented."""
        assert self.replay_source is not None
        slots = self.buffer.sample(n)
        inputs = load_examples(self.replay_source, self.buffer.index[slots].tolist())
        return inputs.to(self.device), self.buffer.label[slots], slots

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        inputs, targets = x, y
        if len(self.buffer):
            buf_x, buf_y, _ = self.replay_batch(self.replay_batch_size)
            inputs, targets = torch.cat([x, buf_x.to(x)]), torch.cat([y, buf_y])
        loss = self.scoped_cross_entropy(self.training_logits(inputs), targets)
        self.check_finite(loss, batch_idx)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        assert self.task is not None
        self.buffer.add(index, y, self.task.index)
        return loss
