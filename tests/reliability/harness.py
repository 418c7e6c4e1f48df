"""Helpers of the fault-injection suite: real ``cl-bench`` processes, paused at chosen points
(``pause_at.py``), signalled or killed there, and compared with an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from helpers import REPO_ROOT, TINY

HERE = Path(__file__).resolve().parent
#: Three tasks (4 + 3 + 3 classes) of two epochs: a run of about 10 s on one busy core.
STEPS = (
    "scenario.init_classes=4",
    "scenario.increment=3",
    "method=seq_ft",
    "method.epochs=2",
    "method.batch_size=32",
)
RUN = (*TINY, *STEPS)
METRICS = ("acc_matrix", "til_acc_matrix", "last_acc", "avg_inc_acc", "avg_forgetting", "bwt", "class_order")


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def cl_bench(cwd: Path, *overrides: str, timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run ``python -m cl_bench`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "cl_bench", *overrides],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def start_paused(cwd: Path, point: str, count: int, *overrides: str) -> tuple[subprocess.Popen, Path]:
    """Start ``cl-bench`` that pauses at the ``count``-th call of ``point``; returns it and its marker."""
    marker = cwd / f"paused-{point}-{count}-{time.monotonic_ns()}"
    process = subprocess.Popen(
        [sys.executable, str(HERE / "pause_at.py"), point, str(count), str(marker), *overrides],
        cwd=cwd,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, marker


def wait_for(marker: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before reaching the pause point:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no pause after {timeout} s")
        time.sleep(0.02)


def results(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def same_results(doc: dict[str, Any], reference: dict[str, Any]) -> bool:
    return all(doc[key] == reference[key] for key in METRICS)


def leftovers(run_dir: Path) -> list[str]:
    """Temporary files, lock files and checkpoints that a finished run must not leave behind."""
    patterns = (".*.tmp", "running.lock*", ".writable-probe-*", "checkpoint.json", "checkpoint-task*.pt")
    return sorted(p.name for pattern in patterns for p in run_dir.glob(pattern))


class RequeueableRun:
    """A run as a submitit job that checkpoints and requeues itself on preemption, as
    hydra-submitit-launcher's jobs do (``checkpoint`` returns the same call)."""

    def __init__(self, overrides: list[str]) -> None:
        self.overrides = overrides

    def __call__(self) -> dict[str, Any]:
        from helpers import compose_config

        from cl_bench.runner import run_experiment

        return run_experiment(compose_config(*self.overrides))

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(RequeueableRun(self.overrides))


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux ``/proc``)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in children.read_text().split()] if children.exists() else []
