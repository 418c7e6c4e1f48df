"""Class orders and task splits.

The class order is ``numpy.random.RandomState(order_seed).permutation(C)``, which equals PyCIL's
``np.random.seed(seed); np.random.permutation(C)`` used by LAMDA-PILOT, SLCA, SAFE and RanPAC, so that
order seed 1993 gives those papers' CIFAR-100 order (68, 56, 78, 8, ...). ``order_seed: null`` keeps the
dataset's class ids in order; an explicit ``class_order`` list wins over both, and may list a subset of the
classes to leave the others out (ConFiT drops one Caltech-101 and two Flowers-102 classes). Labels are
remapped to their position in the order, so task t owns a contiguous range of positions and the head grows
in order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cl_bench.config import ScenarioConfig, ScenarioType
from cl_bench.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """Task ``index`` owns class positions ``[start, stop)``; ``original_classes`` are dataset ids."""

    index: int
    start: int
    stop: int
    original_classes: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Scenario:
    type: ScenarioType
    class_order: tuple[int, ...]
    tasks: tuple[Task, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    @property
    def task_incremental(self) -> bool:
        return self.type == ScenarioType.til

    @property
    def label_map(self) -> np.ndarray:
        """``label_map[dataset_class_id]`` = position of that class in the order (-1: left out)."""
        order = np.asarray(self.class_order)
        label_map = np.full(int(order.max()) + 1, -1, dtype=np.int64)
        label_map[order] = np.arange(len(order))
        return label_map

    def merged(self) -> Scenario:
        """The same order as one task of all classes (joint training)."""
        return Scenario(self.type, self.class_order, (Task(0, 0, self.num_classes, self.class_order),))


def class_order(num_classes: int, order_seed: int | None, explicit: list[int] | None = None) -> list[int]:
    """The class order: ``explicit`` if given, else a seeded shuffle or identity.

    ``explicit`` lists distinct class ids of ``[0, num_classes)``; classes it leaves out are not used.
    """
    if explicit is not None:
        order = [int(c) for c in explicit]
        if len(set(order)) != len(order) or not all(0 <= c < num_classes for c in order):
            raise ConfigError(
                f"scenario.class_order must list distinct class ids of 0..{num_classes - 1} (got "
                f"{len(order)} entries, {len(set(order))} distinct, range {min(order)}..{max(order)})"
            )
        if len(order) < num_classes:
            left_out = sorted(set(range(num_classes)) - set(order))
            log.info("scenario.class_order leaves out %d class(es): %s", len(left_out), left_out)
        return order
    if order_seed is None:
        return list(range(num_classes))
    return np.random.RandomState(order_seed).permutation(num_classes).tolist()


def task_sizes(
    num_classes: int, n_tasks: int | None, init_classes: int | None = None, increment: int | None = None
) -> list[int]:
    """Classes per task.

    * ``init_classes`` (+ ``increment``): ``[init] + [increment] * k`` plus one smaller remainder task if
      the rest does not divide (PyCIL's rule). Without ``increment``, ``n_tasks - 1`` equal later tasks.
    * otherwise ``n_tasks`` equal tasks (``num_classes`` must divide).
    """
    if init_classes is not None:
        if not 0 < init_classes <= num_classes:
            raise ConfigError(f"scenario.init_classes={init_classes} must lie in 1..{num_classes}")
        rest = num_classes - init_classes
        if increment is None:
            if n_tasks is None or n_tasks < 2 or rest % (n_tasks - 1):
                raise ConfigError(
                    f"scenario.init_classes={init_classes} needs scenario.increment, "
                    "or n_tasks such that the "
                    f"other {rest} classes split evenly into n_tasks-1 tasks"
                )
            increment = rest // (n_tasks - 1) if rest else 1
        sizes = [init_classes] + [increment] * (rest // increment)
        if rest % increment:
            sizes.append(rest % increment)
        if n_tasks is not None and n_tasks != len(sizes):
            log.info(
                "scenario: init_classes/increment give %d tasks (scenario.n_tasks=%s ignored)",
                len(sizes),
                n_tasks,
            )
        return sizes
    if increment is not None:
        raise ConfigError(
            "scenario.increment needs scenario.init_classes (e.g. init_classes=10 increment=10)"
        )
    if n_tasks is None or n_tasks > num_classes or num_classes % n_tasks:
        raise ConfigError(
            f"scenario.n_tasks={n_tasks} does not split {num_classes} classes evenly; pick a divisor of "
            f"{num_classes} or set scenario.init_classes and scenario.increment"
        )
    return [num_classes // n_tasks] * n_tasks


def build_scenario(cfg: ScenarioConfig, num_classes: int) -> Scenario:
    """The scenario for a dataset of ``num_classes`` classes."""
    order = class_order(
        num_classes, cfg.order_seed, None if cfg.class_order is None else list(cfg.class_order)
    )
    tasks, start = [], 0
    for index, size in enumerate(task_sizes(len(order), cfg.n_tasks, cfg.init_classes, cfg.increment)):
        tasks.append(Task(index, start, start + size, tuple(order[start : start + size])))
        start += size
    return Scenario(ScenarioType(cfg.type), tuple(order), tuple(tasks))
