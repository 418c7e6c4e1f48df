"""Run checkpoints that cannot execute code, checked before use.

After task ``t`` is evaluated the runner writes ``checkpoint-task<t>.pt`` into the run folder and then
``checkpoint.json``, its manifest (file name, size, SHA-256, tasks done, config hash); the previous
checkpoint file is deleted only after that. A kill at any moment leaves the manifest naming a complete file:
the run resumes from the last good state.

The checkpoint holds tensors and plain data only (``torch.load(weights_only=True)`` reads it, so a hostile
file cannot run code): the method's state (:meth:`~cl_bench.methods.base.ContinualModule.method_state`:
``state_dict``, the structure a freshly built method grows before loading, declared extra attributes), the
rows of the accuracy matrices, the task times, the W&B run id and every random generator's state. A method
is rebuilt from the run's config, as a fresh run builds it, and then restored from that state.

Before loading, the file is checked against the manifest: a short file is reported as "truncated at byte
N of M", a changed one as a checksum mismatch; an unreadable or non-conforming file likewise. A bad
checkpoint is set aside (renamed ``*.corrupt-<time>``) with a log line, and the run starts over (its
results so far are recomputed identically), so one broken file never blocks a config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cl_bench.errors import CheckpointError
from cl_bench.storage import read_small_json, sha256_of, write_atomic, write_text

log = logging.getLogger(__name__)

MANIFEST_FILE = "checkpoint.json"
FORMAT = "cl_bench.checkpoint/2"
#: A pickled whole-method checkpoint of earlier versions: never loaded (unpickling can run code).
LEGACY_FILE = "checkpoint.pt"
_DATA_NAME = re.compile(r"checkpoint-task(\d{3,})\.pt")
#: Config keys that may differ between an interrupted run and the command that resumes it.
VOLATILE_KEYS = (("paths", "run_dir"), ("resume",), ("logger", "mode"), ("trainer", "enable_progress_bar"))
#: Keys of a checkpoint's payload.
PAYLOAD_KEYS = ("format", "tasks_done", "method", "run_state", "rng", "wandb_id", "config_hash")


class CorruptCheckpoint(CheckpointError):
    """A checkpoint that does not match its manifest or cannot be read."""


# --------------------------------------------------------------------------------------------- configs
def comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without the keys that may change between an interrupted run and its resumption."""
    out = yaml.safe_load(yaml.safe_dump(dict(config)))
    for path in VOLATILE_KEYS:
        node = out
        for key in path[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return out


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 (hex, 16 characters) of the comparable config: one key per experiment."""
    canonical = json.dumps(comparable(config), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def config_differences(saved: Any, current: Any, prefix: str = "", limit: int = 5) -> list[str]:
    """Dotted keys where two configs differ (at most ``limit``)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(current), key=str):
            out += config_differences(saved.get(key), current.get(key), f"{prefix}{key}.", limit)
            if len(out) >= limit:
                return out[:limit]
        return out
    return [] if saved == current else [prefix.rstrip(".")]


