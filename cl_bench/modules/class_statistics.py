"""Per-class Gaussian statistics of features, and sampling from them.

SLCA's Classifier Alignment (Zhang et al., ICCV 2023, Sec. 4.2, "modeling the class-wise distributions")
stores, for every class, the mean and covariance of its training features once the class's task is learnt
and later samples pseudo-features from ``N(mu_c, Sigma_c)``. Following the official code
(``GengDavid/SLCA`` ``models/base.py::_compute_class_mean``; ``shared/research/methods_vit.md`` §2.3):

* ``mu_c`` is the plain mean and ``Sigma_c`` the unbiased covariance (``torch.cov``, i.e. ``numpy.cov``
  with ``ddof=1``) computed in float64, plus ``shrink * I`` with ``shrink = 1e-4`` so that a class with
  fewer images than feature dimensions (CUB: ~30 per class for 768-d) still has a positive-definite
  covariance; both are stored in float32 on the CPU, as the code keeps them.
* A class's statistics are written once, when its task ends, and never refreshed (old classes keep the
  statistics of the backbone that learnt them), unless :meth:`update` is called for it again.

Statistics are computed in float64 and samples drawn in float32 whatever the trainer's autocast
(:mod:`cl_bench.modules.precision`). Sampling draws ``mean + z @ L^T`` with ``L`` the Cholesky factor of
``Sigma_c`` (factorised in float32 as the code does; where float32 rounding leaves an ill-conditioned
``Sigma_c`` indefinite, as for a class of a few images with a large feature variance in a smoke run, through
its float64 eigendecomposition) and ``z ~ N(0, I)`` from the caller's
``torch.Generator``, so it is repeatable
(``torch.distributions.MultivariateNormal``, which the code uses, samples the same distribution the same way
but only from the global RNG).

The statistics are plain tensors, not module state: they are not part of a saved model (a 768-d covariance
per class is 2.25 MiB; 200 classes take 450 MiB).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cl_bench.errors import ConfigError
from cl_bench.modules.precision import float32


class ClassStatistics:
    """Mean and covariance of each class's features, keyed by class position.

    Args:
        covariance_shrink: ``shrink`` added to the covariance diagonal (SLCA code: 1e-4).
    """

    def __init__(self, covariance_shrink: float = 1e-4) -> None:
        if covariance_shrink < 0:
            raise ConfigError(f"covariance_shrink={covariance_shrink} must be >= 0")
        self.covariance_shrink = covariance_shrink
        self.means: dict[int, torch.Tensor] = {}
        self.covariances: dict[int, torch.Tensor] = {}

    @property
    def classes(self) -> list[int]:
        """The classes with statistics, in increasing order."""
        return sorted(self.means)

    def __len__(self) -> int:
        return len(self.means)

    def state_dict(self) -> dict[str, dict[int, torch.Tensor]]:
        """Means and covariances by class (a resumed run's checkpoint)."""
        return {"means": dict(self.means), "covariances": dict(self.covariances)}

    def load_state_dict(self, state: dict[str, dict[int, torch.Tensor]]) -> None:
        self.means = {int(c): v.cpu() for c, v in state["means"].items()}
        self.covariances = {int(c): v.cpu() for c, v in state["covariances"].items()}

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """Compute (or overwrite) the statistics of every class present in ``labels``; returns them.

        Raises :class:`~cl_bench.errors.ConfigError` for a class with fewer than two examples (no
        covariance) or for non-finite features.
        """
        if features.ndim != 2 or labels.shape != features.shape[:1]:
            raise ValueError(
                f"expected features [N, D] and labels [N], got {tuple(features.shape)} and "
                f"{tuple(labels.shape)}"
            )
        if not torch.isfinite(features).all():
            raise ConfigError("class statistics: the features contain NaN/inf; check the backbone and inputs")
        features = features.detach().to("cpu", torch.float64)
        labels = labels.detach().cpu()
        eye = torch.eye(features.shape[1], dtype=torch.float64)
        updated = []
        for cls in torch.unique(labels).tolist():
            class_features = features[labels == cls]
            if len(class_features) < 2:
                raise ConfigError(
                    f"class {cls} has {len(class_features)} training example(s); "
                    "a covariance needs at least 2"
                )
            self.means[cls] = class_features.mean(dim=0).float()
            covariance = torch.cov(class_features.T) + self.covariance_shrink * eye
            self.covariances[cls] = covariance.float()
            updated.append(cls)
        return updated

    def _factor(self, cls: int, device: torch.device) -> torch.Tensor:
        """``L`` with ``L @ L.T = Sigma_c``: the float32 Cholesky factor (the code's), or, where float32
        rounding of an ill-conditioned ``Sigma_c`` left it indefinite, ``V sqrt(max(lambda, 0))`` from its
        float64 eigendecomposition (the nearest positive semi-definite matrix, equal up to that rounding)."""
        covariance = self.covariances[cls].to(device)
        factor, info = torch.linalg.cholesky_ex(covariance)
        if info.item() == 0:
            return factor
        if not torch.isfinite(covariance).all():
            raise ConfigError(f"the covariance of class {cls} is not finite (its features overflowed)")
        values, vectors = torch.linalg.eigh(covariance.double())
        return (vectors * values.clamp(min=0).sqrt()).float()

    def sample(
        self,
        classes: Sequence[int],
        per_class: int,
        generator: torch.Generator,
        mean_scales: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` draws from ``N(mean_scales[i] * mu_c, Sigma_c)`` for each ``c = classes[i]``.

        Returns float32 features ``[len(classes) * per_class, D]`` and their class labels, grouped by class
        in the order of ``classes``, on ``device`` (the generator's device must match it).
        """
        missing = [c for c in classes if c not in self.means]
        if missing:
            raise KeyError(f"no statistics for classes {missing}; known: {self.classes}")
        if mean_scales is not None and mean_scales.shape != (len(classes),):
            raise ValueError(f"mean_scales must have shape [{len(classes)}], got {tuple(mean_scales.shape)}")
        device = torch.device(device) if device is not None else generator.device
        samples = []
        with float32(device):
            for i, cls in enumerate(classes):
                mean = self.means[cls].to(device)
                if mean_scales is not None:
                    mean = mean * float(mean_scales[i])
                factor = self._factor(cls, device)
                noise = torch.randn(per_class, mean.shape[0], generator=generator, device=device)
                samples.append(mean + noise @ factor.T)
        labels = torch.as_tensor(classes, device=device).repeat_interleave(per_class)
        return torch.cat(samples), labels
