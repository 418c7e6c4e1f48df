"""The run folder's exclusive lock: refused while the holder lives (same host: pid and start time; other
hosts: heartbeat), stale locks taken over with a log line, and concurrent ``cl-bench`` starts in one
folder: one runs, the other is refused with a message naming the holder."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from reliability.harness import RUN, cl_bench, leftovers, results, same_results, start_paused, wait_for

import cl_bench.locking as locking
from cl_bench.errors import RunLockedError, StorageError
from cl_bench.locking import LOCK_FILE, LockHolder, RunLock, process_start_time, read_holder


def write_lock(folder: Path, holder: LockHolder, age_s: float = 0.0) -> Path:
    path = folder / LOCK_FILE
    path.write_text(json.dumps(asdict(holder)))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def holder_of(pid: int, host: str | None = None) -> LockHolder:
    me = LockHolder.me()
    return replace(me, host=host or me.host, pid=pid, start_time=process_start_time(pid), token="other")


def test_the_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    first = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(
            RunLockedError, match=f"in use by pid {os.getpid()} on host {socket.gethostname()}"
        ):
            RunLock(tmp_path).acquire()
        assert read_holder(tmp_path / LOCK_FILE).start_time == process_start_time(os.getpid())
    finally:
        first.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_live_process_keeps_its_lock_and_a_dead_ones_lock_is_taken_over(tmp_path: Path, caplog) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, holder_of(sleeper.pid))
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = RunLock(tmp_path).acquire()  # the same lock file, its holder now dead
    assert f"took over the stale lock of pid {sleeper.pid}" in caplog.text
    assert lock.owned()
    lock.release()


def test_a_recycled_pid_does_not_keep_a_lock(tmp_path: Path) -> None:
    """The holder's pid exists (it is ours) but with another start time: the holder is gone."""
    stale = replace(holder_of(os.getpid()), start_time=(process_start_time(os.getpid()) or 0) + 12345)
    write_lock(tmp_path, stale)
    RunLock(tmp_path).acquire().release()


def test_other_hosts_count_by_heartbeat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    foreign = holder_of(1, host="node-elsewhere")
    write_lock(tmp_path, foreign, age_s=1.0)
    with pytest.raises(RunLockedError, match="pid 1 on host node-elsewhere"):
        RunLock(tmp_path, wait_for_foreign_s=0.3).acquire()
    write_lock(tmp_path, foreign, age_s=locking.STALE_AFTER_S + 5)
    RunLock(tmp_path, wait_for_foreign_s=0.3).acquire().release()
    assert "took over the stale lock of pid 1 on host node-elsewhere" in caplog.text


def test_release_leaves_a_lock_that_another_process_took_over(tmp_path: Path) -> None:
    lock = RunLock(tmp_path).acquire()
    write_lock(tmp_path, holder_of(os.getpid()))  # someone else's token now
    lock.release()
    assert (tmp_path / LOCK_FILE).exists()


def test_a_run_folder_that_cannot_be_made_is_reported(tmp_path: Path) -> None:
    """It used to end the command with a raw ``NotADirectoryError``/``PermissionError`` traceback."""
    (tmp_path / "a_file").write_text("")
    with pytest.raises(StorageError, match=r"cannot create the run folder .*a_file/run \(Not a directory\)"):
        RunLock(tmp_path / "a_file" / "run").acquire()


