"""Shared fixtures. Tests never touch the network: Hugging Face and W&B are forced offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from cl_bench.backbones.base import Backbone, DataConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "cl_bench" / "conf"
SHARED = REPO_ROOT.parent / "shared"
SHARED_WEIGHTS = SHARED / "weights"
SHARED_DATA = SHARED / "data"


@pytest.fixture
def shared_weights() -> Path:
    """The real CIFAR-10 ResNet checkpoints beside the repository (skipped where absent)."""
    if not SHARED_WEIGHTS.is_dir() or not any(SHARED_WEIGHTS.glob("cifar10_akamaster_resnet*.th")):
        pytest.skip(
            f"real checkpoints not found in {SHARED_WEIGHTS} (only the project's build machines have them)"
        )
    return SHARED_WEIGHTS


def compose_config(*overrides: str):
    """Compose ``cl_bench/conf/config.yaml`` with command-line style overrides, as ``cl-bench`` would."""
    from hydra import compose, initialize_config_dir

    import cl_bench.config  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


#: Overrides that make a run tiny and quiet: fake-free real digits, 2 tasks, no W&B, one epoch.
TINY = (
    "dataset=digits",
    "dataset.size=16",
    "transform.input_size=16",
    "scenario.n_tasks=2",
    "scenario.order_seed=0",
    "logger.mode=disabled",
    "trainer.accelerator=cpu",
    "save_model=false",
)


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


class LinearBackbone(Backbone):
    """``f = A x + a`` with ``A`` 3x4: small enough to differentiate by hand (unit tests of the maths)."""

    feat_dim = 3
    data_config = DataConfig(input_size=1)

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class TinyBackbone(LinearBackbone):
    """``f = tanh(A x + a)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))
