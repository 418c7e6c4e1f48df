"""What methods reach inside a backbone for: blocks, norm layers, attention, linear layers, block outputs."""

from __future__ import annotations

import torch
from torch import nn

from cl_bench.backbones.cifar_resnet import CifarResNet
from cl_bench.backbones.timm_backbone import TimmBackbone


def test_vit_exposes_blocks_norms_attention_and_qkv() -> None:
    vit = TimmBackbone("vit_tiny_patch16_224", pretrained=False).eval()
    assert len(vit.blocks()) == 12
    norms = vit.norm_layers()
    assert len(norms) == 2 * 12 + 1 and all(isinstance(m, nn.LayerNorm) for _, m in norms)
    assert norms[-1][0] == "model.norm"
    assert [n for n, _ in vit.attention_layers()][:2] == ["model.blocks.0.attn", "model.blocks.1.attn"]
    qkv = vit.linear_layers("attn.qkv")
    assert len(qkv) == 12 and qkv[0][1].out_features == 3 * 192
    features = vit.block_features(torch.randn(1, 3, 224, 224))
    assert len(features) == 12 and features[-1].shape == (1, 197, 192)
    assert not vit.blocks()[0]._forward_hooks  # hooks removed afterwards


def test_cifar_resnet_exposes_blocks_and_batchnorms() -> None:
    net = CifarResNet(20)
    assert len(net.blocks()) == 9
    assert len(net.norm_layers()) == 1 + 2 * 9
    outs = net.block_features(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape[1:]) for o in outs[::3]] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    assert net.attention_layers() == []


def test_timm_resnet_blocks_and_replace() -> None:
    net = TimmBackbone("resnet18", pretrained=False).eval()
    assert len(net.blocks()) == 8
    x = torch.randn(1, 3, 64, 64)
    before = net(x)
    old = net.replace("model.layer4.1.bn2", nn.Identity())
    assert isinstance(old, nn.BatchNorm2d) and isinstance(
        net.get_submodule("model.layer4.1.bn2"), nn.Identity
    )
    assert not torch.allclose(net(x), before)
