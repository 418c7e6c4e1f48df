"""Read a W&B offline run file (``RUN_DIR/wandb/offline-run-*/run-*.wandb``) as ``wandb sync`` uploads it.

The file is W&B's LevelDB-style log: a 7-byte header (``:W&B``, magic ``0xBEE1``, version 0), then 32 KiB
blocks of chunks, each with a 7-byte header (CRC-32C, length, type: full, first, middle, last) and a piece of
a serialized ``wandb_internal_pb2.Record``. The installed wandb (0.2x-0.3x) reads it only in its Go core, so
the tests parse it here.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    """Every record of the file, in order, as ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, (ident, magic, version)
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # a block's tail too short for a chunk header is padding
            pos += left_in_block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if pos + HEADER + length > len(data):  # the writer is still at it
            break
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


@dataclass
class OfflineRun:
    """What an offline run holds: run fields, config, history rows, summary, exit code."""

    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)  # metric glob or name -> its step metric
    exit_code: int | None = None


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(run_folder: Path, timeout_s: float = 60.0) -> OfflineRun:
    """The W&B run in ``run_folder`` (a run folder of cl-bench: exactly one offline run expected).

    ``run.finish()`` returns before W&B's service process has written the last records, so this waits (up to
    ``timeout_s``) for the run's exit record."""
    (path,) = run_folder.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        run = _parse(path)
        if run.exit_code is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def _parse(path: Path) -> OfflineRun:
    run = OfflineRun()
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.name, run.group, run.tags = (
                record.run.display_name,
                record.run.run_group,
                list(record.run.tags),
            )
            for item in record.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "metric":
            metric = record.metric
            run.metrics[metric.name or metric.glob_name] = metric.step_metric
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run
