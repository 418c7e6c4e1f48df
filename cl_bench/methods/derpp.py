"""Dark Experience Replay (DER) and DER++: Buzzega et al. 2020, "Dark Experience for General Continual
Learning: a Strong, Simple Baseline" (NeurIPS 2020), Sec. 3, Algorithms 1 (DER) and 2 (DER++).

The reservoir buffer (:class:`~cl_bench.modules.replay.ReservoirBuffer`, the same stream policy as
:mod:`cl_bench.methods.er`) keeps, per example, its label and the **logits the network gave it when it was
inserted** (the logits of that step's forward pass, before the update, as Mammoth's ``models/derpp.py``).
Each step minimises::

    CE(current batch) + alpha * MSE(f(x'), z') + beta * CE(f(x''), y'')

with ``(x', z')`` and ``(x'', y'')`` two independent uniform draws of ``replay_batch_size`` buffered
examples, each through its own forward pass and augmented again. ``beta = 0`` is DER (the second draw and
its forward pass are skipped).

The head grows with the tasks, so an example inserted during task ``t`` stored logits over the classes seen
up to ``t`` only; the MSE is averaged over those stored columns (Mammoth's single-head networks store every
class's output; on its fixed-size head both are the mean over examples and stored columns). The CE terms
follow :meth:`ExperienceReplay.scoped_cross_entropy`: over all seen classes in the class-incremental setting,
over each example's own task block in the task-incremental one (or with ``loss_scope=task``); the MSE is on
all stored columns in both (old blocks included, as Mammoth does in task-IL).

Defaults (``cl_bench/conf/method/derpp.yaml``): Mammoth's seq-cifar100 ``derpp`` configuration with a 500-example
buffer, ``alpha`` 0.3 and ``beta`` 0.5; ``replay_batch_size`` = ``batch_size`` (Mammoth's
``--minibatch_size`` default); the optimiser settings are the repository's ``seq_ft`` protocol.
"""

from __future__ import annotations

from typing import Any

import torch

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.er import ExperienceReplay
from cl_bench.modules.replay import ReservoirBuffer


class DERPlusPlus(ExperienceReplay):
    """DER++ (``beta > 0``) or DER (``beta = 0``): replay with logit matching (module docstring).

    Args:
        alpha: weight of the MSE between the network's and the stored logits of buffered examples.
        beta: weight of the cross-entropy on buffered examples' labels (0: DER).
        (the rest as :class:`~cl_bench.methods.er.ExperienceReplay`)
    """

    def __init__(
        self,
        backbone: Backbone,
        alpha: float = 0.3,
        beta: float = 0.5,
        buffer_size: int = 500,
        replay_batch_size: int | None = None,
        **base_args: Any,
    ) -> None:
        super().__init__(
            backbone,
            buffer_size=buffer_size,
            replay_batch_size=replay_batch_size,
            **base_args,
        )
        if alpha < 0 or beta < 0:
            raise ConfigError(f"method.alpha={alpha} and method.beta={beta} must be >= 0")
        self.alpha = alpha
        self.beta = beta

    def build_buffer(self, buffer_size: int) -> ReservoirBuffer:
        return ReservoirBuffer(buffer_size, store_logits=True)

    def logit_matching(self, slots: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Mean squared error of buffered examples' ``logits`` against their stored logits (valid columns)."""
        stored = self.buffer.logits[slots]
        width = stored.shape[1]
        valid = torch.arange(width, device=stored.device) < self.buffer.logit_width[slots, None]
        squared = (logits[:, :width].float() - stored).pow(2) * valid
        return squared.sum() / valid.sum().clamp(min=1)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        logits = self.training_logits(x)
        ce = self.scoped_cross_entropy(logits, y)
        loss = ce
        if len(self.buffer):
            buf_x, _, slots = self.replay_batch(self.replay_batch_size)
            mse = self.logit_matching(slots, self.training_logits(buf_x.to(x)))
            loss = loss + self.alpha * mse
            self.log("train/mse", mse, on_step=False, on_epoch=True, batch_size=len(slots))
            if self.beta > 0:
                buf_x, buf_y, _ = self.replay_batch(self.replay_batch_size)
                buf_ce = self.scoped_cross_entropy(self.training_logits(buf_x.to(x)), buf_y)
                loss = loss + self.beta * buf_ce
                self.log("train/buffer_ce", buf_ce, on_step=False, on_epoch=True, batch_size=len(buf_y))
        self.check_finite(loss, batch_idx)
        self.log("train/ce", ce, on_step=False, on_epoch=True, batch_size=len(y))
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        assert self.task is not None
        self.buffer.add(index, y, self.task.index, logits=logits.detach().float())
        return loss
