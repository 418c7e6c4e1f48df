"""Sequential fine-tuning: the lower-bound baseline of every continual fine-tuning paper.

The whole network (backbone and a linear head grown by one block per task) is trained with cross-entropy on
each task in turn, with no measure against forgetting ("Finetune" in PyCIL/LAMDA-PILOT, "Seq FT" in SLCA,
Zhang et al. 2023, Table 1). Defaults: SGD, momentum 0.9, cosine schedule; ``loss_scope=seen`` uses the
logits of every seen class as PyCIL's Finetune does.
"""

from __future__ import annotations

from cl_bench.backbones.base import Backbone
from cl_bench.methods.base import ContinualModule


class SequentialFineTuning(ContinualModule):
    """Full fine-tuning of backbone and head on each task in sequence (see module docstring)."""

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
        super().__init__(
            backbone,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            backbone_lr=backbone_lr,
            optimizer=optimizer,
            momentum=momentum,
            weight_decay=weight_decay,
            scheduler=scheduler,
            loss_scope=loss_scope,
        )
