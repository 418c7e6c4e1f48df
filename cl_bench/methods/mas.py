"""Memory Aware Synapses: Aljundi et al. 2018, "Memory Aware Synapses: Learning what (not) to forget"
(ECCV 2018), Sec. 3-4: importance from the sensitivity of the squared L2 norm of the output, and the loss
``L_new + lambda * sum_k Omega_k (theta_k - theta*_k)^2``.

At the end of each task, in eval mode, the new importance is the mean over mini-batches (``batch_size``) of
``|d/dtheta mean_i n(f(x_i))|``, where ``f`` are the logits the task was trained on (all seen classes in
the class-incremental setting; the task's own block in the task-incremental one or with
``loss_scope=task``), on the task's training images with the evaluation transform (``ctx.train_eval_set``).
The paper averages per-example absolute gradients; the per-batch form is Avalanche's and FACIL's (much
cheaper). Two conventions (``convention``):

* ``avalanche`` (default): current Avalanche ``MASPlugin`` (``avalanche/training/plugins/mas.py``, since
  commit ``3e925faf``, Nov 2022): ``n = ||f||_2^2`` (the squared norm, as the paper's "squared L2-norm of
  the learned function output"); after the first task ``Omega = Omega_1``, then
  ``Omega <- alpha * Omega + (1 - alpha) * Omega_new``, and a parameter without an old ``Omega`` (a head
  block created since) takes ``Omega_new``; penalty ``lambda_reg * sum_k Omega_k (theta_k - theta*_k)^2``.
* ``facil``: FACIL (``mmasana/FACIL`` ``src/approach/mas.py``) and Avalanche's first MAS (``c3ae415b``,
  Mar 2022, "based on FACIL"): ``n = ||f||_2`` (unsquared), ``Omega`` starts at 0 so
  ``Omega <- alpha * Omega + (1 - alpha) * Omega_new`` gives ``(1 - alpha) Omega_1`` after the first task,
  and the penalty is halved: ``lambda_reg / 2 * sum_k Omega_k (theta_k - theta*_k)^2``.

The anchor moves to each task's final weights. Deviations from both: eval mode instead of train mode (which
would also update BatchNorm statistics after training); FACIL keeps importances for the feature extractor
only, here (as Avalanche) every trainable parameter is penalised, heads included.

Head: importance and anchor cover every trainable parameter at the end of the task (backbone and all head
blocks so far); later blocks are free until their own task ends. In the task-incremental setting the output
norm of the current block does not depend on the old blocks, so they get no new importance (``alpha``
decays their old one).

Defaults (``cl_bench/conf/method/mas.yaml``): ``lambda_reg`` 1 and ``alpha`` 0.5 (Avalanche's ``MASPlugin``
and FACIL); the optimiser settings are the repository's ``seq_ft`` protocol.
"""

from __future__ import annotations

from typing import Any

import torch

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.base import ContinualModule, TaskContext, autocast
from cl_bench.modules.regularizers import (
    QuadraticPenalty,
    TensorDict,
    gradient_importance,
    snapshot,
    trainable_parameters,
)

CONVENTIONS = ("avalanche", "facil")


class MAS(ContinualModule):
    """Fine-tuning with the MAS quadratic penalty (see the module docstring).

    Args:
        lambda_reg: weight of the penalty.
        alpha: weight of the old importance when a task's importance is folded in.
        convention: ``avalanche`` (current Avalanche, default) or ``facil`` (FACIL / early Avalanche).
        (the rest as :class:`~cl_bench.methods.base.ContinualModule`)
    """

    def __init__(
        self,
        backbone: Backbone,
        lambda_reg: float = 1.0,
        alpha: float = 0.5,
        convention: str = "avalanche",
        **base_args: Any,
    ) -> None:
        super().__init__(
            backbone,
            **base_args,
        )
        if lambda_reg < 0:
            raise ConfigError(f"method.lambda_reg={lambda_reg} must be >= 0")
        if not 0.0 <= alpha < 1.0:
            raise ConfigError(f"method.alpha={alpha} must lie in [0, 1) (1 would ignore every new task)")
        if convention not in CONVENTIONS:
            raise ConfigError(f"method.convention={convention!r}: choose one of {list(CONVENTIONS)}")
        self.lambda_reg = lambda_reg
        self.alpha = alpha
        self.convention = convention
        self.penalty = QuadraticPenalty()

    def importance(self, ctx: TaskContext) -> TensorDict:
        """Mean absolute gradient of the mean output norm (squared for ``avalanche``) on the task's training
        images."""
        was_training = self.training
        self.eval()

        def batch_norm_sq(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            with autocast(self.device, ctx.autocast_dtype):
                logits, _ = self.task_logits(self(x.to(self.device)), y.to(self.device))
            norms = torch.linalg.vector_norm(logits.float(), dim=1)
            return (norms if self.convention == "facil" else norms.pow(2)).mean()

        loader = ctx.shard_loader(ctx.train_eval_set, self.batch_size)
        importance = gradient_importance(trainable_parameters(self), loader, batch_norm_sq, torch.abs)
        self.train(was_training)
        return importance

    def on_task_end(self, ctx: TaskContext) -> None:
        """Fold the task's importance in and anchor the penalty at the task's final weights."""
        importance = self.importance(ctx)
        self.penalty.consolidate(
            snapshot(trainable_parameters(self)),
            importance,
            decay=self.alpha,
            scale=1.0 - self.alpha,
            fresh_scale=1.0 if self.convention == "avalanche" else None,
        )

    def regularizer(self) -> torch.Tensor | None:
        """``lambda_reg`` (``facil``: ``lambda_reg / 2``) times the quadratic penalty (nothing before the
        first task ends)."""
        if not len(self.penalty):
            return None
        weight = self.lambda_reg / 2 if self.convention == "facil" else self.lambda_reg
        return weight * self.penalty(dict(self.named_parameters()))
