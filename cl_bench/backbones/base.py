"""The interface methods rely on: ``forward_features`` (unpooled), ``pool`` and ``forward`` (embedding)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataConfig:
    """What the backbone was pre-trained on: input side, normalisation, resize interpolation, crop ratio."""

    input_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 1.0


class Backbone(nn.Module):
    """A feature extractor. Subclasses set ``feat_dim`` and ``data_config`` and implement the two stages."""

    feat_dim: int
    data_config: DataConfig

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features: a ``[B, C, H, W]`` map for CNNs, ``[B, N, D]`` tokens for ViTs."""
        raise NotImplementedError

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``[B, feat_dim]`` from :meth:`forward_features`'s output."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))
