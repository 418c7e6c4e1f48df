"""Linear probing: a frozen pre-trained backbone with a linear head trained continually.

Only the head is trained, by SGD on cross-entropy over the seen classes, each task in turn. Features of a
task's training images (evaluation transform, no augmentation) are computed once when the task starts and
the head is trained on them for ``epochs`` epochs, so the backbone runs once per image rather than once per
epoch. The backbone's BatchNorm statistics stay fixed (eval mode).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch.utils.data import Dataset

from cl_bench.backbones.base import Backbone
from cl_bench.methods.base import ContinualModule, TaskContext


class LinearProbe(ContinualModule):
    """Frozen backbone, continually trained linear head on cached features."""

    frozen_backbone: ClassVar[bool] = True

    def __init__(
        self,
        backbone: Backbone,
        epochs: int = 30,
        batch_size: int = 128,
        lr: float = 0.01,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        scheduler: str = "cosine",
        loss_scope: str = "seen",
    ) -> None:
        super().__init__(
            backbone,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer,
            momentum=momentum,
            weight_decay=weight_decay,
            scheduler=scheduler,
            loss_scope=loss_scope,
        )

    def train_dataset(self, ctx: TaskContext) -> Dataset:
        """The task's training images embedded once by the frozen backbone."""
        return self.features_dataset(*self.extract_features(ctx, ctx.train_eval_set))

    def training_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Training batches hold cached embeddings, not images."""
        return self.classify(inputs)
