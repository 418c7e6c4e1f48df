"""Datasets stored as image folders: ``ROOT/<train_dir>/<class>/<image>`` and ``ROOT/<test_dir>/<class>/...``.

This is the layout of the fixed train/test folders that the APER/RanPAC/SAFE line of work distributes for
ImageNet-R, ImageNet-A, CUB-200, OmniBenchmark and VTAB (Zhou et al. 2023, RevisitingCIL README), and of
any ``torchvision.datasets.ImageFolder``-style tree. Class ids follow the sorted folder names of the train
split; the test split must hold the same classes.

JPEG decoding dominates the cost of a continual run on a frozen or slowly tuned backbone. With
``cache_size`` set, the first load decodes every image once, resizes its shorter side to ``cache_size``,
centre-crops it to a square and stores the split as a memory-mapped uint8 array under
``cache_dir``; later runs (and every epoch) read that array instead of the JPEGs.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2 as T

from cl_bench.data.base import ArrayImages, ClassificationData
from cl_bench.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def decode_rgb(path: str) -> torch.Tensor:
    """Decode an image file into a uint8 ``[3, H, W]`` RGB tensor."""
    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        raise DataError(f"cannot decode image {path} ({exc}); remove or replace the file") from exc


class FileImages:
    """Labelled image files, decoded when accessed (same interface as :class:`ArrayImages`).

    ``boxes`` (optional, ``[N, 4]`` as x, y, width, height in pixels) crops each image to its box.
    """

    def __init__(
        self, paths: list[str], labels: np.ndarray, source: str, boxes: np.ndarray | None = None
    ) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.source = source
        self.boxes = None if boxes is None else np.asarray(boxes, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> torch.Tensor:
        image = decode_rgb(self.paths[index])
        if self.boxes is None:
            return image
        x, y, width, height = self.boxes[index]
        top, left = int(y), int(x)
        return image[:, top : top + max(1, int(height)), left : left + max(1, int(width))]


def _list_split(
    split_dir: Path, class_names: list[str] | None, exclude: tuple[str, ...] = ()
) -> tuple[list[str], np.ndarray, list[str]]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in exclude)
    if class_names is not None:
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise DataError(f"{split_dir} has class folders {unknown[:5]} that the train split lacks")
        classes = class_names
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = split_dir / name
        files = (
            sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if folder.is_dir()
            else []
        )
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"{split_dir} holds no images (expected {split_dir}/<class>/<image>.jpg)")
    return paths, np.asarray(labels, dtype=np.int64), classes


def _cache_file(cache_dir: Path, tag: str, images: FileImages, size: int) -> Path:
    key = "\n".join(images.paths)
    if images.boxes is not None:
        key += "\nboxes:" + images.boxes.tobytes().hex()
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return cache_dir / f"{tag}_{size}px_{digest}.npy"


def cached_resized(images: FileImages, size: int, cache_file: Path) -> ArrayImages:
    """``images`` resized (shorter side ``size``, centre crop) into a memory-mapped uint8 array on disk.

    Built once (into a temporary file renamed when complete, so an interrupted build is never used) and
    reused while the file list is the same (the name carries a hash of the paths).
    """
    if not cache_file.is_file():
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        resize = T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size)])
        tmp = cache_file.with_suffix(".partial.npy")
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(images), size, size, 3))
        log.info("caching %d images of %s at %d px into %s", len(images), images.source, size, cache_file)
        for i in range(len(images)):
            array[i] = resize(images.image(i)).permute(1, 2, 0).numpy()
        array.flush()
        del array
        tmp.replace(cache_file)
    return ArrayImages(np.load(cache_file, mmap_mode="r"), images.labels, source=f"{images.source} (cache)")


def with_cache(
    data: ClassificationData, cache_size: int | None, cache_dir: str | Path | None, default_dir: Path
) -> ClassificationData:
    """``data`` with both splits replaced by memory-mapped ``cache_size`` px copies (if ``cache_size``)."""
    if not cache_size:
        return data
    folder = Path(cache_dir).expanduser() if cache_dir else default_dir
    for split in ("train", "test"):
        images = getattr(data, split)
        setattr(
            data,
            split,
            cached_resized(images, cache_size, _cache_file(folder, split, images, cache_size)),
        )
    return data


def load_image_folders(
    root: str,
    train_dir: str = "train",
    test_dir: str = "test",
    hflip_invariant: bool = True,
    cache_size: int | None = None,
    cache_dir: str | None = None,
    get_it_from: str = "",
) -> ClassificationData:
    """Load ``root/<train_dir>/<class>/*`` and ``root/<test_dir>/<class>/*``.

    Args:
        root: the dataset folder.
        hflip_invariant: whether a horizontal flip keeps the label.
        cache_size: if set, decode once into a ``cache_size`` px memory-mapped copy (see module docstring).
        cache_dir: where the cached copies go (default ``root/.cl_bench_cache``).
        get_it_from: where to obtain the data, quoted in the error when the folder is missing.
    """
    base = Path(root).expanduser()
    train_path, test_path = base / train_dir, base / test_dir
    if not train_path.is_dir() or not test_path.is_dir():
        hint = f" Get it from {get_it_from}." if get_it_from else ""
        raise DataError(
            f"dataset folder not found: expected {train_path}/<class>/<image> "
            f"and {test_path}/<class>/<image>."
            f"{hint} Set paths.data_dir (or CL_BENCH_DATA) to the folder that contains {base.name}/, "
            f"or dataset.root to the dataset folder itself."
        )
    train_paths, train_labels, classes = _list_split(train_path, None)
    test_paths, test_labels, _ = _list_split(test_path, classes)
    train = FileImages(train_paths, train_labels, source=str(train_path))
    test = FileImages(test_paths, test_labels, source=str(test_path))
    data = ClassificationData(base.name, train, test, classes, hflip_invariant=hflip_invariant)
    return with_cache(data, cache_size, cache_dir, base / ".cl_bench_cache")


def load_split_image_folder(
    root: str,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    stratified: bool = True,
    exclude: list[str] | None = None,
    hflip_invariant: bool = True,
    cache_size: int | None = None,
    cache_dir: str | None = None,
    get_it_from: str = "",
) -> ClassificationData:
    """Load ``root/<class>/<image>`` (one folder, no official split) and split it into train/test.

    The split is ``sklearn.model_selection.train_test_split(test_size=test_fraction,
    random_state=split_seed, stratify=labels if stratified)`` over the images in sorted order: the
    stratified 80/20 split with seed 0 is what ConFiT uses for Caltech-101 and Flowers-102, and a random
    80/20 split of the raw release is what SLCA and LN tuning use for ImageNet-R (24,000 / 6,000 images).
    ``exclude`` drops class folders (Caltech-101's ``BACKGROUND_Google``).
    """
    from sklearn.model_selection import train_test_split

    base = Path(root).expanduser()
    if not base.is_dir():
        hint = f" Get it from {get_it_from}." if get_it_from else ""
        raise DataError(
            f"dataset folder not found: expected {base}/<class>/<image>.{hint} Set paths.data_dir (or "
            f"CL_BENCH_DATA) to the folder that contains {base.name}/, or dataset.root to the folder itself."
        )
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"dataset.test_fraction={test_fraction} must lie strictly between 0 and 1")
    paths, labels, classes = _list_split(base, None, tuple(exclude or ()))
    train_idx, test_idx = train_test_split(
        np.arange(len(paths)),
        test_size=test_fraction,
        random_state=split_seed,
        stratify=labels if stratified else None,
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    train = FileImages([paths[i] for i in train_idx], labels[train_idx], source=f"{base} (train split)")
    test = FileImages([paths[i] for i in test_idx], labels[test_idx], source=f"{base} (test split)")
    data = ClassificationData(base.name, train, test, classes, hflip_invariant=hflip_invariant)
    return with_cache(data, cache_size, cache_dir, base / ".cl_bench_cache")
