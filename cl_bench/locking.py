"""An exclusive lock on a run folder: one process at a time writes a run's files.

``running.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and NFSv3+), before the
run writes anything, for fresh and resumed runs alike. It holds JSON naming its holder: host, pid, the
process's start time (so that a recycled pid is not mistaken for the holder) and the boot id. While the run
lives a background thread touches the file every :data:`HEARTBEAT_S` seconds.

A second process that finds the lock:

* refuses to start (:class:`~cl_bench.errors.RunLockedError`, naming the holder) while the holder lives:
  on the same host the pid exists with the same start time; on another host the heartbeat is younger than
  :data:`STALE_AFTER_S` seconds (it waits up to that long to see whether it moves: a job requeued on another
  node right after a SIGKILL then takes the folder over instead of failing);
* takes a stale lock over (a killed job's), with a log line naming the dead holder. The takeover itself is
  serialised by a second exclusive file, so two processes never both take the same stale lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cl_bench.errors import RunLockedError, StorageError
from cl_bench.storage import read_small_json

log = logging.getLogger(__name__)

LOCK_FILE = "running.lock"
#: Seconds between two touches of the lock file by its holder.
HEARTBEAT_S = 30.0
#: A lock of another host whose heartbeat is older than this counts as stale.
STALE_AFTER_S = 120.0
#: A takeover marker older than this was left by a process that died while taking a lock over.
TAKEOVER_STALE_S = 30.0


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks after boot (Linux ``/proc``), or ``None``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may contain spaces: split after the last ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of proc(5), the 20th after the command name and state
    except (IndexError, ValueError):
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock (the file's content)."""

    host: str
    pid: int
    start_time: int | None
    boot_id: str | None
    token: str
    acquired: float

    @classmethod
    def me(cls) -> LockHolder:
        pid = os.getpid()
        return cls(
            socket.gethostname(), pid, process_start_time(pid), _boot_id(), uuid.uuid4().hex, time.time()
        )

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.acquired))
        return f"pid {self.pid} on host {self.host} (since {started})"

    def alive_on_this_host(self) -> bool:
        """Whether the holder (same host) still runs: same pid, same start time, same boot."""
        if self.boot_id is not None and self.boot_id != _boot_id():
            return False
        if not _pid_exists(self.pid):
            return False
        return self.start_time is None or process_start_time(self.pid) in (None, self.start_time)


def read_holder(path: Path) -> LockHolder | None:
    """The holder written in ``path``; ``None`` if the file is gone or unreadable (a torn or foreign file)."""
    try:
        data = read_small_json(path)
        return LockHolder(
            host=str(data["host"]),
            pid=int(data["pid"]),
            start_time=None if data.get("start_time") is None else int(data["start_time"]),
            boot_id=None if data.get("boot_id") is None else str(data["boot_id"]),
            token=str(data["token"]),
            acquired=float(data["acquired"]),
        )
    except (OSError, ValueError, TypeError, KeyError):
        return None


class RunLock:
    """The lock of one run folder; :meth:`acquire` then :meth:`release` (or use it as a context manager)."""

    def __init__(self, run_dir: Path, wait_for_foreign_s: float = STALE_AFTER_S) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.wait_for_foreign_s = wait_for_foreign_s
        self.holder: LockHolder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- acquire
    def _create(self) -> bool:
        """Create the lock file exclusively with this process as holder; ``False`` if it exists."""
        holder = LockHolder.me()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageError(
                f"cannot create {self.path} ({exc.strerror}): the output folder is not writable. "
                "Check paths.output_dir / hydra.run.dir, the permissions and the free space."
            ) from exc
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(asdict(holder)) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            self.path.unlink(missing_ok=True)
            raise StorageError(
                f"cannot write {self.path} ({exc.strerror}): the output folder is full or not writable"
            ) from exc
        self.holder = holder
        return True

    def _is_live(self, holder: LockHolder) -> bool:
        """Whether ``holder`` still runs (other hosts: watch the heartbeat for a while)."""
        if holder.host == socket.gethostname():
            return holder.alive_on_this_host()
        deadline = time.monotonic() + self.wait_for_foreign_s
        first = None
        while True:
            try:
                mtime = self.path.stat().st_mtime
            except FileNotFoundError:
                return False
            age = time.time() - mtime
            if age > STALE_AFTER_S:
                return False
            if first is not None and mtime != first:
                return True  # the heartbeat moved
            first = mtime if first is None else first
            if time.monotonic() >= deadline:
                return True
            log.info(
                "%s is held by %s on another host; waiting for its heartbeat (%.0f s old)",
                self.path,
                holder.describe(),
                age,
            )
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))

    def _take_over(self, stale: LockHolder | None) -> bool:
        """Replace a stale lock by ours, serialised by an exclusive takeover marker."""
        marker = self.run_dir / f"{LOCK_FILE}.takeover"
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - marker.stat().st_mtime > TAKEOVER_STALE_S:
                    marker.unlink()
            return False
        except OSError as exc:
            raise StorageError(
                f"cannot take over the stale lock {self.path} ({exc.strerror}): the folder is not writable. "
                "Check the permissions and the free space."
            ) from exc
        os.close(fd)
        try:
            if read_holder(self.path) != stale:
                return False  # someone else took it over meanwhile
            self.path.unlink(missing_ok=True)
            return self._create()
        finally:
            marker.unlink(missing_ok=True)

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunLockedError` naming the live holder."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create the run folder {self.run_dir} ({exc.strerror or exc}). Check "
                "paths.output_dir / paths.run_dir / hydra.run.dir and the permissions."
            ) from exc
        for _ in range(50):
            if self._create():
                self._start_heartbeat()
                return self
            holder = read_holder(self.path)
            if holder is None:
                # a lock file that is being written (or torn by a crash mid-write): give it a moment
                time.sleep(0.1)
                holder = read_holder(self.path)
                if holder is None and self.path.exists() and time.time() - self.path.stat().st_mtime < 5:
                    continue
            if holder is not None and self._is_live(holder):
                raise RunLockedError(
                    f"{self.run_dir} is in use by {holder.describe()}: another cl-bench process is running "
                    f"this run now. Wait for it to finish, or stop it; if it is dead on another host, its "
                    f"lock counts as stale {STALE_AFTER_S:.0f} s after its last heartbeat."
                )
            if self._take_over(holder):
                who = holder.describe() if holder is not None else "an unreadable lock file"
                log.warning("took over the stale lock of %s in %s (that process is gone)", who, self.run_dir)
                self._start_heartbeat()
                return self
            time.sleep(0.1)
        raise RunLockedError(f"could not take the lock {self.path}: other processes keep competing for it")

    # ----------------------------------------------------------------- heartbeat and release
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="cl_bench-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def owned(self) -> bool:
        """Whether the lock file still names this process (not taken over, not deleted)."""
        current = read_holder(self.path)
        return self.holder is not None and current is not None and current.token == self.holder.token

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.owned():
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.holder = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
