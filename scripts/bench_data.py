"""Benchmark: reading an image-folder dataset from JPEGs vs from the memory-mapped resized cache.

Writes ``--images`` JPEGs of ImageNet-like size (500x375, quality 90) into a temporary ``train/test`` tree,
then times one pass over the train split through the 224 px evaluation transform (what a frozen-backbone
method or one epoch of data loading costs) three ways: decoding the JPEGs, building the 256 px cache (once),
and reading the cache. Writes the timings and the speed-up to a JSON file.

    .venv/bin/python scripts/bench_data.py --images 2000 --out bench_data.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torchvision.io import encode_jpeg

from cl_bench.backbones.base import DataConfig
from cl_bench.data.folders import load_image_folders
from cl_bench.data.transforms import eval_transform


def write_tree(root: Path, n_images: int, n_classes: int = 10) -> None:
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 500).expand(375, 500)
    for i in range(n_images):
        split = "test" if (i // n_classes) % 5 == 0 else "train"
        folder = root / split / f"class_{i % n_classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        noise = torch.rand(3, 375, 500, generator=generator)
        image = ((0.7 * ramp + 0.3 * noise) * 255).to(torch.uint8)
        (folder / f"{i:06d}.jpg").write_bytes(encode_jpeg(image, quality=90).numpy().tobytes())


def one_pass(images, transform) -> float:
    start = time.perf_counter()
    for i in range(len(images)):
        transform(images.image(i))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--cache-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("bench_data.json"))
    args = parser.parse_args()
    transform = eval_transform(DataConfig(input_size=224, crop_pct=0.875, interpolation="bicubic"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_tree(root, args.images)
        plain = load_image_folders(str(root))
        jpeg_s = one_pass(plain.train, transform)
        start = time.perf_counter()
        load_image_folders(str(root), cache_size=args.cache_size)
        build_s = time.perf_counter() - start
        cached = load_image_folders(str(root), cache_size=args.cache_size)
        cache_s = one_pass(cached.train, transform)
    report = {
        "train_images": len(plain.train),
        "jpeg_size": [500, 375],
        "cache_size": args.cache_size,
        "torch_threads": torch.get_num_threads(),
        "pass_from_jpeg_s": jpeg_s,
        "cache_build_s": build_s,
        "pass_from_cache_s": cache_s,
        "images_per_s_jpeg": len(plain.train) / jpeg_s,
        "images_per_s_cache": len(plain.train) / cache_s,
        "speedup_per_pass": jpeg_s / cache_s,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