def test_a_listed_run_that_completes_while_the_index_is_read_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process completes a listed run (deleting its checkpoint) between the index's check and its
    sort by checkpoint time: that used to end this start with a raw ``FileNotFoundError``."""
    from helpers import TINY, compose_config
    from omegaconf import OmegaConf

    import cl_bench.run_folder as run_folder

    cfg = compose_config(*TINY, f"paths.output_dir={tmp_path / 'out'}")
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    listed = [tmp_path / "a", tmp_path / "b"]
    for folder in listed:
        folder.mkdir()
        run_folder.register(cfg, config, folder)
    (tmp_path / "a" / "checkpoint.json").write_text("{}")  # b's run completed just after the check
    monkeypatch.setattr(run_folder, "has_checkpoint", lambda folder: True)
    assert run_folder.indexed_runs(cfg, config) == listed


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_stale_lock_in_a_read_only_folder_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGKILLed run's lock in a folder now read-only (or full): taking it over used to raise a raw
    ``OSError`` from the takeover marker."""
    write_lock(tmp_path, holder_of(_dead_pid()))
    real_open = os.open

    def read_only(path, flags, *args):  # as Linux: an existing file is EEXIST, a new one EROFS
        if flags & os.O_CREAT and not os.path.lexists(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(locking.os, "open", read_only)
    with pytest.raises(StorageError, match=r"cannot take over the stale lock .* \(Read-only file system\)"):
        RunLock(tmp_path).acquire()


def test_an_indexed_run_in_a_folder_that_takes_no_writes_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """An interrupted run listed in the resume index whose folder became read-only (archived, a full disk)
    used to stop every later run of the config; it is skipped with a warning and the run starts afresh in
    its own folder."""
    from helpers import TINY, compose_config
    from omegaconf import OmegaConf

    import cl_bench.run_folder as run_folder

    cfg = compose_config(*TINY, f"paths.output_dir={tmp_path / 'out'}")
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    archived = tmp_path / "archived"
    archived.mkdir()
    run_folder.write_config(archived, config)
    (archived / "checkpoint.json").write_text("{}")
    run_folder.register(cfg, config, archived)
    acquire = RunLock.acquire

    def refuse_archived(lock: RunLock) -> RunLock:
        if lock.run_dir == archived:
            raise StorageError(f"cannot create {lock.path} (Read-only file system)")
        return acquire(lock)

    monkeypatch.setattr(RunLock, "acquire", refuse_archived)
    claim = run_folder.claim_run_folder(cfg, tmp_path / "new", config)
    claim.release()
    assert claim.run_dir == tmp_path / "new" and claim.checkpoint is None
    assert f"not resuming {archived}: cannot create" in caplog.text


@pytest.mark.slow
def test_concurrent_starts_in_one_folder_run_once(tmp_path: Path) -> None:
    """Issue 17.2: a second process with the same ``hydra.run.dir`` is refused (before writing anything)
    while the first runs; the first finishes alone with the uninterrupted results."""
    run_dir = tmp_path / "run"
    first, marker = start_paused(tmp_path, "training_step", 1, *RUN, f"hydra.run.dir={run_dir}")
    wait_for(marker, first)
    second = cl_bench(tmp_path, *RUN, f"hydra.run.dir={run_dir}")
    assert second.returncode == 2
    assert f"is in use by pid {first.pid} on host {socket.gethostname()}" in second.stderr
    marker.with_name(marker.name + ".go").touch()
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output
    reference = cl_bench(tmp_path, *RUN, f"hydra.run.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0
    assert same_results(results(run_dir), results(tmp_path / "reference"))
    assert leftovers(run_dir) == [] and len(list(run_dir.glob("wandb"))) == 0


@pytest.mark.slow
def test_two_reruns_of_a_killed_run_resume_it_once(tmp_path: Path) -> None:
    """Issue 17.2 with resumption: two processes rerun one killed run at the same time; one resumes it, the
    other is refused; the result equals an uninterrupted run's."""
    run_dir = tmp_path / "run"
    killed, marker = start_paused(tmp_path, "evaluation", 2, *RUN, f"hydra.run.dir={run_dir}")
    wait_for(marker, killed)
    killed.kill()
    killed.communicate(timeout=60)
    command = [sys.executable, "-m", "cl_bench", *RUN, f"hydra.run.dir={run_dir}"]
    from reliability.harness import env

    processes = [
        subprocess.Popen(
            command, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    codes = sorted(p.returncode for p in processes)
    assert codes[0] == 0, outputs
    loser = outputs[[p.returncode for p in processes].index(codes[1])]
    assert codes[1] == 2 and ("is in use by pid" in loser or "already holds a complete run" in loser), loser
    reference = cl_bench(tmp_path, *RUN, f"hydra.run.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0
    assert same_results(results(run_dir), results(tmp_path / "reference"))
    assert leftovers(run_dir) == []
