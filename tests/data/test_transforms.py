"""Input pipelines from the backbone's data config (cl_bench/data/transforms.py)."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from cl_bench.backbones.base import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from cl_bench.config import TrainAugment, TransformConfig
from cl_bench.data.transforms import build_transforms, eval_transform, resolve_data_config, train_transform
from cl_bench.errors import ConfigError

CIFAR = DataConfig(input_size=32)
VIT = DataConfig(224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=0.875)


def _normalised(value: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The per-channel model input of a constant uint8 image of ``value``."""
    return torch.tensor([(value / 255.0 - m) / s for m, s in zip(mean, std)], dtype=torch.float32)


def _constant(value: int, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.full((3, h, w), value, dtype=torch.uint8)


def _half_image(size: int = 32) -> torch.Tensor:
    """Left half black, right half white."""
    img = torch.zeros(3, size, size, dtype=torch.uint8)
    img[:, :, size // 2 :] = 255
    return img


def _steps(transform: object) -> list[type]:
    assert isinstance(transform, T.Compose)
    return [type(t) for t in transform.transforms]


@pytest.mark.parametrize("value", [0, 37, 128, 255])
def test_eval_normalisation_exact(value: int) -> None:
    """A constant image of v maps to (v/255 - mean)/std in every pixel, as float32 [3, 32, 32]."""
    out = eval_transform(CIFAR)(_constant(value))
    assert out.shape == (3, 32, 32)
    assert out.dtype == torch.float32
    expected = _normalised(value, IMAGENET_MEAN, IMAGENET_STD)[:, None, None].expand(3, 32, 32)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_eval_keeps_a_32px_image() -> None:
    """At crop_pct 1 and the native size, the eval transform only normalises."""
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = eval_transform(CIFAR)(img)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(out, (img.float() / 255 - mean) / std, rtol=0, atol=1e-6)


def test_eval_resize_then_centre_crop_224() -> None:
    """crop_pct 0.875: resize to 256, centre-crop 224, so a 16-px border of a 256 image disappears."""
    img = torch.full((3, 256, 256), 255, dtype=torch.uint8)
    img[:, 16:240, 16:240] = 0
    out = eval_transform(VIT)(img)
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out, torch.full_like(out, -1.0), rtol=0, atol=1e-6)  # (0 - 0.5) / 0.5


def test_eval_upsizes_small_non_square_input() -> None:
    """A 32x48 image becomes 224x224 (shorter side to 256, bicubic, then centre crop)."""
    gen = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8, generator=gen)
    out = eval_transform(VIT)(img)
    assert out.shape == (3, 224, 224)
    ref = TF.center_crop(TF.resize(img, 256, interpolation=InterpolationMode.BICUBIC, antialias=True), 224)
    torch.testing.assert_close(out, (ref.float() / 255 - 0.5) / 0.5, rtol=0, atol=1e-5)
    bilinear = eval_transform(DataConfig(224, VIT.mean, VIT.std, "bilinear", 0.875))(img)
    assert not torch.allclose(out, bilinear)


@pytest.mark.parametrize("size", [32, 64])
def test_train_auto_small_is_crop_flip(size: int) -> None:
    """Up to 64 px, auto picks pad-4 random crop + flip and keeps the input size."""
    t = train_transform(DataConfig(input_size=size), TrainAugment.auto, hflip=True)
    steps = _steps(t)
    assert T.RandomCrop in steps and T.RandomHorizontalFlip in steps
    assert T.RandomResizedCrop not in steps
    assert t(_constant(10, 40, 50)).shape == (3, size, size)


def test_crop_flip_pads_with_zeros() -> None:
    """The 4-px zero padding shows up in some crops of a constant white image, never more than 4 px deep."""
    t = train_transform(CIFAR, TrainAugment.crop_flip, hflip=False)
    white = _normalised(255, IMAGENET_MEAN, IMAGENET_STD)
    black = _normalised(0, IMAGENET_MEAN, IMAGENET_STD)
    saw_padding = False
    torch.manual_seed(0)
    for _ in range(20):
        out = t(_constant(255))
        assert out.shape == (3, 32, 32)
        interior = white[:, None, None].expand(3, 24, 24)
        torch.testing.assert_close(out[:, 4:28, 4:28], interior, rtol=0, atol=1e-6)
        saw_padding |= bool(torch.isclose(out[0], black[0]).any())
    assert saw_padding


def test_train_auto_large_is_rrc() -> None:
    """Above 64 px, auto picks RandomResizedCrop with the backbone's interpolation."""
    t = train_transform(VIT, TrainAugment.auto, hflip=True)
    steps = _steps(t)
    assert T.RandomResizedCrop in steps and T.RandomCrop not in steps
    rrc = next(s for s in t.transforms if isinstance(s, T.RandomResizedCrop))
    assert rrc.interpolation == InterpolationMode.BICUBIC
    out = t(_constant(10))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    just_above = train_transform(DataConfig(input_size=65), TrainAugment.auto, hflip=True)
    assert T.RandomResizedCrop in _steps(just_above)
    assert just_above(_constant(0)).shape == (3, 65, 65)


