"""Class orders and task splits (cl_bench/scenario.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cl_bench.config import ScenarioConfig, ScenarioType
from cl_bench.errors import ConfigError
from cl_bench.scenario import Scenario, build_scenario, class_order, task_sizes

PYCIL_1993 = [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
PYCIL_1996 = [35, 18, 40, 85, 63, 62, 77, 73, 12, 44]


def _scenario(num_classes: int = 100, **kwargs: object) -> Scenario:
    return build_scenario(ScenarioConfig(**kwargs), num_classes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_tasks": 10},
        {"n_tasks": 5, "order_seed": None},
        {"init_classes": 50, "increment": 10},
        {"init_classes": 30, "increment": 20},
    ],
)
def test_every_class_in_exactly_one_task(kwargs: dict[str, object]) -> None:
    """Tasks partition the classes; positions are contiguous and match the order."""
    sc = _scenario(**kwargs)
    seen = [c for task in sc.tasks for c in task.original_classes]
    assert sorted(seen) == list(range(100))
    assert len(seen) == len(set(seen)) == 100
    start = 0
    for i, task in enumerate(sc.tasks):
        assert task.index == i
        assert task.start == start
        assert task.num_classes == len(task.original_classes) == task.stop - task.start
        assert task.original_classes == sc.class_order[task.start : task.stop]
        start = task.stop
    assert start == sc.num_classes == 100


def test_seeded_order_reproducible_and_seed_dependent() -> None:
    """The same seed gives the same order; different seeds give different orders."""
    assert class_order(100, 7) == class_order(100, 7)
    assert class_order(100, 7) != class_order(100, 8)
    assert sorted(class_order(100, 7)) == list(range(100))


def test_pycil_orders() -> None:
    """Seeds 1993 and 1996 reproduce PyCIL/SLCA's CIFAR-100 class orders."""
    assert class_order(100, 1993)[:10] == PYCIL_1993
    assert class_order(100, 1996)[:10] == PYCIL_1996
    assert list(_scenario(order_seed=1993).tasks[0].original_classes) == PYCIL_1993


def test_order_independent_of_global_rng() -> None:
    """The order comes from its own RandomState, not NumPy's global state."""
    np.random.seed(0)
    a = class_order(100, 1993)
    np.random.seed(123)
    b = class_order(100, 1993)
    assert a == b


def test_order_seed_none_is_identity() -> None:
    """order_seed None keeps the dataset's class ids in order."""
    assert class_order(20, None) == list(range(20))
    sc = _scenario(20, n_tasks=4, order_seed=None)
    assert sc.class_order == tuple(range(20))
    assert sc.tasks[1].original_classes == (5, 6, 7, 8, 9)


def test_explicit_class_order_wins_over_seed() -> None:
    """An explicit class_order is used as given, whatever order_seed says."""
    order = [3, 1, 4, 0, 5, 2]
    sc = _scenario(6, n_tasks=3, order_seed=1993, class_order=order)
    assert sc.class_order == tuple(order)
    assert [t.original_classes for t in sc.tasks] == [(3, 1), (4, 0), (5, 2)]


@pytest.mark.parametrize(
    "bad",
    [
        [0, 1, 2, 3, 4, 4],  # duplicate
        [0, 1, 2, 3, 4, 6],  # out of range
        [0, 1, 2, 3, 4, 5, 0],  # too long
    ],
)
def test_non_permutation_class_order_raises(bad: list[int]) -> None:
    """A class_order with repeated or unknown ids is a ConfigError naming the key."""
    with pytest.raises(ConfigError, match="scenario.class_order"):
        _scenario(6, n_tasks=3, class_order=bad)


def test_class_order_subset_leaves_classes_out() -> None:
    """ConFiT drops classes (Caltech-101 id 47): a shorter class_order uses only the listed classes."""
    sc = _scenario(6, n_tasks=2, class_order=[4, 0, 2, 5])
    assert [t.original_classes for t in sc.tasks] == [(4, 0), (2, 5)]
    assert sc.num_classes == 4
    assert sc.label_map.tolist() == [1, -1, 2, -1, 0, 3]


