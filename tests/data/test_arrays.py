"""The ``.npz`` dataset loader (cl_bench/data/arrays.py)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import SHARED_DATA

from cl_bench.data.arrays import load_npz
from cl_bench.errors import DataError

CIFAR100_NPZ = SHARED_DATA / "cifar100.npz"


def _arrays(n_train: int = 6, n_test: int = 3, classes: int = 3, grey: bool = False) -> dict[str, np.ndarray]:
    """Tiny random uint8 images with labels cycling through ``classes``."""
    rng = np.random.RandomState(0)
    shape = (8, 6) if grey else (8, 6, 3)
    return {
        "x_train": rng.randint(0, 256, (n_train, *shape)).astype(np.uint8),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.randint(0, 256, (n_test, *shape)).astype(np.uint8),
        "y_test": np.arange(n_test) % classes,
    }


def _write(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_rgb_hwc(tmp_path: Path) -> None:
    """HWC RGB images are kept as they are; labels become int64; default names class_i."""
    arrays = _arrays()
    data = load_npz(str(_write(tmp_path / "toy.npz", **arrays)))
    assert data.name == "toy"
    assert data.train.images.shape == (6, 8, 6, 3)
    assert data.test.images.shape == (3, 8, 6, 3)
    np.testing.assert_array_equal(data.train.images, arrays["x_train"])
    np.testing.assert_array_equal(data.test.images, arrays["x_test"])
    assert data.train.labels.dtype == np.int64
    assert data.train.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert data.class_names == ["class_0", "class_1", "class_2"]
    assert data.num_classes == 3
    assert data.hflip_invariant is True
    # ArrayImages.image gives CHW uint8.
    img = data.train.image(4)
    assert img.shape == (3, 8, 6)
    assert img[2, 7, 5].item() == arrays["x_train"][4, 7, 5, 2]


def test_default_names_cover_labels_of_both_splits(tmp_path: Path) -> None:
    """Without names the class count is the largest label of train or test, plus one."""
    arrays = _arrays(classes=2)
    arrays["y_test"] = np.array([0, 4, 1])
    data = load_npz(str(_write(tmp_path / "t.npz", **arrays)))
    assert data.class_names == [f"class_{i}" for i in range(5)]


def test_greyscale_expanded_to_rgb(tmp_path: Path) -> None:
    """HW greyscale images become HWC with three equal channels."""
    arrays = _arrays(grey=True)
    data = load_npz(str(_write(tmp_path / "grey.npz", **arrays)), hflip_invariant=False)
    assert data.train.images.shape == (6, 8, 6, 3)
    for c in range(3):
        np.testing.assert_array_equal(data.train.images[..., c], arrays["x_train"])
        np.testing.assert_array_equal(data.test.images[..., c], arrays["x_test"])
    assert data.hflip_invariant is False


@pytest.mark.parametrize("key", ["class_names", "fine_label_names", "label_names"])
def test_class_names_from_file(tmp_path: Path, key: str) -> None:
    """Class names come from any of the known keys."""
    arrays = _arrays()
    data = load_npz(str(_write(tmp_path / "n.npz", **arrays, **{key: np.array(["cat", "dog", "emu"])})))
    assert data.class_names == ["cat", "dog", "emu"]


def test_class_names_key_priority(tmp_path: Path) -> None:
    """class_names wins over fine_label_names."""
    arrays = _arrays()
    names = {"class_names": np.array(["a", "b", "c"]), "fine_label_names": np.array(["x", "y", "z"])}
    path = _write(tmp_path / "n.npz", **arrays, **names)
    assert load_npz(str(path)).class_names == ["a", "b", "c"]


def test_missing_file(tmp_path: Path) -> None:
    """The message names the path and the arrays the file must hold."""
    path = tmp_path / "nope.npz"
    with pytest.raises(DataError) as info:
        load_npz(str(path))
    msg = str(info.value)
    assert str(path) in msg
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert key in msg


def test_missing_keys(tmp_path: Path) -> None:
    """Missing arrays are named."""
    arrays = _arrays()
    del arrays["y_test"], arrays["x_test"]
    with pytest.raises(DataError) as info:
        load_npz(str(_write(tmp_path / "m.npz", **arrays)))
    msg = str(info.value)
    assert "'x_test'" in msg and "'y_test'" in msg
    assert "lacks" in msg


def test_non_uint8_images(tmp_path: Path) -> None:
    """Float images are rejected with the dtype in the message."""
    arrays = _arrays()
    arrays["x_train"] = arrays["x_train"].astype(np.float32)
    with pytest.raises(DataError, match="uint8.*float32"):
        load_npz(str(_write(tmp_path / "f.npz", **arrays)))


@pytest.mark.parametrize("shape", [(6, 8, 6, 4), (6, 8, 6, 1), (6, 48), (6, 1, 8, 6, 3)])
def test_wrong_image_shape(tmp_path: Path, shape: tuple[int, ...]) -> None:
    """Images that are neither [N,H,W,3] nor [N,H,W] are rejected, with the shape in the message."""
    arrays = _arrays()
    arrays["x_train"] = np.zeros(shape, dtype=np.uint8)
    with pytest.raises(DataError, match=r"\[N,H,W,3\]") as info:
        load_npz(str(_write(tmp_path / "s.npz", **arrays)))
    assert str(shape) in str(info.value)


def test_label_count_mismatch(tmp_path: Path) -> None:
    """As many labels as images."""
    arrays = _arrays()
    arrays["y_test"] = np.array([0, 1])
    with pytest.raises(DataError, match="labels must be a 1-d array of 3 ints"):
        load_npz(str(_write(tmp_path / "l.npz", **arrays)))


def test_float_labels(tmp_path: Path) -> None:
    """Labels must be integers."""
    arrays = _arrays()
    arrays["y_train"] = arrays["y_train"].astype(np.float64)
    with pytest.raises(DataError, match="integers"):
        load_npz(str(_write(tmp_path / "fl.npz", **arrays)))


def test_labels_beyond_class_names(tmp_path: Path) -> None:
    """A label without a class name is rejected."""
    arrays = _arrays()
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\)"):
        load_npz(str(_write(tmp_path / "b.npz", **arrays, class_names=np.array(["a", "b"]))))


def test_corrupt_file(tmp_path: Path) -> None:
    """A file that is no zip archive is a DataError naming the file."""
    path = tmp_path / "corrupt.npz"
    path.write_bytes(b"this is not a zip archive at all" * 10)
    with pytest.raises(DataError, match="not a readable .npz") as info:
        load_npz(str(path))
    assert str(path) in str(info.value)


def test_truncated_zip(tmp_path: Path) -> None:
    """A truncated archive (interrupted copy) is a DataError."""
    good = _write(tmp_path / "good.npz", **_arrays())
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(good.read_bytes()[:100])
    with pytest.raises(DataError, match="truncated.npz"):
        load_npz(str(bad))


def test_plain_npy_file_is_a_data_error(tmp_path: Path) -> None:
    """A single-array ``.npy`` given as the dataset path is malformed input: DataError, not AttributeError."""
    path = tmp_path / "images.npy"
    np.save(path, _arrays()["x_train"])
    with pytest.raises(DataError, match="images.npy"):
        load_npz(str(path))


def test_object_array_is_a_data_error(tmp_path: Path) -> None:
    """An array that needs pickle (object dtype) is malformed input: DataError, not NumPy's ValueError."""
    arrays = _arrays()
    path = _write(tmp_path / "obj.npz", **arrays, class_names=np.array(["a", "b", "c"], dtype=object))
    with pytest.raises(DataError, match="obj.npz"):
        load_npz(str(path))


