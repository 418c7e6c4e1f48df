"""CUB-200-2011 and Tiny-ImageNet from tiny trees in their official layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torchvision.io import encode_jpeg, encode_png

from cl_bench.data.listed import load_cub, load_tiny_imagenet, load_yaml_split
from cl_bench.errors import DataError


def jpeg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        encode_jpeg(torch.full((3, 12, 12), value, dtype=torch.uint8), quality=100).numpy().tobytes()
    )


def test_cub_official_split(tmp_path: Path) -> None:
    root = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    rows, labels, split = [], [], []
    for i in range(1, 7):  # ids 1..6: class = (i-1)//3, train = odd ids
        rel = f"{classes[(i - 1) // 3]}/img_{i}.jpg"
        jpeg(root / "images" / rel, 40 * i)
        rows.append(f"{i} {rel}")
        labels.append(f"{i} {(i - 1) // 3 + 1}")
        split.append(f"{i} {i % 2}")
    (root / "images.txt").write_text("\n".join(rows) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "classes.txt").write_text("2 002.Laysan_Albatross\n1 001.Black_footed_Albatross\n")
    data = load_cub(str(root))
    assert data.class_names == classes
    assert data.train.labels.tolist() == [0, 0, 1] and data.test.labels.tolist() == [0, 1, 1]
    assert [Path(p).name for p in data.train.paths] == ["img_1.jpg", "img_3.jpg", "img_5.jpg"]
    assert abs(int(data.test.image(0).float().mean()) - 80) <= 1  # id 2
    cached = load_cub(str(root), cache_size=8)
    assert cached.train.images.shape == (3, 8, 8, 3) and cached.test.labels.tolist() == [0, 1, 1]
    assert abs(int(cached.test.image(0).float().mean()) - 80) <= 1


def test_cub_crop_to_bounding_box(tmp_path: Path) -> None:
    """ConFiT's CUB (via Avalanche) crops each image to bounding_boxes.txt (x, y, width, height)."""
    root = tmp_path / "CUB_200_2011"
    image = torch.zeros(3, 12, 16, dtype=torch.uint8)
    image[:, 2:7, 3:11] = 200  # the bird: rows 2..6, columns 3..10
    path = root / "images" / "001.A/a.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(encode_png(image).numpy().tobytes())
    (root / "images.txt").write_text("1 001.A/a.png\n")
    (root / "image_class_labels.txt").write_text("1 1\n")
    (root / "train_test_split.txt").write_text("1 1\n")
    (root / "classes.txt").write_text("1 001.A\n")
    with pytest.raises(DataError, match="bounding_boxes.txt"):
        load_cub(str(root), crop_to_bbox=True)
    (root / "bounding_boxes.txt").write_text("1 3.0 2.0 8.0 5.0\n")
    cropped = load_cub(str(root), crop_to_bbox=True).train.image(0)
    assert cropped.shape == (3, 5, 8) and bool((cropped == 200).all())
    assert load_cub(str(root)).train.image(0).shape == (3, 12, 16)
    full_cache = load_cub(str(root), cache_size=4, cache_dir=str(tmp_path / "c"))
    crop_cache = load_cub(str(root), crop_to_bbox=True, cache_size=4, cache_dir=str(tmp_path / "c"))
    assert bool((crop_cache.train.image(0) == 200).all()) and not bool(
        (full_cache.train.image(0) == 200).all()
    )


def test_cub_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"CUB-200-2011 not found: missing .*images\.txt.*caltech"):
        load_cub(str(tmp_path / "CUB_200_2011"))


