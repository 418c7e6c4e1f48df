"""Random images for smoke runs (cl_bench/data/fake.py)."""

from __future__ import annotations

import numpy as np

from cl_bench.data.fake import load_fake


def test_shapes_and_names() -> None:
    """Sizes follow the per-class counts; images are uint8 HWC RGB."""
    data = load_fake(num_classes=5, train_per_class=3, test_per_class=2, image_size=16)
    assert (len(data.train), len(data.test)) == (15, 10)
    assert data.train.images.shape == (15, 16, 16, 3)
    assert data.test.images.shape == (10, 16, 16, 3)
    assert data.train.images.dtype == np.uint8
    assert data.class_names == [f"class_{i}" for i in range(5)]
    assert data.num_classes == 5


def test_balanced_labels() -> None:
    """Every class gets exactly train_per_class / test_per_class images."""
    data = load_fake(num_classes=7, train_per_class=4, test_per_class=3, image_size=8)
    assert np.bincount(data.train.labels, minlength=7).tolist() == [4] * 7
    assert np.bincount(data.test.labels, minlength=7).tolist() == [3] * 7


def test_deterministic_and_splits_differ() -> None:
    """Two calls give identical data; train and test images are different draws; images are not constant."""
    a = load_fake(num_classes=3, train_per_class=2, test_per_class=2, image_size=8)
    b = load_fake(num_classes=3, train_per_class=2, test_per_class=2, image_size=8)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.images, b.test.images)
    assert not np.array_equal(a.train.images[:6], a.test.images[:6])
    assert not np.array_equal(a.train.images[0], a.train.images[1])
    assert a.train.images.std() > 10
