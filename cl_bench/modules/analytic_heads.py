"""Analytic classifiers: RanPAC's random-projection ridge head, and the cosine head trained before it.

RanPAC (McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for Continual Learning",
NeurIPS 2023; code ``RanPAC/RanPAC`` ``RanPAC.py``::``setup_RP``/``replace_fc``/``optimise_ridge_parameter``,
``inc_net.py``::``CosineLinear``), also SAFE's classifier (``MIFA-Lab/SAFE`` ``SAFE.py``):

* a frozen random projection ``W_rand in R^{D x M}``, ``W_rand ~ N(0, 1)``, ``M = 10000``, and
  ``h = ReLU(f W_rand)`` (``M = 0``: ``h = f``, the code's "no RP, only decorrelation");
* per task, on the task's training images: ``G += H^T H`` and ``Q += H^T Y`` (``Y`` one-hot);
* ``lambda`` from a grid (RanPAC ``10^{-8..8}``, SAFE ``10^{3..8}``): fit on the first 80 % of the *current
  task's* (shuffled) features, keep the lambda with the smallest MSE on the other 20 %;
* ``W_o = solve(G + lambda I, Q)^T`` and logits ``h W_o^T``.

Everything is computed in float32 on the buffers' device, as the official code (which solves on the CPU),
whatever the autocast (:mod:`cl_bench.modules.precision`): fits and logits use the same projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.errors import ConfigError
from cl_bench.modules.precision import float32


def ridge_grid(low_exponent: int, high_exponent: int) -> list[float]:
    """``10^low, ..., 10^high`` (RanPAC: -8..8; SAFE: 3..8)."""
    if low_exponent > high_exponent:
        raise ConfigError(
            f"ridge exponents [{low_exponent}, {high_exponent}]: the first must be <= the second"
        )
    return [10.0**e for e in range(low_exponent, high_exponent + 1)]


def ridge_solve(gram: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """``W_o = solve(G + ridge I, Q)^T``: the ``[classes, M]`` output weights."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, targets).T


def select_ridge(
    h: torch.Tensor, y_onehot: torch.Tensor, ridges: list[float], train_fraction: float = 0.8
) -> float:
    """The ridge with the smallest validation MSE (the first ``train_fraction`` fit, the rest validate)."""
    n_fit = int(h.shape[0] * train_fraction)
    if n_fit < 1 or n_fit >= h.shape[0]:
        raise ConfigError(
            f"ridge selection needs at least one fitting and one validation sample; got {h.shape[0]} samples"
        )
    gram = h[:n_fit].T @ h[:n_fit]
    q = h[:n_fit].T @ y_onehot[:n_fit]
    losses = [F.mse_loss(h[n_fit:] @ ridge_solve(gram, q, r).T, y_onehot[n_fit:]).item() for r in ridges]
    return ridges[min(range(len(ridges)), key=losses.__getitem__)]


