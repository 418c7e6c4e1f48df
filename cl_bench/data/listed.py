"""Datasets whose official release lists the split in text files.

* CUB-200-2011 (Wah et al. 2011): ``CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt,
  classes.txt, images/<class>/<image>.jpg}``; the official split (5,994 train / 5,794 test) that SLCA uses.
* Tiny-ImageNet (Stanford CS231n): ``tiny-imagenet-200/{wnids.txt, words.txt, train/<wnid>/images/*.JPEG,
  val/images/*.JPEG, val/val_annotations.txt}``; train (100,000) and the labelled val split (10,000) as test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cl_bench.data.base import ClassificationData
from cl_bench.data.folders import IMAGE_SUFFIXES, FileImages
from cl_bench.errors import DataError


def _require(files: list[Path], what: str, get_it_from: str) -> None:
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise DataError(
            f"{what} not found: missing {', '.join(missing[:4])}. Get it from {get_it_from} and set "
            "paths.data_dir (or CL_BENCH_DATA) to the folder that contains it."
        )


def _table(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def load_cub(root: str, hflip_invariant: bool = True) -> ClassificationData:
    """CUB-200-2011 with its official train/test split; class names from ``classes.txt``."""
    base = Path(root).expanduser()
    names = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "images")
    _require(
        [base / n for n in names], "CUB-200-2011", "https://www.vision.caltech.edu/datasets/cub_200_2011/"
    )
    paths = {i: str(base / "images" / p) for i, p in _table(base / "images.txt")}
    labels = {i: int(c) - 1 for i, c in _table(base / "image_class_labels.txt")}
    is_train = {i: flag == "1" for i, flag in _table(base / "train_test_split.txt")}
    class_names = [name for _, name in sorted(_table(base / "classes.txt"), key=lambda row: int(row[0]))]
    if set(paths) != set(labels) or set(paths) != set(is_train):
        raise DataError(
            f"{base}: images.txt, image_class_labels.txt and train_test_split.txt list different ids"
        )
    ids = sorted(paths, key=int)
    splits = []
    for want_train in (True, False):
        chosen = [i for i in ids if is_train[i] == want_train]
        splits.append(
            FileImages([paths[i] for i in chosen], np.array([labels[i] for i in chosen]), str(base))
        )
    return ClassificationData("cub", splits[0], splits[1], class_names, hflip_invariant=hflip_invariant)


def load_tiny_imagenet(root: str, hflip_invariant: bool = True) -> ClassificationData:
    """Tiny-ImageNet: 200 classes (ids in ``wnids.txt`` order); the val split is the test set."""
    base = Path(root).expanduser()
    needed = [
        base / "wnids.txt",
        base / "train",
        base / "val" / "val_annotations.txt",
        base / "val" / "images",
    ]
    _require(needed, "Tiny-ImageNet", "http://cs231n.stanford.edu/tiny-imagenet-200.zip")
    wnids = [row[0] for row in _table(base / "wnids.txt")]
    index = {w: k for k, w in enumerate(wnids)}
    words = {}
    if (base / "words.txt").is_file():
        for line in (base / "words.txt").read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid] = text.split(",")[0].strip()
    train_paths, train_labels = [], []
    for wnid in wnids:
        folder = base / "train" / wnid / "images"
        files = (
            sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if folder.is_dir()
            else []
        )
        if not files:
            raise DataError(
                f"{folder} holds no images; Tiny-ImageNet's train/<wnid>/images/*.JPEG is incomplete"
            )
        train_paths += files
        train_labels += [index[wnid]] * len(files)
    test_paths, test_labels = [], []
    for row in _table(base / "val" / "val_annotations.txt"):
        if row[1] not in index:
            raise DataError(f"val_annotations.txt names class {row[1]} that wnids.txt lacks")
        test_paths.append(str(base / "val" / "images" / row[0]))
        test_labels.append(index[row[1]])
    train = FileImages(train_paths, np.array(train_labels), str(base / "train"))
    test = FileImages(test_paths, np.array(test_labels), str(base / "val"))
    class_names = [words.get(w, w) for w in wnids]
    return ClassificationData("tiny_imagenet", train, test, class_names, hflip_invariant=hflip_invariant)
