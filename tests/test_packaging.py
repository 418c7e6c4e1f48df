"""A non-editable install (a wheel in a fresh virtual environment) ships the configs and runs from any folder,
with the user's own presets from ``--config-dir``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from helpers import REPO_ROOT


def run(*args: str | Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, f"{args}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_a_wheel_in_a_fresh_environment_runs_the_quickstart_with_user_presets(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside the sources
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "cl_bench", source / "cl_bench", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        wheels,
        source,
        cwd=tmp_path,
        env=env,
    )
    (wheel,) = wheels.glob("cl_bench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.startswith("cl_bench/conf/") and n.endswith(".yaml")}
    in_repo = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "cl_bench" / "conf").rglob("*.yaml")}
    assert shipped == in_repo

    # A fresh environment without torch & co. of its own: this environment's packages are visible through a
    # .pth file (appended after the new environment's own site-packages, so the wheel's cl_bench wins).
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path, env=env)
    python = venv / "bin" / "python"
    site = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path, env=env
        ).stdout.strip()
    )
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", wheel, cwd=tmp_path, env=env)
    where = run(python, "-c", "import cl_bench; print(cl_bench.__file__)", cwd=tmp_path, env=env).stdout
    assert where.strip().startswith(str(site)), where

    user = tmp_path / "my_presets"  # a user's own protocol, outside the repository and the package
    (user / "protocol").mkdir(parents=True)
    (user / "protocol" / "digits_2tasks.yaml").write_text(
        "# @package _global_\nbudget:\n  epochs: 1\nscenario:\n  n_tasks: 2\ndataset:\n  size: 16\n"
        "transform:\n  input_size: 16\n"
    )
    elsewhere = tmp_path / "somewhere_else"
    elsewhere.mkdir()
    out = run(
        venv / "bin" / "cl-bench",
        "--config-dir",
        user,
        "protocol=digits_2tasks",
        "logger.mode=disabled",
        "save_model=false",
        f"hydra.run.dir={elsewhere / 'run'}",
        cwd=elsewhere,
        env=env,
    )
    assert "last accuracy" in out.stdout
    assert (elsewhere / "run" / "results.json").is_file()
    assert "protocol:" in run(venv / "bin" / "cl-bench", "--help", cwd=elsewhere, env=env).stdout