def test_tiny_imagenet_train_and_val(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02124075", "n01443537"]
    (root / "val" / "images").mkdir(parents=True)
    root.joinpath("wnids.txt").write_text("\n".join(wnids) + "\n")
    root.joinpath("words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn02124075\tEgyptian cat\n")
    for k, wnid in enumerate(wnids):
        for j in range(3):
            jpeg(root / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", 50 * k + j)
    annotations = []
    for j, wnid in enumerate([wnids[1], wnids[0], wnids[1]]):
        jpeg(root / "val" / "images" / f"val_{j}.JPEG", 100 + j)
        annotations.append(f"val_{j}.JPEG\t{wnid}\t0\t0\t11\t11")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    data = load_tiny_imagenet(str(root))
    assert data.class_names == ["Egyptian cat", "goldfish"]
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.test.labels.tolist() == [1, 0, 1]
    assert data.test.image(2).shape == (3, 12, 12)
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="n99999999"):
        load_tiny_imagenet(str(root))


def test_domainnet_lists_mix_domains(tmp_path: Path) -> None:
    from cl_bench.data.listed import load_domainnet

    root = tmp_path / "domainnet"
    for domain in ("real", "sketch"):
        for split, items in (
            ("train", [("aircraft_carrier", 0), ("zebra", 344)]),
            ("test", [("zebra", 344)]),
        ):
            lines = []
            for k, (name, label) in enumerate(items):
                rel = f"{domain}/{name}/{domain}_{split}_{k}.jpg"
                jpeg(root / rel, label % 200)
                lines.append(f"{rel} {label}")
            (root / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
    data = load_domainnet(str(root), domains=["real", "sketch"])
    assert (
        len(data.class_names) == 345
        and data.class_names[0] == "aircraft_carrier"
        and data.class_names[344] == "zebra"
    )
    assert data.train.labels.tolist() == [0, 344, 0, 344] and len(data.test) == 2
    with pytest.raises(DataError, match="clipart_train.txt"):
        load_domainnet(str(root))
    with pytest.raises(DataError, match="unknown DomainNet domains"):
        load_domainnet(str(root), domains=["photos"])


def test_domainnet_images_keep_their_domain(tmp_path: Path) -> None:
    from helpers import write_domainnet

    from cl_bench.data.listed import load_domainnet

    root = tmp_path / "domainnet"
    write_domainnet(root, ["real", "sketch", "clipart"], ["apple", "bus"], n_train=3, n_test=2)
    data = load_domainnet(str(root), domains=["sketch", "real", "clipart"])
    assert data.domain_names == ["sketch", "real", "clipart"] and data.class_names == ["apple", "bus"]
    for split, ids in (("train", data.train_domains), ("test", data.test_domains)):
        images = getattr(data, split)
        assert len(ids) == len(images) == 3 * 2 * (3 if split == "train" else 2)
        folders = [Path(p).relative_to(root).parts[0] for p in images.paths]
        assert folders == [data.domain_names[i] for i in ids]
        assert data.domain_indices(split, "real").tolist() == [
            k for k, f in enumerate(folders) if f == "real"
        ]


def test_flowers102_official_and_stratified_splits(tmp_path: Path) -> None:
    import numpy as np
    from scipy.io import savemat

    from cl_bench.data.listed import load_flowers102

    root = tmp_path / "flowers102"
    labels = np.repeat([1, 2, 3], 10)  # 30 images, 1-based labels as in imagelabels.mat
    for i in range(1, 31):
        jpeg(root / "jpg" / f"image_{i:05d}.jpg", i)
    savemat(root / "imagelabels.mat", {"labels": labels[None, :]})
    savemat(
        root / "setid.mat",
        {
            "trnid": np.array([[1, 11, 21]]),
            "valid": np.array([[2, 12, 22]]),
            "tstid": np.array([[3, 4, 5, 13, 14, 23]]),
        },
    )
    official = load_flowers102(str(root))
    assert official.train.labels.tolist() == [0, 0, 1, 1, 2, 2] and len(official.test) == 6
    assert Path(official.test.paths[0]).name == "image_00003.jpg"
    stratified = load_flowers102(str(root), split="stratified")
    assert (len(stratified.train), len(stratified.test)) == (24, 6)
    assert np.bincount(stratified.test.labels).tolist() == [2, 2, 2]


def test_stanford_cars_from_devkit_annotations(tmp_path: Path) -> None:
    import numpy as np
    from scipy.io import savemat

    from cl_bench.data.listed import load_stanford_cars

    root = tmp_path / "stanford_cars"
    (root / "devkit").mkdir(parents=True)
    fields = [
        ("bbox_x1", "O"),
        ("bbox_y1", "O"),
        ("bbox_x2", "O"),
        ("bbox_y2", "O"),
        ("class", "O"),
        ("fname", "O"),
    ]

    def annotations(folder: str, items: list[tuple[str, int]]) -> np.ndarray:
        for k, (name, _) in enumerate(items):
            jpeg(root / folder / name, 30 * k)
        return np.array([(0, 0, 9, 9, cls, name) for name, cls in items], dtype=fields)

    savemat(
        root / "devkit" / "cars_train_annos.mat",
        {"annotations": annotations("cars_train", [("00001.jpg", 2), ("00002.jpg", 1)])},
    )
    savemat(
        root / "cars_test_annos_withlabels.mat",
        {"annotations": annotations("cars_test", [("00001.jpg", 1), ("00002.jpg", 2), ("00003.jpg", 2)])},
    )
    savemat(
        root / "devkit" / "cars_meta.mat",
        {"class_names": np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012"], dtype=object)},
    )
    data = load_stanford_cars(str(root))
    assert data.class_names == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    assert data.train.labels.tolist() == [1, 0] and data.test.labels.tolist() == [0, 1, 1]
    assert data.test.paths[2].endswith("cars_test/00003.jpg")


def _coda_tree(tmp_path: Path) -> Path:
    """ImageNet-R unpacked under imagenet-r/<wnid>/ with CODA-Prompt's two split files beside it; the files'
    labels are not the sorted folder order (n02 is 0, n01 is 1), as in the real files."""
    root = tmp_path / "imagenet-r"
    lists = {"train": ([], []), "test": ([], [])}
    for label, wnid in enumerate(["n02", "n01"]):
        for k in range(5):
            jpeg(root / wnid / f"art_{k}.jpg", 30 * label + 10 * k)
            paths, targets = lists["train" if k < 4 else "test"]
            paths.append(f"data/imagenet-r/{wnid}/art_{k}.jpg")
            targets.append(label)
    for split, (paths, targets) in lists.items():
        (root / f"imagenet-r_{split}.yaml").write_text(yaml.safe_dump({"data": paths, "targets": targets}))
    return root


def test_imagenet_r_coda_split_files(tmp_path: Path) -> None:
    root = _coda_tree(tmp_path)
    data = load_yaml_split(str(root))
    assert data.num_classes == 2 and data.class_names == ["n02", "n01"]
    assert len(data.train) == 8 and len(data.test) == 2
    assert data.train.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and data.test.labels.tolist() == [0, 1]
    assert [Path(p).relative_to(root).as_posix() for p in data.test.paths] == [
        "n02/art_4.jpg",
        "n01/art_4.jpg",
    ]
    assert abs(int(data.test.image(1).float().mean()) - 70) <= 1  # n01/art_4: 30 + 40

    from helpers import compose_config

    from cl_bench.config import build_from_config

    cfg = compose_config("dataset=imagenet_r_coda", f"paths.data_dir={tmp_path}")
    assert build_from_config("dataset", cfg.dataset).class_names == ["n02", "n01"]


def test_imagenet_r_coda_bad_files_are_explained(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="imagenet-r_train.yaml.*CODA-Prompt"):
        load_yaml_split(str(tmp_path / "imagenet-r"), get_it_from="CODA-Prompt's dataloaders/splits/")
    root = _coda_tree(tmp_path)
    (root / "n01" / "art_0.jpg").unlink()
    with pytest.raises(DataError, match="missing, e.g. .*n01/art_0.jpg"):
        load_yaml_split(str(root))
    jpeg(root / "n01" / "art_0.jpg", 0)
    listing = yaml.safe_load((root / "imagenet-r_test.yaml").read_text())
    listing["targets"] = [1, 1]  # n02's image labelled as n01's class
    (root / "imagenet-r_test.yaml").write_text(yaml.safe_dump(listing))
    with pytest.raises(DataError, match="label 1 is given to images of two folders"):
        load_yaml_split(str(root))
