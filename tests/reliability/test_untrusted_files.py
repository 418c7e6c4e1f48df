"""Hostile or damaged small files in a run folder (config, results, checkpoint manifest, lock): read only as
bounded regular files, never through a link, a FIFO or a device; a clear error naming the file; results
already written are never overwritten."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from helpers import TINY, compose_config
from omegaconf import OmegaConf

from cl_bench.checkpointing import MANIFEST_FILE
from cl_bench.errors import ConfigError
from cl_bench.locking import LOCK_FILE, read_holder
from cl_bench.results import RESULTS_FILE
from cl_bench.run_folder import CONFIG_FILE, claim_run_folder, write_config
from cl_bench.storage import read_small_text


def command(run_dir: Path, *overrides: str):
    cfg = compose_config(*TINY, f"paths.run_dir={run_dir}", *overrides)
    return cfg, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


@pytest.fixture
def no_hang():
    """Turn a read that blocks (a FIFO opened for reading) into a failure after 10 s."""

    def hung(signum, frame):
        raise AssertionError("blocked reading a file of the run folder")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_small_files_are_read_only_as_bounded_regular_files(tmp_path: Path, no_hang) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    (tmp_path / "link").symlink_to(outside)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "big").write_bytes(b"x" * 101)
    (tmp_path / "latin1").write_bytes(b"caf\xe9")
    with pytest.raises(OSError, match="symbolic link"):
        read_small_text(tmp_path / "link")
    with pytest.raises(OSError, match="not a regular file"):
        read_small_text(tmp_path / "fifo")
    with pytest.raises(OSError, match="not a regular file"):
        read_small_text(Path("/dev/zero"))
    with pytest.raises(OSError, match="larger than 100 bytes"):
        read_small_text(tmp_path / "big", limit=100)
    with pytest.raises(UnicodeDecodeError):
        read_small_text(tmp_path / "latin1")
    assert read_small_text(outside) == "secret"


def _finished_folder(run_dir: Path, status: str = "incomplete") -> bytes:
    """A run folder holding a task's results (of seed 0) and its config; returns results.json's bytes."""
    _, config = command(run_dir)
    run_dir.mkdir(parents=True)
    write_config(run_dir, config)
    content = json.dumps({"status": status, "acc_matrix": [[50.0, None]], "config": config}).encode()
    (run_dir / RESULTS_FILE).write_bytes(content)
    return content


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda path: path.write_bytes(b"\xff\xfe seed: 0"), "UnicodeDecodeError"),
        (lambda path: path.unlink(), "No such file or directory"),
        (lambda path: (path.unlink(), os.mkfifo(path)), "not a regular file"),
        (lambda path: path.write_text("[1, 2]"), "does not hold a config"),
        (lambda path: path.write_text("[" * 100_000 + "]" * 100_000), "RecursionError"),
    ],
    ids=["not-utf8", "missing", "fifo", "a-list", "nested-too-deeply"],
)
def test_results_whose_config_cannot_be_read_are_never_overwritten(
    tmp_path: Path, no_hang, damage, expected: str
) -> None:
    """A non-UTF-8 ``config.yaml`` used to end the command with a raw ``UnicodeDecodeError``; a missing one
    let a run of another config (here seed 5) start over the folder's results."""
    run_dir = tmp_path / "run"
    content = _finished_folder(run_dir)
    damage(run_dir / CONFIG_FILE)
    with pytest.raises(ConfigError, match=f"{CONFIG_FILE} cannot be read|does not hold") as error:
        claim_run_folder(*_with_dir(run_dir, "seed=5"))
    assert expected in str(error.value) and "left as they are" in str(error.value)
    assert (run_dir / RESULTS_FILE).read_bytes() == content
    assert not (run_dir / LOCK_FILE).exists()


def _with_dir(run_dir: Path, *overrides: str):
    cfg, config = command(run_dir, *overrides)
    return cfg, run_dir, config


def test_a_results_file_linked_elsewhere_is_neither_read_nor_replaced(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _finished_folder(run_dir)
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"status": "incomplete"}))
    (run_dir / RESULTS_FILE).unlink()
    (run_dir / RESULTS_FILE).symlink_to(outside)
    with pytest.raises(ConfigError, match="is unreadable; it is left as it is"):
        claim_run_folder(*_with_dir(run_dir))
    assert json.loads(outside.read_text()) == {"status": "incomplete"}


def test_a_manifest_linked_elsewhere_is_set_aside_not_followed(tmp_path: Path, caplog) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _, config = command(run_dir)
    write_config(run_dir, config)
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (run_dir / MANIFEST_FILE).symlink_to(outside)
    claim = claim_run_folder(*_with_dir(run_dir))
    claim.release()
    assert claim.checkpoint is None
    assert "a symbolic link (never followed)" in caplog.text and "checkpoint set aside" in caplog.text
    assert outside.read_text() == "{}" and not (run_dir / MANIFEST_FILE).exists()


def test_a_lock_file_that_is_a_fifo_is_taken_over_without_blocking(tmp_path: Path, no_hang) -> None:
    os.mkfifo(tmp_path / LOCK_FILE)
    assert read_holder(tmp_path / LOCK_FILE) is None


DEEP = "[" * 100_000 + "]" * 100_000


def test_json_nested_too_deeply_is_unreadable_not_a_crash(tmp_path: Path, caplog) -> None:
    """``[[[...]]]`` made ``json.loads`` raise ``RecursionError``, which no reader caught: a planted
    results.json, manifest or lock file ended every start in the folder with a traceback."""
    assert read_holder(_planted(tmp_path / "lock", LOCK_FILE)) is None
    results_dir = tmp_path / "results"
    _finished_folder(results_dir)
    (results_dir / RESULTS_FILE).write_text(DEEP)
    with pytest.raises(ConfigError, match="is unreadable; it is left as it is"):
        claim_run_folder(*_with_dir(results_dir))
    manifest_dir = tmp_path / "manifest"
    manifest_dir.mkdir()
    write_config(manifest_dir, command(manifest_dir)[1])
    _planted(manifest_dir, MANIFEST_FILE)
    claim = claim_run_folder(*_with_dir(manifest_dir))
    claim.release()
    assert claim.checkpoint is None and "is nested too deeply" in caplog.text


def _planted(folder: Path, name: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(DEEP)
    return folder / name
