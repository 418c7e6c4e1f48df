"""Linear probing: a frozen pre-trained backbone with a linear head trained continually.

Only the head is trained, by SGD on cross-entropy over the seen classes, each task in turn. Features of a
task's training images (evaluation transform, no augmentation) are computed once when the task starts and
the head is trained on them for ``epochs`` epochs, so the backbone runs once per image rather than once per
epoch. The backbone's BatchNorm statistics stay fixed (eval mode).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F

from cl_bench.backbones.base import Backbone
from cl_bench.methods.base import Capabilities, ContinualModule, HeadTraining, Phase, TaskContext


class LinearProbe(ContinualModule):
    """Frozen backbone, continually trained linear head on cached features.

    Args (beyond :class:`~cl_bench.methods.base.ContinualModule`'s, which refuses ``backbone_lr`` here: the
    backbone is frozen):
        epochs, batch_size: 30 epochs of batches of 128, as the head-only joint baseline of RanPAC and SAFE
            (``joint_linear``; ``shared/research/methods_vit.md``).
        weight_decay: 0 (ours; ``joint_linear``: 5e-4).
    """

    CAPABILITIES = Capabilities(frozen_backbone=True)
    refused_base_args: ClassVar[frozenset[str]] = frozenset({"backbone_lr"})

    def __init__(
        self,
        backbone: Backbone,
        epochs: int = 30,
        batch_size: int = 128,
        weight_decay: float = 0.0,
        **base_args: Any,
    ) -> None:
        super().__init__(
            backbone, epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, **base_args
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
