"""Checks before training that turn silently wrong metrics into clear errors.

* :func:`validate_numbers`: every learning rate in the config (a key ``lr``, ``*_lr``, ``lr_*`` or
  ``*_lr_*``) is a finite number >= 0, every batch size (``batch_size``, ``*_batch_size``) a positive integer.
* :func:`validate_data`: the dataset's labels lie in ``0..C-1``; every class the scenario uses has training
  and test images (labels with gaps, as ``{0, 2, ..., 18}``, would otherwise make empty classes score 0 %
  and drag every average down); no task is empty.

Each message names the field or the classes and what to do.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cl_bench.data.base import ClassificationData
from cl_bench.errors import ConfigError, DataError
from cl_bench.scenario import Scenario

_LR_KEY = re.compile(r"(^|_)lr(_|$)")
_BATCH_KEY = re.compile(r"(^|_)batch_size$")


def _fields(node: Any, prefix: str = "") -> list[tuple[str, str, Any]]:
    """``(dotted path, key, value)`` of every leaf under ``node``."""
    if isinstance(node, Mapping):
        out = []
        for key, value in node.items():
            out += (
                _fields(value, f"{prefix}{key}.")
                if isinstance(value, Mapping)
                else [(f"{prefix}{key}", str(key), value)]
            )
        return out
    return []


def validate_numbers(config: Mapping[str, Any]) -> None:
    """Learning rates finite and >= 0, batch sizes positive integers (see the module docstring)."""
    for path, key, value in _fields({k: v for k, v in config.items() if k != "hydra"}):
        if value is None:
            continue
        if _LR_KEY.search(key):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{path}={value!r}: a learning rate must be a number")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{path}={value}: a learning rate must be finite and >= 0")
        elif _BATCH_KEY.search(key):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{path}={value!r}: a batch size must be a positive integer")


def _ranges(values: Sequence[int], limit: int = 12) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def validate_data(data: ClassificationData, scenario: Scenario) -> None:
    """Labels in range, train and test images for every class of the scenario, no empty task."""
    n = data.num_classes
    counts = {}
    for split_name, split in (("train", data.train), ("test", data.test)):
        labels = np.asarray(split.labels)
        if len(labels) and (labels.min() < 0 or labels.max() >= n):
            raise DataError(
                f"dataset {data.name}: {split_name} labels span [{labels.min()}, {labels.max()}] but there "
                f"are {n} classes; labels must lie in 0..{n - 1}"
            )
        counts[split_name] = np.bincount(labels.astype(np.int64), minlength=n) if len(labels) else np.zeros(n)
    used = sorted(int(c) for c in scenario.class_order)
    no_train = [c for c in used if counts["train"][c] == 0]
    no_test = [c for c in used if counts["test"][c] == 0]
    if no_train or no_test:
        present = np.flatnonzero(counts["train"] + counts["test"]).tolist()
        neither = [c for c in no_train if c in no_test]
        parts = [f"classes {_ranges(neither)} have no images at all"] if neither else []
        if [c for c in no_train if c not in neither]:
            parts.append(
                f"classes {_ranges([c for c in no_train if c not in neither])} have no training images"
            )
        if [c for c in no_test if c not in neither]:
            parts.append(f"classes {_ranges([c for c in no_test if c not in neither])} have no test images")
        raise DataError(
            f"dataset {data.name} ({n} classes): {'; '.join(parts)}. The labels present are "
            f"{_ranges(present)}. Labels must be 0..C-1 without gaps, every class in both splits: relabel "
            "them (e.g. numpy.unique(labels, return_inverse=True)) or list the classes to use in "
            "scenario.class_order."
        )
    empty = [task.index for task in scenario.tasks if task.num_classes == 0]
    if empty:
        raise DataError(f"tasks {empty} of the scenario have no classes; check scenario.n_tasks/increment")
    for task in scenario.tasks:
        if task.domain is None:
            continue
        for split_name in ("train", "test"):
            if len(data.domain_indices(split_name, task.domain)) == 0:
                raise DataError(
                    f"dataset {data.name}: domain {task.domain!r} (task {task.index} of scenario.domains) "
                    f"has no {split_name} images; check the dataset's files or leave the domain out of "
                    "scenario.domains"
                )
