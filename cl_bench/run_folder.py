"""The run folder: which one a run writes to (resume or start afresh, under the folder's exclusive lock),
its config and environment facts.

Files: ``config.yaml`` (the resolved config), ``environment.json`` (versions and machine),
``results.json`` and the matrix CSVs (:mod:`cl_bench.results`), ``checkpoint.json`` with
``checkpoint-task<t>.pt`` while a run is unfinished (:mod:`cl_bench.checkpointing`), ``running.lock`` while
a process runs it (:mod:`cl_bench.locking`) and ``final_model.pt`` at the end (:mod:`cl_bench.saved_model`).

``resume=auto`` (the default) continues an interrupted run of the same config (same config up to
:data:`~cl_bench.checkpointing.VOLATILE_KEYS`) if there is one:

* the run folder itself (``paths.run_dir``, or a fixed ``hydra.run.dir`` as on a SLURM requeue);
* otherwise (Hydra's timestamped folders) the runs of this config listed in the resume index,
  ``<paths.output_dir>/.cl_bench/resume/<config hash>/``: every run in a Hydra folder registers it there
  when it starts and removes it when it completes. Nothing else under ``paths.output_dir`` is looked at.

The candidate folder is locked (:mod:`cl_bench.locking`) before anything is read or written, and checked
again under the lock. A checkpoint that fails its checks is set aside (:func:`~cl_bench.checkpointing.
set_aside`) and that run starts over. ``resume=never`` always starts afresh and ``resume=PATH`` continues the
run in ``PATH``. A folder that already holds results is never overwritten, except an interrupted run of the
same config that has no usable checkpoint (it starts over and recomputes the same rows).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from cl_bench.checkpointing import (
    LEGACY_FILE,
    MANIFEST_FILE,
    CorruptCheckpoint,
    comparable,
    config_differences,
    config_hash,
    has_checkpoint,
    load_checkpoint,
    set_aside,
)
from cl_bench.errors import ConfigError, RunLockedError
from cl_bench.locking import RunLock
from cl_bench.results import RESULTS_FILE, write_text_atomic
from cl_bench.storage import check_writable, remove_temporaries, write_text

log = logging.getLogger(__name__)

ENVIRONMENT_FILE = "environment.json"
CONFIG_FILE = "config.yaml"
INDEX_DIR = Path(".cl_bench") / "resume"


def resolve_run_dir(cfg: DictConfig) -> Path:
    """``paths.run_dir``, else the folder Hydra made for this run."""
    if cfg.paths.run_dir:
        return Path(cfg.paths.run_dir)
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ConfigError("paths.run_dir is not set and no Hydra run is active: set paths.run_dir=DIR")
    return Path(HydraConfig.get().runtime.output_dir)


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


@dataclass
class RunClaim:
    """A run folder taken by this process: its lock, and the checkpoint to continue from (``None``: the run
    starts at its first task)."""

    run_dir: Path
    lock: RunLock | None
    checkpoint: dict[str, Any] | None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


# --------------------------------------------------------------------------------------------- index
def _index_dir(cfg: DictConfig, config: dict[str, Any]) -> Path:
    return Path(cfg.paths.output_dir) / INDEX_DIR / config_hash(config)


def _index_entry(cfg: DictConfig, config: dict[str, Any], run_dir: Path) -> Path:
    key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    return _index_dir(cfg, config) / f"{key}.json"


def register(cfg: DictConfig, config: dict[str, Any], run_dir: Path) -> None:
    """List ``run_dir`` among this config's runs (a failure costs only automatic resumption). Runs in a
    folder named by ``paths.run_dir`` are found there and need no entry."""
    if cfg.paths.run_dir:
        return
    entry = _index_entry(cfg, config, run_dir)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_text(entry, json.dumps({"run_dir": str(Path(run_dir).resolve())}) + "\n")
    except OSError as exc:
        log.warning("could not register %s in the resume index %s (%s)", run_dir, entry.parent, exc)


def unregister(cfg: DictConfig, config: dict[str, Any], run_dir: Path) -> None:
    if cfg.paths.run_dir:
        return
    try:
        _index_entry(cfg, config, run_dir).unlink(missing_ok=True)
    except OSError:
        pass


def indexed_runs(cfg: DictConfig, config: dict[str, Any]) -> list[Path]:
    """This config's registered run folders, most recently checkpointed first."""
    folders = []
    index = _index_dir(cfg, config)
    for entry in sorted(index.glob("*.json")) if index.is_dir() else []:
        try:
            folder = Path(json.loads(entry.read_text())["run_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring the malformed resume index entry %s", entry)
            continue
        if has_checkpoint(folder):
            folders.append(folder)
    return sorted(folders, key=lambda d: (d / MANIFEST_FILE).stat().st_mtime, reverse=True)


# --------------------------------------------------------------------------------------------- checks
def _saved_config(run_dir: Path) -> dict[str, Any] | None:
    try:
        saved = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


def same_config(run_dir: Path, config: dict[str, Any]) -> bool:
    saved = _saved_config(run_dir)
    return saved is not None and comparable(saved) == comparable(config)


def _results_status(run_dir: Path) -> str | None:
    """``complete``, ``incomplete``, ``unreadable`` or ``None`` (no results.json)."""
    path = run_dir / RESULTS_FILE
    if not path.exists():
        return None
    try:
        status = json.loads(path.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return "unreadable"
    return status if status in ("complete", "incomplete") else "unreadable"


def _warn_legacy(run_dir: Path) -> None:
    if (run_dir / LEGACY_FILE).exists():
        log.warning(
            "%s was written by an older cl_bench as a pickle of the whole method; it is never loaded "
            "(unpickling can run code). That run cannot be resumed by this version.",
            run_dir / LEGACY_FILE,
        )


def _load_or_set_aside(run_dir: Path, config: dict[str, Any], device: torch.device | None) -> dict | None:
    """The folder's checkpoint if it is sound and of this config, else ``None`` (a bad one set aside)."""
    if not has_checkpoint(run_dir):
        _warn_legacy(run_dir)
        return None
    try:
        payload = load_checkpoint(run_dir, device)
        if payload["config_hash"] != config_hash(config):
            raise CorruptCheckpoint(f"{run_dir / MANIFEST_FILE} belongs to another config")
        return payload
    except CorruptCheckpoint as exc:
        set_aside(run_dir, str(exc))
        return None


def _refuse_existing(run_dir: Path, config: dict[str, Any], resume: str) -> None:
    """Refuse to start afresh in a folder holding results, with a message that says what they are."""
    status = _results_status(run_dir)
    if status is None:
        return
    saved = _saved_config(run_dir)
    if saved is not None and comparable(saved) != comparable(config):
        diff = ", ".join(config_differences(comparable(saved), comparable(config))) or "?"
        raise ConfigError(
            f"{run_dir} holds the results of another config (differing in: {diff}). Choose another folder "
            "(hydra.run.dir or paths.run_dir) or move that run away first."
        )
    if status == "complete":
        raise ConfigError(
            f"{run_dir} already holds a complete run of this config ({run_dir / RESULTS_FILE}). "
            "Choose another folder (hydra.run.dir or paths.run_dir) to run it again."
        )
    if status == "unreadable":
        raise ConfigError(
            f"{run_dir / RESULTS_FILE} is unreadable; it is left as it is. Move it away or choose another "
            "folder."
        )
    if resume == "never" and has_checkpoint(run_dir):
        raise ConfigError(
            f"resume=never, but {run_dir} holds an interrupted run of this config with a checkpoint: "
            "resume=auto continues it; to start it over, move it away or choose another folder."
        )


# --------------------------------------------------------------------------------------------- claiming
def _try_resume(folder: Path, config: dict[str, Any], explicit: bool) -> RunClaim | None:
    """Lock ``folder`` and take its checkpoint; ``None`` when it holds none of this config (lock dropped).

    A live holder is reported (``explicit``: the folder was named) or the folder skipped."""
    lock = RunLock(folder)
    try:
        lock.acquire()
    except RunLockedError as exc:
        if explicit:
            raise
        log.warning("not resuming %s: %s", folder, exc)
        return None
    try:
        if same_config(folder, config):
            remove_temporaries(folder)
            checkpoint = _load_or_set_aside(folder, config, None)
            if checkpoint is not None:
                return RunClaim(folder, lock, checkpoint)
    except BaseException:
        lock.release()
        raise
    lock.release()
    return None


def claim_run_folder(cfg: DictConfig, run_dir: Path, config: dict[str, Any]) -> RunClaim:
    """Take the folder this run writes to (see the module docstring); the lock is held on return."""
    resume = str(cfg.resume)
    run_dir = Path(run_dir)
    if resume not in ("auto", "never"):
        folder = Path(resume)
        if not (folder / CONFIG_FILE).is_file() or not same_config(folder, config):
            raise ConfigError(
                f"resume={folder}: no run of this config there (its config.yaml must equal this command's). "
                "Use resume=auto or resume=never."
            )
        claim = _try_resume(folder, config, explicit=True)
        if claim is None:
            raise ConfigError(f"resume={folder}: that run has no usable checkpoint (see the log above)")
        return _prepared(cfg, config, claim)
    if resume == "auto":
        candidates = [run_dir] if has_checkpoint(run_dir) else []
        if not cfg.paths.run_dir:  # Hydra's own folder: also the registered runs of this config
            candidates += [d for d in indexed_runs(cfg, config) if d.resolve() != run_dir.resolve()]
        for folder in candidates:
            claim = _try_resume(folder, config, explicit=folder == run_dir)
            if claim is not None:
                if folder != run_dir:
                    log.info(
                        "resuming the interrupted run in %s (this command's folder %s stays unused)",
                        folder,
                        run_dir,
                    )
                return _prepared(cfg, config, claim)
    lock = RunLock(run_dir).acquire()
    try:
        _refuse_existing(run_dir, config, resume)
        remove_temporaries(run_dir)
        if has_checkpoint(run_dir):  # resume=auto found it unusable for another reason: start over
            set_aside(run_dir, "not resumable with this config")
        _warn_legacy(run_dir)
    except BaseException:
        lock.release()
        raise
    return _prepared(cfg, config, RunClaim(run_dir, lock, None))


def _prepared(cfg: DictConfig, config: dict[str, Any], claim: RunClaim) -> RunClaim:
    """Check that the claimed folder takes writes, and register it in the resume index."""
    try:
        check_writable(claim.run_dir)
    except BaseException:
        claim.release()
        raise
    register(cfg, config, claim.run_dir)
    if claim.checkpoint is not None:
        log.info("resuming %s after task %d", claim.run_dir, claim.checkpoint["tasks_done"])
    return claim


def follower_folder(
    cfg: DictConfig, run_dir: Path, config: dict[str, Any], resumed: bool | None, device: torch.device
) -> tuple[Path, dict[str, Any] | None]:
    """A DDP process of rank > 0: rank 0's folder and checkpoint, found from the same files without
    taking the lock (``resumed``: rank 0's choice when it started this process, else ``None``)."""
    if resumed is None:
        candidates = [run_dir] if cfg.resume != "never" and has_checkpoint(run_dir) else []
        if cfg.resume not in ("auto", "never"):
            candidates = [Path(cfg.resume)]
        elif cfg.resume == "auto" and not cfg.paths.run_dir:
            candidates += indexed_runs(cfg, config)
        for folder in candidates:
            if same_config(folder, config) and has_checkpoint(folder):
                return folder, load_checkpoint(folder, device)
        return run_dir, None
    return run_dir, (load_checkpoint(run_dir, device) if resumed else None)
