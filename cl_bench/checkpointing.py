"""Resume after preemption: the whole run state after each finished task, and finding a run to resume.

After task ``t`` is evaluated, the runner writes ``checkpoint.pt`` into the run folder: the method object
itself (every parameter, buffer *and* Python attribute: prototypes, class statistics, Fisher matrices, replay
slots, teachers, keys, per-task heads), the rows of the accuracy matrices, the task times, the W&B run id and
every random generator's state. Pickling the method whole means a new method needs no save/load code of its
own; the datasets it refers to (an ER buffer's image source, for instance) are not copied into the file but
stored as references and re-attached to the resuming run's datasets, which the same config rebuilds
identically.

A rerun of the same command (or a SLURM/submitit requeue) with ``resume=auto`` finds the newest incomplete run
with the same config under ``paths.output_dir`` and continues it at the next task, in its own folder; the
final metrics equal those of an uninterrupted run (same seed, CPU). ``checkpoint.pt`` is deleted once the
run is complete (``final_model.pt`` holds the final weights).

The file is a pickle of this code's objects: it resumes runs of the same code version and is read only from
run folders the user points the runner at (``weights_only=False`` semantics), never from downloads.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import random
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cl_bench.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
LOCK_FILE = "running.lock"
#: Config keys that may differ between an interrupted run and the command that resumes it.
VOLATILE_KEYS = (("paths", "run_dir"), ("resume",), ("logger", "mode"), ("trainer", "enable_progress_bar"))


@dataclass
class RunCheckpoint:
    """What a resumed run needs: the method, the results so far and the random state after ``tasks_done``
    tasks."""

    tasks_done: int
    method: Any
    #: The runner's ``RunState``: accuracy rows, extra metric rows, task times.
    state: Any
    rng: dict[str, Any]
    wandb_id: str | None
    config: dict[str, Any]


def rng_state() -> dict[str, Any]:
    """The state of Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Pickler(pickle.Pickler):
    """Stores the listed external objects (datasets, image sources) as named references."""

    def __init__(self, file: io.BufferedIOBase, external: dict[str, Any]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._names = {id(obj): name for name, obj in external.items()}

    def persistent_id(self, obj: Any) -> str | None:
        return self._names.get(id(obj))


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, external: dict[str, Any]) -> None:
        super().__init__(file)
        self._external = external

    def persistent_load(self, pid: str) -> Any:
        if pid not in self._external:
            raise CheckpointError(f"the checkpoint refers to {pid!r}, which this run does not have")
        return self._external[pid]


def save_checkpoint(path: Path, checkpoint: RunCheckpoint, external: dict[str, Any]) -> None:
    """Pickle ``checkpoint`` to ``path`` atomically; objects in ``external`` are stored by name only."""
    method = checkpoint.method
    trainer = getattr(method, "_trainer", None)
    method._trainer = None  # Lightning's trainer of the last fit: not part of the method's state
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as fh:
            _Pickler(fh, external).dump(checkpoint)
        os.replace(tmp, path)
    finally:
        method._trainer = trainer
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, external: dict[str, Any], device: torch.device) -> RunCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, re-attaching the named external objects."""
    try:
        with path.open("rb") as fh:
            checkpoint = _Unpickler(fh, external).load()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"cannot resume from {path} ({type(exc).__name__}: {exc}); it was probably written by another "
            "version of cl_bench. Start afresh with resume=never, or check out the commit in the run's "
            "environment.json."
        ) from exc
    if not isinstance(checkpoint, RunCheckpoint):
        raise CheckpointError(f"{path} is not a cl_bench run checkpoint")
    checkpoint.method.to(device)
    return checkpoint


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the keys that may change between an interrupted run and its resumption."""
    out = yaml.safe_load(yaml.safe_dump(config))
    for path in VOLATILE_KEYS:
        node = out
        for key in path[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return out


def _lock_is_live(run_dir: Path) -> bool:
    """Whether another process on this host is running in ``run_dir`` now (stale locks of killed jobs, or
    of jobs on other hosts, which cannot be checked from here, do not count)."""
    lock = run_dir / LOCK_FILE
    try:
        host, pid = lock.read_text().split()
    except (OSError, ValueError):
        return False
    if host != socket.gethostname() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(run_dir: Path) -> None:
    (run_dir / LOCK_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")


def release_lock(run_dir: Path) -> None:
    (run_dir / LOCK_FILE).unlink(missing_ok=True)


def is_resumable(run_dir: Path, config: dict[str, Any], ignore_lock: bool = False) -> bool:
    """``run_dir`` holds an interrupted run of ``config`` (same config up to :data:`VOLATILE_KEYS`) that no
    live process is running (``ignore_lock``: DDP ranks > 0, which follow rank 0 into the run it holds)."""
    config_file = run_dir / "config.yaml"
    if not (run_dir / CHECKPOINT_FILE).is_file() or not config_file.is_file():
        return False
    if not ignore_lock and _lock_is_live(run_dir):
        return False
    saved = yaml.safe_load(config_file.read_text())
    return isinstance(saved, dict) and comparable(saved) == comparable(config)


def find_resumable(roots: Iterable[Path], config: dict[str, Any], ignore_lock: bool = False) -> Path | None:
    """The most recently checkpointed interrupted run of ``config`` under ``roots``, if any."""
    candidates = {
        ckpt.parent
        for root in roots
        if root.is_dir()
        for ckpt in root.rglob(CHECKPOINT_FILE)
        if is_resumable(ckpt.parent, config, ignore_lock)
    }
    if not candidates:
        return None
    return max(candidates, key=lambda d: (d / CHECKPOINT_FILE).stat().st_mtime)
