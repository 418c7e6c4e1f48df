"""PET modules: insertion points and sizes, identity at init (adapter), exact pass-through when disabled,
only PET parameters trainable, independent copies; on the small 192-d, 3-head ViT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_bench.backbones.cifar_resnet import CifarResNet
from cl_bench.backbones.timm_backbone import TimmBackbone
from cl_bench.errors import ConfigError
from cl_bench.modules.peft import (
    AdapterBranch,
    ParallelAdapter,
    PromptedBlock,
    ScaleShift,
    ShallowPromptedBlocks,
    attach_peft,
    freeze_all_but_peft,
    independent_copy,
    peft_disabled,
    peft_parameters,
)

DEPTH, DIM = 2, 192


def _vit() -> TimmBackbone:
    torch.manual_seed(0)
    kwargs = {"img_size": 16, "patch_size": 8, "depth": DEPTH}
    return TimmBackbone("vit_tiny_patch16_224", pretrained=False, model_kwargs=kwargs).eval()


def _x() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_adapter_is_the_identity_at_init_and_sits_beside_every_mlp() -> None:
    backbone, x = _vit(), _x()
    reference = backbone(x)
    wrappers = attach_peft(backbone, "adapter", adapter_bottleneck=8)
    assert len(wrappers) == DEPTH and all(isinstance(w, ParallelAdapter) for w in wrappers)
    assert all(isinstance(block.norm2, nn.Identity) for block in backbone.blocks())
    assert sum(p.numel() for p in peft_parameters(backbone)) == DEPTH * (2 * DIM * 8 + 8 + DIM)
    torch.testing.assert_close(backbone(x), reference)  # Up = 0
    for wrapper in wrappers:
        nn.init.normal_(wrapper.up.weight)
    changed = backbone(x)
    assert not torch.allclose(changed, reference)
    with peft_disabled(backbone):
        torch.testing.assert_close(backbone(x), reference)
    torch.testing.assert_close(backbone(x), changed)  # switched back on


def test_adapter_adds_scale_times_the_bottleneck_of_the_pre_norm_stream() -> None:
    norm, mlp = nn.LayerNorm(4), nn.Linear(4, 4)
    adapter = ParallelAdapter(norm, mlp, dim=4, bottleneck=2, scale=0.1, dropout=0.0)
    nn.init.normal_(adapter.up.weight)
    x = torch.randn(5, 4)
    expected = mlp(norm(x)) + 0.1 * adapter.up(torch.relu(adapter.down(x)))
    torch.testing.assert_close(adapter(x), expected)


def test_adapter_branch_is_zero_at_init_and_keeps_the_saved_keys() -> None:
    """The branch EASE keeps per task outputs 0 at init (zero ``Up``); ``ParallelAdapter`` holds it as its
    own ``down``/``up`` layers, the keys of saved models, and lists only those as PET parameters."""
    branch = AdapterBranch(dim=4, bottleneck=2, scale=0.1, dropout=0.0)
    assert torch.count_nonzero(branch(torch.randn(3, 4))) == 0
    adapter = ParallelAdapter(nn.LayerNorm(4), nn.Linear(4, 4), dim=4, bottleneck=2, scale=0.1, dropout=0.0)
    keys = {"norm.weight", "norm.bias", "mlp.weight", "mlp.bias", "down.weight", "down.bias", "up.weight"}
    assert set(adapter.state_dict()) == keys | {"up.bias"}
    assert {id(p) for p in adapter.pet_parameters()} == {
        id(p) for p in (adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias)
    }


def test_ssf_wraps_the_official_insertion_points() -> None:
    backbone, x = _vit(), _x()
    reference = backbone(x)
    wrappers = attach_peft(backbone, "ssf")
    assert all(isinstance(w, ScaleShift) for w in wrappers)
    assert len(wrappers) == 1 + 6 * DEPTH + 1  # patch embed, 6 per block, final norm
    block = backbone.blocks()[0]
    for module in (block.norm1, block.attn.qkv, block.attn.proj, block.norm2, block.mlp.fc1, block.mlp.fc2):
        assert isinstance(module, ScaleShift)
    assert block.attn.qkv.ssf_scale.shape == (3 * DIM,) and block.mlp.fc1.ssf_scale.shape == (4 * DIM,)
    assert not torch.allclose(backbone(x), reference)  # scale ~ N(1, 0.02), shift ~ N(0, 0.02)
    with peft_disabled(backbone):
        torch.testing.assert_close(backbone(x), reference)
    with torch.no_grad():
        for w in wrappers:
            w.ssf_scale.fill_(1.0)
            w.ssf_shift.zero_()
    torch.testing.assert_close(backbone(x), reference)


def test_deep_vpt_appends_and_drops_prompts_at_every_block() -> None:
    backbone, x = _vit(), _x()
    reference = backbone(x)
    wrappers = attach_peft(backbone, "vpt", prompt_tokens=3)
    assert len(wrappers) == DEPTH and all(isinstance(w, PromptedBlock) for w in wrappers)
    assert all(w.prompts.shape == (3, DIM) and not w.prompts.any() for w in wrappers)
    assert backbone.forward_features(x).shape == (3, 1 + 4, DIM)  # prompts dropped again
    assert not torch.allclose(backbone(x), reference)  # zero tokens still take part in attention
    with peft_disabled(backbone):
        torch.testing.assert_close(backbone(x), reference)
    freeze_all_but_peft(backbone)
    backbone(x).sum().backward()
    assert all(w.prompts.grad is not None and w.prompts.grad.abs().sum() > 0 for w in wrappers)


def test_shallow_vpt_appends_prompts_once_and_drops_them_after_the_last_block() -> None:
    backbone, x = _vit(), _x()
    reference = backbone(x)
    blocks = list(backbone.model.blocks)
    wrappers = attach_peft(backbone, "vpt_shallow", prompt_tokens=3)
    assert len(wrappers) == 1 and isinstance(wrappers[0], ShallowPromptedBlocks)
    assert backbone.blocks() == blocks and wrappers[0].prompts.shape == (3, DIM)
    with torch.no_grad():
        wrappers[0].prompts.normal_()
    tokens: list[torch.Tensor] = []
    hook = blocks[0].register_forward_pre_hook(lambda _m, args: tokens.append(args[0]))
    with peft_disabled(backbone):
        torch.testing.assert_close(backbone(x), reference)
    hook.remove()
    expected = torch.cat([tokens[0], wrappers[0].prompts.expand(len(x), -1, -1)], dim=1)
    for block in blocks:  # the same prompts go through every block, never replaced
        expected = block(expected)
    expected = backbone.model.norm(expected[:, :-3])
    torch.testing.assert_close(backbone.forward_features(x), expected)
    freeze_all_but_peft(backbone)
    backbone(x).sum().backward()
    assert wrappers[0].prompts.grad is not None and wrappers[0].prompts.grad.abs().sum() > 0
    assert peft_parameters(backbone) == [wrappers[0].prompts]


@pytest.mark.parametrize("kind", ["adapter", "ssf", "vpt", "vpt_shallow"])
def test_only_pet_parameters_train_and_copies_are_independent(kind: str) -> None:
    backbone = _vit()
    attach_peft(backbone, kind)
    freeze_all_but_peft(backbone)
    pet = {id(p) for p in peft_parameters(backbone)}
    assert pet and all(p.requires_grad == (id(p) in pet) for p in backbone.parameters())
    slow = independent_copy(backbone, trainable=False)
    fast = independent_copy(backbone, trainable=True)
    assert not slow.training and not any(p.requires_grad for p in slow.parameters())
    assert {id(p) for p in fast.parameters() if p.requires_grad} == {id(p) for p in peft_parameters(fast)}
    storages = {p.untyped_storage().data_ptr() for p in backbone.parameters()}
    assert not storages & {p.untyped_storage().data_ptr() for p in slow.parameters()}
    with torch.no_grad():
        for p in peft_parameters(fast):
            p.add_(torch.randn_like(p))  # (a constant would vanish in the LayerNorm of zero prompts)
    x = _x()
    torch.testing.assert_close(slow(x), backbone.eval()(x))
    assert not torch.allclose(fast.eval()(x), slow(x))


def test_bad_requests_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="choose one of"):
        attach_peft(_vit(), "prefix")
    with pytest.raises(ConfigError, match="timm ViT"):
        attach_peft(CifarResNet(20), "adapter")
    with pytest.raises(ConfigError, match="bottleneck"):
        attach_peft(_vit(), "adapter", adapter_bottleneck=0)
    assert attach_peft(CifarResNet(20), "none") == []
