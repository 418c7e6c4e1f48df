"""scikit-learn's bundled handwritten digits (UCI optdigits test set, 1,797 8x8 images, 10 classes).

Real data that needs no download, used by the quickstart. The 8x8 greyscale images (values 0-16) are
scaled to 0-255, upscaled to ``size`` px (bilinear) and split per class into train/test with a fixed seed,
independent of the run's seed so that every run sees the same split.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cl_bench.data.base import ArrayImages, ClassificationData
from cl_bench.errors import ConfigError, DataError


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images [1797, 8, 8] float64 in 0..16, labels [1797])`` read from scikit-learn's bundled
    ``digits.csv.gz`` as ``sklearn.datasets.load_digits`` reads it, without importing scikit-learn (about a
    second of start-up)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "dataset=digits reads the digits file bundled with scikit-learn: pip install scikit-learn"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(
            f"{path} is missing: reinstall scikit-learn (pip install --force-reinstall scikit-learn)"
        )
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def load_digits(size: int = 32, test_fraction: float = 0.2, split_seed: int = 0) -> ClassificationData:
    """Load the digits as a stratified train/test split of ``size`` x ``size`` greyscale images."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"dataset.test_fraction={test_fraction} must lie strictly between 0 and 1")
    raw, labels = read_digits()
    small = torch.from_numpy(raw.astype(np.float32) * (255.0 / 16.0))[:, None]
    big = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    images = big[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()

    rng = np.random.RandomState(split_seed)
    test_mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = max(1, int(round(test_fraction * len(idx))))
        test_mask[rng.permutation(idx)[:n_test]] = True
    train = ArrayImages(images[~test_mask], labels[~test_mask], source="digits:train")
    test = ArrayImages(images[test_mask], labels[test_mask], source="digits:test")
    return ClassificationData("digits", train, test, [str(d) for d in range(10)], hflip_invariant=False)
