"""Shared fixtures. Tests never touch the network: Hugging Face and W&B are forced offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
SHARED = REPO_ROOT.parent / "shared"
SHARED_WEIGHTS = SHARED / "weights"
SHARED_DATA = SHARED / "data"


@pytest.fixture
def shared_weights() -> Path:
    """The real CIFAR-10 ResNet checkpoints beside the repository (skipped where absent)."""
    if not SHARED_WEIGHTS.is_dir() or not any(SHARED_WEIGHTS.glob("cifar10_akamaster_resnet*.th")):
        pytest.skip(f"real checkpoints not found in {SHARED_WEIGHTS} (only the project's build machines have them)")
    return SHARED_WEIGHTS
