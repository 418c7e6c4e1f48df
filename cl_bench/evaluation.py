"""Accuracy of a method on every seen task's test set.

* class-incremental accuracy: ``argmax`` over all classes seen so far, no task id;
* task-incremental accuracy: the task id ``j`` is given (``forward(x, task=j)``) and the ``argmax`` is taken
  within task ``j``'s classes.

For methods with a frozen backbone, test embeddings are computed once per task and reused after every later
task, so the backbone sees each test image once per run instead of once per evaluation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from cl_bench.methods.base import ContinualModule
from cl_bench.scenario import Scenario


class Evaluator:
    def __init__(
        self,
        scenario: Scenario,
        test_sets: Sequence[Dataset],
        batch_size: int = 256,
        num_workers: int = 0,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.scenario = scenario
        self.test_sets = list(test_sets)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.autocast_dtype = autocast_dtype
        self.task_sizes = [len(ds) for ds in self.test_sets]
        self._features: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def _loader(self, j: int) -> DataLoader:
        return DataLoader(
            self.test_sets[j], batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )

    def _cached_features(self, module: ContinualModule, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if j not in self._features:
            feats, labels = [], []
            for x, y in self._loader(j):
                with self._autocast(module.device):
                    feats.append(module.embed(x.to(module.device)).float().cpu())
                labels.append(y)
            self._features[j] = (torch.cat(feats), torch.cat(labels))
        return self._features[j]

    def _batches(
        self, module: ContinualModule, j: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(cil_logits, til_logits, labels)`` per batch of task ``j``'s test set."""
        device = module.device
        if module.frozen_backbone:
            feats, labels = self._cached_features(module, j)
            for k in range(0, len(labels), self.batch_size):
                f = feats[k : k + self.batch_size].to(device)
                with self._autocast(device):
                    cil = module.classify(f).float()
                    til = module.classify(f, task=j).float() if module.task_conditioned else cil
                yield cil, til, labels[k : k + self.batch_size].to(device)
            return
        for x, y in self._loader(j):
            x = x.to(device)
            with self._autocast(device):
                cil = module(x).float()
                til = module(x, task=j).float() if module.task_conditioned else cil
            yield cil, til, y.to(device)

    @torch.no_grad()
    def evaluate(self, module: ContinualModule, upto: int) -> tuple[list[float], list[float]]:
        """Accuracies (percent) on tasks ``0..upto``: ``(class_incremental_row, task_incremental_row)``."""
        was_training = module.training
        module.eval()
        cil_row, til_row = [], []
        for j in range(upto + 1):
            task = self.scenario.tasks[j]
            cil_correct = til_correct = total = 0
            for cil, til, y in self._batches(module, j):
                cil_correct += int((cil.argmax(dim=1) == y).sum())
                til_correct += int((til[:, task.start : task.stop].argmax(dim=1) + task.start == y).sum())
                total += len(y)
            cil_row.append(100.0 * cil_correct / max(total, 1))
            til_row.append(100.0 * til_correct / max(total, 1))
        module.train(was_training)
        return cil_row, til_row
