"""A full or refusing disk: failed writes retry once, then stop the run with a clear error; the results
already written stay whole; temporary files never stay behind; a complete run stays complete."""

from __future__ import annotations

import errno
import os
import resource
from pathlib import Path

import pytest
import torch
from reliability.harness import RUN, cl_bench, results, same_results

import cl_bench.storage as storage
from cl_bench.errors import StorageError
from cl_bench.results import RESULTS_FILE, build_results, write_results

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


def test_results_are_synced_to_disk_and_a_full_disk_keeps_the_last_ones_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``results.json`` (and the CSVs, ``config.yaml``) used to be renamed into place unsynced, so a power
    loss could leave it empty, and a full disk ended the run with a raw ``OSError``."""
    monkeypatch.setattr(storage, "RETRY_DELAY_S", 0.0)
    first = build_results([[50.0]], [[50.0]], [2, 2], [0, 1, 2, 3], [1.0], 0.0, "incomplete", {"seed": 0})
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_results(tmp_path, first)
    assert any(Path(name).name.startswith(f".{RESULTS_FILE}.") for name in synced), synced
    before = (tmp_path / RESULTS_FILE).read_bytes()

    def full(fd: int) -> None:  # a delayed allocation that fails at fsync (ENOSPC)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    second = {**first, "acc_matrix": [[50.0, None], [25.0, 75.0]]}
    with pytest.raises(StorageError, match=r"cannot write .*: No space left on device \(twice\)"):
        write_results(tmp_path, second)
    assert (tmp_path / RESULTS_FILE).read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_resume_index_that_takes_no_writes_costs_only_automatic_resumption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """``register`` caught ``OSError`` but ``write_text`` raises ``StorageError``: an index folder another
    user owns (or a full disk there) stopped the run instead of logging a warning."""
    from helpers import TINY, compose_config
    from omegaconf import OmegaConf

    from cl_bench.run_folder import register

    monkeypatch.setattr(storage, "RETRY_DELAY_S", 0.0)
    cfg = compose_config(*TINY, f"paths.output_dir={tmp_path / 'out'}")
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)

    def refused(fd: int) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "fsync", refused)
    register(cfg, config, tmp_path / "run")
    assert "could not register" in caplog.text and "Permission denied" in caplog.text


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
