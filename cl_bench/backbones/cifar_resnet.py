"""ResNet-20/32/44/56 for 32x32 inputs (He et al. 2016, "Deep Residual Learning", Sec. 4.2).

3x3 conv (16 ch) + BN + ReLU, then three stages of ``n = (depth - 2) / 6`` basic blocks with 16/32/64
channels and strides 1/2/2, global average pooling; 64-d embedding. Shortcuts that change shape use
option A (parameter-free: subsample by 2 and zero-pad the channels, Sec. 4.2). Parameter names match the
public CIFAR-10 checkpoints (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``), whose
classifier ``linear`` is dropped when loading.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.backbones.base import Backbone, DataConfig
from cl_bench.backbones.checkpoint import load_strict, read_state_dict
from cl_bench.errors import ConfigError

log = logging.getLogger(__name__)


class PadShortcut(nn.Module):
    """Option-A shortcut: take every other pixel and zero-pad ``pad`` channels on each side."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        changes_shape = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = PadShortcut(planes // 4) if changes_shape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Backbone):
    """CIFAR ResNet of ``depth`` 6n+2, optionally loading ``checkpoint`` (strict keys, ``linear.*`` dropped).

    Without a checkpoint the weights are randomly initialised (Kaiming normal), which the log says.
    """

    def __init__(self, depth: int = 32, checkpoint: str | None = None) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ConfigError(f"backbone.depth={depth}: a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for stage, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.feat_dim = 64
        self.data_config = DataConfig(input_size=32)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
        if checkpoint:
            dropped = load_strict(self, read_state_dict(checkpoint), checkpoint, drop_prefixes=("linear.",))
            log.info("resnet%d_cifar: loaded %s (dropped classifier keys %s)", depth, checkpoint, dropped)
        else:
            log.warning(
                "resnet%d_cifar: no backbone.checkpoint given, weights are randomly initialised", depth
            )

    def blocks(self) -> list[nn.Module]:
        return [block for stage in (self.layer1, self.layer2, self.layer3) for block in stage]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(out)))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return features.mean(dim=(2, 3))
