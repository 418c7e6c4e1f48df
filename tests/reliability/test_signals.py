"""Real ``cl-bench`` processes stopped at chosen points: SIGTERM/SIGUSR1 (graceful: exit 128+signal, a
line naming the signal, results written, checkpoint at the last task boundary, lock released, W&B
closed) and SIGKILL (nothing to clean up but nothing lost); rerunning the command then gives the
uninterrupted run's results."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from reliability.harness import RUN, cl_bench, leftovers, results, same_results, start_paused, wait_for

from cl_bench.checkpointing import MANIFEST_FILE
from cl_bench.locking import LOCK_FILE

pytestmark = pytest.mark.slow
#: Task 0 has about 18 training steps per epoch, 36 in all: step 40 is in task 1.
STEP_IN_TASK_1 = 40


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("reference")
    done = cl_bench(folder, *RUN, f"hydra.run.dir={folder / 'run'}")
    assert done.returncode == 0, done.stderr
    return results(folder / "run")


def _rerun_completes(tmp_path: Path, run_dir: Path, reference: dict, *extra: str) -> str:
    rerun = cl_bench(tmp_path, *RUN, *extra, f"hydra.run.dir={run_dir}")
    assert rerun.returncode == 0, rerun.stderr
    doc = results(run_dir)
    assert doc["status"] == "complete" and same_results(doc, reference)
    assert leftovers(run_dir) == []
    return rerun.stderr + rerun.stdout


@pytest.mark.parametrize(
    ("signum", "point", "count", "logger"),
    [
        (signal.SIGTERM, "training_step", STEP_IN_TASK_1, "disabled"),
        (signal.SIGTERM, "evaluation", 2, "offline"),
        (signal.SIGUSR1, "task_end", 2, "disabled"),
        (signal.SIGTERM, "checkpoint_manifest", 1, "disabled"),
    ],
    ids=["sigterm-in-fit", "sigterm-in-evaluation", "sigusr1-at-task-end", "sigterm-in-checkpoint-write"],
)
def test_a_stop_signal_keeps_everything_finished_and_the_rerun_continues(
    tmp_path: Path, reference: dict, signum: signal.Signals, point: str, count: int, logger: str
) -> None:
    run_dir = tmp_path / "run"
    overrides = (*RUN, f"logger.mode={logger}", f"hydra.run.dir={run_dir}")
    process, marker = start_paused(tmp_path, point, count, *overrides)
    wait_for(marker, process)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, output
    assert f"stopped by {signum.name} after 1 of 3 task(s)" in output
    doc = results(run_dir)
    assert doc["status"] == "incomplete" and len(doc["acc_matrix"]) == 1
    assert doc["acc_matrix"][0] == reference["acc_matrix"][0]
    assert json.loads((run_dir / MANIFEST_FILE).read_text())["tasks_done"] == 1
    assert not (run_dir / LOCK_FILE).exists() and not list(run_dir.glob(".*.tmp"))
    if logger == "offline":  # the W&B run was finished, as failed (exit code 1)
        (debug_log,) = run_dir.glob("wandb/offline-run-*/logs/debug.log")
        assert "finishing run" in debug_log.read_text() and "got exitcode: 1" in debug_log.read_text()

    log = _rerun_completes(tmp_path, run_dir, reference, f"logger.mode={logger}")
    assert "resuming" in log and "after task 1" in log


@pytest.mark.parametrize(
    ("point", "count", "resumed_after"),
    [("checkpoint_manifest", 2, 1), ("results_write", 2, 1)],
    ids=["between-checkpoint-file-and-manifest", "while-writing-results"],
)
def test_sigkill_at_a_write_loses_nothing(
    tmp_path: Path, reference: dict, point: str, count: int, resumed_after: int
) -> None:
    run_dir = tmp_path / "run"
    process, marker = start_paused(tmp_path, point, count, *RUN, f"hydra.run.dir={run_dir}")
    wait_for(marker, process)
    process.kill()
    process.communicate(timeout=60)
    assert json.loads((run_dir / MANIFEST_FILE).read_text())["tasks_done"] == resumed_after
    results(run_dir)  # still a whole JSON document
    log = _rerun_completes(tmp_path, run_dir, reference)
    assert f"after task {resumed_after}" in log


def test_sigkill_while_saving_the_final_model_keeps_complete_results(tmp_path: Path, reference: dict) -> None:
    run_dir = tmp_path / "run"
    process, marker = start_paused(
        tmp_path, "final_model", 1, *RUN, "save_model=true", f"hydra.run.dir={run_dir}"
    )
    wait_for(marker, process)
    process.kill()
    process.communicate(timeout=60)
    doc = results(run_dir)
    assert doc["status"] == "complete" and same_results(doc, reference)
    again = cl_bench(tmp_path, *RUN, "save_model=true", f"hydra.run.dir={run_dir}")
    assert again.returncode != 0 and "already holds a complete run of this config" in again.stderr


def test_a_stop_signal_after_the_last_task_lets_the_complete_run_finish(
    run_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while ``final_model.pt`` is written: the results are complete and the checkpoint is gone, so
    there is nothing to resume. It used to stop with 143, no model file and ``error: stopped by SIGTERM``
    in complete results, and a requeued job then failed on "already holds a complete run"."""
    import os

    import cl_bench.runner as runner

    save_model = runner.save_model

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return save_model(*args, **kwargs)

    monkeypatch.setattr(runner, "save_model", signalled)
    doc, run_dir = run_tiny("save_model=true")
    assert doc["status"] == "complete" and doc["error"] is None
    assert results(run_dir)["error"] is None and (run_dir / "final_model.pt").is_file()
    assert leftovers(run_dir) == []
