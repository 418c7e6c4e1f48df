"""Launchers: ``launcher=local`` (joblib), ``launcher=submitit_local`` and ``launcher=slurm`` (submitit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cl_bench.report import build_report


def hydra_launcher(*overrides: str) -> dict:
    """``hydra.launcher`` as composed for ``cl-bench -m ...``, interpolations left as written."""
    from hydra import compose, initialize_config_dir

    from cl_bench.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert isinstance(launcher, dict)
    return launcher


def test_local_launchers_select_the_plugins() -> None:
    joblib = hydra_launcher("launcher=local", "hydra.launcher.n_jobs=3")
    assert joblib["_target_"].endswith("JoblibLauncher") and joblib["n_jobs"] == 3
    local = hydra_launcher("launcher=submitit_local")
    assert local["_target_"].endswith("submitit_launcher.LocalLauncher") and local["gpus_per_node"] == 0
    assert hydra_launcher()["_target_"].endswith("BasicLauncher")  # no launcher: Hydra's sequential one


def job_trainer(*overrides: str) -> dict:
    """A sweep job's ``trainer`` section resolved as the job sees it (``${hydra:...}`` included)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from cl_bench.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    finally:
        HydraConfig.instance().cfg = None
    assert isinstance(trainer, dict)
    return trainer


def test_every_parallel_launcher_sizes_the_jobs_threads() -> None:
    """joblib: cores / n_jobs per run; submitit's local jobs (all started at once, pinned to no cores): the
    cpus_per_task each asked for. (SLURM jobs: their allocation, cl_bench.threads.available_cores.)"""
    assert job_trainer("launcher=local", "hydra.launcher.n_jobs=3")["concurrent_jobs"] == 3
    assert job_trainer("launcher=submitit_local")["threads"] == 1
    assert job_trainer("launcher=submitit_local", "hydra.launcher.cpus_per_task=4")["threads"] == 4
    assert job_trainer("launcher=submitit_local", "trainer.threads=2")["threads"] == 2
    assert job_trainer()["threads"] is None


def test_slurm_options_reach_the_sbatch_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The options of conf/launcher/slurm.yaml, mapped as hydra-submitit-launcher maps them, give the
    expected sbatch lines (submitit only checks that ``srun`` exists, so a stand-in is put on PATH)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm.slurm import _make_sbatch_string

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    params = hydra_launcher(
        "launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=90",
        "hydra.launcher.array_parallelism=5",
        "hydra.launcher.setup=[module load cuda,source .venv/bin/activate]",
        "+hydra.launcher.additional_parameters.mail-type=END",
    )
    assert params.pop("_target_").endswith("submitit_launcher.SlurmLauncher")
    folder = tmp_path / "submitit"
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=folder, slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{
            k if k in base else f"slurm_{k}": v
            for k, v in params.items()
            if k not in ("submitit_folder", "name")
        }
    )
    script = _make_sbatch_string(
        command="python job.py", folder=folder, map_count=20, **executor._executor.parameters
    )
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --time=90",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=32GB",
        "#SBATCH --array=0-19%5",
        "#SBATCH --mail-type=END",
        "module load cuda\nsource .venv/bin/activate",
    ):
        assert line in script, line


@pytest.mark.slow
def test_submitit_local_two_job_sweep_runs_separate_processes(tmp_path: Path) -> None:
    """Two runs as two submitit jobs (two processes): both finish, share one W&B group, and the report
    finds both with nothing missing."""
    sweep_dir = tmp_path / "sweep"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cl_bench",
            "-m",
            "launcher=submitit_local",
            "hydra.launcher.timeout_min=5",
            "dataset=fake",
            "dataset.num_classes=4",
            "method=linear_probe",
            "method.epochs=1",
            "scenario.n_tasks=2",
            "seed=0,1",
            "logger.mode=offline",
            "trainer=cpu",
            "save_model=false",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = sorted(sweep_dir.glob("*/results.json"))
    assert len(results) == 2
    docs = [json.loads(p.read_text()) for p in results]
    assert [d["status"] for d in docs] == ["complete", "complete"]
    assert sorted(d["config"]["seed"] for d in docs) == [0, 1]
    job_folders = [p for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]
    assert len(job_folders) == 2  # the local executor's job id is the job's process id
    assert all(any(f.name.endswith("_log.out") for f in folder.iterdir()) for folder in job_folders)
    group = f"sweep-{sweep_dir.name}".encode()
    for result in results:
        (wandb_file,) = result.parent.glob("wandb/offline-run-*/run-*.wandb")
        assert group in wandb_file.read_bytes()
    report = build_report([str(sweep_dir)], tmp_path / "report")
    assert not report.problems and sum(r.complete for r in report.runs) == 2