class RandomProjectionRidgeHead(nn.Module):
    """RanPAC's head: ``logits = scale * ReLU(f W_rand) W_o^T``, ``W_o`` the ridge solution on ``G``, ``Q``.

    Args:
        in_features: feature width ``D``.
        rp_dim: ``M``, the projection width (0: no projection, the ridge acts on ``f`` itself).
        ridges: the lambda grid (:func:`ridge_grid`).
        train_fraction: share of a task's samples that fit the lambda candidates (0.8 in the code).
        generator: draws ``W_rand`` (seed it for reproducible runs).

    ``G`` and ``Q`` are allocated at the first :meth:`fit` that accumulates into this head, so a head whose
    statistics live in another head (SAFE's shared ``G``/``Q``) holds none.
    """

    def __init__(
        self,
        in_features: int,
        rp_dim: int = 10000,
        ridges: list[float] | None = None,
        train_fraction: float = 0.8,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if rp_dim < 0:
            raise ConfigError(f"method.rp_dim={rp_dim} must be >= 0 (0: no random projection)")
        if not 0.0 < train_fraction < 1.0:
            raise ConfigError(f"ridge train_fraction={train_fraction} must lie in (0, 1)")
        self.in_features = in_features
        self.rp_dim = rp_dim
        self.ridges = list(ridges) if ridges is not None else ridge_grid(-8, 8)
        self.train_fraction = train_fraction
        width = rp_dim or in_features
        projection = torch.randn(in_features, rp_dim, generator=generator) if rp_dim else torch.empty(0)
        self.register_buffer("projection", projection)
        self.register_buffer("weight", torch.zeros(0, width))
        self.register_buffer("gram", torch.zeros(0, 0))
        self.register_buffer("cross", torch.zeros(0, 0))
        #: The lambda chosen at the last fit.
        self.last_ridge: float | None = None

    @property
    def width(self) -> int:
        return self.rp_dim or self.in_features

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def add_task(self, n_classes: int) -> None:
        """Reserve ``n_classes`` more outputs (zero weights until the next :meth:`fit`)."""
        self.weight = torch.cat([self.weight, self.weight.new_zeros(n_classes, self.width)])

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """``h = ReLU(f W_rand)`` (``f`` itself when ``rp_dim = 0``), in float32."""
        with float32(features.device):
            features = features.float()
            return torch.relu(features @ self.projection.float()) if self.rp_dim else features

    def accumulate(self, h: torch.Tensor, y_onehot: torch.Tensor) -> None:
        """``G += H^T H``, ``Q += H^T Y`` (``Q`` grows to ``Y``'s number of classes)."""
        if self.gram.numel() == 0:
            self.gram = h.new_zeros(self.width, self.width)
            self.cross = h.new_zeros(self.width, 0)
        if self.cross.shape[1] < y_onehot.shape[1]:
            grown = h.new_zeros(self.width, y_onehot.shape[1])
            grown[:, : self.cross.shape[1]] = self.cross
            self.cross = grown
        self.gram += h.T @ h
        self.cross += h.T @ y_onehot

    @torch.no_grad()
    def fit(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        statistics: RandomProjectionRidgeHead | None = None,
        generator: torch.Generator | None = None,
    ) -> float:
        """Add one task's training features to ``G``/``Q`` and re-solve ``W_o``; returns the chosen lambda.

        ``statistics``: the head whose ``G``/``Q`` accumulate (``None``: this head's own). The lambda is
        selected on this task's features in a random order drawn from ``generator``.
        """
        device = self.weight.device
        with float32(device):
            h = self.project(features.to(device))
            y = F.one_hot(labels.to(device).long(), self.num_classes).float()
            order = torch.randperm(len(h), generator=generator).to(device)
            ridge = select_ridge(h[order], y[order], self.ridges, self.train_fraction)
            owner = self if statistics is None else statistics
            owner.accumulate(h, y)
            self.weight = ridge_solve(owner.gram, owner.cross[:, : self.num_classes], ridge)
        self.last_ridge = ridge
        return ridge

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with float32(features.device):
            return self.project(features) @ self.weight.float().T

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        for name in ("weight", "gram", "cross"):  # resize to the saved shapes before copying
            if prefix + name in state_dict:
                setattr(self, name, getattr(self, name).new_zeros(state_dict[prefix + name].shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CosineLinear(nn.Module):
    """PyCIL's ``CosineLinear``: ``logits = sigma * cos(f, w_c)`` with a learnable scalar ``sigma``.

    The head RanPAC, APER and SAFE train with the PET module on the first session. ``sigma`` starts at 1 in
    RanPAC's and RevisitingCIL's ``inc_net.py`` and at 10 in SAFE's. Weights start uniform in
    ``+-1/sqrt(D)``; :meth:`add_task` appends zero rows and keeps ``sigma`` (``update_fc``).
    """

    def __init__(self, in_features: int, sigma: float = 1.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.zeros(0, in_features))
        self.sigma = nn.Parameter(torch.tensor([float(sigma)]))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def add_task(self, n_classes: int, init: str = "uniform") -> None:
        """Append ``n_classes`` rows: ``uniform`` (a fresh head) or ``zeros`` (``update_fc``'s new rows)."""
        new = self.weight.new_zeros(n_classes, self.in_features)
        if init == "uniform":
            bound = 1.0 / math.sqrt(self.in_features)
            new.uniform_(-bound, bound)
        self.weight = nn.Parameter(
            torch.cat([self.weight.detach(), new]), requires_grad=self.weight.requires_grad
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.sigma * F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        if prefix + "weight" in state_dict:
            self.weight = nn.Parameter(self.weight.new_zeros(state_dict[prefix + "weight"].shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