def test_none_equals_eval() -> None:
    """train='none' is the eval transform: same output, every time."""
    gen = torch.Generator().manual_seed(2)
    img = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=gen)
    for dc in (CIFAR, VIT):
        train = train_transform(dc, TrainAugment.none, hflip=True)
        first = train(img)
        torch.testing.assert_close(first, eval_transform(dc)(img), rtol=0, atol=0)
        torch.testing.assert_close(train(img), first, rtol=0, atol=0)


def _left_columns_white(transform: object, draws: int = 30) -> list[bool]:
    """For each draw, whether the left 12 columns of the half-black/half-white image came out white."""
    white = _normalised(255, IMAGENET_MEAN, IMAGENET_STD)[0]
    torch.manual_seed(0)
    return [bool(torch.isclose(transform(_half_image())[0, :, :12], white).all()) for _ in range(draws)]  # type: ignore[operator]


def test_hflip_follows_dataset_unless_overridden() -> None:
    """Digits (not flip-invariant) are never mirrored unless transform.hflip=true forces it."""
    cfg = TransformConfig(train=TrainAugment.crop_flip)
    no_flip, _ = build_transforms(CIFAR, cfg, dataset_hflip_invariant=False)
    assert T.RandomHorizontalFlip not in _steps(no_flip)
    assert not any(_left_columns_white(no_flip))  # a 4-px shift never brings the white half to columns 0..11

    flip, _ = build_transforms(CIFAR, cfg, dataset_hflip_invariant=True)
    assert any(_left_columns_white(flip))

    forced, _ = build_transforms(CIFAR, TransformConfig(train=TrainAugment.crop_flip, hflip=True), False)
    assert any(_left_columns_white(forced))
    off, _ = build_transforms(CIFAR, TransformConfig(train=TrainAugment.crop_flip, hflip=False), True)
    assert not any(_left_columns_white(off))


def test_resolve_data_config_overrides() -> None:
    """transform.input_size/mean/std replace the backbone's; interpolation and crop_pct are kept."""
    dc = resolve_data_config(VIT, TransformConfig(input_size=96, mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6]))
    assert dc == DataConfig(96, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bicubic", 0.875)
    assert resolve_data_config(VIT, TransformConfig()) == VIT


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"input_size": 0}, r"transform\.input_size=0 must be at least 1"),
        ({"input_size": -32}, r"transform\.input_size=-32 must be at least 1"),
        ({"mean": [0.5, 0.5]}, r"transform\.mean=\[0\.5, 0\.5\] must give one value per input channel \(3"),
        ({"mean": []}, r"transform\.mean=\[\] must give one value per input channel"),
        ({"std": [0.5, 0.5, 0.5, 0.5]}, r"transform\.std=.* must give one value per input channel"),
        ({"std": [0.5, 0.0, 0.5]}, r"transform\.std=\[0\.5, 0\.0, 0\.5\]: every value must be > 0"),
    ],
)
def test_bad_input_size_mean_or_std_is_refused_naming_the_key(override: dict, message: str) -> None:
    """Before, input_size=0 silently meant the backbone's size, and a mean or std of the wrong length
    crashed in the first batch's normalisation with a tensor-shape error."""
    with pytest.raises(ConfigError, match=message):
        build_transforms(CIFAR, TransformConfig(**override), dataset_hflip_invariant=True)


def test_build_transforms_applies_overrides() -> None:
    """The built pipelines use the overridden size and normalisation."""
    cfg = TransformConfig(train=TrainAugment.auto, input_size=48, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 0.5])
    train, evaluate = build_transforms(CIFAR, cfg, dataset_hflip_invariant=True)
    out = evaluate(_constant(51))
    assert out.shape == (3, 48, 48)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([0.2, 0.2, 0.4]), rtol=0, atol=1e-6)
    assert train(_constant(51)).shape == (3, 48, 48)
    assert T.RandomCrop in _steps(train)  # 48 <= 64: still the CIFAR recipe


def test_build_transforms_string_augment() -> None:
    """A plain string from the config works as the augment name."""
    train, _ = build_transforms(CIFAR, TransformConfig(train="rrc_flip"), dataset_hflip_invariant=True)  # type: ignore[arg-type]
    assert T.RandomResizedCrop in _steps(train)
    assert train(_constant(3)).shape == (3, 32, 32)


def test_normalize_false_feeds_unit_range_inputs() -> None:
    """transform.normalize=false (the official RanPAC/APER/SimpleCIL ViT input): v/255 in every pixel, for
    the eval pipeline and the train pipeline alike, whatever mean/std say."""
    cfg = TransformConfig(train=TrainAugment.crop_flip, normalize=False, mean=[0.5, 0.5, 0.5])
    train, evaluate = build_transforms(CIFAR, cfg, dataset_hflip_invariant=False)
    torch.testing.assert_close(evaluate(_constant(51)), torch.full((3, 32, 32), 0.2), rtol=0, atol=1e-6)
    assert T.Normalize not in _steps(train) and T.Normalize not in _steps(evaluate)
    assert float(train(_constant(255)).max()) == 1.0
