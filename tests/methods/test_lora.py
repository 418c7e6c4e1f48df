"""LoRA (cl_bench/methods/lora.py): a wrapped layer is the same nn.Linear at init (same output, same
parameters, same state-dict keys), only the factors train once the rest is frozen, the fused timm qkv gets
one update, SVD init takes W0's top right singular vectors, and bad targets fail with the valid names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_bench.backbones.timm_backbone import TimmBackbone
from cl_bench.errors import ConfigError
from cl_bench.methods.lora import LoRALinear, add_lora, lora_parameters, mark_only_lora_trainable

TARGETS = ["attn.qkv", "mlp.fc1", "mlp.fc2"]


def _vit() -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone(
        "vit_tiny_patch16_224", pretrained=False, model_kwargs={"img_size": 16, "patch_size": 8, "depth": 2}
    ).eval()


def test_lora_linear_wraps_the_same_parameters_and_adds_scale_BA() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    lora = LoRALinear.wrap(linear, rank=2, scale=0.8)
    assert lora.weight is linear.weight and lora.bias is linear.bias
    assert isinstance(lora, nn.Linear) and lora.lora_A.shape == (2, 6) and lora.lora_B.shape == (5, 2)
    x = torch.randn(3, 6)
    torch.testing.assert_close(lora(x), linear(x))  # B = 0
    with torch.no_grad():
        lora.lora_B.normal_()
    expected = x @ (linear.weight + 0.8 * lora.lora_B @ lora.lora_A).T + linear.bias
    torch.testing.assert_close(lora(x), expected)
    torch.testing.assert_close(lora.weight, linear.weight)  # never merged
    with pytest.raises(ConfigError, match="once"):
        LoRALinear.wrap(lora, rank=2, scale=1.0)


def test_svd_init_takes_the_top_right_singular_vectors() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(8, 12)
    lora = LoRALinear.wrap(linear, rank=3, scale=0.8, init="svd")
    _, s, vh = torch.linalg.svd(linear.weight.detach())
    torch.testing.assert_close(lora.lora_A, vh[:3])
    # Rows of A are unit vectors that capture the largest singular values of W0.
    torch.testing.assert_close(torch.linalg.norm(linear.weight.detach() @ lora.lora_A.T, dim=0), s[:3])


def test_lora_on_a_vit_leaves_its_output_and_keys_unchanged_at_init() -> None:
    vit = _vit()
    x = torch.randn(2, 3, 16, 16)
    before = vit(x)
    keys = set(vit.state_dict())
    wrapped = add_lora(vit, TARGETS, rank=4, scale=0.8, init="svd")
    assert sorted(wrapped) == sorted(f"model.blocks.{b}.{t}" for b in range(2) for t in TARGETS)
    qkv = wrapped["model.blocks.0.attn.qkv"]
    assert qkv.lora_B.shape == (3 * 192, 4) and qkv.lora_A.shape == (4, 192)  # one update for fused q, k, v
    torch.testing.assert_close(vit(x), before)
    lora_keys = {k for k in vit.state_dict() if "lora_" in k}
    assert set(vit.state_dict()) - lora_keys == keys and len(lora_keys) == 2 * len(wrapped)


def test_only_lora_parameters_train_when_the_rest_is_frozen() -> None:
    vit = _vit()
    add_lora(vit, TARGETS, rank=2, scale=0.8)
    mark_only_lora_trainable(vit)
    trainable = [p for p in vit.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(vit)}
    frozen = {n: p.detach().clone() for n, p in vit.named_parameters() if not p.requires_grad}
    lora_before = [p.detach().clone() for p in lora_parameters(vit)]
    optimizer = torch.optim.SGD(trainable, lr=0.5, momentum=0.9, weight_decay=1e-3)
    x = torch.randn(4, 3, 16, 16)
    for _ in range(2):
        loss = vit(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in vit.named_parameters() if n in frozen)
    assert all(not torch.equal(a, b) for a, b in zip(lora_parameters(vit), lora_before, strict=True))


def test_unknown_target_lists_the_linear_layers() -> None:
    with pytest.raises(ConfigError, match="attn.qkv"):
        add_lora(_vit(), ["attn.q_proj"], rank=2, scale=1.0)
    with pytest.raises(ConfigError, match="rank"):
        LoRALinear.wrap(nn.Linear(3, 3), rank=0, scale=1.0)
