"""Continual-learning metrics from the accuracy matrix.

``R[t][j]`` is the accuracy (percent) on task ``j``'s test set after training task ``t`` (``j <= t``;
entries with ``j > t`` are ``None``), ``n[j]`` the number of test images of task ``j``, ``T`` the number of
tasks, all 0-based. Under domain-incremental learning (``scenario=dil``) every domain is evaluated after every
task, so the rows are full; ``E_t`` below is then every domain, otherwise the seen tasks ``j <= t``.

* ``A_t`` (accuracy after task t) = sum_{j in E_t} n_j R[t][j] / sum_{j in E_t} n_j, ``E_t`` the tasks
  evaluated after task t (the entries that are not ``None``): top-1 accuracy on the union of their test sets,
  each image counted once (what SLCA, SAFE, APER/SimpleCIL and PyCIL report as "CNN top1"; under DIL the
  union of all domains' test sets, RanPAC's and SAFE's DIL "top1"). With equal task sizes it equals the mean
  of the row.
* **last accuracy** = ``A_{T-1}``.
* **average incremental accuracy** = (1/T) sum_t A_t (Rebuffi et al. 2017, iCaRL, Sec. 4.1).
* **average forgetting** = 1/(T-1) sum_{j<T-1} f_j with f_j = max_{l in [j, T-2]} R[l][j] - R[T-1][j]
  (Chaudhry et al. 2018, "Riemannian Walk", Eq. 3); not clipped at zero, so it can be negative when
  accuracy on an old task improves. ``None`` for a single task.
* **backward transfer (BWT)** = 1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j]) (Lopez-Paz & Ranzato 2017, GEM,
  Sec. 4). ``None`` for a single task.
* **mean of per-task accuracies** = (1/|E_t|) sum_{j in E_t} R[t][j] (what L2P, DualPrompt, RanPAC and LN
  tuning report); equal to ``A_t`` only when all tasks have the same number of test images.
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def _check(matrix: Matrix, task_sizes: Sequence[int] | None = None) -> int:
    rows = len(matrix)
    if rows == 0:
        raise ValueError("empty accuracy matrix")
    for t, row in enumerate(matrix):
        if any(row[j] is None for j in range(t + 1)):
            raise ValueError(f"row {t} lacks an accuracy for a seen task: {list(row)}")
    if task_sizes is not None and len(task_sizes) < rows:
        raise ValueError(f"{len(task_sizes)} task sizes for {rows} rows")
    return rows


def evaluated(matrix: Matrix, t: int) -> list[int]:
    """``E_t``: the tasks with an accuracy after task ``t`` (``0..t``; under DIL every domain)."""
    return [j for j, value in enumerate(matrix[t]) if value is not None]


def accuracy_after_task(matrix: Matrix, task_sizes: Sequence[int], t: int) -> float:
    """``A_t``: test-size-weighted accuracy over the tasks evaluated after task ``t``."""
    _check(matrix, task_sizes)
    columns = evaluated(matrix, t)
    if len(task_sizes) < len(columns):
        raise ValueError(f"{len(task_sizes)} task sizes for {len(columns)} evaluated tasks")
    total = sum(task_sizes[j] for j in columns)
    if total == 0:
        raise ValueError("no test images in the evaluated tasks")
    return sum(task_sizes[j] * matrix[t][j] for j in columns) / total  # type: ignore[operator]


def mean_task_accuracy(matrix: Matrix, t: int) -> float:
    """Unweighted mean of row ``t`` over the evaluated tasks (``R[t][0..t]``; under DIL every domain)."""
    _check(matrix)
    columns = evaluated(matrix, t)
    return sum(matrix[t][j] for j in columns) / len(columns)  # type: ignore[misc]


def last_accuracy(matrix: Matrix, task_sizes: Sequence[int]) -> float:
    return accuracy_after_task(matrix, task_sizes, len(matrix) - 1)


def average_incremental_accuracy(matrix: Matrix, task_sizes: Sequence[int]) -> float:
    rows = _check(matrix, task_sizes)
    return sum(accuracy_after_task(matrix, task_sizes, t) for t in range(rows)) / rows


def average_forgetting(matrix: Matrix) -> float | None:
    rows = _check(matrix)
    if rows < 2:
        return None
    last = rows - 1
    drops = [max(matrix[r][j] for r in range(j, last)) - matrix[last][j] for j in range(last)]  # type: ignore[operator,type-var]
    return sum(drops) / last


def backward_transfer(matrix: Matrix) -> float | None:
    rows = _check(matrix)
    if rows < 2:
        return None
    last = rows - 1
    return sum(matrix[last][j] - matrix[j][j] for j in range(last)) / last  # type: ignore[operator]


def summarize(matrix: Matrix, task_sizes: Sequence[int]) -> dict[str, float | None]:
    """The headline metrics of a (possibly partial: fewer rows than tasks) accuracy matrix."""
    return {
        "last_acc": last_accuracy(matrix, task_sizes),
        "avg_inc_acc": average_incremental_accuracy(matrix, task_sizes),
        "avg_forgetting": average_forgetting(matrix),
        "bwt": backward_transfer(matrix),
    }
