"""CIFAR-100 from the official python pickles (cl_bench/data/cifar.py), on a small fake folder."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets

from cl_bench.data.cifar import CIFAR10, CIFAR100, load_cifar10, load_cifar100
from cl_bench.errors import DataError

FOLDER = CIFAR100.folder
SOURCE_URL = CIFAR100.url

FINE_NAMES = [f"fine_{i:02d}" for i in range(100)]
COARSE_NAMES = [f"coarse_{i:02d}" for i in range(20)]


def _split_dict(n: int, seed: int, name: str) -> dict[str, object]:
    """One split in the official layout: ``data`` uint8 [N, 3072] rows in CHW order, lists of labels."""
    rng = np.random.RandomState(seed)
    return {
        "filenames": [f"img_{i}.png" for i in range(n)],
        "batch_label": f"{name} batch 1 of 1",
        "fine_labels": [int(v) for v in np.arange(n) % 100],
        "coarse_labels": [int(v) for v in np.arange(n) % 20],
        "data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
    }


def _dump(obj: object, path: Path) -> None:
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def make_cifar_folder(root: Path, n_train: int = 200, n_test: int = 100) -> dict[str, dict[str, object]]:
    """Write ``root/cifar-100-python/{train,test,meta}`` and return the train/test dicts."""
    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": _split_dict(n_train, 0, "training"), "test": _split_dict(n_test, 1, "testing")}
    for name, entry in splits.items():
        _dump(entry, folder / name)
    _dump({"fine_label_names": FINE_NAMES, "coarse_label_names": COARSE_NAMES}, folder / "meta")
    return splits


def test_load_official_format(tmp_path: Path) -> None:
    """Sizes, labels and names come from the pickles; HWC pixel (h,w,c) = row[c*1024 + h*32 + w]."""
    splits = make_cifar_folder(tmp_path)
    data = load_cifar100(str(tmp_path), download=False)
    assert data.name == "cifar100"
    assert (len(data.train), len(data.test)) == (200, 100)
    assert data.class_names == FINE_NAMES
    assert data.num_classes == 100
    assert data.train.images.shape == (200, 32, 32, 3)
    assert data.train.images.dtype == np.uint8
    assert data.train.labels.tolist() == splits["train"]["fine_labels"]
    assert data.test.labels.tolist() == splits["test"]["fine_labels"]
    for split, images in (("train", data.train.images), ("test", data.test.images)):
        rows = splits[split]["data"]
        assert isinstance(rows, np.ndarray)
        for i, c, h, w in [(0, 0, 0, 0), (3, 1, 5, 7), (57, 2, 31, 0), (99, 2, 31, 31), (42, 0, 17, 30)]:
            assert images[i, h, w, c] == rows[i, c * 1024 + h * 32 + w]
        # the whole array, against an independent per-pixel layout
        planes = [rows[:, c * 1024 : (c + 1) * 1024].reshape(-1, 32, 32) for c in range(3)]
        expected = np.stack(planes, axis=-1)
        np.testing.assert_array_equal(images, expected)
    # ArrayImages.image gives back CHW, i.e. the row reshaped
    chw = data.train.image(5).numpy()
    np.testing.assert_array_equal(chw.reshape(-1), splits["train"]["data"][5])  # type: ignore[index]


def test_missing_folder_without_download(tmp_path: Path) -> None:
    """download=False and no folder: DataError naming the expected files and the source URL."""
    with pytest.raises(DataError) as info:
        load_cifar100(str(tmp_path), download=False)
    msg = str(info.value)
    assert str(tmp_path / FOLDER / "train") in msg
    assert str(tmp_path / FOLDER / "meta") in msg
    assert SOURCE_URL in msg


def test_incomplete_folder_without_download(tmp_path: Path) -> None:
    """A folder missing one of its three files counts as absent."""
    make_cifar_folder(tmp_path)
    (tmp_path / FOLDER / "test").unlink()
    with pytest.raises(DataError, match="CIFAR-100 not found"):
        load_cifar100(str(tmp_path), download=False)


def test_download_failure_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed download is a DataError naming the folder and saying what to do."""
    calls: list[tuple[str, bool, bool]] = []

    def offline(root: str, train: bool = True, download: bool = False, **_: object) -> None:
        calls.append((root, train, download))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(DataError) as info:
        load_cifar100(str(tmp_path), download=True)
    assert calls == [(str(tmp_path), True, True)]
    msg = str(info.value)
    assert str(tmp_path / FOLDER) in msg
    assert "name resolution" in msg
    assert SOURCE_URL in msg
    assert "paths.data_dir" in msg
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_download_fills_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the download succeeds, the freshly unpacked folder is read."""

    def fake_download(root: str, train: bool = True, download: bool = False, **_: object) -> None:
        make_cifar_folder(Path(root), n_train=100, n_test=100)

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake_download)
    data = load_cifar100(str(tmp_path), download=True)
    assert (len(data.train), len(data.test)) == (100, 100)


def test_existing_folder_is_not_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """download=True does not touch the network when the files are there."""

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("download attempted although the folder exists")

    make_cifar_folder(tmp_path)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", must_not_run)
    assert len(load_cifar100(str(tmp_path), download=True).train) == 200


def test_corrupt_pickle(tmp_path: Path) -> None:
    """An unreadable pickle (e.g. an interrupted download) is a DataError naming the file."""
    make_cifar_folder(tmp_path)
    train = tmp_path / FOLDER / "train"
    train.write_bytes(train.read_bytes()[:1000])
    with pytest.raises(DataError, match="not a readable CIFAR pickle") as info:
        load_cifar100(str(tmp_path), download=False)
    assert str(train) in str(info.value)


def test_wrong_number_of_names(tmp_path: Path) -> None:
    """meta must list 100 fine class names."""
    make_cifar_folder(tmp_path)
    _dump({"fine_label_names": FINE_NAMES[:10]}, tmp_path / FOLDER / "meta")
    with pytest.raises(DataError, match="100 fine_label_names, found 10"):
        load_cifar100(str(tmp_path), download=False)


def test_split_without_fine_labels(tmp_path: Path) -> None:
    """A pickle without 'fine_labels' (e.g. CIFAR-10's 'labels') is rejected."""
    make_cifar_folder(tmp_path)
    entry = _split_dict(10, 0, "testing")
    entry["labels"] = entry.pop("fine_labels")
    _dump(entry, tmp_path / FOLDER / "test")
    with pytest.raises(DataError, match="lacks 'data'/'fine_labels'"):
        load_cifar100(str(tmp_path), download=False)


def test_cifar10_official_batches(tmp_path: Path) -> None:
    """CIFAR-10: five train batches + test_batch with ``labels``, names from ``batches.meta``."""
    folder = tmp_path / CIFAR10.folder
    folder.mkdir()
    rng = np.random.RandomState(0)
    batches = []
    for name in (*CIFAR10.train_files, *CIFAR10.test_files):
        entry = {
            "data": rng.randint(0, 256, (20, 3072)).astype(np.uint8),
            "labels": [i % 10 for i in range(20)],
        }
        _dump(entry, folder / name)
        batches.append(entry)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump({"label_names": names, "num_cases_per_batch": 20}, folder / "batches.meta")
    data = load_cifar10(str(tmp_path), download=False)
    assert (len(data.train), len(data.test), data.class_names) == (100, 20, names)
    row = batches[3]["data"][5]  # 4th train batch, 6th image = train index 65
    assert data.train.images[65, 7, 9, 2] == row[2 * 1024 + 7 * 32 + 9]
    assert data.test.labels.tolist() == [i % 10 for i in range(20)]
    with pytest.raises(DataError, match="cifar-10-batches-py/data_batch_1"):
        load_cifar10(str(tmp_path / "elsewhere"), download=False)
