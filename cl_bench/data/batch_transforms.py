"""Train-time augmentation of whole uint8 batches on the training device (``transform.on_device``).

The data loader only decodes (JPEG datasets, in its workers) and applies the recipe's deterministic leading
geometry (:func:`~cl_bench.data.transforms.batch_prepare_transform`), so the images collate as one uint8
batch; :class:`BatchAugment` then draws each image's random parameters with the same distributions as the
per-image torchvision path (:func:`~cl_bench.data.transforms.train_pipeline`) and applies crop, flip,
brightness jitter and normalisation to the batch where it lies (the GPU, when training runs there).

Equal parameters give equal images: pad-and-crop, square random crop, flip and the brightness jitter are
bit-identical to torchvision's uint8 kernels, and the deterministic steps (``train=none``: the eval
geometry, then conversion) are identical. RandomResizedCrop resizes each crop box with
``torch.nn.functional.interpolate`` (antialiased, rounded back to uint8 as torchvision does off the CPU);
torchvision's CPU uint8 kernels round differently by at most one grey level. The random draws come from
the process's global torch generator (seeded by the run, saved in checkpoints), drawn on the CPU, so a run
is reproducible whatever the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from cl_bench.backbones.base import DataConfig
from cl_bench.config import TrainAugment, TransformConfig
from cl_bench.data.base import ArrayImages, ClassificationData
from cl_bench.data.transforms import (
    CROP_PADDING,
    PipelineSpec,
    Transform,
    batch_prepare_transform,
    eval_pipeline,
    resolve_spec,
    train_pipeline,
)
from cl_bench.errors import ConfigError

#: RandomResizedCrop's attempts at a box inside the image before its centre-crop fallback (torchvision).
RRC_ATTEMPTS = 10


@dataclass
class AugmentParams:
    """Random parameters of one batch: crop boxes ``[B, 4]`` as (top, left, height, width) in the collated
    image (after padding for ``crop_flip``), flips ``[B]`` and brightness factors ``[B]`` (or ``None``)."""

    boxes: torch.Tensor
    flips: torch.Tensor | None
    brightness: torch.Tensor | None


def random_crop_boxes(n: int, height: int, width: int, size: int) -> torch.Tensor:
    """``RandomCrop(size)`` boxes: top and left uniform over the valid offsets (torchvision's ``randint``)."""
    top = torch.randint(0, height - size + 1, (n,))
    left = torch.randint(0, width - size + 1, (n,))
    return torch.stack([top, left, torch.full_like(top, size), torch.full_like(top, size)], dim=1)


def rrc_boxes(
    n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float]
) -> torch.Tensor:
    """``RandomResizedCrop.get_params`` for ``n`` images at once: the first of 10 (area, log-ratio) draws
    whose box fits the image, else the centre crop clamped to ``ratio``; then a uniform position."""
    area = height * width
    target = area * torch.empty(n, RRC_ATTEMPTS, dtype=torch.float64).uniform_(scale[0], scale[1])
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(torch.empty(n, RRC_ATTEMPTS, dtype=torch.float64).uniform_(*log_ratio))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.int8).argmax(dim=1)
    rows = torch.arange(n)
    w, h, found = w[rows, first], h[rows, first], fits.any(dim=1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w, torch.full_like(w, fallback_w)).long()
    h = torch.where(found, h, torch.full_like(h, fallback_h)).long()
    u = torch.rand(n, 2, dtype=torch.float64)
    top = torch.minimum((u[:, 0] * (height - h + 1)).long(), height - h)
    left = torch.minimum((u[:, 1] * (width - w + 1)).long(), width - w)
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def crop_boxes(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Crops of equal size ``[B, C, h, w]`` at per-image offsets, by one gather."""
    n, _, _, _ = images.shape
    h, w = int(boxes[0, 2]), int(boxes[0, 3])
    boxes = boxes.to(images.device)
    rows = boxes[:, 0, None] + torch.arange(h, device=images.device)
    cols = boxes[:, 1, None] + torch.arange(w, device=images.device)
    index = torch.arange(n, device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """Each box of each image resized to ``size x size`` (antialiased), uint8 out, rounded as torchvision's
    tensor kernels round."""
    antialias = interpolation in ("bilinear", "bicubic")
    extra = {} if interpolation == "nearest" else {"align_corners": False}
    out = torch.empty(len(images), images.shape[1], size, size, dtype=torch.uint8, device=images.device)
    for k, (top, left, h, w) in enumerate(boxes.tolist()):
        crop = images[k : k + 1, :, top : top + h, left : left + w].float()
        resized = F.interpolate(crop, size=(size, size), mode=interpolation, antialias=antialias, **extra)
        out[k] = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    return out


@dataclass
class BatchAugment:
    """The random part of the train pipeline ``spec`` on uint8 batches ``[B, 3, H, W]`` (module docstring)."""

    spec: PipelineSpec

    def draw(self, n: int, height: int, width: int) -> AugmentParams:
        """The random parameters for ``n`` collated images of ``height x width``."""
        spec, size = self.spec, self.spec.size
        if spec.train == TrainAugment.crop_flip:
            pad = 2 * CROP_PADDING
            boxes = random_crop_boxes(n, height + pad, width + pad, size)
        elif spec.train == TrainAugment.resize_crop_flip:
            boxes = random_crop_boxes(n, height, width, size)
        elif spec.train == TrainAugment.rrc_flip:
            boxes = rrc_boxes(n, height, width, spec.rrc_scale, spec.rrc_ratio)
        else:
            boxes = torch.tensor([[0, 0, height, width]]).expand(n, 4)
        if spec.train == TrainAugment.none:
            return AugmentParams(boxes, None, None)
        flips = torch.rand(n) < 0.5 if spec.hflip else None
        low = max(0.0, 1 - spec.brightness)
        factors = torch.empty(n).uniform_(low, 1 + spec.brightness) if spec.brightness > 0 else None
        return AugmentParams(boxes, flips, factors)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """``images`` (uint8) augmented with ``params``, converted to the model input (float32)."""
        spec = self.spec
        if spec.train == TrainAugment.crop_flip:
            x = crop_boxes(F.pad(images, [CROP_PADDING] * 4), params.boxes)
        elif spec.train == TrainAugment.resize_crop_flip:
            x = crop_boxes(images, params.boxes)
        elif spec.train == TrainAugment.rrc_flip:
            x = resized_crops(images, params.boxes, spec.size, spec.interpolation(train=True).value)
        else:
            x = images
        if params.flips is not None:
            flips = params.flips.to(x.device)[:, None, None, None]
            x = torch.where(flips, x.flip(-1), x)
        if params.brightness is not None:
            factors = params.brightness.to(x.device)[:, None, None, None]
            x = x.mul(factors).clamp_(0, 255).to(torch.uint8)
        x = TF.to_dtype(x, torch.float32, scale=True)
        if spec.normalize:
            x = TF.normalize(x, mean=list(spec.data.mean), std=list(spec.data.std))
        return x

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"BatchAugment takes uint8 [B, 3, H, W] batches, got {images.dtype} {tuple(images.shape)}"
            )
        return self.apply(images, self.draw(len(images), images.shape[2], images.shape[3]))


def augment_batch(transform: BatchAugment | None, batch: Any) -> Any:
    """``batch`` with its images (first element) augmented when they arrive as uint8 and a transform is set;
    anything else (cached features, evaluation batches) passes through."""
    if transform is None or not isinstance(batch, (list, tuple)) or not batch:
        return batch
    images = batch[0]
    if not torch.is_tensor(images) or images.dtype != torch.uint8:
        return batch
    return type(batch)([transform(images), *batch[1:]])


@dataclass
class InputPipeline:
    """A run's transforms: the per-image train transform the loader applies (all of it, or only the
    deterministic geometry when ``batch`` is set), the eval transform and the batch-level augmentation."""

    train: Transform
    eval: Transform
    batch: BatchAugment | None


def augments_on_device(
    setting: bool | None, spec: PipelineSpec, data: ClassificationData, device: torch.device
) -> bool:
    """Resolve ``transform.on_device``: auto (``None``) = on a GPU whenever the batch collates."""
    collates = spec.train != TrainAugment.rrc_flip or isinstance(data.train, ArrayImages)
    if setting is None:
        return device.type == "cuda" and collates
    if setting and not collates:
        raise ConfigError(
            f"transform.on_device=true with transform.train=rrc_flip needs images of one size, but "
            f"{data.name}'s are decoded from files of varying sizes: set dataset.cache_size=N (a "
            "memory-mapped resized copy) or transform.on_device=false"
        )
    return setting


def build_input_pipeline(
    backbone_cfg: DataConfig, cfg: TransformConfig, data: ClassificationData, device: torch.device
) -> InputPipeline:
    """The run's :class:`InputPipeline` for ``transform.*`` and the training device."""
    spec = resolve_spec(backbone_cfg, cfg, data.hflip_invariant)
    if augments_on_device(cfg.on_device, spec, data, device):
        return InputPipeline(batch_prepare_transform(spec), eval_pipeline(spec), BatchAugment(spec))
    return InputPipeline(train_pipeline(spec), eval_pipeline(spec), None)
