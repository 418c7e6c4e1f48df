"""Input transformations for input-space tuning: exact identity at init, any size, trainable, clear errors."""

from __future__ import annotations

import pytest
import torch

from cl_bench.errors import ConfigError
from cl_bench.methods.input_transforms import INPUT_TRANSFORMS, PaddingPrompt, build_input_transform


@pytest.mark.parametrize("name", sorted(INPUT_TRANSFORMS))
@pytest.mark.parametrize(("channels", "height", "width"), [(3, 32, 32), (1, 12, 20), (3, 224, 224)])
def test_identity_at_init_for_any_shape(name: str, channels: int, height: int, width: int) -> None:
    g = build_input_transform(name, channels, height, width)
    x = torch.randn(2, channels, height, width)
    assert torch.equal(g(x), x)


@pytest.mark.parametrize("name", sorted(INPUT_TRANSFORMS))
def test_one_step_moves_away_from_identity(name: str) -> None:
    g = build_input_transform(name, 3, 16, 16)
    optimizer = torch.optim.SGD(g.parameters(), lr=0.1)
    x = torch.randn(4, 3, 16, 16)
    for _ in range(2):  # residual_conv: the zero layer moves first, the layers before it next
        optimizer.zero_grad()
        (g(x) - x - 1.0).pow(2).mean().backward()
        optimizer.step()
    assert not torch.allclose(g(x), x)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())


def test_padding_changes_only_the_frame() -> None:
    g = PaddingPrompt(3, 10, 12, pad=2)
    with torch.no_grad():
        for p in g.parameters():
            p.fill_(1.0)
    frame = g.frame()
    assert frame.shape == (3, 10, 12)
    assert torch.all(frame[:, 2:-2, 2:-2] == 0) and frame.sum() == 3 * (10 * 12 - 6 * 8)
    assert sum(p.numel() for p in g.parameters()) == 3 * (10 * 12 - 6 * 8)


def test_bad_options_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="choose one of"):
        build_input_transform("rotate", 3, 32, 32)
    with pytest.raises(ConfigError, match=r"method\.pad=16"):
        build_input_transform("padding", 3, 32, 32, pad=16)
    with pytest.raises(ConfigError, match=r"conv_layers=0"):
        build_input_transform("residual_conv", 3, 32, 32, layers=0)
