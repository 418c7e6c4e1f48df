"""Per-task LayerNorm affine sets swapped into a backbone (cl_bench/methods/norm_sets.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cl_bench.backbones.cifar_resnet import CifarResNet
from cl_bench.backbones.timm_backbone import TimmBackbone
from cl_bench.errors import ConfigError
from cl_bench.methods.norm_sets import NormSets, TaskLayerNorm

TINY_VIT = {"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def original() -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone("vit_tiny_patch16_224", model_kwargs=TINY_VIT).eval()


def _wrapped(original: TimmBackbone) -> tuple[TimmBackbone, NormSets]:
    backbone = copy.deepcopy(original)
    return backbone, NormSets(backbone)


def _randomise(sets: NormSets, index: int) -> None:
    with torch.no_grad():
        for param in sets.parameters_of(index):
            param.copy_(torch.randn_like(param))


def test_wraps_every_layernorm_and_starts_as_the_pretrained_model(original: TimmBackbone) -> None:
    backbone, sets = _wrapped(original)
    assert sets.names == [f"model.blocks.{i}.norm{j}" for i in range(2) for j in (1, 2)] + ["model.norm"]
    assert all(isinstance(backbone.get_submodule(name), TaskLayerNorm) for name in sets.names)
    assert sets.params_per_set == 5 * 2 * 32
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(backbone(x), original(x))  # selection None: the pre-trained LayerNorms
    sets.add_set(copy_from=None)
    with sets.selected(0):
        assert torch.equal(backbone(x), original(x))  # a fresh set equals the pre-trained parameters


def test_swapping_a_set_changes_only_layernorm_affine_parameters(original: TimmBackbone) -> None:
    backbone, sets = _wrapped(original)
    sets.add_set(None)
    sets.add_set(0)
    _randomise(sets, 1)
    reference = copy.deepcopy(original)  # the plain model with set 1 written into its LayerNorms
    with torch.no_grad():
        for name, layer in zip(sets.names, sets.layers, strict=True):
            reference.get_submodule(name).weight.copy_(layer.weights[1])
            reference.get_submodule(name).bias.copy_(layer.biases[1])
    changed = {k for k, v in reference.state_dict().items() if not torch.equal(v, original.state_dict()[k])}
    assert changed and all(
        k.endswith(("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"))
        or k in ("model.norm.weight", "model.norm.bias")
        for k in changed
    )
    x = torch.randn(4, 3, 16, 16)
    with sets.selected(1):
        assert torch.equal(backbone(x), reference(x))
    with sets.selected(0):
        assert torch.equal(backbone(x), original(x))
    assert sets.layers[0].selection is None  # the context restores the previous selection


def test_per_image_selection_equals_one_pass_per_set(original: TimmBackbone) -> None:
    backbone, sets = _wrapped(original)
    for copy_from in (None, 0, 1):
        sets.add_set(copy_from)
    _randomise(sets, 1)
    _randomise(sets, 2)
    x = torch.randn(5, 3, 16, 16)
    tasks = torch.tensor([2, 0, 1, 2, 0])
    with sets.selected(tasks):
        mixed = backbone(x)
    for i, task in enumerate(tasks.tolist()):
        with sets.selected(task):
            torch.testing.assert_close(mixed[i], backbone(x[i : i + 1])[0], rtol=1e-5, atol=1e-5)
    with sets.selected(torch.tensor([1, 1, 1, 1, 1])):  # one set for the batch: the fused path, exact
        uniform = backbone(x)
    with sets.selected(1):
        assert torch.equal(uniform, backbone(x))


def test_sets_are_independent_tensors_and_training_one_leaves_the_other_identical(
    original: TimmBackbone,
) -> None:
    backbone, sets = _wrapped(original.requires_grad_(False))
    sets.add_set(None)
    sets.add_set(0)  # warm start: a copy of set 0, not a view of it
    first = [p.detach().clone() for p in sets.parameters_of(0)]
    for old, new in zip(sets.parameters_of(0), sets.parameters_of(1), strict=True):
        assert old.data_ptr() != new.data_ptr() and old.stride() == new.stride() == (1,)
        assert not old.requires_grad and new.requires_grad
    # The official expand() tables alias every row on CPU (methods_vit.md §4.8 pitfall 1):
    table = nn.Parameter(first[0].unsqueeze(0).expand(3, -1))
    assert table.stride(0) == 0 and table[0].data_ptr() == table[2].data_ptr()
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in sets.parameters_of(1)}
    optimizer = torch.optim.AdamW(sets.parameters_of(0) + sets.parameters_of(1), lr=0.1, weight_decay=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        with sets.selected(1):
            backbone(torch.randn(4, 3, 16, 16)).pow(2).mean().backward()
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(sets.parameters_of(0), first, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(sets.parameters_of(1), first, strict=True))


def test_errors() -> None:
    with pytest.raises(ConfigError, match="no nn.LayerNorm"):
        NormSets(CifarResNet(20))
    backbone = TimmBackbone("vit_tiny_patch16_224", model_kwargs=TINY_VIT)
    sets = NormSets(backbone)
    with pytest.raises(ValueError, match="already wrapped"):
        NormSets(backbone)
    sets.add_set(None)
    with pytest.raises(IndexError):
        sets.select(1)
    with pytest.raises(IndexError):
        sets.select(torch.tensor([0, 1]))
    with pytest.raises(IndexError):
        sets.add_set(copy_from=3)
    with pytest.raises(ConfigError, match="scale and a bias"):
        TaskLayerNorm(nn.LayerNorm(4, elementwise_affine=False))
