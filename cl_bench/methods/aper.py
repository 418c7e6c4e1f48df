"""APER (ADAM): Zhou, Cai, Ye, Zhan, Liu, "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need" (IJCV 2024, arXiv 2303.07338; code
``zhoudw-zdw/RevisitingCIL`` ``models/aper_*.py``; spec ``shared/research/methods_vit.md`` §5).

* First task only: a PET module (adapter, SSF, deep VPT or shallow VPT, the code's ``vpt_type`` ``deep`` /
  ``shallow``: ``peft=vpt`` / ``vpt_shallow``; :mod:`cl_bench.modules.peft`) is trained with a cosine head
  and cross-entropy (``exps/aper_adapter/*.json``: SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 48,
  20 epochs, cosine to 0), then frozen.
* The embedding is the concatenation ``[f_PTM(x), f_adapted(x)]`` of the pre-trained model and the adapted
  model (``MultiBranchCosineIncrementalNet``): here one backbone run twice, once with its PET modules off
  (:func:`~cl_bench.modules.peft.peft_disabled`), which is exactly the pre-trained model.
* After every task (the first included), each new class's prototype is the mean of its training images'
  embeddings under the evaluation transform; prediction is the cosine prototype classifier
  (:class:`~cl_bench.modules.heads.PrototypeHead`), as in SimpleCIL.

Domain-incremental scenarios (``scenario=dil``, not in the paper): the PET module is trained on the first
domain and the prototypes average every domain seen (feature sums accumulated), as the "NCM with Phase 1" of
RanPAC's DIL branch.

``peft=none`` reduces APER to SimpleCIL on a doubled embedding (the same predictions as SimpleCIL).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from cl_bench.backbones.base import Backbone
from cl_bench.methods.base import TaskContext
from cl_bench.methods.first_session import FirstSessionPetl
from cl_bench.modules.heads import PrototypeHead
from cl_bench.modules.peft import peft_disabled


class APER(FirstSessionPetl):
    """First-session PET, then prototypes of the concatenated pre-trained and adapted embeddings.

    Args: as :class:`~cl_bench.methods.first_session.FirstSessionPetl` (``epochs`` are the first task's).
    """

    backbone_needs: ClassVar[frozenset[str]] = frozenset({"vit_blocks"})  # the PET module
    any_backbone_setting: ClassVar[str | None] = "peft=none"

    @classmethod
    def needs(cls, settings: dict[str, Any]) -> frozenset[str]:
        """``peft=none`` runs on any backbone."""
        return cls.backbone_needs if settings["peft"] != "none" else frozenset()

    def __init__(self, backbone: Backbone, **base_args: Any) -> None:
        super().__init__(backbone, **base_args)
        self.head: nn.Module = PrototypeHead(2 * backbone.feat_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``[f_PTM(x), f_adapted(x)]``."""
        with peft_disabled(self.backbone):
            pretrained = self.backbone(x)
        return torch.cat([pretrained, self.backbone(x)], dim=1)

    def on_task_end(self, ctx: TaskContext) -> None:
        """Freeze after the first task; set each new class's prototype to its mean embedding (DIL: add the
        domain's images to the running mean)."""
        super().on_task_end(ctx)
        features, labels = self.extract_features(ctx, ctx.train_eval_set)
        self.head.fit(features, labels, accumulate=ctx.scenario.domain_incremental)
