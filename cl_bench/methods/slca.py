"""SLCA: Slow Learner with Classifier Alignment (Zhang, Wang, Kang, Chen, Wei, "SLCA: Slow Learner with
Classifier Alignment for Continual Learning on a Pre-trained Model", ICCV 2023, arXiv 2303.05118).

Sequential fine-tuning of a pre-trained backbone with two changes (abstract, Sec. 4):

* **Slow Learner** (Sec. 4.1): the backbone learns with a much smaller learning rate than the classifier,
  ``backbone_lr = 1e-4`` against ``lr = 0.01`` (the code's ``bcb_lrscale = 1/100``). ``slow=false`` trains
  the backbone at ``lr`` too (no slow learner; the learning rate of the paper's "Seq FT" rows was not
  readable).
* **Classifier Alignment** (Sec. 4.2, :mod:`cl_bench.modules.classifier_alignment`): when a task ends, the
  mean and covariance of each new class's features are stored
  (:class:`~cl_bench.modules.class_statistics.ClassStatistics`; training images under the evaluation
  transform); from the second task on, the classifier is retrained on features sampled from all seen
  classes' Gaussians, with per-task logit normalisation. ``ca=false`` skips it ("Seq FT w/ SL").

Everything the readable sources do not state follows the official code (``GengDavid/SLCA`` @169d4e6,
``models/slca.py``, ``convs/linears.py``, ``convs/vits.py``; ``shared/research/methods_vit.md`` §2):

* one linear head per task (:class:`~cl_bench.modules.heads.IncrementalLinearHead`), trunc-normal(0.02)
  weights and zero bias; earlier heads are frozen when a task starts (``freeze_old_heads``);
* task-local cross-entropy over the current head's logits (``loss_scope=task``);
* SGD, momentum 0.9, weight decay 5e-4, batch 128, ``MultiStepLR`` with ``lr_decay = 0.1`` at
  ``milestones`` (20 epochs with a step at 18 on CIFAR; 50/40 on ImageNet-R, CUB and Cars);
* the backbone's final LayerNorm is replaced by a fresh ``nn.LayerNorm`` (weight 1, bias 0, eps 1e-5),
  trained with the backbone (``reset_final_norm``; the code's ``del model.norm; model.norm =
  nn.LayerNorm(768)``). A backbone without a LayerNorm after its last block (the CIFAR ResNets) has nothing
  to reset: the switch then only logs a warning;
* CA: 5 epochs, 256 samples per class and epoch, batch 256, SGD with the method's lr, momentum and weight
  decay, cosine schedule; logit normalisation ``tau = 0.1`` (0.05 for Cars); the mean of a class of task
  ``t_c`` is shrunk by ``0.9 + 0.1 (t_c + 1) / (T + 1)`` before sampling (``ca_mean_shrink``; code only);
  covariances get ``+1e-4 I`` (``covariance_shrink``);
* the aligned heads are used for the evaluation after task ``T`` only: when the next task starts, the
  heads as they were before CA are restored (``recall``, the code's ``fc.recall()``), so every CA starts
  from un-aligned heads, and old heads stay as their own task trained them.

Deviation (pitfall 5 of the spec): the code gives class ``c`` the task ``c // task_size`` with the *current*
task's size, which is wrong for a shorter last task (Cars: 9 x 20 + 16). Here a class's task is the task
that owns it; ``official_task_index=true`` restores the code's rule.

Each task is two phases (:class:`~cl_bench.methods.base.Phase`): ``train`` (the slow learner) and, from the
second task on, ``align`` (CA: the head alone on sampled features, one Lightning fit like any phase). CA
samples from a generator seeded by ``(seed, task)`` on the module's device, so CA is repeatable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch import nn

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.base import ContinualModule, HeadTraining, Phase, TaskContext
from cl_bench.modules.class_statistics import ClassStatistics
from cl_bench.modules.classifier_alignment import ClassifierAlignment, FeatureScaler, slca_mean_scales

log = logging.getLogger(__name__)

SLCA_SCHEDULERS = ("multistep", "cosine", "none")


def final_layer_norm_name(backbone: Backbone) -> str | None:
    """Dotted name of the last ``nn.LayerNorm`` outside the backbone's blocks (a ViT's ``norm``), or None."""
    try:
        inside = {id(m) for block in backbone.blocks() for m in block.modules()}
    except NotImplementedError:
        inside = set()
    names = [n for n, m in backbone.named_modules() if isinstance(m, nn.LayerNorm) and id(m) not in inside]
    return names[-1] if names else None


def reset_final_layer_norm(backbone: Backbone, eps: float = 1e-5) -> str | None:
    """Replace the final LayerNorm by a fresh trainable ``nn.LayerNorm(eps=eps)``; returns its name."""
    name = final_layer_norm_name(backbone)
    if name is None:
        return None
    old = backbone.get_submodule(name)
    assert isinstance(old, nn.LayerNorm)
    device = old.weight.device if old.weight is not None else None
    backbone.replace(name, nn.LayerNorm(old.normalized_shape, eps=eps, device=device))
    return name


class SLCA(ContinualModule):
    """Slow-learner fine-tuning with post-hoc Classifier Alignment (see the module docstring).

    Args (beyond :class:`~cl_bench.methods.base.ContinualModule`'s, whose defaults here are the code's):
        epochs, batch_size: 20 epochs (CIFAR-100 config) of batches of 128 (``slca.py``; its lr 0.01, SGD
            momentum 0.9 and weight decay 5e-4 are the base's defaults).
        backbone_lr: the slow learner's rate, ``lr * bcb_lrscale`` = 1e-4.
        slow: train the backbone at ``backbone_lr`` (``False``: at ``lr``, no slow learner).
        scheduler: ``multistep`` (``milestones``, ``lr_decay``), ``cosine`` (to ``eta_min`` over the epochs)
            or ``none``; stepped per epoch.
        milestones: epochs at which ``multistep`` multiplies the learning rates by ``lr_decay``.
        lr_decay: the ``multistep`` factor.
        eta_min: the ``cosine`` floor, one absolute value for every parameter group (as ``torch``'s).
        freeze_old_heads: freeze earlier tasks' heads when a task starts.
        reset_final_norm: replace the backbone's final LayerNorm by a fresh one.
        ca: run Classifier Alignment after every task but the first.
        ca_epochs, ca_samples_per_class, ca_batch_size: CA's epochs, draws per class and epoch, batch size.
        ca_lr: CA's learning rate (``None``: ``lr``).
        ca_logit_norm: temperature of CA's per-task logit normalisation (``None`` or 0: plain CE).
        ca_mean_shrink: shrink old classes' means by ``0.9 + 0.1 (t_c + 1) / (T + 1)`` before sampling.
        covariance_shrink: added to every class covariance's diagonal.
        recall: restore the pre-CA heads when the next task starts (``False``: keep the aligned heads).
        official_task_index: give class ``c`` the task ``c // (current task size)`` in CA, as the code does.
        loss_scope: ``task`` (the code's task-local CE over the current head) or ``seen``.
    """

    training_state_attributes = ("statistics", "_stage1_head")

    def __init__(
        self,
        backbone: Backbone,
        epochs: int = 20,
        batch_size: int = 128,
        backbone_lr: float | None = 1e-4,
        scheduler: str = "multistep",
        loss_scope: str = "task",
        slow: bool = True,
        milestones: tuple[int, ...] | list[int] = (18,),
        lr_decay: float = 0.1,
        eta_min: float = 0.0,
        freeze_old_heads: bool = True,
        reset_final_norm: bool = True,
        ca: bool = True,
        ca_epochs: int = 5,
        ca_samples_per_class: int = 256,
        ca_batch_size: int = 256,
        ca_lr: float | None = None,
        ca_logit_norm: float | None = 0.1,
        ca_mean_shrink: bool = True,
        covariance_shrink: float = 1e-4,
        recall: bool = True,
        official_task_index: bool = False,
        **base_args: Any,
    ) -> None:
        if scheduler not in SLCA_SCHEDULERS:
            raise ConfigError(f"method.scheduler={scheduler!r}: choose one of {list(SLCA_SCHEDULERS)}")
        if lr_decay <= 0 or eta_min < 0:
            raise ConfigError("method.lr_decay must be > 0 and method.eta_min >= 0")
        if ca_logit_norm is not None and ca_logit_norm < 0:
            raise ConfigError(f"method.ca_logit_norm={ca_logit_norm} must be > 0 (0 or null: plain CE)")
        super().__init__(
            backbone,
            epochs=epochs,
            batch_size=batch_size,
            backbone_lr=backbone_lr,
            scheduler="none",  # SLCA's own schedules are built in configure_optimizers
            loss_scope=loss_scope,
            **base_args,
        )
        if not slow:
            self.backbone_lr = self.lr
        self.scheduler_name = scheduler
        self.slow = slow
        self.milestones = list(milestones)
        self.lr_decay = lr_decay
        self.eta_min = eta_min
        self.freeze_old_heads = freeze_old_heads
        self.reset_final_norm = reset_final_norm
        self.ca = ca
        self.recall = recall
        self.official_task_index = official_task_index
        self.ca_mean_shrink = ca_mean_shrink
        try:
            self.alignment = ClassifierAlignment(
                epochs=ca_epochs,
                samples_per_class=ca_samples_per_class,
                batch_size=ca_batch_size,
                lr=self.lr if ca_lr is None else ca_lr,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
                logit_norm=ca_logit_norm or None,
            )
            self.statistics = ClassStatistics(covariance_shrink)
        except ValueError as exc:
            raise ConfigError(f"method.ca_*: {exc}") from exc
        #: The heads' state right after stage 1 of the last task (what ``recall`` restores).
        self._stage1_head: dict[str, torch.Tensor] | None = None
        if reset_final_norm:
            name = reset_final_layer_norm(self.backbone)
            if name is None:
                log.warning(
                    "SLCA: %s has no LayerNorm after its last block, so reset_final_norm has no effect "
                    "(set method.reset_final_norm=false to silence this)",
                    type(backbone).__name__,
                )
            else:
                log.info("SLCA: the backbone's final LayerNorm %r is replaced by a fresh one", name)

    # ----------------------------------------------------------------- task hooks
    def on_task_start(self, ctx: TaskContext) -> None:
        """Restore the pre-CA heads (``recall``), add the new task's head and freeze the old ones."""
        if self.recall and self._stage1_head is not None:
            self.head.load_state_dict(self._stage1_head)
        self._stage1_head = None
        super().on_task_start(ctx)
        new_block = self.head.blocks[-1]
        nn.init.trunc_normal_(new_block.weight, std=0.02)
        if new_block.bias is not None:
            nn.init.zeros_(new_block.bias)
        if self.freeze_old_heads:
            for block in self.head.blocks[:-1]:
                block.requires_grad_(False)

    def phases(self, ctx: TaskContext) -> Iterator[Phase]:
        """``train``; then the new classes' statistics, and (task > 0) ``align`` on all seen classes."""
        yield from super().phases(ctx)
        if not self.ca:
            return
        features, labels = self.extract_features(ctx, ctx.train_eval_set)
        self.statistics.update(features, labels)
        if ctx.task.index == 0 or self.alignment.epochs == 0:
            return
        self._stage1_head = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        yield self.alignment_phase(ctx)
        self.on_alignment_end(ctx)
        log.info("task %d: classifier alignment on %d classes done", ctx.task.index, ctx.task.stop)

    # ----------------------------------------------------------------- classifier alignment
    def class_tasks(self, ctx: TaskContext) -> torch.Tensor:
        """The task index of every seen class position (``official_task_index``: ``c // task size``)."""
        if self.official_task_index:
            return torch.arange(ctx.task.stop) // ctx.task.num_classes
        sizes = [task.num_classes for task in ctx.scenario.tasks[: ctx.task.index + 1]]
        return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))

    def ca_feature_scaler(
        self, class_tasks: torch.Tensor, ctx: TaskContext, generator: torch.Generator
    ) -> FeatureScaler | None:
        """A per-sample factor for CA's sampled features (none in SLCA; SLCA++ shrinks old ones)."""
        return None

    def alignment_phase(self, ctx: TaskContext) -> Phase:
        """Classifier Alignment on every class seen up to ``ctx.task``: every head parameter trains."""
        class_tasks = self.class_tasks(ctx)
        generator = ctx.generator(self.device)
        mean_scales = slca_mean_scales(class_tasks, ctx.task.index) if self.ca_mean_shrink else None
        samples = self.alignment.samples(
            self.statistics,
            list(range(ctx.task.stop)),
            generator,
            mean_scales,
            self.ca_feature_scaler(class_tasks.to(self.device), ctx, generator),
        )
        training = HeadTraining(
            self.head,
            loss=partial(self.alignment.loss, task_sizes=self.head.task_sizes),
            optimizer=self.alignment.optimizer,
            scheduler=self.alignment.scheduler,
        )
        return Phase(
            "align",
            self.alignment.epochs,
            samples,
            batch_size=None,  # the samples come in batches
            trainable=tuple(self.head.parameters()),
            head_training=training,
            shuffle=False,
        )

    def on_alignment_end(self, ctx: TaskContext) -> None:
        """After CA (SLCA++ sets the old heads' input scales here)."""

    # ----------------------------------------------------------------- optimisation
    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
        """``multistep`` (the code's ``MultiStepLR``) or ``cosine`` down to ``eta_min``, per epoch."""
        if self.scheduler_name == "none":
            return None
        if self.scheduler_name == "multistep":
            return torch.optim.lr_scheduler.MultiStepLR(
                optimizer, milestones=self.milestones, gamma=self.lr_decay
            )
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, self.epochs), eta_min=self.eta_min
        )
