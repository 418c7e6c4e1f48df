"""A run under submitit's local executor, preempted with submitit's signal after its first checkpoint: it
stops gracefully, submitit requeues it, and the requeued job finishes it with the uninterrupted results."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from helpers import REPO_ROOT
from reliability.harness import RUN, STEPS, RequeueableRun, child_pids, same_results

from cl_bench.checkpointing import MANIFEST_FILE

submitit = pytest.importorskip("submitit")


@pytest.mark.slow
def test_a_preempted_submitit_job_is_requeued_and_continues(
    run_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, _ = run_tiny(*STEPS)
    run_dir = tmp_path / "run"
    monkeypatch.setenv("PYTHONPATH", f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=20)
    job = executor.submit(RequeueableRun([*RUN, f"paths.run_dir={run_dir}"]))
    deadline = time.monotonic() + 300
    while not (run_dir / MANIFEST_FILE).exists():
        assert not job.done(), job.stderr()
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    (task,) = child_pids(job._process.pid)  # the controller's one task: the job itself
    os.kill(task, signal.SIGUSR2)  # submitit's preemption signal
    doc = job.result()
    log = job.stderr() + job.stdout()
    assert "stopped by SIGUSR2" in log and "Requeued job" in log, log
    assert doc["status"] == "complete" and same_results(doc, reference)
