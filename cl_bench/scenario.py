"""Class orders and task splits.

The class order is ``numpy.random.RandomState(order_seed).permutation(C)``, which equals PyCIL's
``np.random.seed(seed); np.random.permutation(C)`` used by LAMDA-PILOT, SLCA, SAFE and RanPAC, so that
order seed 1993 gives those papers' CIFAR-100 order (68, 56, 78, 8, ...). ``order_seed: null`` keeps the
dataset's class ids in order; an explicit ``class_order`` list wins over both, and may list a subset of the
classes to leave the others out (ConFiT drops one Caltech-101 and two Flowers-102 classes). Labels are
remapped to their position in the order, so task t owns a contiguous range of positions and the head grows
in order.

``scenario=dil`` (domain-incremental) splits by domain instead of by class: task t holds the images of
domain ``scenario.domains[t]`` (per-image domain ids of :class:`~cl_bench.data.base.ClassificationData`) and
*every* class of the order, so the head covers all classes from task 0 and never grows
(:attr:`Task.new_classes`). This is the DIL branch of RanPAC's and SAFE's ``trainer.py`` (DomainNet: real,
quickdraw, painting, sketch, infograph, clipart; 345 classes each task). The task id names only the domain,
so a DIL scenario has no task-incremental accuracy.
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
    """Task ``index`` owns class positions ``[start, stop)``; ``original_classes`` are dataset ids.

    ``domain``: under DIL, the domain whose images the task holds (its classes are all of them, ``[0, C)``);
    ``None``: every image of the task's classes.
    """

    index: int
    start: int
    stop: int
    original_classes: tuple[int, ...]
    domain: str | None = None

    @property
    def num_classes(self) -> int:
        """Classes the task's images belong to (under DIL: all of them, in every task)."""
        return self.stop - self.start

    @property
    def known_classes(self) -> int:
        """Class positions learnt before this task (``[0, known_classes)``): ``start`` when tasks bring
        disjoint classes; under DIL none before the first domain and all of them afterwards."""
        if self.domain is None:
            return self.start
        return 0 if self.index == 0 else self.stop

    @property
    def new_classes(self) -> int:
        """Classes first seen in this task: what a head grows by (0 for every DIL domain after the first)."""
        return self.stop - self.known_classes


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
    def domain_incremental(self) -> bool:
        """Each task is one domain of every class (``scenario=dil``)."""
        return self.type == ScenarioType.dil

    @property
    def label_map(self) -> np.ndarray:
        """``label_map[dataset_class_id]`` = position of that class in the order (-1: left out)."""
        order = np.asarray(self.class_order)
        label_map = np.full(int(order.max()) + 1, -1, dtype=np.int64)
        label_map[order] = np.arange(len(order))
        return label_map

    def merged(self) -> Scenario:
        """The same order as one task of all classes (joint training; not for DIL, whose methods must declare
        ``domain_incremental``, which joint training does not)."""
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


def domain_tasks(
    order: list[int],
    wanted: list[str] | None,
    domain_names: list[str] | None,
    dataset: str,
    n_tasks: int | None,
) -> list[Task]:
    """DIL: one task per domain of ``wanted`` (default: the dataset's ``domain_names`` in their order), each
    holding every class of ``order``."""
    if domain_names is None:
        raise ConfigError(
            f"scenario=dil needs per-image domain ids, but dataset {dataset} has none "
            "(ClassificationData.domain_names/train_domains/test_domains are unset): use a dataset with "
            "domains (dataset=domainnet), or scenario=cil"
        )
    domains = list(domain_names) if wanted is None else [str(d) for d in wanted]
    unknown = [d for d in domains if d not in domain_names]
    if not domains or unknown or len(set(domains)) != len(domains):
        raise ConfigError(
            f"scenario.domains={domains}: list distinct domains of dataset {dataset}, which has "
            f"{list(domain_names)}" + (f" (unknown: {unknown})" if unknown else "")
        )
    if n_tasks is not None and n_tasks != len(domains):
        log.info(
            "scenario=dil: %d domains give %d tasks (scenario.n_tasks=%s ignored)",
            len(domains),
            len(domains),
            n_tasks,
        )
    return [Task(index, 0, len(order), tuple(order), domain) for index, domain in enumerate(domains)]


def build_scenario(
    cfg: ScenarioConfig, num_classes: int, domain_names: list[str] | None = None, dataset: str = "the dataset"
) -> Scenario:
    """The scenario for a dataset of ``num_classes`` classes (and, for DIL, of domains ``domain_names``)."""
    order = class_order(
        num_classes, cfg.order_seed, None if cfg.class_order is None else list(cfg.class_order)
    )
    if ScenarioType(cfg.type) == ScenarioType.dil:
        domains = None if cfg.domains is None else list(cfg.domains)
        tasks = domain_tasks(order, domains, domain_names, dataset, cfg.n_tasks)
        return Scenario(ScenarioType.dil, tuple(order), tuple(tasks))
    tasks, start = [], 0
    for index, size in enumerate(task_sizes(len(order), cfg.n_tasks, cfg.init_classes, cfg.increment)):
        tasks.append(Task(index, start, start + size, tuple(order[start : start + size])))
        start += size
    return Scenario(ScenarioType(cfg.type), tuple(order), tuple(tasks))
