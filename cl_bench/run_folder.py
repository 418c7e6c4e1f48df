"""The run folder: which one a run writes to (resume or start afresh, under the folder's exclusive lock),
its config and environment facts.

Files: ``config.yaml`` (the resolved config), ``environment.json`` (versions and machine),
``results.json`` and the matrix CSVs (:mod:`cl_bench.results`), ``checkpoint.json`` with
``checkpoint-task<t>.pt`` while a run is unfinished (:mod:`cl_bench.checkpointing`), ``running.lock`` while
a process runs it (:mod:`cl_bench.locking`) and ``final_model.pt`` at the end (:mod:`cl_bench.saved_model`).

``resume=auto`` (the default) continues an interrupted run of the same config (same config up to
:data:`~cl_bench.checkpointing.VOLATILE_KEYS`) if there is one. A run started by an older cl_bench lacks the
keys added since; each such key counts as the same when this command gives it the default this version
declares for it (:func:`stored_config_now`), so a version upgrade between two preemptions keeps the run:

* the run folder itself: always, and only it when the command names it (``paths.run_dir``, or
  ``hydra.run.dir`` on the command line, as on a SLURM requeue; :func:`named_folder`);
* otherwise (Hydra's timestamped folders, a sweep's job folders) the runs of this config listed in the
  resume index, ``<paths.output_dir>/.cl_bench/resume/<config hash>/``: every run in a Hydra folder
  registers it there when it starts and removes it when it completes; when none is listed under this hash,
  the runs listed under the other hashes whose stored config is this one's (an older cl_bench's run).
  Nothing else under ``paths.output_dir`` is looked at.

The candidate folder is locked (:mod:`cl_bench.locking`) before anything is read or written, and checked
again under the lock. A checkpoint that fails its checks is set aside (:func:`~cl_bench.checkpointing.
set_aside`) and that run starts over. ``resume=never`` always starts afresh and ``resume=PATH`` continues the
run in ``PATH``. A folder that already holds results is never overwritten, except an interrupted run of the
same config that has no usable checkpoint (it starts over and recomputes the same rows).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import inspect
import json
import logging
import platform
import subprocess
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra import utils as hydra_utils
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
from cl_bench.errors import CompleteRunError, ConfigError, RunLockedError, StorageError
from cl_bench.locking import RunLock
from cl_bench.results import RESULTS_FILE, write_text_atomic
from cl_bench.storage import (
    check_writable,
    read_small_json,
    read_small_text,
    remove_temporaries,
    write_text,
)

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


def named_folder(cfg: DictConfig) -> bool:
    """Whether the command names its run folder (``paths.run_dir``, or ``hydra.run.dir`` on the command
    line): then that folder alone is resumed, never another run found in the resume index."""
    if cfg.paths.run_dir:
        return True
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN:
        return False
    keys = (o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.hydra)
    return "hydra.run.dir" in keys


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
    except (OSError, StorageError) as exc:  # write_text's failures are StorageErrors
        log.warning("could not register %s in the resume index %s (%s)", run_dir, entry.parent, exc)


def unregister(cfg: DictConfig, config: dict[str, Any], run_dir: Path) -> None:
    """Remove ``run_dir`` from the index, under every config hash (a run resumed by a newer cl_bench was
    listed under its first version's hash too)."""
    if cfg.paths.run_dir:
        return
    name = _index_entry(cfg, config, run_dir).name
    try:
        for entry in (Path(cfg.paths.output_dir) / INDEX_DIR).glob(f"*/{name}"):
            entry.unlink(missing_ok=True)
    except OSError:
        pass


def _listed_runs(index: Path) -> list[Path]:
    """The run folders with a checkpoint that ``index`` (one config hash's folder) lists."""
    folders = []
    for entry in sorted(index.glob("*.json")) if index.is_dir() else []:
        try:
            folder = Path(read_small_json(entry)["run_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring the malformed resume index entry %s", entry)
            continue
        if has_checkpoint(folder):
            folders.append(folder)
    return folders


def indexed_runs(cfg: DictConfig, config: dict[str, Any]) -> list[Path]:
    """This config's registered run folders, most recently checkpointed first: those listed under its
    config hash, else those listed under another hash whose stored config is this one up to keys added
    since (:func:`same_config`: a run started by an older cl_bench)."""
    own = _index_dir(cfg, config)
    folders = _listed_runs(own)
    if not folders and own.parent.is_dir():
        for index in sorted(d for d in own.parent.iterdir() if d.is_dir() and d != own):
            folders += [f for f in _listed_runs(index) if same_config(f, config, cfg)]
    return sorted(folders, key=_checkpoint_time, reverse=True)


def _checkpoint_time(folder: Path) -> float:
    """When ``folder``'s checkpoint was written; 0 if it is gone (its run completed since it was listed)."""
    try:
        return (folder / MANIFEST_FILE).stat().st_mtime
    except OSError:
        return 0.0


# --------------------------------------------------------------------------------------------- checks
def _read_config(run_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """The folder's stored config (untrusted input, :func:`~cl_bench.storage.read_small_text`), or ``None``
    and why it cannot be used."""
    path = run_dir / CONFIG_FILE
    try:
        saved = yaml.safe_load(read_small_text(path))
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as exc:  # Recursion: [[[...]]]
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        return None, f"{path} cannot be read ({reason.splitlines()[0]})"
    if not isinstance(saved, dict):
        return None, f"{path} does not hold a config (a mapping)"
    return saved, ""


def _saved_config(run_dir: Path) -> dict[str, Any] | None:
    return _read_config(run_dir)[0]


def _plain(value: Any) -> Any:
    """``value`` as it appears in a resolved config (dataclasses as dicts, enums as strings, lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = OmegaConf.to_container(OmegaConf.structured(value), enum_to_str=True)
    elif isinstance(value, Enum):
        value = value.value
    try:
        return yaml.safe_load(yaml.safe_dump(value))
    except yaml.YAMLError:
        return repr(value)


def declared_default(cfg: DictConfig, path: tuple[str, ...]) -> tuple[bool, Any]:
    """``(True, default)`` when this version declares a default for the key at ``path``: the field default
    of the config schema (``cl_bench/config.py``), or the parameter default of the ``_target_`` the key
    configures (the dataset, backbone or method constructor, its base classes' included); else ``(False,
    None)``."""
    parent = cfg if len(path) == 1 else OmegaConf.select(cfg, ".".join(path[:-1]), default=None)
    if not isinstance(parent, DictConfig):
        return False, None
    name, schema = path[-1], OmegaConf.get_type(parent)
    if dataclasses.is_dataclass(schema):
        for f in dataclasses.fields(schema):
            if f.name == name and f.default is not dataclasses.MISSING:
                return True, _plain(f.default)
            if f.name == name and f.default_factory is not dataclasses.MISSING:
                return True, _plain(f.default_factory())
        return False, None
    target = parent.get("_target_") if "_target_" in parent else None
    if not isinstance(target, str):
        return False, None
    try:
        built = hydra_utils.get_object(target)
    except Exception:  # an unknown target is reported when the run builds it
        return False, None
    for function in [c.__init__ for c in built.__mro__] if isinstance(built, type) else [built]:
        try:
            parameter = inspect.signature(function).parameters.get(name)
        except (TypeError, ValueError):
            continue
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return True, _plain(parameter.default)
    return False, None


def stored_config_now(
    saved: dict[str, Any], config: dict[str, Any], cfg: DictConfig, prefix: tuple[str, ...] = ()
) -> tuple[dict[str, Any], list[str]]:
    """A folder's stored config as this version reads it: ``saved`` plus each key of ``config`` that it
    lacks and that ``config`` sets to this version's declared default (:func:`declared_default`), as
    written by an older cl_bench before the key existed. Returns it and the dotted keys added."""
    out, added = dict(saved), []
    for key, value in config.items():
        path = (*prefix, str(key))
        if key not in saved:
            found, default = declared_default(cfg, path)
            if found and default == _plain(value):
                out[key] = value
                added.append(".".join(path))
        elif isinstance(value, dict) and isinstance(saved[key], dict):
            out[key], more = stored_config_now(saved[key], value, cfg, path)
            added += more
    return out, added


def added_keys(run_dir: Path, config: dict[str, Any], cfg: DictConfig) -> list[str] | None:
    """The keys added since ``run_dir``'s run started (:func:`stored_config_now`) when it holds a run of
    ``config`` up to volatile keys and those; ``None`` when it holds no run of this config."""
    saved = _saved_config(run_dir)
    if saved is None:
        return None
    now, added = stored_config_now(saved, config, cfg)
    return added if comparable(now) == comparable(config) else None


def same_config(run_dir: Path, config: dict[str, Any], cfg: DictConfig) -> bool:
    """Whether ``run_dir`` holds a run of ``config`` (see :func:`added_keys`)."""
    return added_keys(run_dir, config, cfg) is not None


def _results_status(run_dir: Path) -> str | None:
    """``complete``, ``incomplete``, ``unreadable`` or ``None`` (no results.json)."""
    path = run_dir / RESULTS_FILE
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        status = read_small_json(path).get("status")
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
    """The checkpoint of a folder holding a run of this config (:func:`same_config`) if it is sound and
    was written for that run's config, else ``None`` (a bad one set aside)."""
    if not has_checkpoint(run_dir):
        _warn_legacy(run_dir)
        return None
    try:
        payload = load_checkpoint(run_dir, device)
        saved = _saved_config(run_dir) or config
        if payload["config_hash"] not in (config_hash(config), config_hash(saved)):
            raise CorruptCheckpoint(f"{run_dir / MANIFEST_FILE} belongs to another config")
        return payload
    except CorruptCheckpoint as exc:
        set_aside(run_dir, str(exc))
        return None


def _refuse_existing(run_dir: Path, config: dict[str, Any], cfg: DictConfig) -> None:
    """Refuse to start afresh in a folder holding results, with a message that says what they are."""
    status = _results_status(run_dir)
    if status is None:
        return
    saved, problem = _read_config(run_dir)
    if saved is None:
        raise ConfigError(
            f"{run_dir} holds {RESULTS_FILE}, but {problem}, so which config those results are of is "
            "unknown; they are left as they are. Choose another folder (hydra.run.dir or paths.run_dir) "
            "or move them away first."
        )
    now = comparable(stored_config_now(saved, config, cfg)[0])
    if now != comparable(config):
        diff = ", ".join(config_differences(now, comparable(config))) or "?"
        raise ConfigError(
            f"{run_dir} holds the results of another config (differing in: {diff}). Choose another folder "
            "(hydra.run.dir or paths.run_dir) or move that run away first."
        )
    if status == "complete":
        raise CompleteRunError(
            f"{run_dir} already holds a complete run of this config ({run_dir / RESULTS_FILE}). "
            "Choose another folder (hydra.run.dir or paths.run_dir) to run it again."
        )
    if status == "unreadable":
        raise ConfigError(
            f"{run_dir / RESULTS_FILE} is unreadable; it is left as it is. Move it away or choose another "
            "folder."
        )
    if cfg.resume == "never" and has_checkpoint(run_dir):
        raise ConfigError(
            f"resume=never, but {run_dir} holds an interrupted run of this config with a checkpoint: "
            "resume=auto continues it; to start it over, move it away or choose another folder."
        )


# --------------------------------------------------------------------------------------------- claiming
def _try_resume(folder: Path, config: dict[str, Any], cfg: DictConfig, explicit: bool) -> RunClaim | None:
    """Lock ``folder`` and take its checkpoint; ``None`` when it holds none of this config (lock dropped).

    A live holder or a folder that takes no writes is reported (``explicit``: the folder was named) or the
    folder skipped."""
    lock = RunLock(folder)
    try:
        lock.acquire()
    except (RunLockedError, StorageError) as exc:
        if explicit:
            raise
        log.warning("not resuming %s: %s", folder, exc)
        return None
    try:
        added = added_keys(folder, config, cfg)
        if added is not None:
            remove_temporaries(folder)
            checkpoint = _load_or_set_aside(folder, config, None)
            if checkpoint is not None:
                if added:
                    log.warning(
                        "%s was started by an older cl_bench; keys added since take their defaults: %s",
                        folder,
                        ", ".join(added),
                    )
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
        if not (folder / CONFIG_FILE).is_file() or not same_config(folder, config, cfg):
            raise ConfigError(
                f"resume={folder}: no run of this config there (its config.yaml must equal this command's). "
                "Use resume=auto or resume=never."
            )
        claim = _try_resume(folder, config, cfg, explicit=True)
        if claim is None:
            raise ConfigError(f"resume={folder}: that run has no usable checkpoint (see the log above)")
        return _prepared(cfg, config, claim)
    if resume == "auto":
        candidates = [run_dir] if has_checkpoint(run_dir) else []
        if not named_folder(cfg):  # Hydra's own folder: also the registered runs of this config
            candidates += [d for d in indexed_runs(cfg, config) if d.resolve() != run_dir.resolve()]
        for folder in candidates:
            claim = _try_resume(folder, config, cfg, explicit=folder == run_dir)
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
        _refuse_existing(run_dir, config, cfg)
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
        elif cfg.resume == "auto" and not named_folder(cfg):
            candidates += indexed_runs(cfg, config)
        for folder in candidates:
            if same_config(folder, config, cfg) and has_checkpoint(folder):
                return folder, load_checkpoint(folder, device)
        return run_dir, None
    return run_dir, (load_checkpoint(run_dir, device) if resumed else None)
