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


#: Normalisation layer types (LayerNorm tuning, Xconv BN and SSF act on these).
NORM_TYPES = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


class Backbone(nn.Module):
    """A feature extractor. Subclasses set ``feat_dim`` and ``data_config``, implement the two stages and
    :meth:`blocks`; the introspection helpers below give methods the places they modify (normalisation
    layers, attention, linear layers for LoRA/adapters, per-block outputs for prompts or distillation).
    """

    feat_dim: int
    data_config: DataConfig

    def blocks(self) -> list[nn.Module]:
        """The residual/transformer blocks in forward order."""
        raise NotImplementedError

    def weights_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in the key layout that ``backbone.checkpoint=`` loads back."""
        return self.state_dict()

    def norm_layers(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every LayerNorm / BatchNorm / GroupNorm, in registration order."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, NORM_TYPES)]

    def attention_layers(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every self-attention module (timm's ``Attention`` and its variants)."""
        return [(n, m) for n, m in self.named_modules() if type(m).__name__.endswith("Attention")]

    def linear_layers(self, suffix: str = "") -> list[tuple[str, nn.Linear]]:
        """``(name, module)`` of the ``nn.Linear`` layers whose name ends with ``suffix`` (``attn.qkv``)."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, nn.Linear) and n.endswith(suffix)]

    def replace(self, name: str, module: nn.Module) -> nn.Module:
        """Swap the submodule at dotted ``name`` (e.g. a LoRA-wrapped linear layer); returns the old one."""
        old = self.get_submodule(name)
        self.set_submodule(name, module)
        return old

    def block_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every block of :meth:`blocks` for input ``x`` (one forward pass, via hooks)."""
        outputs: list[torch.Tensor] = []
        handles = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for b in self.blocks()]
        try:
            self.forward_features(x)
        finally:
            for handle in handles:
                handle.remove()
        return outputs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features: a ``[B, C, H, W]`` map for CNNs, ``[B, N, D]`` tokens for ViTs."""
        raise NotImplementedError

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``[B, feat_dim]`` from :meth:`forward_features`'s output."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))
