"""trainer.threads: one thread count for torch, OpenMP/BLAS and data workers (cl_bench/threads.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cl_bench import threads
from cl_bench.errors import ConfigError


@pytest.fixture
def restore_threads(monkeypatch: pytest.MonkeyPatch):
    """Keep this process's torch threads and thread variables as they were."""
    before = torch.get_num_threads()
    for variable in threads.THREAD_VARIABLES:
        monkeypatch.setenv(variable, os.environ.get(variable, "1"))
    yield
    torch.set_num_threads(before)


def test_explicit_threads_win_and_must_be_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.resolve_threads(5, concurrent_jobs=4) == 5
    with pytest.raises(ConfigError, match="trainer.threads=0"):
        threads.resolve_threads(0, concurrent_jobs=1)


def test_zero_concurrent_jobs_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """joblib gives n_jobs=0 no meaning: a clear error rather than one thread on a machine's worth of jobs."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with pytest.raises(ConfigError, match="trainer.concurrent_jobs=0"):
        threads.resolve_threads(None, concurrent_jobs=0)
    with pytest.raises(ConfigError, match="trainer.concurrent_jobs=0"):
        threads.resolve_threads(4, concurrent_jobs=0)


def test_default_is_the_environment_else_cores_per_concurrent_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.resolve_threads(None, concurrent_jobs=4) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    assert threads.resolve_threads(None, concurrent_jobs=1) == 16
    assert threads.resolve_threads(None, concurrent_jobs=4) == 4
    assert threads.resolve_threads(None, concurrent_jobs=32) == 1
    assert threads.resolve_threads(None, concurrent_jobs=-1) == 1  # joblib: one job per core
    assert threads.resolve_threads(None, concurrent_jobs=-13) == 4  # joblib: 16 + 1 - 13 = 4 jobs


def test_a_slurm_job_counts_the_cores_it_was_allocated(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a node that does not pin jobs to cores the affinity mask is the whole node: SLURM_CPUS_PER_TASK
    (submitit's cpus_per_task) bounds the cores, so jobs sharing the node do not oversubscribe it."""
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _pid: set(range(64)), raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert threads.available_cores() == 64
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    assert threads.available_cores() == 8
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.resolve_threads(None, concurrent_jobs=1) == 8
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert threads.available_cores() == 2  # a pinned allocation smaller than asked (never more cores)


def test_a_ddp_run_shares_the_cores_among_its_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer=ddp with 4 devices: Lightning starts 3 more processes of the run on this machine, which
    inherit rank 0's thread variables, so rank 0 sizes each process's share (cores / 4), not all cores
    each. Processes started by torchrun or srun come with their own share (1 here)."""
    from cl_bench.config import TrainerConfig

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for name in ("RANK", "LOCAL_RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    ddp = TrainerConfig(accelerator="gpu", devices=4, strategy="ddp")
    assert threads.local_processes(ddp) == 4
    assert threads.local_processes(TrainerConfig(devices=[0, 1], strategy="ddp")) == 2
    assert threads.local_processes(TrainerConfig()) == 1
    assert threads.resolve_threads(None, concurrent_jobs=1, processes=4) == 4
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert threads.local_processes(ddp) == 1


def test_configure_applies_everywhere_and_caps_workers(restore_threads) -> None:
    plan = threads.configure_threads(2, concurrent_jobs=1, num_workers=8)
    assert plan == threads.ThreadPlan(threads=2, num_workers=2)
    assert torch.get_num_threads() == 2
    assert all(os.environ[v] == "2" for v in threads.THREAD_VARIABLES)
    assert threads.configure_threads(1, 1, num_workers=0).num_workers == 0
    assert torch.get_num_threads() == 1


def test_run_records_its_threads(run_tiny, restore_threads) -> None:
    _, run_dir = run_tiny("method=simplecil", "trainer.threads=2")
    assert json.loads((run_dir / "environment.json").read_text())["cpu_threads"] == 2


@pytest.mark.slow
def test_local_sweep_gives_each_job_its_share(tmp_path: Path) -> None:
    """launcher=local with n_jobs=2: every job's config says 2 concurrent jobs and it runs on cores // 2."""
    env = {k: v for k, v in os.environ.items() if k not in threads.THREAD_VARIABLES}
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "cl_bench", "-m", "launcher=local", "hydra.launcher.n_jobs=2"]
    command += ["dataset=fake", "dataset.num_classes=4", "method=simplecil", "scenario.n_tasks=2", "seed=0,1"]
    command += ["logger.mode=disabled", "trainer=cpu", "save_model=false", f"hydra.sweep.dir={sweep_dir}"]
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p.parent for p in sweep_dir.glob("*/results.json"))
    assert len(runs) == 2
    for run in runs:
        assert json.loads((run / "results.json").read_text())["config"]["trainer"]["concurrent_jobs"] == 2
        expected = max(1, threads.available_cores() // 2)
        assert json.loads((run / "environment.json").read_text())["cpu_threads"] == expected
