"""Input pipelines derived from the backbone's pre-training data config (timm's ``pretrained_cfg``).

Transforms act on uint8 ``[3,H,W]`` tensors (torchvision ``transforms.v2``), so in-memory datasets never
go through PIL.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from cl_bench.backbones.base import DataConfig
from cl_bench.config import TrainAugment, TransformConfig

Transform = Callable[[torch.Tensor], torch.Tensor]
#: Inputs up to this size get the CIFAR recipe under ``train=auto``; larger ones the ImageNet recipe.
SMALL_INPUT_MAX = 64


def resolve_data_config(backbone_cfg: DataConfig, cfg: TransformConfig) -> DataConfig:
    """The backbone's data config with any explicit ``transform.*`` overrides applied."""
    return DataConfig(
        input_size=cfg.input_size or backbone_cfg.input_size,
        mean=tuple(cfg.mean) if cfg.mean else backbone_cfg.mean,
        std=tuple(cfg.std) if cfg.std else backbone_cfg.std,
        interpolation=backbone_cfg.interpolation,
        crop_pct=backbone_cfg.crop_pct,
    )


def _to_model_input(dc: DataConfig, normalize: bool = True) -> list[T.Transform]:
    """uint8 -> float in [0, 1], then (``normalize``) the mean/std normalisation."""
    scale = [T.ToDtype(torch.float32, scale=True)]
    return [*scale, T.Normalize(mean=list(dc.mean), std=list(dc.std))] if normalize else scale


def eval_transform(dc: DataConfig, normalize: bool = True) -> Transform:
    """Resize to ``size / crop_pct`` then centre-crop ``size`` (timm's eval transform)."""
    interp = InterpolationMode(dc.interpolation)
    resize = math.floor(dc.input_size / dc.crop_pct)
    return T.Compose(
        [
            T.Resize(resize, interpolation=interp, antialias=True),
            T.CenterCrop(dc.input_size),
            *_to_model_input(dc, normalize),
        ]
    )


def train_transform(dc: DataConfig, augment: TrainAugment, hflip: bool, normalize: bool = True) -> Transform:
    """Train-time transform for ``augment`` (see :class:`~cl_bench.config.TrainAugment`)."""
    if augment == TrainAugment.auto:
        augment = TrainAugment.crop_flip if dc.input_size <= SMALL_INPUT_MAX else TrainAugment.rrc_flip
    if augment == TrainAugment.none:
        return eval_transform(dc, normalize)
    interp = InterpolationMode(dc.interpolation)
    flip = [T.RandomHorizontalFlip()] if hflip else []
    if augment == TrainAugment.crop_flip:
        steps = [
            T.Resize(dc.input_size, interpolation=interp, antialias=True),
            T.CenterCrop(dc.input_size),
            T.RandomCrop(dc.input_size, padding=4),
        ]
    else:
        steps = [T.RandomResizedCrop(dc.input_size, interpolation=interp, antialias=True)]
    return T.Compose([*steps, *flip, *_to_model_input(dc, normalize)])


def build_transforms(
    backbone_cfg: DataConfig, cfg: TransformConfig, dataset_hflip_invariant: bool
) -> tuple[Transform, Transform]:
    """``(train, eval)`` transforms for a backbone, honouring ``transform.*`` overrides."""
    dc = resolve_data_config(backbone_cfg, cfg)
    hflip = dataset_hflip_invariant if cfg.hflip is None else cfg.hflip
    return (
        train_transform(dc, TrainAugment(cfg.train), hflip, cfg.normalize),
        eval_transform(dc, cfg.normalize),
    )