@pytest.mark.skipif(not CIFAR100_NPZ.is_file(), reason=f"{CIFAR100_NPZ} not present (build machines only)")
def test_shared_cifar100_npz() -> None:
    """The shared CIFAR-100 arrays: 50,000/10,000 32x32 RGB images, 100 fine classes starting with apple."""
    data = load_npz(str(CIFAR100_NPZ))
    assert data.name == "cifar100"
    assert (len(data.train), len(data.test)) == (50000, 10000)
    assert data.num_classes == 100
    assert data.class_names[0] == "apple"
    assert data.class_names[-1] == "worm"
    assert data.train.images.shape == (50000, 32, 32, 3)
    assert data.test.images.shape == (10000, 32, 32, 3)
    assert np.bincount(data.train.labels, minlength=100).tolist() == [500] * 100
    assert np.bincount(data.test.labels, minlength=100).tolist() == [100] * 100


def _compressed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, np.ndarray]]:
    """A ``savez_compressed`` archive whose image members count as large (the cache threshold lowered)."""
    import cl_bench.data.arrays as arrays_module

    monkeypatch.setattr(arrays_module, "CACHE_MIN_BYTES", 1)
    arrays = _arrays(n_train=40, n_test=10)
    np.savez_compressed(tmp_path / "c.npz", **arrays)
    return tmp_path / "c.npz", arrays


def test_a_compressed_archive_is_decoded_once_then_memory_mapped(tmp_path: Path, monkeypatch) -> None:
    file, arrays = _compressed(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    first = load_npz(str(file), cache_dir=str(cache))
    copies = sorted(p.name for p in cache.iterdir())
    assert len(copies) == 2 and all(name.startswith("c-x_") for name in copies)  # the two image members
    opened: list[str] = []
    original = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(getattr(name, "filename", name))
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    second = load_npz(str(file), cache_dir=str(cache))
    assert "x_train.npy" not in opened and "x_test.npy" not in opened  # read from the copies
    for data in (first, second):
        assert isinstance(data.train.images, np.memmap)
        np.testing.assert_array_equal(data.train.images, arrays["x_train"])
        np.testing.assert_array_equal(data.test.images, arrays["x_test"])


def test_a_damaged_copy_is_decoded_again(tmp_path: Path, monkeypatch, caplog) -> None:
    file, arrays = _compressed(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    load_npz(str(file), cache_dir=str(cache))
    (copy,) = cache.glob("c-x_train-*.npy")
    raw = bytearray(copy.read_bytes())
    raw[-1] ^= 0xFF  # same size, one image byte changed
    copy.write_bytes(bytes(raw))
    data = load_npz(str(file), cache_dir=str(cache))
    assert "does not match" in caplog.text
    np.testing.assert_array_equal(data.train.images, arrays["x_train"])


def test_no_cache_or_an_unusable_cache_folder_decodes_in_memory(tmp_path: Path, monkeypatch, caplog) -> None:
    file, arrays = _compressed(tmp_path, monkeypatch)
    data = load_npz(str(file), cache=False, cache_dir=str(tmp_path / "unused"))
    assert not isinstance(data.train.images, np.memmap) and not (tmp_path / "unused").exists()
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    data = load_npz(str(file), cache_dir=str(blocked))
    assert "cannot cache" in caplog.text
    np.testing.assert_array_equal(data.test.images, arrays["x_test"])
