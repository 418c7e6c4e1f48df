"""Learnable input transformations ``g(x)`` placed in front of a frozen backbone, all the identity at init.

They act on the backbone's input as the data pipeline gives it: a normalised ``[B, C, H, W]`` tensor at the
backbone's resolution (after ``Normalize``), so a zero perturbation is the identity and the learning rate
is in normalised-pixel units. Nothing is clamped or un-normalised after the transformation.

Used by :mod:`cl_bench.methods.input_tuning` (Marullo et al., "Continual Learning with Pretrained
Backbones by Tuning in the Input Space", IJCNN 2023, arXiv 2306.02947), whose abstract does not say which
form the transformation takes; these are the three plausible families:

* ``additive``: a full-image additive prompt (adversarial reprogramming, Elsayed et al., ICLR 2019; the
  full-image visual prompt of Bahng et al., "Exploring Visual Prompts for Adapting Large-Scale Models",
  arXiv 2203.17274, 2022);
* ``padding``: Bahng et al.'s padding prompt, a learnable frame added to the image border;
* ``residual_conv``: a small image-to-image network, as the authors' Neural Friendly Training (Marullo et
  al., "Being Friends Instead of Adversaries: Deep Networks Learn from Data Simplified by Other Networks",
  AAAI 2022) learns a network that transforms the input; here residual and zero-initialised.

Every class takes ``(channels, height, width, **options)``; :data:`INPUT_TRANSFORMS` maps names to classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.errors import ConfigError


class AdditivePrompt(nn.Module):
    """``g(x) = x + delta``, one learnable ``delta`` of the image's shape, initialised to zero.

    The full-image prompt of Bahng et al. (2022) and adversarial reprogramming (Elsayed et al., 2019);
    both start from a random prompt, zero here (ours) so that training starts from a linear probe.
    ``C * H * W`` parameters (3,072 at 32 px, 150,528 at 224 px).
    """

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(channels, height, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta


class PaddingPrompt(nn.Module):
    """``g(x) = x + frame``: a learnable frame ``pad`` pixels wide added to the image border, zero inside.

    Bahng et al.'s (2022) padding prompter (``pad=30`` at 224 px there; the frame is added to the border
    pixels, the image keeps its size). Initialised to zero (theirs: random), so ``g`` is the identity at
    init. ``C * (H * W - (H - 2 pad) * (W - 2 pad))`` parameters.
    """

    def __init__(self, channels: int, height: int, width: int, pad: int = 4) -> None:
        super().__init__()
        if pad < 1 or 2 * pad >= min(height, width):
            raise ConfigError(
                f"method.pad={pad}: the frame must be at least 1 pixel wide and leave an inside for "
                f"{height}x{width} inputs (1 <= pad < {(min(height, width) + 1) // 2})"
            )
        self.pad = pad
        inner = height - 2 * pad
        self.top = nn.Parameter(torch.zeros(channels, pad, width))
        self.bottom = nn.Parameter(torch.zeros(channels, pad, width))
        self.left = nn.Parameter(torch.zeros(channels, inner, pad))
        self.right = nn.Parameter(torch.zeros(channels, inner, pad))
        self.register_buffer("inside", torch.zeros(channels, inner, width - 2 * pad), persistent=False)

    def frame(self) -> torch.Tensor:
        """The ``[C, H, W]`` additive frame (zero inside)."""
        middle = torch.cat([self.left, self.inside, self.right], dim=2)
        return torch.cat([self.top, middle, self.bottom], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.frame()


class ResidualConvTransform(nn.Module):
    """``g(x) = x + T(x)``: ``layers`` 3x3 convolutions (ReLU between, ``hidden`` channels), last one zero.

    A small, resolution-agnostic stand-in for the U-Net "simplifier" of Neural Friendly Training (Marullo
    et al., AAAI 2022), made residual with a zero-initialised output layer (ours) so that ``g`` is exactly
    the identity at init. The zero layer gets gradients at the first step, the layers before it from the
    second step on.
    """

    def __init__(self, channels: int, height: int, width: int, hidden: int = 16, layers: int = 2) -> None:
        super().__init__()
        if hidden < 1 or layers < 1:
            raise ConfigError(f"method.conv_hidden={hidden} and method.conv_layers={layers} must be >= 1")
        widths = [channels] + [hidden] * (layers - 1) + [channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, padding=1) for c_in, c_out in zip(widths[:-1], widths[1:])
        )
        nn.init.zeros_(self.convs[-1].weight)
        nn.init.zeros_(self.convs[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for conv in self.convs[:-1]:
            out = F.relu(conv(out))
        return x + self.convs[-1](out)


#: Transformation family name (``method.transform``) -> class.
INPUT_TRANSFORMS: dict[str, type[nn.Module]] = {
    "additive": AdditivePrompt,
    "padding": PaddingPrompt,
    "residual_conv": ResidualConvTransform,
}


def build_input_transform(name: str, channels: int, height: int, width: int, **options: int) -> nn.Module:
    """The transformation ``name`` for ``channels x height x width`` inputs, with its ``options``."""
    if name not in INPUT_TRANSFORMS:
        raise ConfigError(f"method.transform={name!r}: choose one of {sorted(INPUT_TRANSFORMS)}")
    return INPUT_TRANSFORMS[name](channels, height, width, **options)
