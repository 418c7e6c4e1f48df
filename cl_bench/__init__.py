"""cl_bench: an experiment runner for continual fine-tuning of pre-trained models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def load_model(run_dir: str | Path, device: str = "cpu") -> Any:
    """The final model of the run in ``run_dir``, ready to predict (:mod:`cl_bench.saved_model`)."""
    from cl_bench.saved_model import load_model as _load_model

    return _load_model(run_dir, device)
