"""RanPAC: McDonnell, Gong, Parvaneh, Abbasnejad, van den Hengel, "RanPAC: Random Projections and
Pre-trained Models for Continual Learning" (NeurIPS 2023; code ``RanPAC/RanPAC``, ``RanPAC.py``; spec
``shared/research/methods_vit.md`` §5).

* Phase 1 (first task only): a PET module (:mod:`cl_bench.modules.peft`; adapter for CIFAR/CUB, SSF for
  IN-R/IN-A/VTAB, VPT for OmniBenchmark/Cars in ``args/*_publish.csv``) is trained with a cosine head
  (:class:`~cl_bench.modules.analytic_heads.CosineLinear`, ``sigma`` 1) and cross-entropy over the first
  task's classes: SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 48, 20 epochs, cosine to 0. Then the
  whole backbone is frozen and the cosine head discarded from inference.
* Phase 2 (every task): the random-projection ridge head
  (:class:`~cl_bench.modules.analytic_heads.RandomProjectionRidgeHead`, ``M`` 10000, ``lambda`` in
  ``10^{-8..8}``) accumulates the task's training features under the evaluation transform and is re-solved.

``peft=none`` skips phase 1 (the "No Phase 1" ablation of the RanPAC tables); ``rp_dim=0`` fits the ridge on
the features themselves (the code's ``M=0``: "no RP, only decorrelation"). The official ``sigma`` scaling of
the ridge logits does not change the argmax and is left out.

:class:`~cl_bench.methods.first_session.FirstSessionPetl` holds phase 1 (shared with APER): after the first
task RanPAC has no training phase.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.base import TaskContext
from cl_bench.methods.first_session import FirstSessionPetl
from cl_bench.modules.analytic_heads import RandomProjectionRidgeHead, ridge_grid


class RanPAC(FirstSessionPetl):
    """Phase-1 PET on the first task, then a random-projection ridge head updated analytically per task.

    Args (beyond :class:`FirstSessionPetl`'s):
        rp_dim: ``M``, the random projection's width (0: none).
        ridge_exponents: ``[low, high]``: lambda is searched in ``10^low .. 10^high``.
    """

    backbone_needs: ClassVar[frozenset[str]] = frozenset({"vit_blocks"})  # the PET module
    any_backbone_setting: ClassVar[str | None] = "peft=none"

    @classmethod
    def needs(cls, settings: dict[str, Any]) -> frozenset[str]:
        """``peft=none`` runs on any backbone."""
        return cls.backbone_needs if settings["peft"] != "none" else frozenset()

    def __init__(
        self,
        backbone: Backbone,
        rp_dim: int = 10000,
        ridge_exponents: tuple[int, int] | list[int] = (-8, 8),
        **base_args: Any,
    ) -> None:
        if len(ridge_exponents) != 2:
            raise ConfigError(f"method.ridge_exponents={list(ridge_exponents)}: give [low, high]")
        super().__init__(backbone, **base_args)
        self.head: nn.Module = RandomProjectionRidgeHead(
            backbone.feat_dim, rp_dim, ridge_grid(*ridge_exponents)
        )

    def on_task_end(self, ctx: TaskContext) -> None:
        """Freeze after the first task, then add this task's features to the ridge statistics and solve."""
        super().on_task_end(ctx)
        features, labels = self.extract_features(ctx, ctx.train_eval_set)
        self.head.fit(features, labels, generator=ctx.generator())
