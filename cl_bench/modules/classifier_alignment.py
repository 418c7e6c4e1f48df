"""Classifier Alignment (CA): post-hoc retraining of the classifier on features sampled from stored class
Gaussians (Zhang et al., "SLCA: Slow Learner with Classifier Alignment", ICCV 2023, Sec. 4.2; SLCA++,
arXiv 2408.08295).

After a task is learnt, every seen class ``c`` has a Gaussian ``N(mu_c, Sigma_c)`` of its features
(:class:`~cl_bench.modules.class_statistics.ClassStatistics`). CA then trains the classifier alone, for
``epochs`` epochs, on ``samples_per_class`` fresh draws per class and epoch, shuffled and cut into batches
of ``batch_size``, with SGD (momentum, weight decay) and a cosine schedule over the CA epochs. Every detail
below follows the official code (``GengDavid/SLCA`` ``models/slca.py::_stage2_compact_classifier``,
``models/slca_pp.py``; ``shared/research/methods_vit.md`` §2.3):

* 5 epochs, 256 samples per class and epoch, batch 256 (each sample is used once per epoch), lr 0.01 with
  ``CosineAnnealingLR(T_max=epochs)`` stepped per epoch, momentum 0.9, the method's weight decay;
* **logit normalisation** (``logit_norm = tau``; 0.1, 0.05 for Cars): the logits are divided by the mean
  over task heads ``k`` of ``||z_k||_2 + 1e-7`` (the norm of head ``k``'s slice of the logits, *not* the
  global norm) and by ``tau``, for the CA loss only (:func:`task_normalized_logits`); ``None``: plain CE;
* every head parameter is trained, old tasks' blocks included, whatever its ``requires_grad`` was (the
  flags are restored afterwards);
* how old classes' samples are rescaled is the caller's choice: SLCA shrinks the *mean* of a class of task
  ``t_c`` by ``0.9 + 0.1 (t_c + 1) / (T + 1)`` before sampling (:func:`slca_mean_scales`), SLCA++ divides
  each *sample* by ``1 + s (T - t_c)`` with ``s ~ U(mu - jitter/2, mu + jitter/2)``
  (:func:`random_feature_scales`).

All randomness (samples, shuffling, random scales) comes from the caller's generator. A method runs CA as a
head-only training phase (:class:`~cl_bench.methods.base.HeadTraining`) on :meth:`ClassifierAlignment.samples`
with :meth:`~ClassifierAlignment.optimizer`, :meth:`~ClassifierAlignment.scheduler` and
:meth:`~ClassifierAlignment.loss`; :meth:`ClassifierAlignment.align` is the same training as a plain loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset

from cl_bench.errors import TrainingDivergedError
from cl_bench.modules.class_statistics import ClassStatistics

#: ``scaler(labels) -> [N]`` factors that multiply the sampled features of an epoch.
FeatureScaler = Callable[[torch.Tensor], torch.Tensor]


def task_normalized_logits(
    logits: torch.Tensor, task_sizes: Sequence[int], temperature: float
) -> torch.Tensor:
    """``logits / (mean_k (||z_k||_2 + 1e-7) * temperature)``, ``z_k`` being task ``k``'s logits."""
    if sum(task_sizes) != logits.shape[1]:
        raise ValueError(f"task sizes {list(task_sizes)} do not cover the {logits.shape[1]} logits")
    norms = torch.stack([z.norm(p=2, dim=1) + 1e-7 for z in logits.split(list(task_sizes), dim=1)], dim=1)
    return logits / (norms.mean(dim=1, keepdim=True) * temperature)


def slca_mean_scales(class_tasks: torch.Tensor, current_task: int, base: float = 0.9) -> torch.Tensor:
    """SLCA's mean shrink ``base + (1 - base) (t_c + 1) / (T + 1)`` per class (1 for the current task)."""
    return base + (1.0 - base) * (class_tasks.double() + 1) / (current_task + 1)


def random_feature_scales(
    sample_tasks: torch.Tensor, current_task: int, mu: float, jitter: float, generator: torch.Generator
) -> torch.Tensor:
    """SLCA++'s ``1 / (1 + s (T - t))`` with ``s = mu + jitter (U(0, 1) - 0.5)`` drawn per sample."""
    uniform = torch.rand(sample_tasks.shape, generator=generator, device=sample_tasks.device)
    strength = mu + jitter * (uniform - 0.5)
    return 1.0 / (1.0 + strength * (current_task - sample_tasks).float())


