"""CIFAR-10 and CIFAR-100 in the official python format (Krizhevsky 2009).

The folder is read directly: each pickle holds ``data`` as ``[N, 3072]`` uint8 rows in CHW order and the
labels (``fine_labels`` for CIFAR-100, ``labels`` for CIFAR-10); the meta file holds the class names.
torchvision's downloader fetches the folder when it is absent and ``download`` is true.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cl_bench.data.base import ArrayImages, ClassificationData
from cl_bench.errors import DataError


@dataclass(frozen=True)
class CifarLayout:
    name: str
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    url: str


CIFAR100 = CifarLayout(
    "cifar100",
    "CIFAR-100",
    "cifar-100-python",
    ("train",),
    ("test",),
    "meta",
    "fine_labels",
    "fine_label_names",
    100,
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
)
CIFAR10 = CifarLayout(
    "cifar10",
    "CIFAR-10",
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("test_batch",),
    "batches.meta",
    "labels",
    "label_names",
    10,
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
)


def _read_pickle(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            return pickle.load(fh, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise DataError(
            f"{path} is not a readable CIFAR pickle ({exc}); delete the folder and download it again"
        ) from exc


def _split(folder: Path, files: tuple[str, ...], label_key: str) -> ArrayImages:
    data, labels = [], []
    for name in files:
        entry = _read_pickle(folder / name)
        if "data" not in entry or label_key not in entry:
            raise DataError(f"{folder / name} lacks 'data'/'{label_key}': not a CIFAR python pickle")
        data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(entry[label_key]))
    return ArrayImages(np.concatenate(data), np.concatenate(labels), source=str(folder))


def _download(layout: CifarLayout, root: Path) -> None:
    from torchvision.datasets import CIFAR10 as TorchCIFAR10
    from torchvision.datasets import CIFAR100 as TorchCIFAR100

    dataset = TorchCIFAR100 if layout is CIFAR100 else TorchCIFAR10
    try:
        dataset(str(root), train=True, download=True)
    except Exception as exc:  # URLError, socket errors, checksum failures
        raise DataError(
            f"{layout.title} is not in {root / layout.folder} and could not be downloaded ({exc}). Download "
            f"and unpack {layout.url} so that {root / layout.folder}/ holds "
            f"{', '.join(layout.train_files + layout.test_files + (layout.meta_file,))}, then set "
            "paths.data_dir (or CL_BENCH_DATA) to that root; for CIFAR-100 dataset=cifar100_npz also works."
        ) from exc


def load_cifar(layout: CifarLayout, root: str, download: bool) -> ClassificationData:
    base = Path(root).expanduser()
    folder = base / layout.folder
    needed = [folder / f for f in (*layout.train_files, *layout.test_files, layout.meta_file)]
    if not all(p.is_file() for p in needed):
        if not download:
            raise DataError(
                f"{layout.title} not found: expected {', '.join(str(p) for p in needed)}. "
                f"Unpack {layout.url} "
                f"into {base}, or set dataset.download=true on a machine with network."
            )
        _download(layout, base)
    meta = _read_pickle(folder / layout.meta_file)
    class_names = [str(n) for n in meta.get(layout.names_key, [])]
    if len(class_names) != layout.num_classes:
        raise DataError(
            f"{folder / layout.meta_file} must list {layout.num_classes} {layout.names_key}, "
            f"found {len(class_names)}"
        )
    train = _split(folder, layout.train_files, layout.label_key)
    test = _split(folder, layout.test_files, layout.label_key)
    return ClassificationData(layout.name, train, test, class_names)


def load_cifar100(root: str, download: bool = True) -> ClassificationData:
    """CIFAR-100 (50,000 train / 10,000 test, 100 fine classes) from ``root/cifar-100-python``."""
    return load_cifar(CIFAR100, root, download)


def load_cifar10(root: str, download: bool = True) -> ClassificationData:
    """CIFAR-10 (50,000 train / 10,000 test, 10 classes) from ``root/cifar-10-batches-py``."""
    return load_cifar(CIFAR10, root, download)
