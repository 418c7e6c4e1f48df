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

:class:`FirstSessionPetl` holds phase 1 and is shared with APER (:mod:`cl_bench.methods.aper`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.base import ContinualModule, TaskContext
from cl_bench.modules.analytic_heads import CosineLinear, RandomProjectionRidgeHead, ridge_grid
from cl_bench.modules.peft import attach_peft, freeze_all_but_peft


class FirstSessionPetl(ContinualModule):
    """A PET module trained with a cosine head on the first task only, then frozen with the backbone.

    Args (beyond :class:`~cl_bench.methods.base.ContinualModule`'s; ``epochs`` are the first task's):
        peft: ``adapter``, ``ssf``, ``vpt`` or ``none`` (no first-session training).
        adapter_bottleneck, adapter_scale, adapter_dropout, prompt_tokens: PET sizes
            (:func:`~cl_bench.modules.peft.attach_peft`; official 64, 0.1, 0.1, 5).
        cosine_sigma: the initial scale of the first-session cosine head.
    """

    def __init__(
        self,
        backbone: Backbone,
        peft: str = "adapter",
        adapter_bottleneck: int = 64,
        adapter_scale: float = 0.1,
        adapter_dropout: float = 0.1,
        prompt_tokens: int = 5,
        cosine_sigma: float = 1.0,
        epochs: int = 20,
        batch_size: int = 48,
        **base_args: Any,
    ) -> None:
        super().__init__(backbone, epochs=epochs, batch_size=batch_size, **base_args)
        attach_peft(
            backbone,
            peft,
            adapter_bottleneck=adapter_bottleneck,
            adapter_scale=adapter_scale,
            adapter_dropout=adapter_dropout,
            prompt_tokens=prompt_tokens,
        )
        freeze_all_but_peft(backbone)
        self.peft = peft
        self.cosine_sigma = cosine_sigma
        #: The first session's cosine head (training only; ``None`` before it and without PET).
        self.cosine_head: CosineLinear | None = None

    @property
    def adapts(self) -> bool:
        """Whether the first task trains a PET module."""
        return self.peft != "none" and self.epochs > 0

    def on_task_start(self, ctx: TaskContext) -> None:
        super().on_task_start(ctx)
        if ctx.task.index == 0 and self.adapts:
            self.cosine_head = CosineLinear(self.backbone.feat_dim, self.cosine_sigma)
            self.cosine_head.add_task(ctx.task.num_classes)

    def train_dataset(self, ctx: TaskContext) -> Any:
        return ctx.train_set if ctx.task.index == 0 and self.adapts else None

    def training_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        assert self.cosine_head is not None
        return self.cosine_head(self.backbone(inputs))

    def on_task_end(self, ctx: TaskContext) -> None:
        """After the first task the backbone (with its PET module) is frozen for good."""
        if ctx.task.index == 0:
            self.backbone.requires_grad_(False)
            if self.cosine_head is not None:
                self.cosine_head.requires_grad_(False)
            self.frozen_backbone = True  # type: ignore[misc]  # from now on: cached features, eval mode
            self.backbone.eval()

    def task_generator(self, ctx: TaskContext) -> torch.Generator:
        """A generator seeded by (run seed, task) for the analytic heads' random choices."""
        return torch.Generator().manual_seed(ctx.seed * 1000 + ctx.task.index)


class RanPAC(FirstSessionPetl):
    """Phase-1 PET on the first task, then a random-projection ridge head updated analytically per task.

    Args (beyond :class:`FirstSessionPetl`'s):
        rp_dim: ``M``, the random projection's width (0: none).
        ridge_exponents: ``[low, high]``: lambda is searched in ``10^low .. 10^high``.
    """

    backbone_needs: ClassVar[frozenset[str]] = frozenset({"vit_blocks"})  # the PET module

    @classmethod
    def needs(cls, settings: dict[str, Any]) -> frozenset[str]:
        """``peft=none`` runs on any backbone."""
        return cls.backbone_needs if settings["peft"] != "none" else frozenset()

    def __init__(
        self,
        backbone: Backbone,
        rp_dim: int = 10000,
        ridge_exponents: tuple[int, int] | list[int] = (-8, 8),
        **first_session_args: Any,
    ) -> None:
        if len(ridge_exponents) != 2:
            raise ConfigError(f"method.ridge_exponents={list(ridge_exponents)}: give [low, high]")
        super().__init__(backbone, **first_session_args)
        self.head: nn.Module = RandomProjectionRidgeHead(
            backbone.feat_dim, rp_dim, ridge_grid(*ridge_exponents)
        )

    def on_task_end(self, ctx: TaskContext) -> None:
        """Freeze after the first task, then add this task's features to the ridge statistics and solve."""
        super().on_task_end(ctx)
        features, labels = self.extract_features(ctx, ctx.train_eval_set)
        self.head.fit(features, labels, generator=self.task_generator(ctx))
