"""Input pipelines derived from the backbone's pre-training data config (timm's ``pretrained_cfg``) and the
``transform.*`` keys.

Transforms act on uint8 ``[3,H,W]`` tensors (torchvision ``transforms.v2``), so in-memory datasets never
go through PIL. Two placements of the train-time augmentation exist (``transform.on_device``):

* per image in the data loader (:func:`train_transform`), the reference path;
* on whole uint8 batches on the training device (:class:`~cl_bench.data.batch_transforms.BatchAugment`):
  the loader then only applies the deterministic geometry (:func:`batch_prepare_transform`) so that images
  collate, and the method's ``on_after_batch_transfer`` hook does the rest.

Train recipes (``transform.train``), each followed by an optional horizontal flip, an optional ColorJitter
brightness (``transform.brightness``) and the conversion to the model input:

* ``crop_flip``: resize + centre crop to the input size, zero-pad 4, random crop (CIFAR, He et al. 2016);
* ``rrc_flip``: RandomResizedCrop with ``transform.rrc_scale``/``rrc_ratio`` (ImageNet recipe);
* ``resize_crop_flip``: square resize to ``transform.train_resize``, random crop (SLCA on CUB/Cars);
* ``none``: the evaluation transform.

Evaluation: resize the shorter side to ``transform.eval_resize`` (default ``input_size / crop_pct``, timm's
rule), centre-crop the input size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from cl_bench.backbones.base import DataConfig
from cl_bench.config import TrainAugment, TransformConfig
from cl_bench.errors import ConfigError

Transform = Callable[[torch.Tensor], torch.Tensor]
#: Inputs up to this size get the CIFAR recipe under ``train=auto``; larger ones the ImageNet recipe.
SMALL_INPUT_MAX = 64
#: Zero padding of the ``crop_flip`` recipe's random crop.
CROP_PADDING = 4
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class PipelineSpec:
    """Every choice of the train and eval pipelines, resolved (no ``auto``, no ``null``)."""

    data: DataConfig
    train: TrainAugment
    hflip: bool
    normalize: bool = True
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    train_resize: int | None = None
    brightness: float = 0.0
    eval_resize: int | None = None
    train_interpolation: str | None = None
    eval_interpolation: str | None = None

    @property
    def size(self) -> int:
        return self.data.input_size

    @property
    def eval_resize_side(self) -> int:
        """The shorter side the eval transform resizes to before the centre crop."""
        if self.eval_resize is not None:
            return self.eval_resize
        return math.floor(self.data.input_size / self.data.crop_pct)

    def interpolation(self, train: bool) -> InterpolationMode:
        name = self.train_interpolation if train else self.eval_interpolation
        return InterpolationMode(name or self.data.interpolation)


def resolve_data_config(backbone_cfg: DataConfig, cfg: TransformConfig) -> DataConfig:
    """The backbone's data config with any explicit ``transform.*`` overrides applied."""
    return DataConfig(
        input_size=cfg.input_size or backbone_cfg.input_size,
        mean=tuple(cfg.mean) if cfg.mean is not None else backbone_cfg.mean,
        std=tuple(cfg.std) if cfg.std is not None else backbone_cfg.std,
        interpolation=backbone_cfg.interpolation,
        crop_pct=backbone_cfg.crop_pct,
    )


def resolve_augment(augment: TrainAugment, input_size: int) -> TrainAugment:
    """``augment`` with ``auto`` resolved: the CIFAR recipe for inputs up to ``SMALL_INPUT_MAX``, else the
    ImageNet one."""
    if augment != TrainAugment.auto:
        return augment
    return TrainAugment.crop_flip if input_size <= SMALL_INPUT_MAX else TrainAugment.rrc_flip


def _range(name: str, values: list[float], low: float) -> tuple[float, float]:
    if len(values) != 2 or not low < values[0] <= values[1]:
        raise ConfigError(
            f"transform.{name}={list(values)} must be two numbers [min, max] with {low} < min <= max"
        )
    return float(values[0]), float(values[1])


def resolve_spec(
    backbone_cfg: DataConfig, cfg: TransformConfig, dataset_hflip_invariant: bool
) -> PipelineSpec:
    """The pipeline a run uses, with a clear error for any inconsistent ``transform.*`` value."""
    if cfg.input_size is not None and cfg.input_size < 1:
        raise ConfigError(
            f"transform.input_size={cfg.input_size} must be at least 1 (or null: the backbone's "
            f"{backbone_cfg.input_size})"
        )
    channels = len(backbone_cfg.mean)
    for key in ("mean", "std"):
        values = getattr(cfg, key)
        if values is not None and len(values) != channels:
            raise ConfigError(
                f"transform.{key}={list(values)} must give one value per input channel ({channels}, e.g. "
                f"{list(getattr(backbone_cfg, key))}), or be null for the backbone's"
            )
    if cfg.std is not None and not all(s > 0 for s in cfg.std):
        raise ConfigError(
            f"transform.std={list(cfg.std)}: every value must be > 0 (inputs are divided by it)"
        )
    dc = resolve_data_config(backbone_cfg, cfg)
    augment = resolve_augment(TrainAugment(cfg.train), dc.input_size)
    for key in ("train_interpolation", "eval_interpolation"):
        if getattr(cfg, key) not in (None, *INTERPOLATIONS):
            raise ConfigError(f"transform.{key}={getattr(cfg, key)!r}: choose one of {list(INTERPOLATIONS)}")
    if cfg.brightness < 0:
        raise ConfigError(f"transform.brightness={cfg.brightness} must be >= 0 (0: no jitter)")
    if augment == TrainAugment.resize_crop_flip and (cfg.train_resize or 0) < dc.input_size:
        raise ConfigError(
            "transform.train=resize_crop_flip needs transform.train_resize >= the input size "
            f"{dc.input_size} (got {cfg.train_resize}); SLCA's CUB/Cars recipe uses 300"
        )
    if cfg.eval_resize is not None and cfg.eval_resize < dc.input_size:
        raise ConfigError(
            f"transform.eval_resize={cfg.eval_resize} must be >= the input size {dc.input_size} (or null)"
        )
    return PipelineSpec(
        data=dc,
        train=augment,
        hflip=dataset_hflip_invariant if cfg.hflip is None else cfg.hflip,
        normalize=cfg.normalize,
        rrc_scale=_range("rrc_scale", cfg.rrc_scale, 0.0),
        rrc_ratio=_range("rrc_ratio", cfg.rrc_ratio, 0.0),
        train_resize=cfg.train_resize,
        brightness=float(cfg.brightness),
        eval_resize=cfg.eval_resize,
        train_interpolation=cfg.train_interpolation,
        eval_interpolation=cfg.eval_interpolation,
    )


