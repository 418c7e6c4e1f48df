"""Resume after preemption: a run killed between tasks and rerun gives the uninterrupted run's results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO_ROOT, TINY

import cl_bench.runner as runner
from cl_bench.checkpointing import CHECKPOINT_FILE, LOCK_FILE
from cl_bench.errors import ConfigError

METRICS = ("acc_matrix", "til_acc_matrix", "last_acc", "avg_inc_acc", "avg_forgetting", "bwt")
#: One method per kind of state a checkpoint must carry.
METHODS = {
    "seq_ft": ("method=seq_ft",),  # weights and growing heads
    "er": ("method=er", "method.buffer_size=20"),  # replay slots that point into the training images
    "ewc": ("method=ewc",),  # Fisher matrices and anchor weights (penalty state)
    "lwf": ("method=lwf",),  # the previous model as a teacher
    "simplecil": ("method=simplecil",),  # prototypes, frozen backbone
    "confit": ("method=confit", "scenario=til"),  # per-task BN snapshots (extra state) and trackers
}
THREE_TASKS = ("scenario.init_classes=4", "scenario.increment=3", "method.epochs=1", "method.batch_size=32")


class Killed(BaseException):
    """Stands for SIGKILL/preemption: not an Exception, so nothing in the runner handles it."""


def kill_before_task(monkeypatch: pytest.MonkeyPatch, index: int) -> None:
    learn_task = runner.learn_task

    def learn_or_die(method, ctx, *args, **kwargs):
        if ctx.task.index == index:
            raise Killed
        return learn_task(method, ctx, *args, **kwargs)

    monkeypatch.setattr(runner, "learn_task", learn_or_die)


@pytest.mark.parametrize("method", list(METHODS))
def test_killed_run_resumes_with_the_same_results(
    run_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    overrides = [*METHODS[method], *THREE_TASKS]
    if method == "simplecil":
        overrides = [o for o in overrides if not o.startswith("method.")]
    uninterrupted, _ = run_tiny(*overrides)

    run_dir = tmp_path / "preempted"
    with monkeypatch.context() as patch:
        kill_before_task(patch, 2)
        with pytest.raises(Killed):
            run_tiny(*overrides, run_dir=run_dir)
    partial = json.loads((run_dir / "results.json").read_text())
    assert partial["status"] == "incomplete" and len(partial["acc_matrix"]) == 2
    assert (run_dir / CHECKPOINT_FILE).is_file()

    resumed, _ = run_tiny(*overrides, run_dir=run_dir)  # the same command again
    assert resumed["status"] == "complete"
    for key in METRICS:
        assert resumed[key] == uninterrupted[key], key
    assert not (run_dir / CHECKPOINT_FILE).exists() and not (run_dir / LOCK_FILE).exists()


def test_checkpoint_refers_to_the_images_instead_of_copying_them(
    run_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ER buffer points into the training images; the checkpoint stores a reference, not the images."""
    overrides = (
        "method=er",
        "method.buffer_size=20",
        *THREE_TASKS,
        "dataset.size=64",
        "transform.input_size=64",
    )
    run_dir = tmp_path / "er"
    kill_before_task(monkeypatch, 1)
    with pytest.raises(Killed):
        run_tiny(*overrides, run_dir=run_dir)
    images_bytes = 1797 * 64 * 64  # digits at 64 px, uint8, grey: what a copy would add at least
    assert (run_dir / CHECKPOINT_FILE).stat().st_size < images_bytes


def test_resume_never_and_a_changed_config_start_no_resume(
    run_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        kill_before_task(patch, 1)
        with pytest.raises(Killed):
            run_tiny("method=simplecil", run_dir=run_dir)
    with pytest.raises(ConfigError, match="already exists"):
        run_tiny("method=simplecil", "resume=never", run_dir=run_dir)
    with pytest.raises(ConfigError, match="already exists"):  # another seed is another experiment
        run_tiny("method=simplecil", "seed=1", run_dir=run_dir)
    with pytest.raises(ConfigError, match="no interrupted run of this config"):
        run_tiny("method=simplecil", "seed=1", f"resume={run_dir}", run_dir=tmp_path / "other")


@pytest.mark.slow
def test_rerunning_the_command_resumes_a_killed_process(tmp_path: Path) -> None:
    """A real ``cl-bench`` process killed with SIGKILL after its first task; the same command, run again
    (Hydra makes a new timestamped folder), finds the interrupted run and finishes it in its own folder."""
    command = [
        sys.executable,
        "-m",
        "cl_bench",
        *TINY,
        "scenario.n_tasks=5",
        "method=seq_ft",
        "method.epochs=2",
        f"paths.output_dir={tmp_path / 'outputs'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    while not list((tmp_path / "outputs").rglob(CHECKPOINT_FILE)):
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (killed_dir,) = {p.parent for p in (tmp_path / "outputs").rglob("results.json")}
    assert json.loads((killed_dir / "results.json").read_text())["status"] == "incomplete"

    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming the interrupted run in {killed_dir}" in rerun.stderr + rerun.stdout
    doc = json.loads((killed_dir / "results.json").read_text())
    assert doc["status"] == "complete" and len(doc["acc_matrix"]) == 5
    assert len({p.parent for p in (tmp_path / "outputs").rglob("results.json")}) == 1
