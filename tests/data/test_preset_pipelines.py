"""Each paper preset's input pipeline is the official code's (issue 20 item 2; methods_vit.md §2.6, §3.6,
§4.6; RanPAC/SAFE and SLCA utils/data.py, LN tuning couple/datasets.py)."""

from __future__ import annotations

import pytest
from helpers import compose_config
from omegaconf import OmegaConf

from cl_bench.backbones.base import DataConfig
from cl_bench.config import TrainAugment, TransformConfig
from cl_bench.data.transforms import resolve_spec

#: A ViT-B/16 data config as timm gives it (crop_pct 0.9): the presets must not depend on it.
VIT = DataConfig(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.9)

SLCA_CIFAR = dict(
    train=TrainAugment.rrc_flip,
    rrc_scale=(0.08, 1.0),
    brightness=63 / 255,
    eval_resize_side=256,
    train_interp="bicubic",
    eval_interp="bicubic",
)
SLCA_INR = dict(SLCA_CIFAR, brightness=0.0)
SLCA_FINE = dict(SLCA_INR, train=TrainAugment.resize_crop_flip, train_resize=300)
RANPAC_LINE = dict(
    train=TrainAugment.rrc_flip,
    rrc_scale=(0.05, 1.0),
    brightness=0.0,
    eval_resize_side=256,
    train_interp="bilinear",
    eval_interp="bicubic",
)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("slca/cifar100", SLCA_CIFAR),
        ("slca/cifar100_pp", SLCA_CIFAR),
        ("slca/cifar100_mocov3", SLCA_CIFAR),
        ("slca/imagenet_r", SLCA_INR),
        ("slca/imagenet_r_pp", SLCA_INR),
        ("slca/cub", SLCA_FINE),
        ("slca/cub_pp", SLCA_FINE),
        ("slca/cars", SLCA_FINE),
        ("slca/cars_pp_mocov3", SLCA_FINE),
        ("safe/cifar100", dict(RANPAC_LINE, eval_resize_side=224)),
        ("safe/imagenet_a", RANPAC_LINE),
        ("safe/cub", RANPAC_LINE),
        ("lnt/cifar100", RANPAC_LINE),
        ("lnt/imagenet_r", RANPAC_LINE),
        ("ranpac/cifar100", dict(RANPAC_LINE, eval_resize_side=224)),  # SAFE's protocol, RanPAC's code
        ("ranpac/cars", RANPAC_LINE),
        ("aper/cifar100", RANPAC_LINE),  # RevisitingCIL: Resize(256) for every dataset
        ("simplecil/imagenet_r", RANPAC_LINE),
    ],
)
def test_preset_pipeline_is_the_official_one(preset: str, expected: dict) -> None:
    cfg = compose_config(f"experiment={preset}")
    transform = TransformConfig(**OmegaConf.to_container(cfg.transform))  # type: ignore[arg-type]
    spec = resolve_spec(VIT, transform, dataset_hflip_invariant=True)
    assert spec.train == expected["train"] and spec.hflip
    assert spec.rrc_scale == pytest.approx(expected["rrc_scale"])
    assert spec.rrc_ratio == pytest.approx((3 / 4, 4 / 3))
    assert spec.brightness == pytest.approx(expected["brightness"])
    assert spec.eval_resize_side == expected["eval_resize_side"] and spec.size == 224
    assert spec.train_resize == expected.get("train_resize")
    assert spec.interpolation(train=True).value == expected["train_interp"]
    assert spec.interpolation(train=False).value == expected["eval_interp"]
