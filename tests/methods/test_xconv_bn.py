"""Xconv BN: exact recovery of post-conv means, phase tracking, pairing on real architectures, snapshots."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from cl_bench.backbones.cifar_resnet import CifarResNet
from cl_bench.methods.xconv_bn import (
    PhaseMeanTracker,
    XconvBatchNorm,
    find_conv_bn_pairs,
    phase_mean_map,
    recover_post_conv_mean,
)

CONVS = {
    "3x3_s1_p1": dict(kernel_size=3, stride=1, padding=1),
    "3x3_s2_p1": dict(kernel_size=3, stride=2, padding=1),
    "1x1_s2_p0": dict(kernel_size=1, stride=2, padding=0),
    "7x7_s2_p3": dict(kernel_size=7, stride=2, padding=3),
    "3x3_groups_dilation_bias": dict(kernel_size=3, stride=1, padding=2, dilation=2, groups=4, bias=True),
    "3x3_s3_p1": dict(kernel_size=3, stride=3, padding=1),
}


def _stationary_batch(phase_means: torch.Tensor, stride: int, size: int, n: int = 64) -> torch.Tensor:
    """x = per-phase constant + noise whose mean over the batch is zero at every position (float64)."""
    torch.manual_seed(0)
    noise = torch.randn(n, phase_means.shape[1], size, size, dtype=torch.float64)
    noise -= noise.mean(dim=0, keepdim=True)
    return phase_mean_map(phase_means, (size, size), (stride, stride)) + noise


@pytest.mark.parametrize("name", list(CONVS))
def test_recovery_is_exact_for_a_stationary_input(name: str) -> None:
    """mean_{n,p} conv(x) equals conv(stored phase-mean map) averaged over p, to float64 precision."""
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 16, **{"bias": False, **CONVS[name]}).double()
    stride = conv.stride[0]
    phase_means = torch.randn(stride * stride, 8, dtype=torch.float64) * 3
    x = _stationary_batch(phase_means, stride, size=14)
    tracker = PhaseMeanTracker(8, conv.stride, momentum=1.0).double()
    tracker.update(x)
    assert torch.allclose(tracker.running_mean, phase_means, atol=1e-12)
    recovered = recover_post_conv_mean(conv, tracker.mean_map())
    truth = conv(x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(recovered, truth.detach(), rtol=0, atol=1e-10)


def test_1x1_stride2_recovery_is_exact_for_any_input() -> None:
    """For the downsample conv (1x1, stride 2, no padding) parity means make the recovery exact."""
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 12, 1, stride=2, bias=False).double()
    x = torch.rand(32, 6, 14, 14, dtype=torch.float64) * torch.linspace(0, 3, 14, dtype=torch.float64)
    tracker = PhaseMeanTracker(6, conv.stride, momentum=1.0).double()
    tracker.update(x)
    truth = conv(x).mean(dim=(0, 2, 3)).detach()
    torch.testing.assert_close(recover_post_conv_mean(conv, tracker.mean_map()), truth, rtol=0, atol=1e-12)


def test_padding_is_not_ignored() -> None:
    """Summing the kernel taps (ignoring zero padding) would be wrong on a small map; the real conv is not."""
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False).double()
    nn.init.ones_(conv.weight)
    mean_map = phase_mean_map(torch.ones(1, 1, dtype=torch.float64), (7, 7), (1, 1))
    recovered = recover_post_conv_mean(conv, mean_map)
    assert recovered.item() == pytest.approx(9 * (19 / 21) ** 2)  # not 9


def test_tracker_ema_uses_momentum_and_only_updates_when_asked() -> None:
    tracker = PhaseMeanTracker(2, (1, 1), momentum=0.1)
    tracker.update(torch.ones(4, 2, 5, 5))
    tracker.update(torch.full((4, 2, 5, 5), 3.0))
    torch.testing.assert_close(tracker.running_mean, torch.full((1, 2), 0.9 * 0.1 + 0.1 * 3.0))
    assert tracker.input_size.tolist() == [5, 5]
    with pytest.raises(RuntimeError, match="fixed input resolution"):
        tracker.update(torch.ones(4, 2, 6, 6))


def _count_bns(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize(
    ("builder", "size", "expected_stride2"),
    [
        (lambda: CifarResNet(20), 32, 2),
        (lambda: torchvision.models.resnet18(), 64, 7),  # conv1, layer{2,3,4}.0.conv1 and downsample.0
        (lambda: timm.create_model("resnet18", pretrained=False, num_classes=0), 64, 7),
    ],
    ids=["cifar_resnet20", "torchvision_resnet18", "timm_resnet18"],
)
def test_every_resnet_bn_is_paired_with_its_conv(builder, size: int, expected_stride2: int) -> None:
    model = builder()
    pairs, unpaired = find_conv_bn_pairs(model, torch.zeros(1, 3, size, size))
    assert not unpaired and len(pairs) == _count_bns(model)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[p.conv_name], nn.Conv2d) for p in pairs)
    strided = [p for p in pairs if modules[p.conv_name].stride == (2, 2)]
    assert len(strided) == expected_stride2
    if "layer2.0.downsample.1" in modules:
        assert ("layer2.0.downsample.0", "layer2.0.downsample.1") in [(p.conv_name, p.bn_name) for p in pairs]


def test_bn_after_a_non_conv_op_is_left_unpaired() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )
    pairs, unpaired = find_conv_bn_pairs(model, torch.zeros(1, 3, 8, 8))
    assert [(p.conv_name, p.bn_name) for p in pairs] == [("3", "4")] and unpaired == ["2"]


def _two_layer_net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1, stride=2)
    )


def test_trackers_follow_training_batches_only() -> None:
    model = _two_layer_net()
    xbn = XconvBatchNorm(model, torch.zeros(1, 3, 8, 8))
    tracker = xbn.trackers["0"]
    model.train()
    model(torch.ones(2, 3, 8, 8))
    after_train = tracker.running_mean.clone()
    assert torch.allclose(after_train, torch.full_like(after_train, 0.1))
    model.eval()
    model(torch.full((2, 3, 8, 8), 5.0))
    assert torch.equal(tracker.running_mean, after_train)


def test_xconv_estimate_beats_the_stale_mean_under_a_shifted_input() -> None:
    """Task A (inputs around +1), then training on task B (inputs around -1) moves the conv: for task A,
    the recovered mean is much closer to the true post-conv mean than BN's running mean."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    xbn = XconvBatchNorm(model, torch.zeros(1, 3, 16, 16))
    task_a = torch.randn(256, 3, 16, 16) * 0.5 + 1.0
    task_b = torch.randn(256, 3, 16, 16) * 0.5 - 1.0
    model.train()
    for _ in range(60):
        model(task_a[torch.randint(0, 256, (32,))])
    xbn.snapshot(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(60):
        loss = (model(task_b[torch.randint(0, 256, (32,))]) - 2.0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        truth = model[0](task_a).mean(dim=(0, 2, 3))
    stale = model[1].running_mean.clone()
    xbn.load(0, recover=True)
    recovered = model[1].running_mean.clone()
    assert (recovered - truth).norm() < 0.1 * (stale - truth).norm()


def test_snapshots_restore_exactly_and_independently_of_order() -> None:
    model = _two_layer_net()
    xbn = XconvBatchNorm(model, torch.zeros(1, 3, 8, 8))
    model.train()
    model(torch.randn(4, 3, 8, 8))
    xbn.snapshot(0)
    with torch.no_grad():
        model[1].weight.mul_(2.0)
        model[0].weight.add_(0.1)
    model(torch.randn(4, 3, 8, 8) + 1)
    xbn.snapshot(1)
    model.eval()
    x = torch.randn(3, 3, 8, 8)
    xbn.load(0, recover=True)
    once = model(x)
    xbn.load(1, recover=False)
    xbn.load(0, recover=True)
    torch.testing.assert_close(model(x), once, rtol=0, atol=0)
    xbn.load(0, recover=False)
    assert torch.equal(model[1].running_mean, xbn.snapshots[0]["1.running_mean"])
    assert torch.equal(model[1].weight, xbn.snapshots[0]["1.weight"])


def test_snapshots_travel_in_the_state_dict() -> None:
    model = _two_layer_net()
    xbn = XconvBatchNorm(model, torch.zeros(1, 3, 8, 8))
    model.train()
    model(torch.randn(4, 3, 8, 8))
    xbn.snapshot(0)
    fresh = XconvBatchNorm(_two_layer_net(), torch.zeros(1, 3, 8, 8))
    fresh.load_state_dict(xbn.state_dict())
    assert len(fresh.snapshots) == 1
    assert torch.equal(fresh.trackers["0"].running_mean, xbn.trackers["0"].running_mean)
