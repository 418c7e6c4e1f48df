"""scikit-learn's digits as a small real dataset (cl_bench/data/digits.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cl_bench.data.digits import load_digits
from cl_bench.errors import ConfigError

# Images per digit in sklearn's copy of the UCI optdigits test set.
CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
# round(0.2 * count) per class
TEST_COUNTS = [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]


def test_sizes_and_classes() -> None:
    """1,797 images, a stratified 20% test split, 10 classes named '0'..'9'."""
    data = load_digits()
    assert data.name == "digits"
    assert len(data.train) + len(data.test) == 1797
    assert len(data.test) == sum(TEST_COUNTS) == 359
    assert len(data.train) == 1438
    assert data.class_names == [str(d) for d in range(10)]
    assert np.bincount(data.test.labels, minlength=10).tolist() == TEST_COUNTS
    train_counts = np.bincount(data.train.labels, minlength=10)
    assert (train_counts + np.bincount(data.test.labels, minlength=10)).tolist() == CLASS_COUNTS
    assert (train_counts > 0).all()


def test_images_uint8_rgb_greyscale() -> None:
    """32x32 uint8 images spanning the 0-255 range, greyscale replicated to 3 channels."""
    data = load_digits()
    images = data.train.images
    assert images.shape == (1438, 32, 32, 3)
    assert images.dtype == np.uint8
    assert images.min() == 0
    assert images.max() > 240  # the 0-16 scale is stretched to 0-255
    np.testing.assert_array_equal(images[..., 0], images[..., 2])


def test_size_param() -> None:
    """``size`` sets the side; at 8 px the pixels are the original 0-16 values scaled to 0-255."""
    from sklearn.datasets import load_digits as sklearn_digits

    small = load_digits(size=8)
    assert small.train.images.shape[1:] == (8, 8, 3)
    assert load_digits(size=16).test.images.shape[1:] == (16, 16, 3)
    original = np.round(sklearn_digits().images * (255.0 / 16.0))
    total = sum(int(split.images[..., 0].astype(np.int64).sum()) for split in (small.train, small.test))
    assert total == int(original.sum())
    assert small.train.images.max() == 255


def test_not_hflip_invariant() -> None:
    """Mirrored digits change meaning, so the dataset says so."""
    assert load_digits().hflip_invariant is False


def test_split_reproducible_and_independent_of_global_rng() -> None:
    """The split depends only on split_seed, not on NumPy's or torch's global state."""
    np.random.seed(0)
    torch.manual_seed(0)
    a = load_digits(size=8)
    np.random.seed(12345)
    torch.manual_seed(999)
    np.random.rand(10)
    b = load_digits(size=8)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    c = load_digits(size=8, split_seed=1)
    assert len(c.test) == len(a.test)
    assert not np.array_equal(a.test.images, c.test.images)


def test_test_fraction() -> None:
    """test_fraction sets the per-class test share and must lie in (0, 1)."""
    data = load_digits(size=8, test_fraction=0.5)
    assert len(data.test) == sum(int(round(0.5 * n)) for n in CLASS_COUNTS)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match="test_fraction"):
            load_digits(test_fraction=bad)


def test_read_digits_equals_scikit_learn() -> None:
    """The bundled file read directly gives scikit-learn's images and labels exactly."""
    from sklearn.datasets import load_digits as sklearn_digits

    from cl_bench.data.digits import read_digits

    images, labels = read_digits()
    bunch = sklearn_digits()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)
