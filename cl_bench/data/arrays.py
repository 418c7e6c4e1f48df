"""Datasets stored as NumPy arrays: any ``.npz`` with ``x_train, y_train, x_test, y_test``.

A compressed archive (``numpy.savez_compressed``; ``shared/data/cifar100.npz`` is LZMA-compressed and takes
about 8 s to decode on one core) is decoded once: each large member is copied, byte for byte, into
``dataset.cache_dir`` (default ``$XDG_CACHE_HOME/cl_bench/npz``, i.e. ``~/.cache/cl_bench/npz``) and later
runs memory-map that copy. A copy is used only while its size and CRC-32 equal the archive member's (its
name carries both), so a changed archive or a damaged copy is decoded again; ``dataset.cache=false`` always
decodes.
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
import zlib
from pathlib import Path

import numpy as np

from cl_bench.data.base import ArrayImages, ClassificationData
from cl_bench.errors import DataError

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
#: Keys tried, in order, for the class names (``fine_label_names`` is what ``shared/data/cifar100.npz`` uses).
CLASS_NAME_KEYS = ("class_names", "fine_label_names", "label_names")
#: Compressed members at least this large (decoded) are cached; small ones decode in milliseconds.
CACHE_MIN_BYTES = 16 * 2**20


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cl_bench" / "npz"


def _file_crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(2**24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _member(arrays: np.lib.npyio.NpzFile, key: str, file: Path, cache_dir: Path | None) -> np.ndarray:
    """Array ``key`` of the archive: decoded in memory, or memory-mapped from its decoded copy in
    ``cache_dir`` (made on first use) when the member is compressed and large."""
    info = arrays.zip.getinfo(f"{key}.npy")
    if cache_dir is None or info.compress_type == zipfile.ZIP_STORED or info.file_size < CACHE_MIN_BYTES:
        return arrays[key]
    copy = cache_dir / f"{file.stem}-{key}-{info.file_size}-{info.CRC:08x}.npy"
    if copy.is_file():
        if copy.stat().st_size == info.file_size and _file_crc32(copy) == info.CRC:
            return np.load(copy, mmap_mode="r", allow_pickle=False)
        log.warning("%s does not match %s:%s (damaged): decoding it again", copy, file, key)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = copy.with_name(f".{copy.name}.{os.getpid()}.partial")
        with arrays.zip.open(info) as source, partial.open("wb") as target:
            shutil.copyfileobj(source, target, 2**24)  # the zip checks the member's CRC as it reads
        os.replace(partial, copy)
    except OSError as exc:  # a read-only or full cache folder: decode in memory, as without a cache
        log.warning("cannot cache %s:%s in %s (%s); decoding it in memory", file, key, cache_dir, exc)
        return arrays[key]
    log.info("decoded %s:%s once into %s (memory-mapped from now on)", file, key, copy)
    return np.load(copy, mmap_mode="r", allow_pickle=False)


def load_npz(
    path: str, hflip_invariant: bool = True, cache: bool = True, cache_dir: str | None = None
) -> ClassificationData:
    """Load an arrays file.

    Images are uint8, ``[N,H,W,3]`` (HWC RGB) or ``[N,H,W]`` (greyscale, expanded to RGB); labels are
    integers ``0..C-1``. Class names come from the first of :data:`CLASS_NAME_KEYS` present, else
    ``class_0 .. class_{C-1}``. ``cache``/``cache_dir``: the decoded copies of a compressed archive's large
    members (module docstring; ``cache_dir`` null: :func:`default_cache_dir`).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(
            f"npz dataset file not found: {file}. Pass dataset.path=/path/to/file.npz holding arrays "
            f"{', '.join(REQUIRED_KEYS)} (uint8 images [N,H,W,3] or [N,H,W], integer labels)."
        )
    try:
        arrays = np.load(file, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{file} is not a readable .npz file ({exc}); re-create it with numpy.savez") from exc
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise DataError(f"{file} holds a single array, not an .npz archive; save one with numpy.savez")
    keys = set(arrays.files)
    missing = [k for k in REQUIRED_KEYS if k not in keys]
    if missing:
        raise DataError(
            f"{file} lacks arrays {missing} (it has {sorted(keys)}); "
            f"an npz dataset needs {list(REQUIRED_KEYS)}"
        )
    try:
        folder = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) if cache else None
        train = ArrayImages(
            _member(arrays, "x_train", file, folder), arrays["y_train"], source=f"{file}:train"
        )
        test = ArrayImages(_member(arrays, "x_test", file, folder), arrays["y_test"], source=f"{file}:test")
        name_key = next((k for k in CLASS_NAME_KEYS if k in keys), None)
        names = None if name_key is None else [str(n) for n in arrays[name_key]]
    except (ValueError, OSError, zipfile.BadZipFile) as exc:  # object arrays, truncated members
        raise DataError(
            f"{file}: cannot read its arrays ({exc}); store images and labels as plain numeric arrays "
            "and class names as a unicode string array (numpy.savez(..., class_names=np.array(names)))"
        ) from exc
    if names is None:
        n_classes = int(max(train.labels.max(), test.labels.max())) + 1
        names = [f"class_{i}" for i in range(n_classes)]
    return ClassificationData(file.stem, train, test, names, hflip_invariant=hflip_invariant)