def test_task_sizes_equal_split() -> None:
    """n_tasks equal tasks."""
    assert task_sizes(100, 10) == [10] * 10
    assert task_sizes(100, 1) == [100]
    assert [t.num_classes for t in _scenario(n_tasks=20).tasks] == [5] * 20


def test_task_sizes_init_and_increment() -> None:
    """init 50 + increment 10 on 100 classes gives 6 tasks (n_tasks ignored)."""
    assert task_sizes(100, None, 50, 10) == [50, 10, 10, 10, 10, 10]
    assert task_sizes(100, 10, 50, 10) == [50, 10, 10, 10, 10, 10]
    sc = _scenario(init_classes=50, increment=10)
    assert len(sc.tasks) == 6
    assert (sc.tasks[0].start, sc.tasks[0].stop, sc.tasks[1].start, sc.tasks[5].stop) == (0, 50, 50, 100)


def test_task_sizes_remainder_task() -> None:
    """A rest that the increment does not divide gets one smaller final task."""
    assert task_sizes(100, None, 30, 20) == [30, 20, 20, 20, 10]
    assert [t.num_classes for t in _scenario(init_classes=30, increment=20).tasks] == [30, 20, 20, 20, 10]


def test_task_sizes_init_with_n_tasks() -> None:
    """init_classes without increment splits the rest into n_tasks-1 equal tasks."""
    assert task_sizes(100, 6, 50) == [50, 10, 10, 10, 10, 10]
    assert task_sizes(10, 3, 10) == [10]
    with pytest.raises(ConfigError, match="scenario.increment"):
        task_sizes(100, 4, 50)  # 50 does not split into 3


def test_n_tasks_not_dividing_raises() -> None:
    """n_tasks must divide the classes; the message points to init_classes/increment."""
    with pytest.raises(ConfigError, match="init_classes") as info:
        task_sizes(100, 7)
    assert "n_tasks=7" in str(info.value)
    with pytest.raises(ConfigError, match="init_classes"):
        _scenario(100, n_tasks=3)
    with pytest.raises(ConfigError):
        task_sizes(10, 20)  # more tasks than classes
    with pytest.raises(ConfigError):
        task_sizes(10, None)


def test_increment_without_init_raises() -> None:
    """increment alone is meaningless."""
    with pytest.raises(ConfigError, match="scenario.increment needs scenario.init_classes"):
        task_sizes(100, 10, None, 10)


def test_init_classes_out_of_range_raises() -> None:
    """init_classes must lie in 1..C."""
    with pytest.raises(ConfigError, match="init_classes=101"):
        task_sizes(100, None, 101, 10)
    with pytest.raises(ConfigError, match="init_classes=0"):
        task_sizes(100, None, 0, 10)


def test_label_map_maps_class_id_to_position() -> None:
    """label_map[order[i]] == i for every position i."""
    sc = _scenario(order_seed=1993)
    lm = sc.label_map
    assert lm.shape == (100,)
    for i, c in enumerate(sc.class_order):
        assert lm[c] == i
    assert lm[68] == 0 and lm[56] == 1 and lm[76] == 9
    # Remapping labels puts task 0's images on positions 0..9.
    labels = np.array(sc.tasks[0].original_classes)
    assert lm[labels].tolist() == list(range(10))


def test_merged_is_one_task_with_same_order() -> None:
    """merged() keeps the order and puts every class in one task."""
    sc = _scenario(order_seed=1996, n_tasks=10)
    merged = sc.merged()
    assert len(merged.tasks) == 1
    assert merged.class_order == sc.class_order
    task = merged.tasks[0]
    assert (task.index, task.start, task.stop) == (0, 0, 100)
    assert task.original_classes == sc.class_order
    assert merged.type == sc.type
    np.testing.assert_array_equal(merged.label_map, sc.label_map)


def test_scenario_type() -> None:
    """cil is the default; til sets task_incremental; the string form is accepted."""
    cil = _scenario(n_tasks=10)
    assert cil.type == ScenarioType.cil and not cil.task_incremental
    til = _scenario(n_tasks=10, type=ScenarioType.til)
    assert til.type == ScenarioType.til and til.task_incremental
    assert _scenario(n_tasks=10, type="til").task_incremental
    assert til.merged().task_incremental
