"""Bad inputs that used to give silently wrong metrics or late failures are refused before training, with
a message naming the field or the classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cl_bench.errors import ConfigError, DataError


def npz(path: Path, train_labels: np.ndarray, test_labels: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 255, (len(train_labels), 8, 8, 3), dtype=np.uint8),
        y_train=train_labels,
        x_test=rng.integers(0, 255, (len(test_labels), 8, 8, 3), dtype=np.uint8),
        y_test=test_labels,
    )
    return path


def run_npz(run_tiny, path: Path, *overrides: str, run_dir: Path):
    return run_tiny(
        "dataset=npz", f"dataset.path={path}", "transform.input_size=8", *overrides, run_dir=run_dir
    )


def test_labels_with_gaps_are_refused_not_scored_as_empty_classes(run_tiny, tmp_path: Path) -> None:
    """Issue 17.5: labels {0, 2, ..., 18} used to be read as 19 classes, 9 of them empty and scored 0 %."""
    labels = np.repeat(np.arange(0, 20, 2), 6)
    path = npz(tmp_path / "gaps.npz", labels, labels)
    with pytest.raises(
        DataError, match=r"classes 1, 3, 5, .*, 17 have no images at all.*labels present are 0, 2, 4"
    ):
        run_npz(run_tiny, path, "scenario.n_tasks=19", run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_class_without_training_images_is_refused(run_tiny, tmp_path: Path) -> None:
    train = np.repeat(np.arange(4), 6)
    test = np.repeat(np.arange(5), 3)  # class 4 only in the test split
    path = npz(tmp_path / "test_only.npz", train, test)
    with pytest.raises(DataError, match="classes 4 have no training images"):
        run_npz(run_tiny, path, "scenario.n_tasks=5", run_dir=tmp_path / "run")


def test_a_class_without_test_images_is_refused(run_tiny, tmp_path: Path) -> None:
    path = npz(tmp_path / "train_only.npz", np.repeat(np.arange(4), 6), np.repeat(np.arange(3), 3))
    with pytest.raises(DataError, match="classes 3 have no test images"):
        run_npz(run_tiny, path, "scenario.n_tasks=2", run_dir=tmp_path / "run")


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("method.lr=nan", "method.lr=nan"),
        ("method.lr=inf", "method.lr=inf"),
        ("method.lr=-0.1", "method.lr=-0.1"),
        ("trainer.eval_batch_size=0", "trainer.eval_batch_size=0"),
        ("method.batch_size=-4", "method.batch_size=-4"),
    ],
)
def test_bad_learning_rates_and_batch_sizes_fail_before_anything_is_written(
    run_tiny, tmp_path: Path, override: str, field: str
) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=f"^{field}"):
        run_tiny(override, run_dir=run_dir)
    assert not run_dir.exists()


def test_a_nan_learning_rate_of_a_method_option_is_named(run_tiny, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^method.transform_lr=nan"):
        run_tiny("method=input_tuning", "method.transform_lr=nan", run_dir=tmp_path / "run")
