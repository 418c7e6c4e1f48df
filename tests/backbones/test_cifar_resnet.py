"""CIFAR ResNet-20/32/44/56 (cl_bench/backbones/cifar_resnet.py), with the real CIFAR-10 checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cl_bench.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from cl_bench.backbones.cifar_resnet import CifarResNet
from cl_bench.errors import CheckpointError, ConfigError

# Feature extractor without the 64->10 classifier. Worked out by hand:
# stem 3*16*9 + 32 = 464; one block per stage: 16->16: 2*2304+64 = 4672, 32->32: 2*9216+128 = 18560,
# 64->64: 2*36864+256 = 73984 (sum 97216); first block of stages 2/3: 4608+9216+128 = 13952 and
# 18432+36864+256 = 55552. ResNet-20 (n=3) = 464 + 3*4672 + 13952 + 2*18560 + 55552 + 2*73984 = 269,072.
PARAMS = {20: 269_072, 32: 463_504, 44: 657_936, 56: 852_368}
DEPTHS = sorted(PARAMS)


def _param_count(n: int) -> int:
    """Independent closed form: stem + first blocks + (n-1) same-shape blocks per stage (+ the rest)."""
    return 464 + 4672 + 13952 + 55552 + (n - 1) * (4672 + 18560 + 73984)


def _checkpoint(weights: Path, depth: int) -> Path:
    (path,) = weights.glob(f"cifar10_akamaster_resnet{depth}-*.th")
    return path


def _raw_state(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint read independently of cl_bench: akamaster's {'state_dict': {'module.*': ...}}."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in raw["state_dict"].items()}


@pytest.mark.parametrize("depth", DEPTHS)
def test_parameter_count(depth: int) -> None:
    """Parameter counts of the feature extractor match the closed form (option-A shortcuts have none)."""
    model = CifarResNet(depth=depth)
    n = sum(p.numel() for p in model.parameters())
    assert n == PARAMS[depth] == _param_count((depth - 2) // 6)
    # The paper's total (with the 64*10+10 classifier) is 0.27M/0.46M/0.66M/0.85M.
    assert round((n + 650) / 1e6, 2) == {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85}[depth]


def test_output_shapes_and_data_config() -> None:
    """[B, 64] embedding, [B, 64, 8, 8] feature map, 32-px input with ImageNet normalisation."""
    model = CifarResNet(depth=20).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        emb = model(x)
    assert feats.shape == (2, 64, 8, 8)
    assert emb.shape == (2, 64)
    assert model.feat_dim == 64
    torch.testing.assert_close(emb, feats.mean(dim=(2, 3)))
    assert model.data_config.input_size == 32
    assert model.data_config.mean == IMAGENET_MEAN and model.data_config.std == IMAGENET_STD


def test_structure() -> None:
    """n = (depth-2)/6 blocks per stage; the layer names match the public checkpoints."""
    model = CifarResNet(depth=32)
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [5, 5, 5]
    keys = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer2.0.conv1.weight", "layer3.4.bn2.bias"} <= keys
    assert not any(k.startswith("linear") for k in keys)


@pytest.mark.parametrize("depth", [0, 2, 19, 21, 22, 33])
def test_invalid_depth(depth: int) -> None:
    """Depths other than 6n+2 (n >= 1) are a ConfigError naming the key."""
    with pytest.raises(ConfigError, match=f"backbone.depth={depth}"):
        CifarResNet(depth=depth)


def test_missing_checkpoint(tmp_path: Path) -> None:
    """A checkpoint path that does not exist is a CheckpointError naming it."""
    path = tmp_path / "nope.th"
    with pytest.raises(CheckpointError, match="nope.th"):
        CifarResNet(depth=20, checkpoint=str(path))


def test_wrong_depth_checkpoint(tmp_path: Path) -> None:
    """Weights of a ResNet-20 do not load into a ResNet-32: the message lists the missing blocks."""
    path = tmp_path / "r20.pth"
    torch.save(CifarResNet(depth=20).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"missing \d+ keys .*layer1\.3"):
        CifarResNet(depth=32, checkpoint=str(path))


@pytest.mark.parametrize("depth", DEPTHS)
def test_real_checkpoint_loads_exactly(shared_weights: Path, depth: int) -> None:
    """Each akamaster checkpoint loads strictly; every tensor equals the file's (``module.`` stripped).

    The classifier ``linear`` is dropped.
    """
    path = _checkpoint(shared_weights, depth)
    model = CifarResNet(depth=depth, checkpoint=str(path))
    raw = _raw_state(path)
    assert {"linear.weight", "linear.bias"} <= set(raw)
    own = model.state_dict()
    expected_keys = {k for k in raw if not k.startswith("linear.")}
    assert expected_keys == {k for k in own if not k.endswith("num_batches_tracked")}
    for k in expected_keys:
        assert torch.equal(own[k], raw[k]), k
    # BatchNorm statistics are the trained ones, not the 0/1 defaults.
    for name in ("bn1", "layer1.0.bn1", f"layer3.{(depth - 2) // 6 - 1}.bn2"):
        assert own[f"{name}.running_mean"].abs().max() > 1e-3
        assert (own[f"{name}.running_var"] - 1).abs().max() > 1e-3


def _reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor, n: int) -> torch.Tensor:
    """akamaster's ResNet written out with functional ops on the raw checkpoint tensors (eval mode)."""

    def bn(h: torch.Tensor, p: str) -> torch.Tensor:
        mean, var = state[f"{p}.running_mean"], state[f"{p}.running_var"]
        return F.batch_norm(h, mean, var, state[f"{p}.weight"], state[f"{p}.bias"], training=False, eps=1e-5)

    h = F.relu(bn(F.conv2d(x, state["conv1.weight"], padding=1), "bn1"))
    for stage, planes in ((1, 16), (2, 32), (3, 64)):
        for i in range(n):
            p = f"layer{stage}.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            out = F.relu(bn(F.conv2d(h, state[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
            out = bn(F.conv2d(out, state[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            if stride != 1:
                zeros = h.new_zeros(h.shape[0], planes // 4, *out.shape[2:])
                short = torch.cat([zeros, h[:, :, ::2, ::2], zeros], dim=1)
            else:
                short = h
            h = F.relu(out + short)
    return h.mean(dim=(2, 3))


def test_real_checkpoint_matches_reference_network(shared_weights: Path) -> None:
    """Our embedding equals an independent functional ResNet on the same weights; 'linear' logits are sane."""
    path = _checkpoint(shared_weights, 20)
    model = CifarResNet(depth=20, checkpoint=str(path)).eval()
    raw = _raw_state(path)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb = model(x)
        ref = _reference_forward(raw, x, 3)
    torch.testing.assert_close(emb, ref, rtol=1e-4, atol=1e-5)
    assert (emb >= 0).all() and emb.abs().sum() > 0  # post-ReLU average
    logits = emb @ raw["linear.weight"].T + raw["linear.bias"]
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1  # not a collapsed classifier
