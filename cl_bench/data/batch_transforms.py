"""Train-time augmentation of whole uint8 batches on the training device (``transform.on_device``).

The data loader only decodes (JPEG datasets, in its workers) and applies the recipe's deterministic leading
geometry (:func:`~cl_bench.data.transforms.batch_prepare_transform`), so the images collate as one uint8
batch; :class:`BatchAugment` then draws each image's random parameters with the same distributions as the
per-image torchvision path (:func:`~cl_bench.data.transforms.train_pipeline`) and applies crop, flip,
brightness jitter and normalisation to the batch where it lies (the GPU, when training runs there).

Equal parameters give equal images: pad-and-crop, square random crop, flip and the brightness jitter are
bit-identical to torchvision's uint8 kernels, and the deterministic steps (``train=none``: the eval
geometry, then conversion) are identical. RandomResizedCrop resizes every crop box of the batch at once
with two batched matrix products whose weights are PyTorch's antialiased interpolation kernels
(:func:`resample_weights`), then rounds to uint8 as torchvision does off the CPU; against torchvision's
per-image float path this differs only by float summation order (at most one grey level, rarely), against
its CPU uint8 kernels by at most one grey level (bilinear) or one on average (bicubic, whose uint8 kernel
clamps between its two passes). The random draws come from
the process's global torch generator (seeded by the run, saved in checkpoints), drawn on the CPU, so a run
is reproducible whatever the device; under DDP each process draws the global batch's parameters and
applies its share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from cl_bench import distributed
from cl_bench.backbones.base import DataConfig
from cl_bench.config import TrainAugment, TransformConfig
from cl_bench.data.base import ArrayImages, ClassificationData, ImageSource
from cl_bench.data.transforms import (
    CROP_PADDING,
    PipelineSpec,
    Transform,
    batch_prepare_transform,
    eval_pipeline,
    resolve_spec,
    train_pipeline,
)
from cl_bench.debug import SubsetImages
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

    def share(self, start: int, n: int) -> AugmentParams:
        """The parameters of images ``start .. start + n - 1``."""
        part = slice(start, start + n)
        return AugmentParams(
            self.boxes[part],
            None if self.flips is None else self.flips[part],
            None if self.brightness is None else self.brightness[part],
        )


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


#: Half-width of each interpolation kernel in input pixels at unit scale (PyTorch's ``interp_size / 2``).
KERNEL_HALF_WIDTH = {"bilinear": 1.0, "bicubic": 2.0}


def _kernel(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    """PyTorch's antialiasing filters: triangle (bilinear) and Keys' cubic with a = -0.5 (bicubic)."""
    x = x.abs()
    if interpolation == "bilinear":
        return (1 - x).clamp(min=0)
    a = -0.5
    inner = ((a + 2) * x - (a + 3)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, inner, torch.where(x < 2, outer, torch.zeros_like(x)))


def resample_weights(
    start: torch.Tensor,
    length: torch.Tensor,
    in_size: int,
    out_size: int,
    interpolation: str,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``[B, out_size, in_size]`` matrices that resize the segment ``[start, start + length)`` of each row
    to ``out_size`` samples as ``F.interpolate(..., antialias=True, align_corners=False)`` does (its kernel
    support, truncation and normalisation, in float32 as its kernels compute them; ``nearest``:
    ``floor(i * scale)``)."""
    start = start.to(device=device, dtype=torch.float32)
    length = length.to(device=device, dtype=torch.float32)
    scale = (length / out_size)[:, None, None]  # [B, 1, 1]
    i = torch.arange(out_size, dtype=torch.float32, device=device)[None, :, None]  # [1, out, 1]
    k = torch.arange(in_size, dtype=torch.float32, device=device)[None, None, :] - start[:, None, None]
    inside = (k >= 0) & (k < length[:, None, None])  # k: input position relative to the segment
    if interpolation == "nearest":
        source = torch.minimum(torch.floor(i * scale), length[:, None, None] - 1)
        return ((k == source) & inside).float()
    half = KERNEL_HALF_WIDTH[interpolation]
    support = torch.where(scale >= 1, half * scale, torch.full_like(scale, half))
    invscale = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    center = scale * (i + 0.5)  # [B, out, 1]
    low = torch.trunc(center - support + 0.5).clamp(min=0)
    high = torch.minimum(torch.trunc(center + support + 0.5), length[:, None, None])
    window = inside & (k >= low) & (k < high)
    weights = _kernel((k - center + 0.5) * invscale, interpolation) * window
    total = weights.sum(dim=2, keepdim=True)
    return weights / torch.where(total == 0, torch.ones_like(total), total)