class AlignmentSamples(IterableDataset):
    """CA's training data, a dataset of whole batches: each pass (epoch) draws ``samples_per_class`` fresh
    features of every class, scales them, shuffles them and cuts them into batches of ``batch_size``.

    Features lie on ``generator``'s device; the draws continue ``generator`` from epoch to epoch.
    """

    def __init__(
        self,
        statistics: ClassStatistics,
        classes: Sequence[int],
        samples_per_class: int,
        batch_size: int,
        generator: torch.Generator,
        mean_scales: torch.Tensor | None = None,
        feature_scaler: FeatureScaler | None = None,
    ) -> None:
        self.statistics = statistics
        self.classes = list(classes)
        self.samples_per_class = samples_per_class
        self.batch_size = batch_size
        self.generator = generator
        self.mean_scales = mean_scales
        self.feature_scaler = feature_scaler

    def __len__(self) -> int:
        return math.ceil(len(self.classes) * self.samples_per_class / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.generator.device
        features, labels = self.statistics.sample(
            self.classes, self.samples_per_class, self.generator, self.mean_scales, device
        )
        if self.feature_scaler is not None:
            features = features * self.feature_scaler(labels).unsqueeze(1)
        order = torch.randperm(len(labels), generator=self.generator, device=device)
        for batch in order.split(self.batch_size):
            yield features[batch], labels[batch]


class ClassifierAlignment:
    """Retrains a classifier on sampled pseudo-features (see the module docstring).

    Args:
        epochs: CA epochs (SLCA code: 5).
        samples_per_class: draws per class and epoch (code: 256).
        batch_size: CA batch size (code: 256).
        lr: initial learning rate, cosine-annealed to 0 over ``epochs`` (code: the method's lr, 0.01).
        momentum: SGD momentum (code: 0.9).
        weight_decay: SGD weight decay (code: the method's, 5e-4; SLCA++ IN-R/Cars: 0).
        logit_norm: temperature ``tau`` of the per-task logit normalisation; ``None``: plain CE.
    """

    def __init__(
        self,
        epochs: int = 5,
        samples_per_class: int = 256,
        batch_size: int = 256,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        logit_norm: float | None = 0.1,
    ) -> None:
        if epochs < 0 or samples_per_class < 1 or batch_size < 1 or lr < 0:
            raise ValueError("CA needs epochs >= 0, samples_per_class >= 1, batch_size >= 1 and lr >= 0")
        if logit_norm is not None and logit_norm <= 0:
            raise ValueError(f"logit_norm={logit_norm} must be > 0 (or None for plain cross-entropy)")
        self.epochs = epochs
        self.samples_per_class = samples_per_class
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.logit_norm = logit_norm

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, task_sizes: Sequence[int]) -> torch.Tensor:
        if self.logit_norm is not None:
            logits = task_normalized_logits(logits, task_sizes, self.logit_norm)
        return F.cross_entropy(logits, labels)

    def samples(
        self,
        statistics: ClassStatistics,
        classes: Sequence[int],
        generator: torch.Generator,
        mean_scales: torch.Tensor | None = None,
        feature_scaler: FeatureScaler | None = None,
    ) -> AlignmentSamples:
        """CA's training batches for ``classes`` (see :class:`AlignmentSamples`); ``mean_scales[i]``
        multiplies ``classes[i]``'s mean before sampling, ``feature_scaler(labels)`` gives a factor for each
        sampled feature."""
        return AlignmentSamples(
            statistics,
            classes,
            self.samples_per_class,
            self.batch_size,
            generator,
            mean_scales,
            feature_scaler,
        )

    def optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """Cosine over the CA epochs, stepped per epoch."""
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.epochs))

    def align(
        self,
        head: nn.Module,
        statistics: ClassStatistics,
        classes: Sequence[int],
        task_sizes: Sequence[int],
        generator: torch.Generator,
        mean_scales: torch.Tensor | None = None,
        feature_scaler: FeatureScaler | None = None,
    ) -> list[float]:
        """Train ``head`` (features -> logits over the class positions ``0..sum(task_sizes)-1``) on samples
        of ``classes`` in a plain loop (the training a CA phase runs under Lightning); returns the mean loss
        of each epoch."""
        params = list(head.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        optimizer = self.optimizer(params)
        scheduler = self.scheduler(optimizer)
        samples = self.samples(statistics, classes, generator, mean_scales, feature_scaler)
        epoch_losses = []
        try:
            with torch.enable_grad():
                for epoch in range(self.epochs):
                    total, count = 0.0, 0
                    for features, labels in samples:
                        loss = self.loss(head(features), labels, task_sizes)
                        if not torch.isfinite(loss):
                            raise TrainingDivergedError(
                                f"classifier alignment loss became {loss.item()} in CA epoch {epoch}; lower "
                                f"the CA learning rate (now {self.lr}) or check the class statistics"
                            )
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        total += loss.item() * len(labels)
                        count += len(labels)
                    scheduler.step()
                    epoch_losses.append(total / count)
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
                p.grad = None
        return epoch_losses
