"""Reading checkpoint files and strict loading (cl_bench/backbones/checkpoint.py)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cl_bench.backbones.checkpoint import load_strict, read_state_dict
from cl_bench.errors import CheckpointError


class Net(nn.Module):
    """A conv + BN feature extractor with a classifier ``fc`` (like a torchvision model)."""

    def __init__(self, channels: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, classes)


class Trunk(nn.Module):
    """``Net`` without its classifier."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, bias=False)
        self.bn = nn.BatchNorm2d(channels)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = Net()
    net.bn.running_mean.uniform_(-1, 1)
    net.bn.running_var.uniform_(0.5, 2)
    net.bn.num_batches_tracked.fill_(7)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_read_safetensors(tmp_path: Path) -> None:
    """A .safetensors file is read as is."""
    state = _state()
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    _assert_same(read_state_dict(path), state)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".th", ".bin"])
def test_read_plain_torch_pickle(tmp_path: Path, suffix: str) -> None:
    """A flat torch-saved state dict, under any of the usual suffixes; str paths work too."""
    state = _state()
    path = tmp_path / f"w{suffix}"
    torch.save(state, path)
    _assert_same(read_state_dict(str(path)), state)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {"state_dict": s, "epoch": 90, "best_prec1": 91.7},
        lambda s: {"model": s, "optimizer": {"lr": 0.1}},
        lambda s: {"model_state": s},
        lambda s: {"net": s},
        lambda s: {"model": {"state_dict": s}},
    ],
    ids=["state_dict", "model", "model_state", "net", "model.state_dict"],
)
def test_read_nested(tmp_path: Path, wrap: object) -> None:
    """Training-script wrappers around the weights are unwrapped."""
    state = _state()
    path = tmp_path / "w.pth"
    torch.save(wrap(state), path)  # type: ignore[operator]
    _assert_same(read_state_dict(path), state)


def test_read_strips_module_prefix(tmp_path: Path) -> None:
    """DataParallel's 'module.' prefix is removed (only at the start of a key)."""
    state = _state()
    wrapped = OrderedDict((f"module.{k}", v) for k, v in state.items())
    wrapped["head.module.x"] = torch.ones(1)
    path = tmp_path / "dp.pth"
    torch.save({"state_dict": wrapped}, path)
    out = read_state_dict(path)
    assert set(out) == set(state) | {"head.module.x"}
    assert torch.equal(out["conv.weight"], state["conv.weight"])


def test_read_missing_file(tmp_path: Path) -> None:
    """A missing file is a CheckpointError naming it and the config key."""
    path = tmp_path / "absent.pth"
    with pytest.raises(CheckpointError, match="checkpoint not found") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)
    assert "backbone.checkpoint" in str(info.value)


def test_read_non_tensor_pickle(tmp_path: Path) -> None:
    """A pickle of plain Python values is not a state dict."""
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "arch": "resnet"}, path)
    with pytest.raises(CheckpointError, match="holds no state dict of tensors") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_read_list_of_tensors(tmp_path: Path) -> None:
    """A list of tensors has no names: rejected with its type."""
    path = tmp_path / "list.pth"
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="top-level type list"):
        read_state_dict(path)


def test_read_pickled_object_refused(tmp_path: Path) -> None:
    """A whole pickled module needs code execution, which weights_only refuses."""
    path = tmp_path / "model.pth"
    torch.save(Net(), path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(path)


def test_read_garbage_file(tmp_path: Path) -> None:
    """Bytes that are no checkpoint at all, under both readers."""
    for name in ("junk.pth", "junk.safetensors"):
        path = tmp_path / name
        path.write_bytes(b"\x00garbage" * 20)
        with pytest.raises(CheckpointError, match=name):
            read_state_dict(path)


def test_load_strict_drops_classifier() -> None:
    """drop_prefixes removes the source classifier, returns its keys, and loads the rest exactly."""
    state = _state()
    trunk = Trunk()
    dropped = load_strict(trunk, state, "src.pth", drop_prefixes=("fc.",))
    assert sorted(dropped) == ["fc.bias", "fc.weight"]
    own = trunk.state_dict()
    for k in own:
        assert torch.equal(own[k], state[k]), k
    assert int(own["bn.num_batches_tracked"]) == 7


def test_load_strict_without_drop_rejects_classifier() -> None:
    """Without drop_prefixes the classifier keys are unexpected."""
    with pytest.raises(CheckpointError, match=r"unexpected 2 keys .*'fc.bias', 'fc.weight'"):
        load_strict(Trunk(), _state(), "src.pth")


def test_load_strict_reports_missing_unexpected_and_shapes() -> None:
    """One message lists missing keys, unexpected keys and shape mismatches, and names the source."""
    state = _state()
    del state["bn.weight"]
    state["extra.weight"] = torch.zeros(2)
    state["conv.weight"] = torch.zeros(5, 3, 3, 3)
    trunk = Trunk()
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_strict(trunk, state, "/ckpt/src.pth", drop_prefixes=("fc.",))
    msg = str(info.value)
    assert "/ckpt/src.pth" in msg and "Trunk" in msg
    assert "missing 1 keys (e.g. ['bn.weight'])" in msg
    assert "unexpected 1 keys (e.g. ['extra.weight'])" in msg
    assert "conv.weight: (5, 3, 3, 3) vs (4, 3, 3, 3)" in msg
    # Nothing was loaded.
    _assert_same(trunk.state_dict(), before)


def test_load_strict_tolerates_missing_num_batches_tracked() -> None:
    """Old checkpoints lack BN's num_batches_tracked; that alone is not an error."""
    state = {k: v for k, v in _state().items() if not k.endswith("num_batches_tracked")}
    trunk = Trunk()
    assert sorted(load_strict(trunk, state, "old.th", drop_prefixes=("fc.",))) == ["fc.bias", "fc.weight"]
    assert torch.equal(trunk.bn.running_var, state["bn.running_var"])


def test_load_strict_only_drops_listed_prefixes() -> None:
    """A prefix matches the start of a key, not a substring elsewhere."""
    state = _state()
    state["conv.fc.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected 1 keys .*conv\.fc\.extra"):
        load_strict(Trunk(), state, "src", drop_prefixes=("fc.",))