def resized_crops(
    images: torch.Tensor,
    boxes: torch.Tensor,
    size: int,
    interpolation: str,
    flips: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each box of each uint8 image resized to ``size x size`` (antialiased as torchvision's tensor path),
    mirrored where ``flips`` says (by reversing the column weights, for free), rounded and clamped as
    torchvision does off the CPU; float32 holding integers 0..255. Two batched matrix products (width, then
    height)."""
    _, _, height, width = images.shape
    rows = resample_weights(boxes[:, 0], boxes[:, 2], height, size, interpolation, images.device)
    cols = resample_weights(boxes[:, 1], boxes[:, 3], width, size, interpolation, images.device)
    if flips is not None:
        cols = torch.where(flips.to(images.device)[:, None, None], cols.flip(1), cols)
    x = torch.matmul(images.float(), cols.transpose(1, 2)[:, None])  # [B, C, H, size]
    x = torch.matmul(rows[:, None], x)  # [B, C, size, size]
    return x.round_().clamp_(0, 255)


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
        """``images`` (uint8) augmented with ``params``, converted to the model input (float32).

        Each step computes what torchvision's uint8 step computes: values stay integers 0..255 (in float32
        after RandomResizedCrop) until the final scaling by 1/255 (``to_dtype``) and normalisation; in
        float32 also under a caller's autocast (replay augments inside ``training_step``)."""
        device = images.device.type
        if not torch.amp.is_autocast_available(device):  # e.g. "meta": nothing to switch off
            return self._apply(images, params)
        with torch.autocast(device, enabled=False):
            return self._apply(images, params)

    def _apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        spec = self.spec
        flips = params.flips
        if spec.train == TrainAugment.crop_flip:
            x = crop_boxes(F.pad(images, [CROP_PADDING] * 4), params.boxes)
        elif spec.train == TrainAugment.resize_crop_flip:
            x = crop_boxes(images, params.boxes)
        elif spec.train == TrainAugment.rrc_flip:
            interpolation = spec.interpolation(train=True).value
            x, flips = resized_crops(images, params.boxes, spec.size, interpolation, flips), None
        else:
            x = images
        if flips is not None:
            x = torch.where(flips.to(x.device)[:, None, None, None], x.flip(-1), x)
        x = x.to(torch.float32)
        if params.brightness is not None:  # torchvision's uint8 blend: product, clamp, truncation
            x = x.mul_(params.brightness.to(x.device)[:, None, None, None]).clamp_(0, 255).floor_()
        x = x.mul_(1.0 / 255)  # to_dtype(uint8 -> float32, scale=True)
        if spec.normalize:
            x = TF.normalize(x, mean=list(spec.data.mean), std=list(spec.data.std))
        return x

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"BatchAugment takes uint8 [B, 3, H, W] batches, got {images.dtype} {tuple(images.shape)}"
            )
        # DDP processes are seeded alike: each draws the global batch's parameters (the streams stay in
        # step) and takes its own share, so ranks do not crop their i-th images alike
        n, rank = len(images), distributed.rank()
        params = self.draw(n * distributed.world_size(), images.shape[2], images.shape[3])
        return self.apply(images, params.share(rank * n, n))


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


def one_size(images: ImageSource) -> bool:
    """Whether all of ``images`` have one size: an array, or a smoke run's subset of one."""
    while isinstance(images, SubsetImages):
        images = images.base
    return isinstance(images, ArrayImages)


def augments_on_device(
    setting: bool | None, spec: PipelineSpec, data: ClassificationData, device: torch.device
) -> bool:
    """Resolve ``transform.on_device``: auto (``None``) = on a GPU whenever the batch collates."""
    collates = spec.train != TrainAugment.rrc_flip or one_size(data.train)
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
