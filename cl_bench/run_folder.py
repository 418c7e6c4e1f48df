"""The run folder: where a run writes (or resumes), its environment facts and its final model.

Files: ``config.yaml`` (the resolved config), ``environment.json`` (versions and machine),
``results.json`` and the matrix CSVs (:mod:`cl_bench.results`), ``checkpoint.pt`` while a run is unfinished
(:mod:`cl_bench.checkpointing`) and ``final_model.pt`` at the end.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cl_bench.checkpointing import CHECKPOINT_FILE, find_resumable, is_resumable
from cl_bench.errors import ConfigError
from cl_bench.methods.base import ContinualModule
from cl_bench.results import RESULTS_FILE, write_text_atomic
from cl_bench.scenario import Scenario

ENVIRONMENT_FILE = "environment.json"
CONFIG_FILE = "config.yaml"
FINAL_MODEL_FILE = "final_model.pt"


def resolve_run_dir(cfg: DictConfig) -> Path:
    """``paths.run_dir``, else the folder Hydra made for this run."""
    if cfg.paths.run_dir:
        return Path(cfg.paths.run_dir)
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ConfigError("paths.run_dir is not set and no Hydra run is active: set paths.run_dir=DIR")
    return Path(HydraConfig.get().runtime.output_dir)


def resume_folder(
    cfg: DictConfig, run_dir: Path, config: dict[str, Any], ignore_lock: bool = False
) -> Path | None:
    """The interrupted run to continue (``resume``), or ``None`` to start afresh in ``run_dir``."""
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        folder = Path(cfg.resume)
        if not is_resumable(folder, config, ignore_lock):
            raise ConfigError(
                f"resume={folder}: no interrupted run of this config there (it needs {CHECKPOINT_FILE} and "
                "the same config.yaml, and no live process running in it). Use resume=auto or resume=never."
            )
        return folder
    if is_resumable(run_dir, config, ignore_lock):
        return run_dir
    if cfg.paths.run_dir:  # an explicit folder: resume only there
        return None
    return find_resumable([Path(cfg.paths.output_dir)], config, ignore_lock)


def check_fresh(run_dir: Path) -> None:
    """Refuse a folder that holds an earlier run's results (they are never overwritten)."""
    if (run_dir / RESULTS_FILE).exists():
        raise ConfigError(
            f"{run_dir / RESULTS_FILE} already exists: this folder holds an earlier run. Choose another "
            "hydra.run.dir (or paths.run_dir), or move that run away first."
        )


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    write_text_atomic(run_dir / CONFIG_FILE, OmegaConf.to_yaml(config))


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_info(device: torch.device) -> dict[str, Any]:
    """Versions and machine facts stored beside the results for reproducibility."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--verify", "-q", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        commit = out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "git_commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "pytorch_lightning": _version("pytorch-lightning"),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
    }


def write_environment(run_dir: Path, device: torch.device) -> None:
    write_text_atomic(run_dir / ENVIRONMENT_FILE, json.dumps(environment_info(device), indent=2) + "\n")


def _to_cpu(value: Any) -> Any:
    """Tensors (also inside a module's extra state: lists and dicts of tensors) detached and on the CPU."""
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def save_model(path: Path, method: ContinualModule, scenario: Scenario, config: dict[str, Any]) -> None:
    """Save the final method state (``torch.load(path, weights_only=True)`` reads it back)."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "state_dict": {k: _to_cpu(v) for k, v in method.state_dict().items()},
            "class_order": list(scenario.class_order),
            "task_boundaries": [[t.start, t.stop] for t in scenario.tasks],
            "method": config["method"].get("_target_"),
            "backbone": config["backbone"],
        },
        tmp,
    )
    tmp.replace(path)
