"""Synaptic Intelligence: Zenke, Poole & Ganguli 2017, "Continual Learning Through Synaptic Intelligence"
(ICML 2017), Eq. 4 (the surrogate loss) and Eq. 5 (the importance).

While training task ``mu`` each parameter accumulates the path integral of its contribution to the drop of
the task loss, ``omega_k += -g_k * delta_theta_k`` at every optimiser step, where ``g`` is the gradient of
the *unregularised* task loss (the reference code's ``unreg_grads``; here the gradient of the step's total
loss minus the penalty's own gradient ``2 c Omega (theta - theta*)``, which is exact) and ``delta_theta``
the step's actual update (momentum and weight decay included). When the task ends::

    Omega <- relu(Omega + omega / (Delta^2 + xi)),   Delta = theta(end of task) - theta(start of task)

(the ``relu`` as in the reference code, ``ganguli-lab/pathint`` ``protocols.py``), ``omega`` is reset and
the anchor ``theta*`` moves to the task's final weights. Training then minimises
``CE + c * sum_k Omega_k (theta_k - theta*_k)^2`` (no ``1/2``, as the paper and the reference code).

Head: every trainable parameter is tracked from the start of the task in which it exists, so a task's head
block gets its importance from its own task on. In the class-incremental setting old blocks keep receiving
gradients and accumulate importance; in the task-incremental setting the current task's loss does not reach
old blocks (``g = 0``: no new importance) and the penalty resists what weight decay does to them. BatchNorm
affine parameters are regularised like the others (Avalanche excludes them; Zenke et al. had none).

Defaults (``cl_bench/conf/method/si.yaml``): ``c`` 0.1 and ``xi`` 1e-3, Zenke et al.'s split CIFAR-10/100
setting (the reference repository's ``fig_transfer_cifar`` run, ``xi=0.001``); Avalanche's ``eps`` 1e-7 and
Mammoth's perm-MNIST ``xi`` 0.1 are other choices. The optimiser settings are the repository's ``seq_ft``
protocol.
"""

from __future__ import annotations

from typing import Any

import torch

from cl_bench.backbones.base import Backbone
from cl_bench.errors import ConfigError
from cl_bench.methods.base import ContinualModule, TaskContext
from cl_bench.modules.regularizers import QuadraticPenalty, TensorDict, snapshot, trainable_parameters


class SynapticIntelligence(ContinualModule):
    """Fine-tuning with the SI surrogate loss (see the module docstring).

    Args:
        c: strength of the penalty.
        xi: damping ``xi`` of the importance's denominator.
        (the rest as :class:`~cl_bench.methods.base.ContinualModule`)
    """

    training_state_attributes = ("penalty",)

    def __init__(
        self,
        backbone: Backbone,
        c: float = 0.1,
        xi: float = 1e-3,
        **base_args: Any,
    ) -> None:
        super().__init__(
            backbone,
            **base_args,
        )
        if c < 0:
            raise ConfigError(f"method.c={c} must be >= 0")
        if xi <= 0:
            raise ConfigError(f"method.xi={xi} must be > 0 (it keeps Omega finite for unmoved weights)")
        self.c = c
        self.xi = xi
        self.penalty = QuadraticPenalty()
        #: The task's starting weights and path integrals (set when training starts, on the fit device).
        self.start: TensorDict = {}
        self.omega: TensorDict = {}
        #: ``(weights before the step, unregularised gradient)`` between a step's gradient and its update.
        self._pending: tuple[TensorDict, TensorDict] | None = None

    # ----------------------------------------------------------------- path integral
    def on_train_start(self) -> None:
        params = trainable_parameters(self)
        self.start = snapshot(params)
        self.omega = {name: torch.zeros_like(p) for name, p in params.items()}

    @torch.no_grad()
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Record the weights and the task-loss gradient that the coming update acts on."""
        grads: TensorDict = {}
        term = self.penalty.terms[0] if self.penalty.terms else None
        for name, p in trainable_parameters(self).items():
            if p.grad is None:
                continue
            grad = p.grad.detach().clone()
            if term is not None and name in term.importance:  # remove the penalty's gradient
                grad -= 2 * self.c * term.importance[name] * (p.detach() - term.anchor[name])
            grads[name] = grad
        self._pending = (snapshot({n: p for n, p in trainable_parameters(self).items() if n in grads}), grads)

    @torch.no_grad()
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """``omega += -g * delta_theta`` for the update that has just been applied."""
        if self._pending is None:
            return
        before, grads = self._pending
        params = dict(self.named_parameters())
        for name, grad in grads.items():
            self.omega[name] -= grad * (params[name].detach() - before[name])
        self._pending = None

    def on_task_end(self, ctx: TaskContext) -> None:
        """Fold the task's path integrals into Omega and anchor at the task's final weights."""
        if not self.start:  # no training on this task
            return
        params = trainable_parameters(self)
        new = {
            name: self.omega[name] / ((p.detach() - self.start[name]).pow(2) + self.xi)
            for name, p in params.items()
            if name in self.omega
        }
        self.penalty.consolidate(snapshot(params), new)
        for importance in self.penalty.terms[0].importance.values():
            importance.clamp_(min=0.0)
        self.start, self.omega = {}, {}

    # ----------------------------------------------------------------- training
    def regularizer(self) -> torch.Tensor | None:
        """``c`` times the quadratic penalty (nothing before the first task ends)."""
        if not len(self.penalty):
            return None
        return self.c * self.penalty(dict(self.named_parameters()))
