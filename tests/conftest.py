"""Shared fixtures (helpers are in helpers.py). Tests never touch the network: Hugging Face and W&B are
forced offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import SHARED_WEIGHTS, TINY, compose_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# CPU training results depend on the thread count (the order of reductions), so every test runs with one
# thread (``trainer.threads`` falls back to this): thresholds and reference comparisons hold on any machine.
os.environ["OMP_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Whole in-process experiments (the ``run_tiny`` fixture) of the methods and of resuming belong to the
    slow lane (``make test-all``); the runner's own (tests/test_runner.py) stay in the fast one."""
    for item in items:
        if "run_tiny" in getattr(item, "fixturenames", ()) and item.path.name != "test_runner.py":
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def shared_weights() -> Path:
    """The real CIFAR-10 ResNet checkpoints beside the repository (skipped where absent)."""
    if not SHARED_WEIGHTS.is_dir() or not any(SHARED_WEIGHTS.glob("cifar10_akamaster_resnet*.th")):
        pytest.skip(
            f"real checkpoints not found in {SHARED_WEIGHTS} (only the project's build machines have them)"
        )
    return SHARED_WEIGHTS


@pytest.fixture
def run_tiny(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Run an experiment in-process on tiny data; returns (results document, run folder).

    Every run also checks that the method could be checkpointed between tasks (resumable runs)."""
    from cl_bench.runner import run_experiment

    counter = {"n": 0}

    def _run(*overrides: str, run_dir: Path | None = None):
        counter["n"] += 1
        folder = run_dir or tmp_path / f"run{counter['n']}"
        other_data = any(o.startswith("dataset=") for o in overrides)
        tiny = [o for o in TINY if not (other_data and o.startswith("dataset"))]
        cfg = compose_config(*tiny, f"paths.run_dir={folder}", *overrides)
        caplog.clear()
        try:
            return run_experiment(cfg), folder
        finally:
            failed = [r.getMessage() for r in caplog.records if "this run cannot resume" in r.getMessage()]
            assert not failed, failed

    return _run
