"""Progress: the terminal status line, the per-epoch log lines, quiet runs, ETAs and a sweep's job lines."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cl_bench import progress
from cl_bench.progress import RunProgress, SweepProgress, duration, job_line, progress_mode

SEQ_FT = ("method=seq_ft", "method.epochs=2", "method.batch_size=64")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_duration_and_mode() -> None:
    assert duration(None) == "?" and duration(float("nan")) == "?"
    assert duration(65) == "1:05" and duration(3 * 3600 + 61) == "3:01:01"
    assert progress_mode(False, FakeTerminal(), multirun=False) == "bar"
    assert progress_mode(False, FakeTerminal(), multirun=True) == "lines"  # parallel jobs share the terminal
    assert progress_mode(False, io.StringIO(), multirun=False) == "lines"  # SLURM log, file, pipe
    assert progress_mode(True, FakeTerminal(), multirun=False) == "off"


def test_run_eta_scales_later_tasks_by_their_training_images() -> None:
    run = RunProgress([500, 100, 100], "off")
    # first task: 10 s done, 30 s left -> 40 s for 500 images -> 0.08 s per image for the 200 later ones
    assert run.run_eta(0, 30.0, 10.0) == pytest.approx(30.0 + 0.08 * 200)
    run.task_done(0, 50.0)  # measured: 0.1 s per image
    assert run.run_eta(1, 4.0, 6.0) == pytest.approx(4.0 + 0.1 * 100)
    assert run.run_eta(2, None, 1.0) is None


def test_log_lines_per_epoch_when_not_a_terminal(run_tiny, caplog) -> None:
    caplog.set_level(logging.INFO, logger="cl_bench.progress")
    run_tiny(*SEQ_FT)
    lines = [r.getMessage() for r in caplog.records if r.name == "cl_bench.progress"]
    assert len(lines) == 4  # 2 tasks x 2 epochs
    assert lines[0].startswith("task 1/2 · epoch 1/2 · steps ")
    assert lines[3].startswith("task 2/2 · epoch 2/2")
    for part in ("loss ", " img/s", "task ETA ", "run ETA ", "this epoch"):
        assert all(part in line for line in lines), part
    assert "task ETA 0:00" in lines[3] and "run ETA 0:00" in lines[3]


def test_quiet_shows_nothing(run_tiny, caplog, monkeypatch) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    caplog.set_level(logging.INFO, logger="cl_bench.progress")
    run_tiny(*SEQ_FT, "quiet=true")
    assert not [r for r in caplog.records if r.name == "cl_bench.progress"] and terminal.getvalue() == ""


def test_status_line_in_a_terminal(run_tiny, caplog, monkeypatch) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(progress, "REDRAW_S", 0.0)
    caplog.set_level(logging.INFO, logger="cl_bench.progress")
    run_tiny(*SEQ_FT)
    out = terminal.getvalue()
    frames = [frame for frame in out.split("\r\x1b[K") if frame]
    assert frames and all(frame.startswith("task ") for frame in frames)
    assert any(f.startswith("task 1/2 · epoch 2/2 · step ") for f in frames)
    assert any(f.startswith("task 2/2") and "run ETA" in f for f in frames)
    assert out.endswith("\r\x1b[K")  # erased at the end
    assert not [r for r in caplog.records if r.name == "cl_bench.progress"]  # no epoch lines as well


def test_the_status_line_shows_each_epochs_last_step_between_redraws(run_tiny, monkeypatch) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(progress, "REDRAW_S", 3600.0)  # only the first step and forced redraws
    run_tiny(*SEQ_FT)
    frames = [frame for frame in terminal.getvalue().split("\r\x1b[K") if frame]
    steps = [frame.split(" · ")[2] for frame in frames]
    last = [s for s in steps if s.split("/")[0] == "step " + s.split("/")[1]]
    assert len(last) == 4  # 2 tasks x 2 epochs, each ending on step n/n


def test_job_lines() -> None:
    folder = Path("sweep/3_method.lr=0.1,seed=1")
    done = {"status": "complete", "last_acc": 45.678, "error": None, "acc_matrix": [[1], [1, 2]]}
    assert job_line(folder, done, 3, 12, 65.0) == (
        "[sweep 1:05] job 3/12 3_method.lr=0.1,seed=1: done, last acc 45.68"
    )
    failed = {"status": "incomplete", "error": "ValueError: bad\nmore", "acc_matrix": [[1]]}
    assert job_line(folder, failed, 4, None, 1.0).endswith(
        "job 4 3_method.lr=0.1,seed=1: FAILED after 1 task(s): ValueError: bad"
    )
    running = {"status": "incomplete", "error": None, "acc_matrix": [[1]]}
    assert job_line(folder, running, 5, 12, 1.0) is None


def test_sweep_progress_prints_each_job_once_as_it_becomes_final(tmp_path: Path) -> None:
    out = io.StringIO()
    watcher = SweepProgress(stream=out)
    watcher.sweep_dir, watcher.total, watcher.start = tmp_path, 2, 0.0
    (tmp_path / "0_seed=0").mkdir()
    (tmp_path / "0_seed=0" / "results.json").write_text(json.dumps({"status": "incomplete", "error": None}))
    (tmp_path / "1_seed=1").mkdir()
    (tmp_path / "1_seed=1" / "results.json").write_text("{torn")
    # planted or foreign files: these used to end the sweep command with a traceback when it finished
    for name, text in [("2_deep", "[" * 100_000 + "]" * 100_000), ("3_list", "[]")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(text)
    watcher.poll()
    assert out.getvalue() == ""
    (tmp_path / "0_seed=0" / "results.json").write_text(json.dumps({"status": "complete", "last_acc": 1.0}))
    watcher.poll()
    watcher.poll()
    assert out.getvalue().count("job 1/2 0_seed=0: done") == 1
    (tmp_path / "4_text").mkdir()
    (tmp_path / "4_text" / "results.json").write_text(json.dumps({"status": "complete", "last_acc": "x"}))
    watcher.poll()
    assert "4_text: done, last acc n/a" in out.getvalue()


def test_sweep_progress_prints_jobs_that_stop_before_results_json(tmp_path: Path) -> None:
    """A job refused at validation (error.txt) or skipped (skipped.txt) writes no results.json: the terminal
    still gets its line, once."""
    out = io.StringIO()
    watcher = SweepProgress(stream=out)
    watcher.sweep_dir, watcher.total, watcher.start = tmp_path, 3, time.monotonic()
    for name in ("0_method=l2p", "1_method=lwf", "2_method=seq_ft"):
        (tmp_path / name).mkdir()
    (tmp_path / "0_method=l2p" / "skipped.txt").write_text("method=l2p cannot run on the backbone x\n")
    (tmp_path / "1_method=lwf" / "error.txt").write_text("dataset.path=/x: no such file\n\nTraceback ...")
    watcher.poll()
    watcher.poll()
    lines = out.getvalue().splitlines()
    assert lines == [
        "[sweep 0:00] job 1/3 0_method=l2p: skipped: method=l2p cannot run on the backbone x",
        "[sweep 0:00] job 2/3 1_method=lwf: FAILED: dataset.path=/x: no such file",
    ]
    failed = {"status": "incomplete", "error": "RuntimeError: boom", "acc_matrix": [[1.0]]}
    (tmp_path / "2_method=seq_ft" / "results.json").write_text(json.dumps(failed))
    (tmp_path / "2_method=seq_ft" / "error.txt").write_text("RuntimeError: boom\n")
    watcher.poll()
    assert (
        out.getvalue().splitlines()[2].endswith("2_method=seq_ft: FAILED after 1 task(s): RuntimeError: boom")
    )
    assert len(out.getvalue().splitlines()) == 3


@pytest.mark.slow
def test_a_sweep_prints_each_jobs_completion(tmp_path: Path) -> None:
    """A real ``-m`` sweep (basic launcher) of two runs prints one line per job, in the launching process."""
    sweep_dir = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable, "-m", "cl_bench", "-m", "dataset=fake", "dataset.num_classes=4",
            "method=simplecil", "scenario.n_tasks=2", "seed=0,1", "logger=none", "trainer=cpu",
            "save_model=false", f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("[sweep ")]
    assert len(lines) == 2, result.stdout[-3000:]
    assert {line.split(" job ")[1].split(" ")[0] for line in lines} == {"1/2", "2/2"}
    assert all(": done, last acc " in line for line in lines)


def test_sweep_job_count_expands_preset_axes_and_command_line() -> None:
    from omegaconf import OmegaConf

    from cl_bench.progress import _job_count

    config = OmegaConf.create(
        {"hydra": {"sweeper": {"params": {"seed": "0,1,2"}}, "overrides": {"task": ["method.lr=0.1,0.2"]}}}
    )
    assert _job_count(config) == 6
    config.hydra.sweeper.params = None
    assert _job_count(config) == 2


def test_sweep_progress_survives_pickling_into_jobs(tmp_path: Path) -> None:
    """submitit pickles Hydra's callbacks with the launcher into every job."""
    import pickle

    watcher = SweepProgress()
    watcher.sweep_dir, watcher.total, watcher.start = tmp_path, 1, 0.0
    watcher._thread = __import__("threading").Thread(target=lambda: None)
    copy = pickle.loads(pickle.dumps(watcher))
    assert copy._thread is None and not copy._stop.is_set()