def _to_model_input(dc: DataConfig, normalize: bool = True) -> list[T.Transform]:
    """uint8 -> float in [0, 1], then (``normalize``) the mean/std normalisation."""
    scale = [T.ToDtype(torch.float32, scale=True)]
    return [*scale, T.Normalize(mean=list(dc.mean), std=list(dc.std))] if normalize else scale


def _eval_geometry(spec: PipelineSpec) -> list[T.Transform]:
    interp = spec.interpolation(train=False)
    return [T.Resize(spec.eval_resize_side, interpolation=interp, antialias=True), T.CenterCrop(spec.size)]


def _train_geometry(spec: PipelineSpec, random: bool) -> list[T.Transform]:
    """The recipe's geometric steps; ``random=False`` keeps only the deterministic ones that come first."""
    interp = spec.interpolation(train=True)
    size = spec.size
    if spec.train == TrainAugment.none:
        return _eval_geometry(spec)
    if spec.train == TrainAugment.crop_flip:
        steps: list[T.Transform] = [T.Resize(size, interpolation=interp, antialias=True), T.CenterCrop(size)]
        return [*steps, T.RandomCrop(size, padding=CROP_PADDING)] if random else steps
    if spec.train == TrainAugment.resize_crop_flip:
        assert spec.train_resize is not None
        resize = T.Resize((spec.train_resize, spec.train_resize), interpolation=interp, antialias=True)
        return [resize, T.RandomCrop(size)] if random else [resize]
    if not random:
        return []
    return [T.RandomResizedCrop(size, spec.rrc_scale, spec.rrc_ratio, interpolation=interp, antialias=True)]


def eval_pipeline(spec: PipelineSpec) -> Transform:
    """Resize the shorter side, centre-crop the input size, convert."""
    return T.Compose([*_eval_geometry(spec), *_to_model_input(spec.data, spec.normalize)])


def train_pipeline(spec: PipelineSpec) -> Transform:
    """The per-image train transform (the reference the batch-level path follows in distribution)."""
    if spec.train == TrainAugment.none:
        return eval_pipeline(spec)
    flip = [T.RandomHorizontalFlip()] if spec.hflip else []
    jitter = [T.ColorJitter(brightness=spec.brightness)] if spec.brightness > 0 else []
    return T.Compose(
        [*_train_geometry(spec, random=True), *flip, *jitter, *_to_model_input(spec.data, spec.normalize)]
    )


class SkipAtSize:
    """``transform`` except for images of ``shape`` (``H, W``), which it would return unchanged: a collated
    dataset already at the target size skips the per-image dispatch."""

    def __init__(self, transform: Transform, shape: tuple[int, int] | None) -> None:
        self.transform = transform
        self.shape = shape

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image if tuple(image.shape[-2:]) == self.shape else self.transform(image)


def batch_prepare_transform(spec: PipelineSpec) -> Transform:
    """The loader's share when the augmentation runs on batches: the recipe's deterministic leading
    geometry, uint8 out (the batch then collates and ``BatchAugment`` does the random part)."""
    steps = _train_geometry(spec, random=False)
    if not steps:
        return T.Identity()
    if spec.train == TrainAugment.resize_crop_flip:
        assert spec.train_resize is not None
        unchanged: tuple[int, int] | None = (spec.train_resize, spec.train_resize)
    elif spec.train == TrainAugment.none and spec.eval_resize_side != spec.size:
        unchanged = None  # the eval resize changes even an image of the input size
    else:  # resize + centre crop to the input size
        unchanged = (spec.size, spec.size)
    return SkipAtSize(T.Compose(steps), unchanged)


def eval_transform(dc: DataConfig, normalize: bool = True) -> Transform:
    """timm's eval transform for ``dc`` (resize to ``size / crop_pct``, centre crop)."""
    return eval_pipeline(PipelineSpec(dc, TrainAugment.none, hflip=False, normalize=normalize))


def train_transform(dc: DataConfig, augment: TrainAugment, hflip: bool, normalize: bool = True) -> Transform:
    """Train-time transform for ``augment`` with the default recipe parameters."""
    cfg = TransformConfig(train=augment, hflip=hflip, normalize=normalize)
    return train_pipeline(resolve_spec(dc, cfg, hflip))


def build_transforms(
    backbone_cfg: DataConfig, cfg: TransformConfig, dataset_hflip_invariant: bool
) -> tuple[Transform, Transform]:
    """Per-image ``(train, eval)`` transforms for a backbone, honouring ``transform.*``."""
    spec = resolve_spec(backbone_cfg, cfg, dataset_hflip_invariant)
    return train_pipeline(spec), eval_pipeline(spec)
