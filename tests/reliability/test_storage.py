"""A full or refusing disk: failed writes retry once, then stop the run with a clear error; the results
already written stay whole; temporary files never stay behind; a complete run stays complete."""

from __future__ import annotations

import errno
import resource
from pathlib import Path

import pytest
import torch
from reliability.harness import RUN, cl_bench, results, same_results

import cl_bench.storage as storage
from cl_bench.errors import StorageError

#: Files above this size cannot be written (``ulimit -f``): results.json passes, a ResNet-20 checkpoint not.
SMALL_FILES = 256 * 1024


def test_a_failed_write_is_retried_once_then_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "RETRY_DELAY_S", 0.0)
    failures = {"left": 1}

    def save(fh) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        torch.save({"x": torch.ones(2)}, fh)

    storage.write_atomic(tmp_path / "a.pt", save)  # the retry succeeds
    assert torch.load(tmp_path / "a.pt", weights_only=True)["x"].sum() == 2
    failures["left"] = 2
    with pytest.raises(StorageError, match=r"cannot write .*b.pt: No space left on device \(twice\)"):
        storage.write_atomic(tmp_path / "b.pt", save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]  # no temporary file left


def test_temporaries_of_a_killed_write_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".results.json.abc.tmp").write_text("torn")
    (tmp_path / "results.json").write_text("{}")
    storage.remove_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def _limited(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("reference")
    done = cl_bench(folder, *RUN, f"hydra.run.dir={folder / 'run'}")
    assert done.returncode == 0, done.stderr
    return results(folder / "run")


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_its_results(
    tmp_path: Path, reference
) -> None:
    """Issue 17.4: training used to go on without a way to resume; now the run stops after the retry."""
    run_dir = tmp_path / "run"
    done = cl_bench(tmp_path, *RUN, f"hydra.run.dir={run_dir}", preexec_fn=_limited(SMALL_FILES))
    assert done.returncode == 2, done.stderr
    assert f"cannot write {run_dir}/checkpoint-task001.pt: File too large (twice)" in done.stderr
    doc = results(run_dir)
    assert doc["status"] == "incomplete" and doc["acc_matrix"] == reference["acc_matrix"][:1]
    assert not list(run_dir.glob(".*.tmp")) and not list(run_dir.glob("checkpoint*"))
    assert not (run_dir / "running.lock").exists()


@pytest.mark.slow
def test_a_final_model_that_cannot_be_written_keeps_complete_results(tmp_path: Path, reference) -> None:
    run_dir = tmp_path / "run"
    overrides = (*RUN, "save_checkpoints=false", "save_model=true", f"hydra.run.dir={run_dir}")
    done = cl_bench(tmp_path, *overrides, preexec_fn=_limited(SMALL_FILES))
    assert done.returncode == 2 and f"cannot write {run_dir}/final_model.pt" in done.stderr
    doc = results(run_dir)
    assert doc["status"] == "complete" and same_results(doc, reference)
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / "final_model.pt").exists()


@pytest.mark.slow
def test_a_folder_that_takes_no_writes_is_reported_before_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = cl_bench(tmp_path, *RUN, f"hydra.run.dir={run_dir}", preexec_fn=_limited(16 * 1024))
    assert done.returncode == 2 and "does not take writes (File too large)" in done.stderr
    assert "task 1/" not in done.stderr and not (run_dir / "results.json").exists()
    assert not list(run_dir.glob(".writable-probe-*")) and not (run_dir / "running.lock").exists()
