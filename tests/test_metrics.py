"""Continual-learning metrics on hand-computed accuracy matrices (cl_bench/metrics.py)."""

from __future__ import annotations

import pytest

from cl_bench.metrics import (
    accuracy_after_task,
    average_forgetting,
    average_incremental_accuracy,
    backward_transfer,
    last_accuracy,
    mean_task_accuracy,
    summarize,
)

# R[t][j]: accuracy on task j after training task t. Test sets of 100, 300 and 600 images.
UNEQUAL = [
    [90.0, None, None],
    [80.0, 70.0, None],
    [60.0, 75.0, 50.0],
]
UNEQUAL_SIZES = [100, 300, 600]


def test_accuracy_after_task_weights_by_task_size() -> None:
    """A_t weights each task by its number of test images; the plain row mean differs."""
    assert accuracy_after_task(UNEQUAL, UNEQUAL_SIZES, 0) == pytest.approx(90.0)
    # (100*80 + 300*70) / 400
    assert accuracy_after_task(UNEQUAL, UNEQUAL_SIZES, 1) == pytest.approx(72.5)
    # (100*60 + 300*75 + 600*50) / 1000
    assert accuracy_after_task(UNEQUAL, UNEQUAL_SIZES, 2) == pytest.approx(58.5)
    assert mean_task_accuracy(UNEQUAL, 1) == pytest.approx(75.0)
    assert mean_task_accuracy(UNEQUAL, 2) == pytest.approx(185.0 / 3)


def test_weighted_equals_mean_for_equal_task_sizes() -> None:
    """With equal test sizes A_t is the row mean."""
    for t in range(3):
        assert accuracy_after_task(UNEQUAL, [50, 50, 50], t) == pytest.approx(mean_task_accuracy(UNEQUAL, t))


def test_three_task_summary() -> None:
    """Last accuracy, average incremental accuracy, forgetting and BWT of the unequal 3-task matrix."""
    assert last_accuracy(UNEQUAL, UNEQUAL_SIZES) == pytest.approx(58.5)
    assert average_incremental_accuracy(UNEQUAL, UNEQUAL_SIZES) == pytest.approx((90.0 + 72.5 + 58.5) / 3)
    # f_0 = max(90, 80) - 60 = 30, f_1 = 70 - 75 = -5
    assert average_forgetting(UNEQUAL) == pytest.approx(12.5)
    # ((60 - 90) + (75 - 70)) / 2
    assert backward_transfer(UNEQUAL) == pytest.approx(-12.5)
    assert summarize(UNEQUAL, UNEQUAL_SIZES) == {
        "last_acc": pytest.approx(58.5),
        "avg_inc_acc": pytest.approx(221.0 / 3),
        "avg_forgetting": pytest.approx(12.5),
        "bwt": pytest.approx(-12.5),
    }


def test_two_tasks() -> None:
    """The 2-task case, including forgetting of the single old task."""
    matrix = [[80.0, None], [50.0, 90.0]]
    sizes = [30, 10]
    assert accuracy_after_task(matrix, sizes, 0) == pytest.approx(80.0)
    assert accuracy_after_task(matrix, sizes, 1) == pytest.approx((30 * 50 + 10 * 90) / 40)  # 60.0
    assert mean_task_accuracy(matrix, 1) == pytest.approx(70.0)
    assert last_accuracy(matrix, sizes) == pytest.approx(60.0)
    assert average_incremental_accuracy(matrix, sizes) == pytest.approx(70.0)
    assert average_forgetting(matrix) == pytest.approx(30.0)
    assert backward_transfer(matrix) == pytest.approx(-30.0)


def test_single_task_has_no_forgetting_or_bwt() -> None:
    """One row: accuracies are that row's value, forgetting and BWT are undefined (None)."""
    matrix = [[42.0]]
    assert last_accuracy(matrix, [7]) == pytest.approx(42.0)
    assert average_incremental_accuracy(matrix, [7]) == pytest.approx(42.0)
    assert average_forgetting(matrix) is None
    assert backward_transfer(matrix) is None
    assert summarize(matrix, [7]) == {
        "last_acc": pytest.approx(42.0),
        "avg_inc_acc": pytest.approx(42.0),
        "avg_forgetting": None,
        "bwt": None,
    }


def test_negative_forgetting_is_not_clipped() -> None:
    """Accuracy on the old task improves from 60 to 75: forgetting is -15, not 0."""
    matrix = [[60.0, None], [75.0, 80.0]]
    assert average_forgetting(matrix) == pytest.approx(-15.0)
    assert backward_transfer(matrix) == pytest.approx(15.0)


def test_forgetting_uses_max_over_earlier_rows() -> None:
    """Task 0 peaks after task 1 (80 > diagonal 50): forgetting counts from the peak, BWT from R[0][0]."""
    matrix = [
        [50.0, None, None],
        [80.0, 60.0, None],
        [40.0, 70.0, 65.0],
    ]
    # f_0 = max(50, 80) - 40 = 40, f_1 = 60 - 70 = -10
    assert average_forgetting(matrix) == pytest.approx(15.0)
    # ((40 - 50) + (70 - 60)) / 2
    assert backward_transfer(matrix) == pytest.approx(0.0)
    assert average_forgetting(matrix) != pytest.approx(-backward_transfer(matrix))  # type: ignore[operator]


def test_last_row_not_counted_in_forgetting_max() -> None:
    """The max runs over rows j..T-2 only: a final-row gain yields negative forgetting, not zero."""
    matrix = [[30.0, None, None], [20.0, 50.0, None], [90.0, 50.0, 70.0]]
    # f_0 = max(30, 20) - 90 = -60, f_1 = 50 - 50 = 0
    assert average_forgetting(matrix) == pytest.approx(-30.0)


def test_partial_matrix_uses_its_own_rows() -> None:
    """A matrix with fewer rows than task sizes (run in progress) summarises the rows it has."""
    partial = UNEQUAL[:2]
    out = summarize(partial, UNEQUAL_SIZES)
    assert out["last_acc"] == pytest.approx(72.5)
    assert out["avg_inc_acc"] == pytest.approx((90.0 + 72.5) / 2)
    assert out["avg_forgetting"] == pytest.approx(10.0)
    assert out["bwt"] == pytest.approx(-10.0)


def test_empty_matrix_raises() -> None:
    """No rows at all is an error for every metric."""
    with pytest.raises(ValueError, match="empty"):
        average_forgetting([])
    with pytest.raises(ValueError, match="empty"):
        summarize([], [])


def test_none_in_seen_entry_raises() -> None:
    """A missing accuracy for a task already seen (j <= t) is an error naming the row."""
    matrix = [[90.0, None], [None, 70.0]]
    with pytest.raises(ValueError, match="row 1"):
        backward_transfer(matrix)
    with pytest.raises(ValueError, match="row 1"):
        last_accuracy(matrix, [1, 1])


def test_too_few_task_sizes_raises() -> None:
    """Task sizes must cover every row of the matrix."""
    with pytest.raises(ValueError, match="2 task sizes for 3 rows"):
        last_accuracy(UNEQUAL, [100, 300])


def test_zero_test_images_raises() -> None:
    """Seen tasks without test images give no accuracy."""
    with pytest.raises(ValueError, match="no test images"):
        accuracy_after_task([[50.0]], [0], 0)
