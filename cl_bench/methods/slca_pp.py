"""SLCA++ (Zhang, Wang, Kang, Chen, Wei, "SLCA++: Unleash the Power of Sequential Fine-tuning for
Continual Learning with Pre-training", arXiv 2408.08295): SLCA (:mod:`cl_bench.methods.slca`) with a
symmetric cross-entropy loss and a parameter-efficient "Hybrid Slow Learner".

What the abstract states: the slow learner is enhanced "with a symmetric cross-entropy loss (SCE)" and
sequential fine-tuning is run with "a parameter-efficient strategy". The rest follows the official code
(``GengDavid/SLCA`` @169d4e6, ``models/slca_pp.py``, ``convs/vits.py``, ``convs/linears.py``;
``shared/research/methods_vit.md`` §2.2-2.5):

* **Hybrid SL**: LoRA (:mod:`cl_bench.methods.lora`) of rank 4 and scale 0.8 on ``attn.qkv`` (fused),
  ``mlp.fc1`` and ``mlp.fc2`` of every block, ``A`` initialised with the top right singular vectors of the
  pre-trained weight and ``B = 0``, never merged; the trainable backbone parameters are those whose name
  contains ``norm``, ``bias``, ``cls_token`` or ``lora`` (``trainable``); the rest stays frozen.
* **Learning rates**: head 0.01; backbone 1e-3 (``bcb_lrscale = 0.1``); the LoRA factors 5e-3 on the first
  task (``0.5 * lr``) and the backbone's rate afterwards. SGD, momentum 0.9, weight decay 5e-4 (0 in the
  ImageNet-R and Cars configs); a cosine schedule to ``eta_min = lr * bcb_lrscale * 0.1^len(milestones)`` =
  1e-4, one absolute floor for every group.
* **Loss**: ``sce_alpha * CE + sce_beta * RCE`` (:func:`~cl_bench.methods.losses.symmetric_cross_entropy`)
  over the current task's logits; (1.0, 0.1) for CIFAR and CUB, (0.5, 0.5) for ImageNet-R and Cars.
* **CA** as SLCA's but without the mean shrink: each sampled feature of a class of task ``t_c`` is divided
  by ``1 + s (T - t_c)`` with ``s = mu + 0.02 (U(0,1) - 0.5)``, ``mu = feature_scale_mu = 0.02``. After CA
  the input of the head of every old task ``t`` is multiplied by ``1 + mu (T - t)`` for the evaluation
  (:class:`ScaledIncrementalLinearHead`); ``recall`` resets these scales to 1 with the heads.
  ``feature_scale_mu=0`` turns both scalings off.

``hybrid=false`` trains the whole backbone without LoRA (SLCA++'s loss and CA on a full slow learner).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import nn

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.base import TaskContext
from cl_bench.methods.lora import LORA_INITS, add_lora, lora_parameters
from cl_bench.methods.losses import symmetric_cross_entropy
from cl_bench.methods.slca import SLCA
from cl_bench.modules.classifier_alignment import FeatureScaler, random_feature_scales
from cl_bench.modules.heads import IncrementalLinearHead

log = logging.getLogger(__name__)


class ScaledIncrementalLinearHead(IncrementalLinearHead):
    """One linear block per task, each fed ``scale_t * features`` (SLCA++'s ``SimpleScaler``, never trained).

    Scales start at 1; :meth:`scale_old_tasks` sets ``1 + mu (T - t)`` for every task ``t`` before the last.
    """

    def __init__(self, in_features: int, bias: bool = True) -> None:
        super().__init__(in_features, bias)
        self.register_buffer("input_scales", torch.ones(0))

    def add_task(self, n_classes: int) -> nn.Linear:
        block = super().add_task(n_classes)
        self.input_scales = torch.cat([self.input_scales, self.input_scales.new_ones(1)])
        return block

    @torch.no_grad()
    def scale_old_tasks(self, mu: float) -> None:
        last = len(self.blocks) - 1
        self.input_scales.copy_(1.0 + mu * (last - torch.arange(last + 1, device=self.input_scales.device)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [block(x * scale) for block, scale in zip(self.blocks, self.input_scales, strict=True)], 1
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        key = prefix + "input_scales"
        if key in state_dict:  # resize to the saved number of tasks before copying
            self.input_scales = self.input_scales.new_ones(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SLCAPlusPlus(SLCA):
    """SLCA with symmetric CE, the LoRA "Hybrid Slow Learner" and scaled CA (see the module docstring).

    Args (beyond :class:`~cl_bench.methods.slca.SLCA`'s, whose defaults here are SLCA++'s code's):
        backbone_lr: ``lr * bcb_lrscale`` = 1e-3 (``slcapp_cifar_lora.json``).
        scheduler, eta_min: ``cosine`` to ``lr * bcb_lrscale * 0.1^len(milestones)`` = 1e-4 (``slca_pp.py``).
        ca_mean_shrink: ``False`` (SLCA++ scales CA's samples instead, ``feature_scale_mu``).
        hybrid: add LoRA and train only the ``trainable`` backbone parameters (``False``: the whole backbone).
        lora_rank, lora_scale: LoRA's rank and the factor of ``B A``.
        lora_targets: name suffixes of the linear layers that get LoRA.
        lora_init: ``svd`` (top right singular vectors of ``W0``) or ``gaussian`` (trunc-normal 0.02).
        lora_lr_first_task: the LoRA factors' learning rate on the first task.
        lora_lr: their learning rate afterwards (``None``: ``backbone_lr``).
        trainable: substrings of the backbone parameter names that train under ``hybrid``.
        sce_alpha, sce_beta: weights of CE and reverse CE.
        feature_scale_mu: ``mu`` of CA's random shrink of old samples and of the old heads' input scales.
        feature_scale_jitter: width of the uniform jitter of the random shrink (code: 0.02).
    """

    backbone_needs: ClassVar[frozenset[str]] = frozenset({"vit_blocks"})  # LoRA on attn.qkv, mlp.fc1/fc2
    any_backbone_setting: ClassVar[str | None] = "hybrid=false"

    @classmethod
    def needs(cls, settings: dict[str, Any]) -> frozenset[str]:
        """``hybrid=false`` (no LoRA) runs on any backbone."""
        return cls.backbone_needs if settings["hybrid"] else frozenset()

    def __init__(
        self,
        backbone: Backbone,
        backbone_lr: float | None = 1e-3,
        scheduler: str = "cosine",
        eta_min: float = 1e-4,
        ca_mean_shrink: bool = False,
        hybrid: bool = True,
        lora_rank: int = 4,
        lora_scale: float = 0.8,
        lora_targets: tuple[str, ...] | list[str] = ("attn.qkv", "mlp.fc1", "mlp.fc2"),
        lora_init: str = "svd",
        lora_lr_first_task: float = 5e-3,
        lora_lr: float | None = None,
        trainable: tuple[str, ...] | list[str] = ("norm", "bias", "cls_token", "lora"),
        sce_alpha: float = 1.0,
        sce_beta: float = 0.1,
        feature_scale_mu: float = 0.02,
        feature_scale_jitter: float = 0.02,
        **base_args: Any,
    ) -> None:
        if lora_init not in LORA_INITS:
            raise ConfigError(f"method.lora_init={lora_init!r}: choose one of {list(LORA_INITS)}")
        if lora_rank < 1:
            raise ConfigError(f"method.lora_rank={lora_rank} must be >= 1 (hybrid=false trains without LoRA)")
        if sce_alpha < 0 or sce_beta < 0 or feature_scale_mu < 0 or feature_scale_jitter < 0:
            raise ConfigError(
                "method.sce_alpha, sce_beta, feature_scale_mu and feature_scale_jitter must be >= 0"
            )
        super().__init__(
            backbone,
            backbone_lr=backbone_lr,
            scheduler=scheduler,
            eta_min=eta_min,
            ca_mean_shrink=ca_mean_shrink,
            **base_args,
        )
        self.hybrid = hybrid
        self.lora_targets = list(lora_targets)
        self.trainable = list(trainable)
        self.lora_lr_first_task = lora_lr_first_task if self.slow else self.lr
        self.lora_lr = self.backbone_lr if lora_lr is None or not self.slow else lora_lr
        self.sce_alpha = sce_alpha
        self.sce_beta = sce_beta
        self.feature_scale_mu = feature_scale_mu
        self.feature_scale_jitter = feature_scale_jitter
        if hybrid:
            add_lora(self.backbone, self.lora_targets, lora_rank, lora_scale, init=lora_init)
            for name, p in self.backbone.named_parameters():
                p.requires_grad_(any(key in name for key in self.trainable))
            n_train = sum(p.numel() for p in self.backbone.parameters() if p.requires_grad)
            log.info("SLCA++ hybrid slow learner: %d trainable backbone parameters", n_train)

    def build_head(self) -> nn.Module:
        return ScaledIncrementalLinearHead(self.backbone.feat_dim)

    # ----------------------------------------------------------------- training
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits, targets = self.task_logits(self.training_logits(x), y)
        loss = symmetric_cross_entropy(logits, targets, self.sce_alpha, self.sce_beta)
        self.check_finite(loss, batch_idx)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def param_groups(self) -> list[dict[str, Any]]:
        """LoRA factors (``lora_lr_first_task`` on task 0, then ``lora_lr``), other backbone, head."""
        first_task = self.task is None or self.task.index == 0
        lora_ids = {id(p) for p in lora_parameters(self.backbone)}
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        lora = [p for p in lora_parameters(self.backbone) if p.requires_grad]
        backbone = [p for p in self.backbone.parameters() if p.requires_grad and id(p) not in lora_ids]
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids]
        groups = [
            {"params": lora, "lr": self.lora_lr_first_task if first_task else self.lora_lr, "name": "lora"},
            {"params": backbone, "lr": self.backbone_lr, "name": "backbone"},
            {"params": head, "lr": self.lr, "name": "head"},
        ]
        return [g for g in groups if g["params"]]

    # ----------------------------------------------------------------- classifier alignment
    def ca_feature_scaler(
        self, class_tasks: torch.Tensor, ctx: TaskContext, generator: torch.Generator
    ) -> FeatureScaler | None:
        if self.feature_scale_mu == 0:
            return None
        current, mu, jitter = ctx.task.index, self.feature_scale_mu, self.feature_scale_jitter
        return lambda labels: random_feature_scales(class_tasks[labels], current, mu, jitter, generator)

    def on_alignment_end(self, ctx: TaskContext) -> None:
        """After CA with SLCA++'s sample scaling: the old heads' input scales for evaluation."""
        assert isinstance(self.head, ScaledIncrementalLinearHead)
        self.head.scale_old_tasks(self.feature_scale_mu)
