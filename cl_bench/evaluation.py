"""Accuracy of a method on every seen task's test set.

* class-incremental accuracy: ``argmax`` over all classes seen so far, no task id;
* task-incremental accuracy: the task id is given (``forward(x, task=j)``) and the ``argmax`` is taken
  within the classes of the image's task. For joint training (one merged task) the task of an image is its
  task in the original split (``til_tasks``), so its TIL accuracy is comparable with the continual methods'.

For methods with a frozen backbone, test embeddings are computed once per task and reused after every later
task, so the backbone sees each test image once per run instead of once per evaluation.

The evaluator reads the method's :class:`~cl_bench.methods.base.Capabilities` and nothing else about it.
Methods that choose task-specific parameters per image (``selects_task``: ``predict`` returns the chosen
task) also get a task-selection accuracy: the percentage of task ``j``'s test images for which task ``j``
was chosen; alternative predictions (``Prediction.alternatives``) get ``<name>_acc`` rows.

Domain-incremental scenarios (``scenario=dil``) evaluate *every* domain's test set after each task, the seen
ones and those not learnt yet, as RanPAC's and SAFE's DIL branch tests on the union of all domains' test sets
after every domain; they have no task-incremental accuracy (the task id names only the domain), so their
``til`` rows are empty.

Under DDP every process evaluates its share of the test batches and the counts are summed, so every
process gets the whole test set's accuracies (:mod:`cl_bench.distributed`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from cl_bench import distributed
from cl_bench.methods.base import ContinualModule, autocast
from cl_bench.scenario import Scenario

#: A method's named alternative logits for one batch (``Prediction.alternatives``).
Alternatives = dict[str, torch.Tensor]

#: Name of the task-selection accuracy among :attr:`EvaluationRows.extra`.
TASK_SELECTION = "task_selection_acc"


@dataclass
class EvaluationRows:
    """One evaluation after a task: per seen task, accuracies in percent."""

    cil: list[float]
    #: Empty under DIL (no task-incremental accuracy).
    til: list[float]
    #: Further per-task metrics the method supports, by name (``task_selection_acc``); empty for most methods.
    extra: dict[str, list[float]] = field(default_factory=dict)


class Evaluator:
    def __init__(
        self,
        scenario: Scenario,
        test_sets: Sequence[Dataset],
        batch_size: int = 256,
        num_workers: int = 0,
        autocast_dtype: torch.dtype | None = None,
        til_tasks: Scenario | None = None,
    ) -> None:
        self.scenario = scenario
        split = til_tasks or scenario
        #: ``[start, stop)`` of the (original) task owning each class position.
        self.task_range = torch.zeros(split.num_classes, 2, dtype=torch.long)
        for task in split.tasks:
            self.task_range[task.start : task.stop] = torch.tensor([task.start, task.stop])
        self.test_sets = list(test_sets)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.autocast_dtype = autocast_dtype
        self.task_sizes = [len(ds) for ds in self.test_sets]
        self._features: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def evaluated_tasks(self, upto: int) -> range:
        """The tasks whose test sets are evaluated after task ``upto``: the seen ones; under DIL every
        domain."""
        return range(len(self.test_sets) if self.scenario.domain_incremental else upto + 1)

    def _loader(self, j: int) -> DataLoader:
        """Task ``j``'s test images in order; under DDP this process's share of the batches."""
        return distributed.shard_loader(self.test_sets[j], self.batch_size, self.num_workers)

    def _cached_features(self, module: ContinualModule, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if any(p.requires_grad for p in module.backbone.parameters()):
            raise RuntimeError(
                f"{type(module).__name__} declares a frozen backbone but it has trainable parameters"
            )
        if j not in self._features:
            batches = []
            for x, y in self._loader(j):
                with autocast(module.device, self.autocast_dtype):
                    batches.append((module.embed(x.to(module.device)).float().cpu(), y))
            batches = distributed.gather_batches(batches)
            self._features[j] = (torch.cat([f for f, _ in batches]), torch.cat([y for _, y in batches]))
        return self._features[j]

    def _batches(
        self, module: ContinualModule, j: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, Alternatives]]:
        """Yield ``(cil_logits, til_logits, labels, chosen_tasks or None, alternative_logits)`` per batch of
        task ``j``'s test set."""
        device = module.device
        capabilities = module.capabilities
        task_aware = capabilities.task_conditioned and not self.scenario.domain_incremental
        if capabilities.frozen_backbone:
            feats, labels = self._cached_features(module, j)
            starts = range(0, len(labels), self.batch_size)  # under DDP: this process's share
            for k in starts[distributed.rank() :: distributed.world_size()]:
                f = feats[k : k + self.batch_size].to(device)
                with autocast(device, self.autocast_dtype):
                    cil = module.classify(f).float()
                    til = module.classify(f, task=j).float() if task_aware else cil
                yield cil, til, labels[k : k + self.batch_size].to(device), None, {}
            return
        for x, y in self._loader(j):
            x = x.to(device)
            with autocast(device, self.autocast_dtype):
                prediction = module.predict(x)
                cil = prediction.logits.float()
                til = module(x, task=j).float() if task_aware else cil
            yield cil, til, y.to(device), prediction.chosen_task, prediction.alternatives

    def _within_task(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Logits with every class outside each image's task set to ``-inf``."""
        ranges = self.task_range.to(y.device)[y]
        positions = torch.arange(logits.shape[1], device=y.device)
        inside = (positions >= ranges[:, :1]) & (positions < ranges[:, 1:])
        return logits.masked_fill(~inside, float("-inf"))

    def evaluate(self, module: ContinualModule, upto: int) -> tuple[list[float], list[float]]:
        """Accuracies (percent) on tasks ``0..upto``: ``(class_incremental_row, task_incremental_row)``."""
        rows = self.evaluate_rows(module, upto)
        return rows.cil, rows.til

    @torch.no_grad()
    def evaluate_rows(self, module: ContinualModule, upto: int) -> EvaluationRows:
        """Accuracies (percent) on tasks ``0..upto`` (under DIL: on every domain), and task-selection accuracy
        if the method has one."""
        was_training = module.training
        module.eval()
        rows = EvaluationRows([], [])
        selection_row: list[float] = []
        alternative_rows: dict[str, list[float]] = {}
        evaluated = self.evaluated_tasks(upto)
        for j in evaluated:
            cil_correct = til_correct = selected = total = 0
            alternative_correct: dict[str, int] = {}
            for cil, til, y, chosen, alternatives in self._batches(module, j):
                for name, logits in alternatives.items():
                    hits = int((logits.argmax(dim=1) == y).sum())
                    alternative_correct[name] = alternative_correct.get(name, 0) + hits
                cil_correct += int((cil.argmax(dim=1) == y).sum())
                til_correct += int((self._within_task(til, y).argmax(dim=1) == y).sum())
                if chosen is not None:
                    selected += int((chosen == j).sum())
                total += len(y)
            counts = {"cil": cil_correct, "til": til_correct, "selected": selected, "total": total}
            counts = distributed.sum_counts(counts)
            cil_correct, til_correct, selected, total = counts.values()
            alternative_correct = distributed.sum_counts(alternative_correct)
            rows.cil.append(100.0 * cil_correct / max(total, 1))
            if not self.scenario.domain_incremental:
                rows.til.append(100.0 * til_correct / max(total, 1))
            selection_row.append(100.0 * selected / max(total, 1))
            for name, hits in sorted(alternative_correct.items()):
                row = alternative_rows.setdefault(name, [float("nan")] * j)  # nan: absent on earlier tasks
                row.append(100.0 * hits / max(total, 1))
        capabilities = module.capabilities
        if capabilities.selects_task and not capabilities.frozen_backbone:  # frozen: cached features
            rows.extra[TASK_SELECTION] = selection_row
        for name, row in alternative_rows.items():  # a name missing for some tasks has no row
            if len(row) == len(evaluated) and not any(math.isnan(v) for v in row):
                rows.extra[f"{name}_acc"] = row
        module.train(was_training)
        return rows
