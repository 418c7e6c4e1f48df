"""Input-space tuning: a frozen pre-trained backbone, a learnable input transformation and a linear head.

Marullo, Tiezzi, Gori, Melacci, Tuytelaars, "Continual Learning with Pretrained Backbones by Tuning in the
Input Space" (IJCNN 2023, arXiv 2306.02947). From the abstract (the body and code are not available): the
pre-trained part is never updated; the method learns "the usual classification head" and "a set of newly-
introduced learnable parameters that are responsible for transforming the input data", for a cheap
plasticity/stability trade-off. The model is ``f(x) = head(backbone(g(x)))``, trained by back-propagating
cross-entropy through the frozen backbone into ``g`` and the head.

Everything the abstract leaves open is a config choice, and every default is ours:

* ``transform``: the family of ``g`` (:mod:`cl_bench.methods.input_transforms`): ``additive`` (default),
  ``padding`` or ``residual_conv``, all the identity at init, so training starts from a linear probe.
  ``additive`` is the default because it is the simplest literal reading of "learnable parameters that
  transform the input", applies unchanged to CNNs and ViTs at any resolution, and has a parameter count
  independent of the backbone.
* ``sharing``: ``shared`` (default) trains one ``g`` continually across tasks; ``per_task`` learns a new
  ``g_t`` and head block per task and freezes the earlier ones. ``shared`` is the default because, with a
  frozen backbone, only a shared ``g`` can produce the "trade-off between plasticity and stability" the
  abstract speaks of: ``per_task`` in task-incremental learning is parameter isolation and cannot forget.
* ``per_task`` without a task id (class-incremental) infers the task, our rule: every ``g_j`` runs, head
  block ``j`` scores task ``j``'s classes from ``backbone(g_j(x))``, and the logits returned are each
  block's log-softmax within its task. Their argmax is the class of highest confidence over tasks, i.e. the
  task whose own model gives the maximum softmax probability (the max-softmax score of Hendrycks & Gimpel,
  ICLR 2017, used for task selection), then the argmax within that task; after ``T`` tasks an image costs
  ``T`` backbone passes. With a task id only ``g_task`` runs. The chosen task is reported: results carry
  the task-selection accuracy (``selects_task``), as for the other methods that pick task-specific
  parameters at test time.
* ``identity_penalty`` (``beta``, default 0) adds ``beta * MSE(g(x), x)``, the penalty of the authors'
  Neural Friendly Training (AAAI 2022), to keep the transformed input close to the original.

The backbone stays in eval mode (BatchNorm statistics fixed, dropout off) with ``requires_grad=False``; it
is not a ``frozen_backbone`` method in the base-class sense, since ``g`` changes its input, so features are
never cached. The fine-tuning references of the comparison are other methods: head-only fine-tuning is
``method=linear_probe`` (this method with ``g`` fixed to the identity), full fine-tuning ``method=seq_ft``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.base import Capabilities, ContinualModule, Prediction, TaskContext, freeze
from cl_bench.methods.input_transforms import INPUT_TRANSFORMS, build_input_transform

SHARING = ("shared", "per_task")


class InputTuning(ContinualModule):
    """Frozen backbone in eval mode; a learnable input transformation (shared or per task) and a linear head.

    Args (beyond :class:`~cl_bench.methods.base.ContinualModule`'s, which refuses ``backbone_lr`` here: the
    backbone is frozen; the paper's optimiser is unknown, every default is ours):
        transform: ``additive``, ``padding`` or ``residual_conv`` (see module docstring).
        sharing: ``shared`` or ``per_task``.
        transform_lr: learning rate of the transformation (``None``: ``lr``).
        identity_penalty: weight ``beta`` of ``MSE(g(x), x)`` added to the loss.
        pad: frame width of ``padding``, in pixels.
        conv_hidden: hidden channels of ``residual_conv``.
        conv_layers: convolutions of ``residual_conv`` (the last one zero-initialised).
        weight_decay: 0 (ours, as :class:`~cl_bench.methods.linear_probe.LinearProbe`'s, which is this method
            with ``g`` fixed to the identity).
        loss_scope: ``None``: ``seen`` for ``shared``, ``task`` for ``per_task`` (whose task models are
            trained on their own classes only; ``seen`` is refused there).
    """

    refused_base_args: ClassVar[frozenset[str]] = frozenset({"backbone_lr"})

    def __init__(
        self,
        backbone: Backbone,
        transform: str = "additive",
        sharing: str = "shared",
        transform_lr: float | None = 0.1,
        identity_penalty: float = 0.0,
        pad: int = 4,
        conv_hidden: int = 16,
        conv_layers: int = 2,
        weight_decay: float = 0.0,
        loss_scope: str | None = None,
        **base_args: Any,
    ) -> None:
        if transform not in INPUT_TRANSFORMS:
            raise ConfigError(f"method.transform={transform!r}: choose one of {sorted(INPUT_TRANSFORMS)}")
        if sharing not in SHARING:
            raise ConfigError(f"method.sharing={sharing!r}: choose one of {list(SHARING)}")
        if sharing == "per_task" and loss_scope == "seen":
            raise ConfigError(
                "method.loss_scope=seen does not fit method.sharing=per_task: each task's transformation and "
                "head block form a separate task model trained on its own classes; use loss_scope=task "
                "(or null)"
            )
        if (transform_lr is not None and transform_lr < 0) or identity_penalty < 0:
            raise ConfigError("method.transform_lr and method.identity_penalty must be >= 0")
        if loss_scope is None:
            loss_scope = "seen" if sharing == "shared" else "task"
        super().__init__(backbone, weight_decay=weight_decay, loss_scope=loss_scope, **base_args)
        freeze(self.backbone)
        self.transform_name = transform
        self.transform_options: dict[str, int] = {
            "additive": {},
            "padding": {"pad": pad},
            "residual_conv": {"hidden": conv_hidden, "layers": conv_layers},
        }[transform]
        self.sharing = sharing
        self.transform_lr = self.lr if transform_lr is None else transform_lr
        self.identity_penalty = identity_penalty
        #: ``[g]`` when shared, ``[g_0, g_1, ...]`` per task; built at the first task from its image shape.
        self.transforms = nn.ModuleList()

    @property
    def capabilities(self) -> Capabilities:
        """Per-task transformations make ``forward(x, task)`` depend on the task id (TIL uses it), and without
        a task id the method picks one per image (its task-selection accuracy is reported)."""
        per_task = self.sharing == "per_task"
        return Capabilities(task_conditioned=per_task, selects_task=per_task)

    def eval_mode_modules(self) -> Iterable[nn.Module]:
        """The backbone stays in eval mode whatever the mode (its BatchNorm statistics never move)."""
        return (self.backbone,)

    # ----------------------------------------------------------------- task hooks
    def on_task_start(self, ctx: TaskContext) -> None:
        """Grow the head; build ``g`` (first task, or every task for ``per_task``) and freeze old ones."""
        super().on_task_start(ctx)
        if self.sharing == "shared" and len(self.transforms):
            return
        for module in [*self.transforms, *self.head.blocks[:-1]]:
            module.requires_grad_(False)  # per_task: earlier task models stay as they were learned
        image = ctx.train_eval_set[0][0]
        channels, height, width = image.shape
        self.transforms.append(
            build_input_transform(self.transform_name, channels, height, width, **self.transform_options)
        )

    def structure(self) -> dict[str, Any]:
        """Also: the image shape each input transformation was built for."""
        return {**super().structure(), "transform_shapes": [list(g.image_shape) for g in self.transforms]}

    def restore_structure(self, structure: dict[str, Any]) -> None:
        super().restore_structure(structure)
        for channels, height, width in structure["transform_shapes"]:
            self.transforms.append(
                build_input_transform(self.transform_name, channels, height, width, **self.transform_options)
            )

    # ----------------------------------------------------------------- inference
    def transform_for(self, task: int | None) -> nn.Module:
        """``g`` (shared) or ``g_task`` (per task)."""
        if self.sharing == "shared":
            return self.transforms[0]
        if task is None:
            raise ValueError("per-task input transformations need a task id here")
        return self.transforms[task]

    def embed(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """The backbone's embedding of the transformed input ``g(x)`` (``g_task`` per task)."""
        return self.backbone(self.transform_for(task)(x))

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Logits over all seen classes; ``per_task`` without ``task`` infers it (module docstring)."""
        if self.sharing == "shared" or task is not None:
            return self.head(self.embed(x, task))
        return torch.cat(
            [F.log_softmax(block(self.embed(x, j)), dim=1) for j, block in enumerate(self.head.blocks)], dim=1
        )

    def predict(self, x: torch.Tensor) -> Prediction:
        """Logits without a task id and, ``per_task``, each image's chosen task (that of its top class)."""
        logits = self(x)
        if self.sharing == "shared":
            return Prediction(logits)
        sizes = torch.tensor([block.out_features for block in self.head.blocks], device=logits.device)
        class_task = torch.repeat_interleave(torch.arange(len(sizes), device=logits.device), sizes)
        return Prediction(logits, chosen_task=class_task[logits.argmax(dim=1)])

    # ----------------------------------------------------------------- training
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy through the frozen backbone with the current task's ``g``, plus the penalty."""
        assert self.task is not None
        x, y = batch
        g = self.transform_for(self.task.index)
        gx = g(x)
        logits, targets = self.task_logits(self.head(self.backbone(gx)), y)
        loss = F.cross_entropy(logits, targets)
        if self.identity_penalty > 0:
            loss = loss + self.identity_penalty * F.mse_loss(gx, x)
        self.check_finite(loss, batch_idx)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def param_groups(self) -> list[dict[str, Any]]:
        """The trainable transformation at ``transform_lr``, the head at ``lr``; the backbone is frozen."""
        groups = [
            {
                "params": [p for p in self.transforms.parameters() if p.requires_grad],
                "lr": self.transform_lr,
                "name": "transform",
            },
            {"params": [p for p in self.head.parameters() if p.requires_grad], "lr": self.lr, "name": "head"},
        ]
        return [g for g in groups if g["params"]]
