"""Elastic Weight Consolidation: Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural
networks" (PNAS 114(13)), Eq. 3; and online EWC: Schwarz et al. 2018, "Progress & Compress: A scalable
framework for continual learning" (ICML 2018), Sec. 2.2 (the online Fisher ``F <- gamma F + F_new``).

Training task ``t`` minimises::

    CE + ewc_lambda * sum_{j<t} sum_k F_k^(j) (theta_k - theta*_k^(j))^2          (mode: separate)
    CE + ewc_lambda * sum_k F_k (theta_k - theta*_k)^2,  F = gamma F + F^(t-1)     (mode: online)

as Avalanche's ``EWCPlugin`` (``avalanche/training/plugins/ewc.py``), which drops the paper's ``1/2``: our
``ewc_lambda`` is the paper's ``lambda / 2``. ``separate`` keeps one anchor and Fisher per past task;
``online`` one Fisher, decayed by ``gamma``, anchored at the last task's optimum.

The Fisher is the diagonal *empirical* Fisher, estimated at the end of each task in eval mode (BatchNorm
uses its running statistics, dropout is off) on the task's training images with the **evaluation
transform** (``ctx.train_eval_set``, one deterministic pass; Avalanche and Mammoth use the training stream
with its augmentation), with the cross-entropy the task was trained with (``task_logits``: over all seen
classes in the class-incremental setting, over the task's own classes in the task-incremental one or with
``loss_scope=task``). Estimators (``fisher``):

* ``per_example`` (default): ``F = mean_i (d CE(x_i, y_i) / d theta)^2``, the mean over examples of squared
  per-example gradients (the empirical Fisher of the paper's Eq. 3 with true labels), computed in
  vectorised form with ``torch.func`` (``fisher_chunk_size`` examples at a time). Its scale does not depend
  on the batch size, so ``ewc_lambda`` means the same at any ``batch_size``.
* ``per_example_weighted``: Mammoth ``ewc_on`` (``models/ewc_on.py::end_task``): each example's squared
  gradient weighted by its probability ``p(y_i | x_i)``.
* ``batch``: Avalanche's ``EWCPlugin.compute_importances``: the mean over mini-batches (``batch_size``) of
  the squared gradient of the mini-batch's *mean* cross-entropy, about ``1/batch_size`` of the per-example
  Fisher (so ``ewc_lambda`` is about ``batch_size`` times weaker than with ``per_example``).

Head: the Fisher and anchor cover every trainable parameter that exists when the task ends, the backbone
and every head block so far (the finished task's block included). A block created later is not penalised
until its own task ends. In the class-incremental setting old blocks receive gradients from the new tasks'
cross-entropy (their logits are pushed down), and the penalty holds them in proportion to their Fisher. In
the task-incremental setting the current task's loss does not reach old blocks: only weight decay moves
them (as for ``seq_ft``), and their penalty resists that.

Defaults (``cl_bench/conf/method/ewc.yaml``): ``mode`` separate (Avalanche's default), ``gamma`` 1 (Mammoth
``ewc_on`` seq-cifar10; Avalanche has no default ``decay_factor``), ``ewc_lambda`` 10 (Mammoth ``ewc_on``
seq-cifar10 ``e_lambda`` 10, ``models/config/ewc_on.yaml``, with a per-example Fisher and no 1/2 as here;
Avalanche has no default; tune it on held-out data of the first tasks, and multiply it by about
``batch_size`` with ``fisher=batch``); the optimiser settings are the repository's ``seq_ft`` protocol.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.base import ContinualModule, TaskContext, autocast
from cl_bench.modules.regularizers import (
    QuadraticPenalty,
    TensorDict,
    gradient_importance,
    per_example_importance,
    snapshot,
    trainable_parameters,
)

MODES = ("separate", "online")
FISHERS = ("per_example", "per_example_weighted", "batch")


class EWC(ContinualModule):
    """Fine-tuning with the (online) EWC quadratic penalty (see the module docstring).

    Args:
        ewc_lambda: weight of the penalty.
        mode: ``separate`` (one anchor and Fisher per task) or ``online`` (one decayed Fisher).
        gamma: online EWC's decay of the old Fisher (``online`` only).
        fisher: the estimator: ``per_example`` (default), ``per_example_weighted`` (Mammoth) or ``batch``
            (Avalanche) (module docstring).
        fisher_chunk_size: examples whose gradients are held at once by the per-example estimators.
        (the rest as :class:`~cl_bench.methods.base.ContinualModule`)
    """

    training_state_attributes = ("penalty",)

    def __init__(
        self,
        backbone: Backbone,
        ewc_lambda: float = 10.0,
        mode: str = "separate",
        gamma: float = 1.0,
        fisher: str = "per_example",
        fisher_chunk_size: int = 16,
        **base_args: Any,
    ) -> None:
        super().__init__(
            backbone,
            **base_args,
        )
        if mode not in MODES:
            raise ConfigError(f"method.mode={mode!r}: choose one of {list(MODES)}")
        if ewc_lambda < 0:
            raise ConfigError(f"method.ewc_lambda={ewc_lambda} must be >= 0")
        if not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"method.gamma={gamma} must lie in [0, 1]")
        if mode == "separate" and gamma != 1.0:
            raise ConfigError(f"method.gamma={gamma} only applies to method.mode=online")
        if fisher not in FISHERS:
            raise ConfigError(f"method.fisher={fisher!r}: choose one of {list(FISHERS)}")
        if fisher_chunk_size < 1:
            raise ConfigError(f"method.fisher_chunk_size={fisher_chunk_size} must be >= 1")
        self.ewc_lambda = ewc_lambda
        self.mode = mode
        self.gamma = gamma
        self.fisher_estimator = fisher
        self.fisher_chunk_size = fisher_chunk_size
        self.penalty = QuadraticPenalty()

    def fisher(self, ctx: TaskContext) -> TensorDict:
        """Diagonal empirical Fisher (``fisher``) of the trainable parameters on the training images."""
        was_training = self.training
        self.eval()

        def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            logits, targets = self.task_logits(logits, labels)
            return F.cross_entropy(logits.float(), targets)

        loader = ctx.shard_loader(ctx.train_eval_set, self.batch_size)
        params = trainable_parameters(self)
        if self.fisher_estimator == "batch":

            def batch_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
                x, y = batch
                with autocast(self.device, ctx.autocast_dtype):
                    logits = self(x.to(self.device))
                return cross_entropy(logits, y.to(self.device))

            fisher = gradient_importance(params, loader, batch_loss, torch.square)
        else:
            weighted = self.fisher_estimator == "per_example_weighted"

            def example_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
                return cross_entropy(logits, label)

            def squares(grads: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
                if weighted:  # p(y | x) = exp(-CE)
                    grads = grads * torch.exp(-losses / 2).view(-1, *([1] * (grads.dim() - 1)))
                return grads.square().sum(dim=0)

            batches = ((x.to(self.device), y.to(self.device)) for x, y in loader)
            with autocast(self.device, ctx.autocast_dtype):
                fisher = per_example_importance(
                    self, params, batches, example_loss, squares, self.fisher_chunk_size
                )
        self.train(was_training)
        return fisher

    def on_task_end(self, ctx: TaskContext) -> None:
        """Estimate the task's Fisher and anchor the penalty at the task's optimum."""
        fisher = self.fisher(ctx)
        anchor = snapshot(trainable_parameters(self))
        if self.mode == "separate":
            self.penalty.append(anchor, fisher)
        else:
            self.penalty.consolidate(anchor, fisher, decay=self.gamma)

    def regularizer(self) -> torch.Tensor | None:
        """``ewc_lambda`` times the quadratic penalty (nothing before the first task ends)."""
        if not len(self.penalty):
            return None
        return self.ewc_lambda * self.penalty(dict(self.named_parameters()))
