"""Datasets stored as NumPy arrays: any ``.npz`` with ``x_train, y_train, x_test, y_test``."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from cl_bench.data.base import ArrayImages, ClassificationData
from cl_bench.errors import DataError

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
#: Keys tried, in order, for the class names (``fine_label_names`` is what ``shared/data/cifar100.npz`` uses).
CLASS_NAME_KEYS = ("class_names", "fine_label_names", "label_names")


def load_npz(path: str, hflip_invariant: bool = True) -> ClassificationData:
    """Load an arrays file.

    Images are uint8, ``[N,H,W,3]`` (HWC RGB) or ``[N,H,W]`` (greyscale, expanded to RGB); labels are
    integers ``0..C-1``. Class names come from the first of :data:`CLASS_NAME_KEYS` present, else
    ``class_0 .. class_{C-1}``.
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
        train = ArrayImages(arrays["x_train"], arrays["y_train"], source=f"{file}:train")
        test = ArrayImages(arrays["x_test"], arrays["y_test"], source=f"{file}:test")
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
