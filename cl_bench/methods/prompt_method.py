"""The part L2P, DualPrompt and CODA-Prompt share: a frozen timm ViT, a query pass, a prompted pass, a linear
head trained with the official logit mask, Adam and gradient clipping.

Each subclass says how its prompts are chosen and injected (:meth:`PromptMethod.prompted`), with the pieces
of :mod:`cl_bench.modules.prompts`. Per training batch and per test image the official codes run the frozen
model twice: once without prompts for the query (the [CLS] token after the final norm, ``original_model``'s
``pre_logits`` in l2p-/dualprompt-pytorch, ``q[:, 0, :]`` in CODA-Prompt's ``ViTZoo``), once with prompts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.base import ContinualModule, Prediction, TaskContext
from cl_bench.modules.prompts import timm_vit


class PromptMethod(ContinualModule):
    """A frozen ViT with learnable prompts and a growing linear head.

    Args (beyond :class:`~cl_bench.methods.base.ContinualModule`'s, which refuses ``backbone_lr`` here: the
    backbone is frozen; each subclass states its paper's ``epochs``, ``batch_size`` and ``lr``):
        optimizer, weight_decay, scheduler: Adam without weight decay at a constant learning rate (the
            official l2p-/dualprompt-pytorch and CODA-Prompt codes).
        clip_grad_norm: clip the gradient's global norm to this value before each step (official
            l2p-/dualprompt-pytorch ``clip_grad`` 1.0); ``None``: no clipping (CODA-Prompt).
        loss_scope: ``task`` (default, the official ``train_mask``: logits of the other tasks' classes
            masked out of the cross-entropy) or ``seen``.
    """

    #: Prompts are placed in timm ViT blocks.
    backbone_needs: ClassVar[frozenset[str]] = frozenset({"vit_blocks"})
    refused_base_args: ClassVar[frozenset[str]] = frozenset({"backbone_lr"})

    def __init__(
        self,
        backbone: Backbone,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        scheduler: str = "none",
        clip_grad_norm: float | None = 1.0,
        loss_scope: str = "task",
        **base_args: Any,
    ) -> None:
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ConfigError(
                f"method.clip_grad_norm={clip_grad_norm}: use a positive norm or null (no clipping)"
            )
        super().__init__(
            backbone,
            optimizer=optimizer,
            weight_decay=weight_decay,
            scheduler=scheduler,
            loss_scope=loss_scope,
            **base_args,
        )
        self.vit = timm_vit(backbone)
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.clip_grad_norm = clip_grad_norm

    def eval_mode_modules(self) -> Iterable[nn.Module]:
        """The frozen backbone stays in eval mode (its dropout and drop-path rates are 0 officially)."""
        return (self.backbone,)

    # ----------------------------------------------------------------- to implement
    def prompted(
        self, x: torch.Tensor, query: torch.Tensor, task: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(features [B, D], prompt loss or None, chosen task [B] or None)`` of the prompted pass.

        ``task``: while training, the task being learned; at test time the task id if one is given
        (task-incremental evaluation), else ``None``.
        """
        raise NotImplementedError

    # ----------------------------------------------------------------- task hooks
    def on_task_start(self, ctx: TaskContext) -> None:
        """Grow the head; with the task-local loss older head blocks get no gradient, so freeze them."""
        super().on_task_start(ctx)
        if self.loss_scope == "task" or self.task_incremental:
            for block in self.head.blocks[:-1]:
                block.requires_grad_(False)

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen pre-trained model's [CLS] token after the final norm, ``[B, D]``."""
        return self.vit.forward_features(x)[:, 0]

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Logits over all seen classes (``task``: that task's prompts where a method has per-task ones)."""
        task = task if self.capabilities.task_conditioned else None
        features, _, _ = self.prompted(x, self.query(x), task)
        return self.head(features)

    def predict(self, x: torch.Tensor) -> Prediction:
        """Logits and, for methods that choose task-specific prompts, each image's chosen task."""
        features, _, chosen = self.prompted(x, self.query(x), None)
        return Prediction(self.head(features), chosen_task=chosen)

    # ----------------------------------------------------------------- training
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        assert self.task is not None
        x, y = batch
        features, prompt_loss, _ = self.prompted(x, self.query(x), self.task.index)
        logits, targets = self.task_logits(self.head(features), y)
        loss = F.cross_entropy(logits, targets)
        if prompt_loss is not None:
            self.log("train/ce", loss, on_step=False, on_epoch=True, batch_size=len(y))
            self.log("train/prompt_loss", prompt_loss, on_step=False, on_epoch=True, batch_size=len(y))
            loss = loss + prompt_loss
        self.check_finite(loss, batch_idx)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """``method.clip_grad_norm`` (the official per-method clipping) unless the trainer sets its own."""
        value = gradient_clip_val if gradient_clip_val is not None else self.clip_grad_norm
        if value is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=value, gradient_clip_algorithm=gradient_clip_algorithm or "norm"
            )
