"""timm models as backbones (cl_bench/backbones/timm_backbone.py), on vit_tiny without network."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

from cl_bench.backbones.cifar_resnet import CifarResNet
from cl_bench.backbones.timm_backbone import TimmBackbone
from cl_bench.errors import CheckpointError, ConfigError

NAME = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def source() -> TimmBackbone:
    """A randomly initialised vit_tiny backbone (built once for the module)."""
    torch.manual_seed(0)
    return TimmBackbone(NAME)


@pytest.fixture(scope="module")
def checkpoint_state(source: TimmBackbone) -> dict[str, torch.Tensor]:
    """Its weights plus a 1000-class classifier, as a full timm model's state dict would have."""
    state = {k: v.clone() for k, v in source.model.state_dict().items()}
    state["head.weight"] = torch.randn(1000, 192)
    state["head.bias"] = torch.randn(1000)
    return state


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hugging Face Hub offline with an empty cache, whatever the machine's cache holds."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def _assert_weights_equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert set(own) == {k for k in state if not k.startswith("head.")}
    for k, v in own.items():
        assert torch.equal(v, state[k]), k


def test_feat_dim_data_config_and_shapes(source: TimmBackbone) -> None:
    """vit_tiny: 192-d embedding; timm's data config (224 px, mean/std 0.5, bicubic, crop_pct 0.9)."""
    assert source.feat_dim == 192
    dc = source.data_config
    assert dc.input_size == 224
    assert dc.mean == (0.5, 0.5, 0.5) and dc.std == (0.5, 0.5, 0.5)
    assert dc.interpolation == "bicubic"
    assert dc.crop_pct == pytest.approx(0.9)
    assert source.name == NAME
    with torch.no_grad():
        tokens = source.eval().forward_features(torch.randn(1, 3, 224, 224))
        emb = source.pool(tokens)
    assert tokens.shape == (1, 197, 192)  # class token + 14x14 patches
    assert emb.shape == (1, 192)
    torch.testing.assert_close(emb, tokens[:, 0])  # pre-logits of a ViT: the (normed) class token


def test_no_classifier(source: TimmBackbone) -> None:
    """The timm model is built without a classifier."""
    assert source.model.num_classes == 0
    assert not any(k.startswith("head.") for k in source.model.state_dict())


def test_load_checkpoint_with_classifier(tmp_path: Path, checkpoint_state: dict[str, torch.Tensor]) -> None:
    """A .pth with the source classifier loads strictly; the classifier is dropped; weights are equal."""
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": checkpoint_state}, path)
    torch.manual_seed(1)  # a different random init, so equality means loading worked
    loaded = TimmBackbone(NAME, checkpoint=str(path))
    _assert_weights_equal(loaded.model, checkpoint_state)


def test_load_safetensors_checkpoint_wins_over_pretrained(
    tmp_path: Path, checkpoint_state: dict[str, torch.Tensor], offline_hub: None
) -> None:
    """checkpoint= takes precedence over pretrained=True, so no download is attempted."""
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint_state.items()}, str(path))
    loaded = TimmBackbone(NAME, pretrained=True, checkpoint=str(path))
    _assert_weights_equal(loaded.model, checkpoint_state)


def test_checkpoint_of_other_architecture(tmp_path: Path) -> None:
    """A CIFAR ResNet checkpoint into a ViT: CheckpointError naming the file and the mismatch."""
    path = tmp_path / "resnet20.pth"
    torch.save(CifarResNet(depth=8).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        TimmBackbone(NAME, checkpoint=str(path))
    msg = str(info.value)
    assert str(path) in msg
    assert "VisionTransformer" in msg
    assert "missing" in msg and "unexpected" in msg


@pytest.mark.parametrize("name", ["vit_tiniest_patch99", "not_a_model.some_tag"])
def test_unknown_model(name: str) -> None:
    """A name timm does not know is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="is not a timm model") as info:
        TimmBackbone(name)
    assert repr(name) in str(info.value)


def test_pretrained_without_network(offline_hub: None) -> None:
    """pretrained=True offline and uncached: CheckpointError telling the user to pass backbone.checkpoint."""
    with pytest.raises(CheckpointError) as info:
        TimmBackbone(NAME, pretrained=True)
    msg = str(info.value)
    assert "could not fetch pretrained weights" in msg
    assert repr(NAME) in msg
    assert "backbone.checkpoint=" in msg
    assert "backbone.pretrained=false" in msg


def test_torchvision_resnet18_checkpoint_loads_and_gives_torchvisions_features(tmp_path: Path) -> None:
    """A torchvision state dict (with its ``fc`` classifier) loads strictly into ``resnet18.tv_in1k``."""
    import torchvision

    reference = torchvision.models.resnet18().eval()
    path = tmp_path / "resnet18-tv.pth"
    torch.save(reference.state_dict(), path)
    backbone = TimmBackbone("resnet18.tv_in1k", pretrained=True, checkpoint=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    reference.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), reference(x), rtol=1e-5, atol=1e-5)
    assert backbone.data_config.input_size == 224 and backbone.data_config.interpolation == "bilinear"


def test_safetensors_checkpoint_round_trip(tmp_path: Path) -> None:

    source = TimmBackbone("deit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "deit.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = TimmBackbone("deit_tiny_patch16_224", checkpoint=str(path))
    for key, value in source.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_explicit_img_size_sets_the_input_size() -> None:
    """A ViT built for 32 px images (model_kwargs.img_size) is fed 32 px images, not the tag's 224."""
    backbone = TimmBackbone(
        "vit_tiny_patch16_224", pretrained=False, model_kwargs={"img_size": 32, "patch_size": 4, "depth": 2}
    )
    assert backbone.data_config.input_size == 32
    assert backbone.data_config.crop_pct == 1.0
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, backbone.feat_dim)
