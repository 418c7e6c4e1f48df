"""CIFAR-100 in the official python format (``cifar-100-python/{train,test,meta}``).

The folder is read directly (the pickles hold ``data`` as ``[N, 3072]`` uint8 rows in CHW order,
``fine_labels`` and, in ``meta``, ``fine_label_names``); torchvision's downloader fetches it when the
folder is absent and ``download`` is true.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from cl_bench.data.base import ArrayImages, ClassificationData
from cl_bench.errors import DataError

FOLDER = "cifar-100-python"
SOURCE_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


def _read_pickle(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            return pickle.load(fh, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise DataError(
            f"{path} is not a readable CIFAR pickle ({exc}); delete the folder and download it again"
        ) from exc


def _split(folder: Path, split: str) -> ArrayImages:
    entry = _read_pickle(folder / split)
    if "data" not in entry or "fine_labels" not in entry:
        raise DataError(f"{folder / split} lacks 'data'/'fine_labels': not a CIFAR-100 python pickle")
    data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ArrayImages(data, np.asarray(entry["fine_labels"]), source=f"{folder / split}")


def _download(root: Path) -> None:
    from torchvision.datasets import CIFAR100

    try:
        CIFAR100(str(root), train=True, download=True)
    except Exception as exc:  # URLError, socket errors, checksum failures
        raise DataError(
            f"CIFAR-100 is not in {root / FOLDER} and could not be downloaded ({exc}). Download and unpack "
            f"{SOURCE_URL} so that {root / FOLDER}/train, test and meta exist, then set "
            "paths.data_dir (or CL_BENCH_DATA) to that root; or use dataset=cifar100_npz."
        ) from exc


def load_cifar100(root: str, download: bool = True) -> ClassificationData:
    """Load CIFAR-100 (50,000 train / 10,000 test, 100 fine classes) from ``root/cifar-100-python``."""
    base = Path(root).expanduser()
    folder = base / FOLDER
    needed = [folder / f for f in ("train", "test", "meta")]
    if not all(p.is_file() for p in needed):
        if not download:
            raise DataError(
                f"CIFAR-100 not found: expected {', '.join(str(p) for p in needed)}. Unpack {SOURCE_URL} "
                f"into {base}, or set dataset.download=true on a machine with network."
            )
        _download(base)
    meta = _read_pickle(folder / "meta")
    class_names = [str(n) for n in meta.get("fine_label_names", [])]
    if len(class_names) != 100:
        raise DataError(f"{folder / 'meta'} must list 100 fine_label_names, found {len(class_names)}")
    return ClassificationData("cifar100", _split(folder, "train"), _split(folder, "test"), class_names)
