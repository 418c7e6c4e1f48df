"""Writing run files safely: a probe that the output folder takes writes, atomic writes that retry once and
never leave temporary files behind, and the clean-up of temporaries a killed process left.

Every file goes to ``.<name>.<random>.tmp`` in the same folder, is flushed to disk (``fsync``) and then
renamed over the target (``os.replace``), so a reader sees the old or the new file, never a torn one. A failed
write (``ENOSPC``, ``EDQUOT``, ``EIO``...) deletes its temporary file, waits a moment and tries once more;
a second failure raises :class:`~cl_bench.errors.StorageError` naming the file and the cause.

The small files a run folder holds (config, results, checkpoint manifest, lock, resume index entries) are
untrusted input: :func:`read_small_text` reads them only as regular files of bounded size, never through a
symbolic link, a FIFO or a device.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from cl_bench.errors import StorageError

log = logging.getLogger(__name__)

#: Bytes the writable probe writes and syncs before training (a full or read-only disk refuses them).
PROBE_BYTES = 1 << 16
#: Seconds between a failed write and its retry.
RETRY_DELAY_S = 1.0
#: The largest config, results, manifest, lock or index file read from an output folder (bytes).
MAX_SMALL_FILE = 16 << 20
#: Name patterns of this package's temporary files in a run folder.
TEMP_PATTERNS = (".*.tmp", ".writable-probe-*")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> str:
    """Write ``path`` through a temporary file (``write(fh)`` fills it), fsync and rename; returns the
    file's SHA-256. Retries once after a failure; then :class:`StorageError`."""
    path = Path(path)
    for attempt in (1, 2):
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        hashing: _HashingWriter | None = None
        try:
            with os.fdopen(fd, "wb") as raw:
                hashing = _HashingWriter(raw)
                write(hashing)  # type: ignore[arg-type]
                raw.flush()
                os.fsync(raw.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            return hashing.sha256.hexdigest()
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            # a writer may turn the file's OSError into its own error (torch.save: RuntimeError)
            error = hashing.error if hashing is not None and hashing.error is not None else exc
            if not isinstance(error, OSError):
                raise
            if attempt == 2:
                raise StorageError(
                    f"cannot write {path}: {error.strerror or error} (twice). Free space on that filesystem "
                    "(or raise the quota) and run the same command again."
                ) from exc
            log.warning("writing %s failed (%s); retrying once", path, error.strerror or error)
            time.sleep(RETRY_DELAY_S)
    raise AssertionError("unreachable")


class _HashingWriter:
    """A binary file wrapper that hashes what passes through it and keeps the first write error."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        #: The first OSError of a write, kept in case the caller's writer replaces it by another error.
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        try:
            return self.raw.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.raw.flush()

    def __getattr__(self, name: str):  # fileno, seek, tell, ... for writers that ask
        return getattr(self.raw, name)


def write_text(path: Path, text: str) -> None:
    """:func:`write_atomic` for text (UTF-8)."""
    write_atomic(path, lambda fh: fh.write(text.encode()))


def read_small_text(path: Path, limit: int = MAX_SMALL_FILE, errors: str = "strict") -> str:
    """The UTF-8 text of ``path``, a small file of an output folder (untrusted input): a regular file of at
    most ``limit`` bytes, not a symbolic link (a link is never followed out of the folder, a FIFO never
    blocks, a device or a huge file is never read). Raises ``OSError`` saying which of these it is, or
    ``UnicodeDecodeError`` (a ``ValueError``) for bytes that are not UTF-8 (``errors="replace"``: never)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symbolic link (never followed)", str(path)) from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return data.decode(errors=errors)


def read_small_json(path: Path, limit: int = MAX_SMALL_FILE) -> Any:
    """The JSON document in ``path`` (:func:`read_small_text`); ``ValueError`` for text that is not JSON or
    is nested too deeply for the parser (``[[[...]]]``: a ``RecursionError`` otherwise)."""
    text = read_small_text(path, limit)
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise ValueError(f"{path} is nested too deeply") from exc


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_writable(folder: Path) -> None:
    """Write, sync and delete a 64 KiB probe in ``folder``: a read-only or full filesystem is reported
    before any training (:class:`StorageError`)."""
    fd, name = -1, ""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".writable-probe-")
        block = memoryview(b"\0" * PROBE_BYTES)
        while block:  # a short write (a size limit) is followed by one that fails
            block = block[os.write(fd, block) :]
        os.fsync(fd)
    except OSError as exc:
        raise StorageError(
            f"the run folder {folder} does not take writes ({exc.strerror or exc}): free space on that "
            "filesystem or choose another paths.output_dir / hydra.run.dir before training"
        ) from exc
    finally:
        if fd >= 0:
            os.close(fd)
        if name:
            Path(name).unlink(missing_ok=True)


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete temporary files that a killed process left in ``folder`` (call it while holding the run's
    lock); returns them."""
    removed = []
    for pattern in TEMP_PATTERNS:
        for path in Path(folder).glob(pattern):
            if path.is_file():
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted write in %s", len(removed), folder)
    return removed
