"""First-session parameter-efficient tuning, shared by RanPAC (:mod:`cl_bench.methods.ranpac`) and APER
(:mod:`cl_bench.methods.aper`): a PET module (:mod:`cl_bench.modules.peft`) trained with a cosine head on the
first task only (one ``train`` phase), then frozen with the backbone; later tasks have no training phase.

Under ``scenario=dil`` the first task is the first domain with every class, as in RanPAC's DIL branch
(``trainer.py``: Phase 1 on the first domain, ``dil_init`` then skips it for the others).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from cl_bench.backbones.base import Backbone
from cl_bench.methods.base import Capabilities, ContinualModule, Phase, TaskContext
from cl_bench.modules.analytic_heads import CosineLinear
from cl_bench.modules.peft import attach_peft, freeze_all_but_peft


class FirstSessionPetl(ContinualModule):
    """A PET module trained with a cosine head on the first task only, then frozen with the backbone.

    Args (beyond :class:`~cl_bench.methods.base.ContinualModule`'s):
        epochs, batch_size: the first task's 20 epochs of batches of 48 (RanPAC ``tuned_epoch``, RevisitingCIL
            ``exps/aper_adapter``; their lr 0.01, SGD momentum 0.9, weight decay 5e-4 and cosine schedule are
            the base's defaults).
        peft: ``adapter``, ``ssf``, ``vpt`` (deep), ``vpt_shallow`` or ``none`` (no first-session training).
        adapter_bottleneck, adapter_scale, adapter_dropout, prompt_tokens: PET sizes
            (:func:`~cl_bench.modules.peft.attach_peft`; official 64, 0.1, 0.1, 5).
        cosine_sigma: the initial scale of the first-session cosine head.
    """

    CAPABILITIES = Capabilities(domain_incremental=True)
    #: Set when the first task ends: the backbone never trains again.
    backbone_frozen: bool = False

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

    @property
    def capabilities(self) -> Capabilities:
        """The backbone is frozen (features cached by the evaluator) once the first task is learnt."""
        return replace(self.CAPABILITIES, frozen_backbone=self.backbone_frozen)

    def phases(self, ctx: TaskContext) -> list[Phase]:
        """The first task's PET training; no training phase after it."""
        return list(super().phases(ctx)) if ctx.task.index == 0 and self.adapts else []

    def training_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        assert self.cosine_head is not None
        return self.cosine_head(self.backbone(inputs))

    def on_task_end(self, ctx: TaskContext) -> None:
        """After the first task the backbone (with its PET module) is frozen for good."""
        if ctx.task.index == 0:
            self.backbone.requires_grad_(False)
            if self.cosine_head is not None:
                self.cosine_head.requires_grad_(False)
            self.backbone_frozen = True  # from now on: cached features, eval mode
            self.backbone.eval()

    def structure(self) -> dict[str, Any]:
        """Also: whether the first session's cosine head exists and the backbone is frozen for good."""
        return {
            **super().structure(),
            "cosine_head": self.cosine_head is not None,
            "backbone_frozen": self.backbone_frozen,
        }

    def restore_structure(self, structure: dict[str, Any]) -> None:
        super().restore_structure(structure)
        if structure["cosine_head"]:
            self.cosine_head = CosineLinear(self.backbone.feat_dim, self.cosine_sigma)
        self.backbone_frozen = bool(structure["backbone_frozen"])