# --------------------------------------------------------------------------------------------- random state
def rng_state() -> dict[str, Any]:
    """The state of Python's, NumPy's and torch's (CPU and CUDA) global generators, as plain data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------- files
def _data_name(tasks_done: int) -> str:
    return f"checkpoint-task{tasks_done:03d}.pt"


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / MANIFEST_FILE).is_file()


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The manifest, checked field by field (it is untrusted input)."""
    path = Path(run_dir) / MANIFEST_FILE
    try:
        manifest = read_small_json(path)
    except (OSError, ValueError) as exc:
        raise CorruptCheckpoint(f"{path} is unreadable ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptCheckpoint(f"{path} is not a {FORMAT} manifest")
    name, size, digest, tasks = (manifest.get(k) for k in ("file", "bytes", "sha256", "tasks_done"))
    if not (isinstance(name, str) and _DATA_NAME.fullmatch(name)):
        raise CorruptCheckpoint(f"{path} names an invalid checkpoint file {name!r}")
    if not (isinstance(size, int) and isinstance(tasks, int) and isinstance(digest, str) and tasks >= 1):
        raise CorruptCheckpoint(f"{path} has malformed fields")
    return manifest


def save_checkpoint(run_dir: Path, payload: dict[str, Any]) -> Path:
    """Write the checkpoint file, then its manifest, then delete the older checkpoint file(s).

    Raises :class:`~cl_bench.errors.StorageError` when the disk refuses the write twice (the manifest then
    still names the previous, intact checkpoint)."""
    run_dir = Path(run_dir)
    missing = [k for k in PAYLOAD_KEYS if k not in payload]
    assert not missing, missing
    name = _data_name(payload["tasks_done"])
    digest = write_atomic(run_dir / name, lambda fh: torch.save(payload, fh))
    manifest = {
        "format": FORMAT,
        "file": name,
        "bytes": (run_dir / name).stat().st_size,
        "sha256": digest,
        "tasks_done": payload["tasks_done"],
        "config_hash": payload["config_hash"],
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_text(run_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    for old in run_dir.glob("checkpoint-task*.pt"):
        if old.name != name and _DATA_NAME.fullmatch(old.name):
            old.unlink(missing_ok=True)
    return run_dir / name


def load_checkpoint(run_dir: Path, device: torch.device | None = None) -> dict[str, Any]:
    """The checkpoint payload of ``run_dir``, verified against its manifest and read with
    ``weights_only=True``. Raises :class:`CorruptCheckpoint` saying precisely what is wrong."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    path = run_dir / manifest["file"]
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CorruptCheckpoint(f"{path}, named by {MANIFEST_FILE}, is missing ({exc.strerror})") from exc
    if size < manifest["bytes"]:
        raise CorruptCheckpoint(f"{path} is truncated at byte {size} of {manifest['bytes']}")
    if size > manifest["bytes"]:
        raise CorruptCheckpoint(f"{path} has {size} bytes, {manifest['bytes']} expected (data appended)")
    if sha256_of(path) != manifest["sha256"]:
        raise CorruptCheckpoint(f"{path}: checksum mismatch (SHA-256 differs from {MANIFEST_FILE})")

    def place(storage: Any, location: str) -> Any:
        if device is not None and device.type == "cuda" and location.startswith("cuda"):
            return storage.cuda(device.index)
        return storage.cpu()

    try:
        payload = torch.load(path, map_location=place, weights_only=True)
    except Exception as exc:  # UnpicklingError for forbidden globals, RuntimeError for a bad archive
        raise CorruptCheckpoint(
            f"{path} cannot be read as tensors and plain data ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); it was not written by this cl_bench"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or set(payload) != set(PAYLOAD_KEYS):
        raise CorruptCheckpoint(f"{path} is not a {FORMAT} checkpoint")
    if payload["tasks_done"] != manifest["tasks_done"]:
        raise CorruptCheckpoint(f"{path} holds {payload['tasks_done']} tasks, its manifest says otherwise")
    return payload


def set_aside(run_dir: Path, reason: str) -> list[Path]:
    """Rename the checkpoint files of ``run_dir`` to ``*.corrupt-<time>`` and log why; returns the new
    paths."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for path in [Path(run_dir) / MANIFEST_FILE, *Path(run_dir).glob("checkpoint-task*.pt")]:
        if path.is_file():
            target = path.with_name(f"{path.name}.corrupt-{stamp}")
            path.replace(target)
            moved.append(target)
    log.error(
        "checkpoint set aside: %s. Renamed to %s; the run starts over from its first task.",
        reason,
        ", ".join(p.name for p in moved) or "(nothing)",
    )
    return moved


def remove_checkpoints(run_dir: Path) -> None:
    """Delete the checkpoint files of a finished run (``final_model.pt`` holds the final weights)."""
    (Path(run_dir) / MANIFEST_FILE).unlink(missing_ok=True)
    for path in Path(run_dir).glob("checkpoint-task*.pt"):
        if _DATA_NAME.fullmatch(path.name):
            path.unlink(missing_ok=True)
