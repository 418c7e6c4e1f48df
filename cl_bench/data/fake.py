"""Random images from torchvision's ``FakeData``, for tests and smoke runs (nothing to learn)."""

from __future__ import annotations

import numpy as np
from torchvision.datasets import FakeData

from cl_bench.data.base import ArrayImages, ClassificationData


def _materialise(n: int, num_classes: int, image_size: int, offset: int) -> ArrayImages:
    fake = FakeData(
        size=n, image_size=(3, image_size, image_size), num_classes=num_classes, random_offset=offset
    )
    images = np.stack([np.asarray(fake[i][0], dtype=np.uint8) for i in range(n)])
    # Balanced labels (FakeData draws them at random, which can leave a class without test images).
    labels = np.arange(n, dtype=np.int64) % num_classes
    return ArrayImages(images, labels, source="fake")


def load_fake(
    num_classes: int = 10, train_per_class: int = 8, test_per_class: int = 4, image_size: int = 32
) -> ClassificationData:
    """``num_classes`` classes of random RGB images, balanced per class, deterministic."""
    train = _materialise(num_classes * train_per_class, num_classes, image_size, offset=0)
    test = _materialise(num_classes * test_per_class, num_classes, image_size, offset=10**6)
    return ClassificationData("fake", train, test, [f"class_{i}" for i in range(num_classes)])
