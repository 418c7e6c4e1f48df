"""Quadratic parameter penalties ``sum_k Omega_k (theta_k - theta*_k)^2`` shared by EWC, SI and MAS.

A :class:`QuadraticPenalty` holds terms of an anchor ``theta*`` and an importance ``Omega`` (one tensor per
parameter name). The methods differ in how they estimate ``Omega`` and fold a new task's estimate in:

* EWC, ``separate``: one term per past task (:meth:`QuadraticPenalty.append`);
* online EWC: one term, ``F <- gamma F + F_new``, anchor at the latest optimum;
* SI: one term, ``Omega <- Omega + Omega_new``;
* MAS: one term, ``Omega <- alpha Omega + (1 - alpha) Omega_new``.

The last three are :meth:`QuadraticPenalty.consolidate` with ``(decay, scale, fresh_scale)``. A parameter
missing from the old term (every parameter at the first task, a head block created by the last task) takes
``fresh_scale * Omega_new`` (default ``scale``, i.e. ``Omega = 0`` before; current Avalanche's MAS takes
``Omega_new`` itself); parameters created after a term (the next task's head block) are not in it, so they
are free until their own task ends.

The state lives in plain attributes, not in the module's ``state_dict``: it is one or more extra copies of
every parameter, which ``final_model.pt`` should not carry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from cl_bench import distributed

TensorDict = dict[str, torch.Tensor]


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that receive gradients, by name (the ones a penalty can protect)."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def snapshot(params: Mapping[str, torch.Tensor]) -> TensorDict:
    """Detached copies of ``params`` (an anchor)."""
    return {name: p.detach().clone() for name, p in params.items()}


@dataclass
class PenaltyTerm:
    """``sum_k importance_k (theta_k - anchor_k)^2`` over the parameters named in ``importance``."""

    anchor: TensorDict
    importance: TensorDict

    def __call__(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum(
            (omega * (params[name] - self.anchor[name]).pow(2)).sum()
            for name, omega in self.importance.items()
        )  # type: ignore[return-value]


@dataclass
class QuadraticPenalty:
    """The sum of :class:`PenaltyTerm` s (see the module docstring)."""

    terms: list[PenaltyTerm] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.terms)

    def __call__(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The penalty at ``params`` (a scalar tensor; ``0.0`` without terms)."""
        if not self.terms:
            return torch.zeros(())
        return sum(term(params) for term in self.terms)  # type: ignore[return-value]

    def append(self, anchor: TensorDict, importance: TensorDict) -> None:
        """Add a separate term (EWC ``separate`` mode)."""
        self.terms.append(PenaltyTerm(anchor, importance))

    @torch.no_grad()
    def consolidate(
        self,
        anchor: TensorDict,
        importance: TensorDict,
        decay: float = 1.0,
        scale: float = 1.0,
        fresh_scale: float | None = None,
    ) -> None:
        """Keep one term: ``Omega <- decay * Omega + scale * importance``, anchored at ``anchor``; a parameter
        without an old ``Omega`` takes ``fresh_scale * importance`` (``None``: ``scale``)."""
        old = self.terms[0].importance if self.terms else {}
        fresh = scale if fresh_scale is None else fresh_scale
        merged = {
            name: scale * omega + decay * old[name] if name in old else fresh * omega
            for name, omega in importance.items()
        }
        self.terms = [PenaltyTerm(anchor, merged)]


def gradient_importance(
    params: Mapping[str, torch.Tensor],
    batches: Iterable[Any],
    loss_fn: Callable[[Any], torch.Tensor],
    reduce: Callable[[torch.Tensor], torch.Tensor],
) -> TensorDict:
    """The mean over ``batches`` of ``reduce(d loss_fn(batch) / d theta)`` for each parameter of ``params``.

    EWC's Fisher uses ``reduce = square`` on the mini-batch cross-entropy, MAS ``reduce = abs`` on the
    squared output norm. Gradients come from :func:`torch.autograd.grad`, so ``.grad`` is left untouched.
    Under DDP each process passes its share of the batches (``TaskContext.shard_loader``): sums and batch
    counts are added up across the processes, giving the one-process mean.
    """
    names, tensors = list(params), list(params.values())
    importance = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    n_batches = 0
    with torch.enable_grad():
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(batch), tensors, allow_unused=True)
            for name, grad in zip(names, grads):
                if grad is not None:
                    importance[name] += reduce(grad.float())
            n_batches += 1
    count = torch.tensor(float(n_batches), device=tensors[0].device if tensors else None)
    distributed.all_reduce_sum(count)
    for value in importance.values():
        distributed.all_reduce_sum(value)
    return {name: value / max(float(count), 1.0) for name, value in importance.items()}


def per_example_importance(
    module: nn.Module,
    params: Mapping[str, torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    example_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int = 16,
) -> TensorDict:
    """The mean over *examples* of ``reduce``-d per-example gradients, for each parameter of ``params``.

    ``example_loss(module(x[None]), y[None])`` is one example's loss; its gradient with respect to every
    parameter of ``params`` comes from ``torch.func`` (``functional_call`` + ``grad_and_value`` + ``vmap``),
    ``chunk_size`` examples at a time (memory: ``chunk_size`` copies of ``params``).
    ``reduce(grads [n, *shape], losses [n])`` sums a chunk's contributions (EWC's empirical Fisher:
    ``grads.square().sum(0)``). ``module`` should be in eval mode (BatchNorm on running statistics).
    Under DDP each process passes its share of the batches; sums and example counts are added up.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    names = list(params)
    detached = {name: p.detach() for name, p in params.items()}

    def loss_of(weights: TensorDict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return example_loss(functional_call(module, weights, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_example = vmap(grad_and_value(loss_of), in_dims=(None, 0, 0))
    importance = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    device = next(iter(detached.values())).device if detached else None
    n_examples = 0
    for x, y in batches:
        for start in range(0, len(x), chunk_size):
            grads, losses = per_example(
                detached, x[start : start + chunk_size], y[start : start + chunk_size]
            )
            for name in names:
                importance[name] += reduce(grads[name].float(), losses.detach().float())
        n_examples += len(x)
    count = torch.tensor(float(n_examples), device=device)
    distributed.all_reduce_sum(count)
    for value in importance.values():
        distributed.all_reduce_sum(value)
    return {name: value / max(float(count), 1.0) for name, value in importance.items()}
