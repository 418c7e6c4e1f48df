"""Image-folder datasets (cl_bench/data/folders.py) on tiny generated trees in the exact layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg, write_png
from torchvision.transforms import v2 as T

from cl_bench.data import folders
from cl_bench.data.folders import load_image_folders
from cl_bench.errors import DataError

CLASSES = ["n01443537", "n01484850", "n01494475"]


def make_tree(root: Path, per_class: dict[str, int], size: tuple[int, int] = (40, 30)) -> None:
    """``root/<split>/<class>/img_k.{png,jpg}``: class c's images are filled with value 60 * c + k."""
    for split, n in per_class.items():
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(n):
                image = torch.full((3, *size), 60 * c + k, dtype=torch.uint8)
                if k % 2:
                    (folder / f"img_{k}.jpg").write_bytes(encode_jpeg(image, quality=100).numpy().tobytes())
                else:
                    write_png(image, str(folder / f"img_{k}.png"))
        (root / split / CLASSES[0] / "notes.txt").write_text("not an image")


def test_counts_labels_names_and_split(tmp_path: Path) -> None:
    make_tree(tmp_path / "imagenet-r", {"train": 4, "test": 2})
    data = load_image_folders(str(tmp_path / "imagenet-r"))
    assert data.class_names == CLASSES and data.name == "imagenet-r"
    assert (len(data.train), len(data.test)) == (12, 6)
    assert data.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    image = data.train.image(5)  # class 1, img_1.jpg
    assert image.shape == (3, 40, 30) and image.dtype == torch.uint8
    assert abs(int(image.float().mean()) - 61) <= 1
    assert data.test.image(0).unique().tolist() == [0]


def test_missing_folder_names_layout_and_source(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_image_folders(str(tmp_path / "cub"), get_it_from="the APER README links")
    message = str(err.value)
    assert f"{tmp_path / 'cub' / 'train'}/<class>/<image>" in message
    assert "the APER README links" in message and "paths.data_dir" in message


def test_test_split_with_an_unknown_class_is_rejected(tmp_path: Path) -> None:
    make_tree(tmp_path / "d", {"train": 1, "test": 1})
    (tmp_path / "d" / "test" / "n09999999").mkdir()
    with pytest.raises(DataError, match="n09999999"):
        load_image_folders(str(tmp_path / "d"))


def test_empty_split_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    (tmp_path / "d" / "test" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_image_folders(str(tmp_path / "d"))


def test_corrupt_image_is_a_data_error(tmp_path: Path) -> None:
    make_tree(tmp_path / "d", {"train": 1, "test": 1})
    bad = tmp_path / "d" / "train" / CLASSES[1] / "img_0.png"
    bad.write_bytes(b"not a png")
    data = load_image_folders(str(tmp_path / "d"))
    with pytest.raises(DataError, match="cannot decode image .*img_0.png"):
        data.train.image(1)


def test_cache_decodes_once_and_matches_a_fresh_resize(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path / "d", {"train": 2, "test": 1}, size=(48, 32))
    plain = load_image_folders(str(tmp_path / "d"))
    cached = load_image_folders(str(tmp_path / "d"), cache_size=16, cache_dir=str(tmp_path / "cache"))
    assert sorted(p.name.split("_")[0] for p in (tmp_path / "cache").glob("*.npy")) == ["test", "train"]
    assert isinstance(cached.train.images, np.memmap) and cached.train.images.shape == (6, 16, 16, 3)
    resize = T.Compose([T.Resize(16, antialias=True), T.CenterCrop(16)])
    for i in range(len(plain.train)):
        assert torch.equal(cached.train.image(i), resize(plain.train.image(i)))
    assert cached.train.labels.tolist() == plain.train.labels.tolist()

    def no_decoding(path: str) -> torch.Tensor:
        raise AssertionError(f"decoded {path} although a cache exists")

    monkeypatch.setattr(folders, "decode_rgb", no_decoding)
    again = load_image_folders(str(tmp_path / "d"), cache_size=16, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(again.test.image(2), cached.test.image(2))


def test_cache_is_rebuilt_when_the_files_change(tmp_path: Path) -> None:
    make_tree(tmp_path / "d", {"train": 1, "test": 1})
    load_image_folders(str(tmp_path / "d"), cache_size=8)
    write_png(
        torch.zeros(3, 8, 8, dtype=torch.uint8), str(tmp_path / "d" / "train" / CLASSES[2] / "extra.png")
    )
    data = load_image_folders(str(tmp_path / "d"), cache_size=8)
    assert len(data.train) == 4
    assert len(list((tmp_path / "d" / ".cl_bench_cache").glob("train_*.npy"))) == 2
    assert not list((tmp_path / "d" / ".cl_bench_cache").glob("*.partial.npy"))


def test_end_to_end_run_on_a_folder_dataset(tmp_path: Path, run_tiny) -> None:
    make_tree(tmp_path / "imagenet-r", {"train": 3, "test": 2}, size=(16, 16))
    doc, _ = run_tiny(
        "dataset=imagenet_r", f"paths.data_dir={tmp_path}", "method=simplecil", "scenario.n_tasks=3"
    )
    assert doc["status"] == "complete" and len(doc["acc_matrix"]) == 3


def make_flat_tree(root: Path, counts: dict[str, int]) -> None:
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for k in range(n):
            write_png(torch.full((3, 8, 8), 10 * c + k, dtype=torch.uint8), str(root / name / f"{k:03d}.png"))


def test_split_folder_is_sklearns_stratified_split(tmp_path: Path) -> None:
    from sklearn.model_selection import train_test_split

    from cl_bench.data.folders import load_split_image_folder

    make_flat_tree(
        tmp_path / "caltech", {"BACKGROUND_Google": 5, "accordion": 10, "airplanes": 20, "anchor": 5}
    )
    data = load_split_image_folder(str(tmp_path / "caltech"), exclude=["BACKGROUND_Google"])
    assert data.class_names == ["accordion", "airplanes", "anchor"]
    assert (len(data.train), len(data.test)) == (28, 7)
    assert np.bincount(data.test.labels).tolist() == [2, 4, 1]  # 20 % of each class
    labels = np.repeat([0, 1, 2], [10, 20, 5])
    _, expected_test = train_test_split(np.arange(35), test_size=0.2, random_state=0, stratify=labels)
    names = [
        f"{['accordion', 'airplanes', 'anchor'][labels[i]]}/{i - [0, 10, 30][labels[i]]:03d}.png"
        for i in sorted(expected_test)
    ]
    assert [str(Path(p).relative_to(tmp_path / "caltech")) for p in data.test.paths] == names
    again = load_split_image_folder(str(tmp_path / "caltech"), exclude=["BACKGROUND_Google"])
    assert again.test.paths == data.test.paths
    other = load_split_image_folder(str(tmp_path / "caltech"), exclude=["BACKGROUND_Google"], split_seed=1)
    assert other.test.paths != data.test.paths


def test_split_folder_errors(tmp_path: Path) -> None:
    from cl_bench.data.folders import load_split_image_folder
    from cl_bench.errors import ConfigError

    with pytest.raises(DataError, match=r"imagenet-r/<class>/<image>.*hendrycks"):
        load_split_image_folder(str(tmp_path / "imagenet-r"), get_it_from="hendrycks' site")
    make_flat_tree(tmp_path / "d", {"a": 4, "b": 4})
    with pytest.raises(ConfigError, match="test_fraction=1.5"):
        load_split_image_folder(str(tmp_path / "d"), test_fraction=1.5)
