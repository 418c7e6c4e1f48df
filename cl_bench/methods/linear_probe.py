"""Linear probing: a frozen pre-trained backbone with a linear head trained continually.

Only the head is trained, by SGD on cross-entropy over the seen classes, each task in turn. Features of a
task's training images (evaluation transform, no augmentation) are computed once when the task starts and
the head is trained on them for ``epochs`` epochs, so the backbone runs once per image rather than once per
epoch. The backbone's BatchNorm statistics stay fixed (eval mode).
"""

from __future__ import annotations

import torch.nn.functional as F

from cl_bench.backbones.base import Backbone
from cl_bench.methods.base import Capabilities, ContinualModule, HeadTraining, Phase, TaskContext


class LinearProbe(ContinualModule):
    """Frozen backbone, continually trained linear head on cached features."""

    CAPABILITIES = Capabilities(frozen_backbone=True)

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

    def phases(self, ctx: TaskContext) -> list[Phase]:
        """One head-only phase on the task's training images embedded once by the frozen backbone."""
        features = self.features_dataset(*self.extract_features(ctx, ctx.train_eval_set))
        training = HeadTraining(
            self.head,
            loss=lambda logits, labels: F.cross_entropy(*self.task_logits(logits, labels)),
            optimizer=lambda params: self.make_optimizer([{"params": params, "lr": self.lr, "name": "head"}]),
            scheduler=self.make_scheduler,
        )
        return [Phase("train", self.epochs, features, self.batch_size, head_training=training)]
