"""Datasets whose official release lists the split in text files.

* CUB-200-2011 (Wah et al. 2011): ``CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt,
  classes.txt, images/<class>/<image>.jpg}``; the official split (5,994 train / 5,794 test) that SLCA uses.
* Tiny-ImageNet (Stanford CS231n): ``tiny-imagenet-200/{wnids.txt, words.txt, train/<wnid>/images/*.JPEG,
  val/images/*.JPEG, val/val_annotations.txt}``; train (100,000) and the labelled val split (10,000) as test.
* DomainNet (Peng et al. 2019): ``<domain>_{train,test}.txt`` lists of ``<domain>/<class>/<image> <label>``.
* Oxford Flowers-102: ``jpg/``, ``imagelabels.mat``, ``setid.mat`` (official or a stratified split).
* Stanford Cars-196: the devkit's annotation ``.mat`` files (official split).
* ImageNet-R with the fixed 80/20 split files of CODA-Prompt (``imagenet-r_{train,test}.yaml``: ``data``,
  a list of ``data/imagenet-r/<wnid>/<image>`` paths, and ``targets``), the files Mammoth ships and
  prompt-based CL code loads; any dataset split by such a pair of files loads the same way.

Every loader takes ``cache_size``/``cache_dir``: decode once into a memory-mapped resized copy
(:func:`cl_bench.data.folders.with_cache`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cl_bench.data.base import ClassificationData
from cl_bench.data.folders import IMAGE_SUFFIXES, FileImages, with_cache
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


def load_cub(
    root: str,
    hflip_invariant: bool = True,
    crop_to_bbox: bool = False,
    cache_size: int | None = None,
    cache_dir: str | None = None,
) -> ClassificationData:
    """CUB-200-2011 with its official train/test split; class names from ``classes.txt``.

    ``crop_to_bbox`` crops every image to its ``bounding_boxes.txt`` box (x, y, width, height), as
    ConFiT's numbers (via Avalanche's ``CUB200``) silently do; full images are the harder benchmark.
    """
    base = Path(root).expanduser()
    names = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "images")
    names += ("bounding_boxes.txt",) if crop_to_bbox else ()
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
    boxes = (
        {row[0]: [float(v) for v in row[1:5]] for row in _table(base / "bounding_boxes.txt")}
        if crop_to_bbox
        else None
    )
    if boxes is not None and set(boxes) != set(paths):
        raise DataError(f"{base}: bounding_boxes.txt and images.txt list different ids")
    ids = sorted(paths, key=int)
    splits = []
    for want_train in (True, False):
        chosen = [i for i in ids if is_train[i] == want_train]
        splits.append(
            FileImages(
                [paths[i] for i in chosen],
                np.array([labels[i] for i in chosen]),
                str(base),
                None if boxes is None else np.array([boxes[i] for i in chosen]),
            )
        )
    data = ClassificationData("cub", splits[0], splits[1], class_names, hflip_invariant=hflip_invariant)
    return with_cache(data, cache_size, cache_dir, base / ".cl_bench_cache")


def load_tiny_imagenet(
    root: str, hflip_invariant: bool = True, cache_size: int | None = None, cache_dir: str | None = None
) -> ClassificationData:
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
    data = ClassificationData("tiny_imagenet", train, test, class_names, hflip_invariant=hflip_invariant)
    return with_cache(data, cache_size, cache_dir, base / ".cl_bench_cache")


DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


def load_domainnet(
    root: str,
    domains: list[str] | None = None,
    hflip_invariant: bool = True,
    cache_size: int | None = None,
    cache_dir: str | None = None,
) -> ClassificationData:
    """DomainNet (Peng et al. 2019; 345 classes) from its split lists ``<domain>_{train,test}.txt``.

    Each line is ``<domain>/<class>/<image> <label>``; the chosen domains (default: all six, as the
    class-incremental DomainNet of EASE/SAFE mixes them) are concatenated, and every image keeps its domain
    (``domain_names`` = the chosen domains, ``train_domains``/``test_domains``: per image) for
    ``scenario=dil``. Class names come from the paths.
    """
    base = Path(root).expanduser()
    chosen = list(domains or DOMAINNET_DOMAINS)
    unknown = sorted(set(chosen) - set(DOMAINNET_DOMAINS))
    if unknown:
        raise DataError(
            f"dataset.domains: unknown DomainNet domains {unknown}; choose from {list(DOMAINNET_DOMAINS)}"
        )
    lists = [base / f"{d}_{s}.txt" for d in chosen for s in ("train", "test")]
    _require(lists, "DomainNet", "https://ai.bu.edu/M3SDA/ (the images and the *_train.txt/*_test.txt lists)")
    names: dict[int, str] = {}
    splits, domain_ids = [], []
    for split in ("train", "test"):
        paths, labels, ids = [], [], []
        for k, domain in enumerate(chosen):
            for rel, label in _table(base / f"{domain}_{split}.txt"):
                paths.append(str(base / rel))
                labels.append(int(label))
                ids.append(k)
                names.setdefault(int(label), Path(rel).parent.name)
        splits.append(FileImages(paths, np.array(labels), f"{base} ({split})"))
        domain_ids.append(np.array(ids, dtype=np.int64))
    n_classes = max(names) + 1
    class_names = [names.get(k, f"class_{k}") for k in range(n_classes)]
    data = ClassificationData(
        "domainnet",
        splits[0],
        splits[1],
        class_names,
        hflip_invariant=hflip_invariant,
        domain_names=chosen,
        train_domains=domain_ids[0],
        test_domains=domain_ids[1],
    )
    return with_cache(data, cache_size, cache_dir, base / ".cl_bench_cache")


def load_flowers102(
    root: str,
    split: str = "official",
    test_fraction: float = 0.2,
    split_seed: int = 0,
    hflip_invariant: bool = True,
    cache_size: int | None = None,
    cache_dir: str | None = None,
) -> ClassificationData:
    """Oxford Flowers-102 (Nilsback & Zisserman 2008): ``jpg/``, ``imagelabels.mat`` and ``setid.mat``.

    ``split=official``: train = ``trnid`` + ``valid`` (2,040), test = ``tstid`` (6,149).
    ``split=stratified``: a stratified ``train_test_split`` of all 8,189 images (``test_fraction``,
    ``split_seed``), as ConFiT does (80/20, seed 0).
    """
    from scipy.io import loadmat

    base = Path(root).expanduser()
    _require(
        [base / "jpg", base / "imagelabels.mat", base / "setid.mat"],
        "Flowers-102",
        "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ (102flowers.tgz, imagelabels.mat, setid.mat)",
    )
    labels = loadmat(base / "imagelabels.mat")["labels"].ravel().astype(np.int64) - 1
    paths = np.array([str(base / "jpg" / f"image_{i:05d}.jpg") for i in range(1, len(labels) + 1)])
    if split == "official":
        ids = loadmat(base / "setid.mat")
        train_idx = np.sort(np.concatenate([ids["trnid"].ravel(), ids["valid"].ravel()])) - 1
        test_idx = np.sort(ids["tstid"].ravel()) - 1
    elif split == "stratified":
        from sklearn.model_selection import train_test_split

        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=test_fraction, random_state=split_seed, stratify=labels
        )
        train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    else:
        raise DataError(f"dataset.split={split!r}: use 'official' or 'stratified'")
    train = FileImages(list(paths[train_idx]), labels[train_idx], f"{base} (train)")
    test = FileImages(list(paths[test_idx]), labels[test_idx], f"{base} (test)")
    class_names = [f"flower_{k}" for k in range(int(labels.max()) + 1)]
    data = ClassificationData("flowers102", train, test, class_names, hflip_invariant=hflip_invariant)
    return with_cache(data, cache_size, cache_dir, base / ".cl_bench_cache")


def load_stanford_cars(
    root: str, hflip_invariant: bool = True, cache_size: int | None = None, cache_dir: str | None = None
) -> ClassificationData:
    """Stanford Cars-196 (Krause et al. 2013) with its official split (8,144 train / 8,041 test).

    Layout of the release: ``cars_train/``, ``cars_test/``, ``devkit/cars_train_annos.mat``,
    ``devkit/cars_meta.mat`` and ``cars_test_annos_withlabels.mat`` (annotations with 1-based ``class`` and
    ``fname``). SLCA's ``split_car.py`` may swap train and test (methods_vit.md, SLCA protocol); this loader
    keeps the official sides.
    """
    from scipy.io import loadmat

    base = Path(root).expanduser()
    needed = [
        base / "cars_train",
        base / "cars_test",
        base / "devkit" / "cars_train_annos.mat",
        base / "devkit" / "cars_meta.mat",
        base / "cars_test_annos_withlabels.mat",
    ]
    _require(
        needed,
        "Stanford Cars",
        "the Stanford Cars release (images, devkit and cars_test_annos_withlabels.mat)",
    )
    class_names = [
        str(n)
        for n in np.atleast_1d(loadmat(base / "devkit" / "cars_meta.mat", squeeze_me=True)["class_names"])
    ]
    splits = []
    for folder, annos in (
        ("cars_train", base / "devkit" / "cars_train_annos.mat"),
        ("cars_test", base / "cars_test_annos_withlabels.mat"),
    ):
        records = np.atleast_1d(loadmat(annos, squeeze_me=True)["annotations"])
        paths = [str(base / folder / str(r["fname"])) for r in records]
        labels = np.array([int(r["class"]) - 1 for r in records])
        splits.append(FileImages(paths, labels, str(base / folder)))
    data = ClassificationData(
        "stanford_cars", splits[0], splits[1], class_names, hflip_invariant=hflip_invariant
    )
    return with_cache(data, cache_size, cache_dir, base / ".cl_bench_cache")


def load_yaml_split(
    root: str,
    name: str = "imagenet_r_coda",
    train_file: str = "imagenet-r_train.yaml",
    test_file: str = "imagenet-r_test.yaml",
    path_prefix: str = "data/imagenet-r/",
    hflip_invariant: bool = True,
    get_it_from: str = "CODA-Prompt's dataloaders/splits/ or Mammoth's datasets/imagenet_r_utils/",
    cache_size: int | None = None,
    cache_dir: str | None = None,
) -> ClassificationData:
    """A dataset split by two YAML files ``{data: [path, ...], targets: [label, ...]}`` (CODA-Prompt's
    ImageNet-R split). Paths start with ``path_prefix``, which is replaced by ``root``; labels are the files'
    own (they are not the sorted folder order); a class's name is its folder (the WordNet id)."""
    import yaml

    base = Path(root).expanduser()
    _require([base / train_file, base / test_file], f"{name} split files", get_it_from)
    splits, folder_of = [], {}
    for file in (train_file, test_file):
        # the C loader when PyYAML has it: the real pair lists all 30,000 ImageNet-R images
        listing = yaml.load((base / file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if not isinstance(listing, dict) or len(listing.get("data", [])) != len(listing.get("targets", [1])):
            raise DataError(
                f"{base / file}: expected equally long lists 'data' (paths) and 'targets' (labels)"
            )
        paths = []
        for path, label in zip(listing["data"], listing["targets"]):
            if not path.startswith(path_prefix):
                raise DataError(f"{base / file}: {path} does not start with path_prefix {path_prefix!r}")
            relative = Path(path[len(path_prefix) :])
            if folder_of.setdefault(int(label), relative.parent.as_posix()) != relative.parent.as_posix():
                raise DataError(f"{base / file}: label {label} is given to images of two folders")
            paths.append(str(base / relative))
        missing = [q for q in paths[:: max(1, len(paths) // 50)] if not Path(q).is_file()]
        if missing:
            raise DataError(
                f"{name}: images listed in {base / file} are missing, e.g. {missing[0]}; unpack the dataset "
                f"so that {base}/<class folder>/<image> holds them (ImageNet-R: "
                "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar)"
            )
        splits.append(FileImages(paths, np.array(listing["targets"], dtype=np.int64), str(base)))
    if sorted(folder_of) != list(range(len(folder_of))):
        raise DataError(f"{name}: the labels in the split files are not 0..{len(folder_of) - 1}")
    class_names = [folder_of[k] for k in range(len(folder_of))]
    data = ClassificationData(name, splits[0], splits[1], class_names, hflip_invariant=hflip_invariant)
    return with_cache(data, cache_size, cache_dir, base / ".cl_bench_cache")
