"""Growing classifier heads (cl_bench/modules/heads.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.modules.heads import IncrementalLinearHead, PrototypeHead


def test_linear_head_grows() -> None:
    """Each add_task appends a block; num_classes is the sum of the blocks."""
    head = IncrementalLinearHead(8)
    assert head.num_classes == 0
    first = head.add_task(3)
    assert isinstance(first, nn.Linear) and first.out_features == 3 and first.in_features == 8
    head.add_task(5)
    assert head.num_classes == 8
    assert len(head.blocks) == 2
    assert head(torch.randn(4, 8)).shape == (4, 8)


def test_linear_head_columns_ordered_by_task() -> None:
    """Columns 0..2 are task 0's block, 3..4 task 1's: logits equal each block's output concatenated."""
    torch.manual_seed(0)
    head = IncrementalLinearHead(6)
    a, b = head.add_task(3), head.add_task(2)
    x = torch.randn(5, 6)
    out = head(x)
    torch.testing.assert_close(out[:, :3], x @ a.weight.T + a.bias)
    torch.testing.assert_close(out[:, 3:], x @ b.weight.T + b.bias)
    # Changing task 1's block leaves task 0's columns alone.
    with torch.no_grad():
        b.weight.zero_()
        b.bias.fill_(2.5)
    out2 = head(x)
    torch.testing.assert_close(out2[:, :3], out[:, :3])
    torch.testing.assert_close(out2[:, 3:], torch.full((5, 2), 2.5))


def test_linear_head_without_bias() -> None:
    """bias=False gives bias-free blocks: a zero input scores zero."""
    head = IncrementalLinearHead(4, bias=False)
    block = head.add_task(2)
    assert block.bias is None
    assert torch.equal(head(torch.zeros(1, 4)), torch.zeros(1, 2))


def test_linear_head_state_dict_keys() -> None:
    """One parameter pair per block, addressable for freezing single tasks."""
    head = IncrementalLinearHead(4)
    head.add_task(2)
    head.add_task(3)
    expected = ["blocks.0.bias", "blocks.0.weight", "blocks.1.bias", "blocks.1.weight"]
    assert sorted(head.state_dict()) == expected


def test_prototype_head_cosine_logits() -> None:
    """logit[i, c] = scale * cos(x_i, mu_c), checked against a manual computation."""
    torch.manual_seed(0)
    head = PrototypeHead(5, scale=16.0)
    head.add_task(3)
    protos = torch.randn(3, 5)
    head.set_prototypes(torch.arange(3), protos)
    x = torch.randn(4, 5)
    out = head(x)
    manual = torch.empty(4, 3)
    for i in range(4):
        for c in range(3):
            manual[i, c] = 16.0 * torch.dot(x[i], protos[c]) / (x[i].norm() * protos[c].norm())
    torch.testing.assert_close(out, manual)
    torch.testing.assert_close(out, 16.0 * F.cosine_similarity(x[:, None], protos[None], dim=-1))
    # the logits do not depend on a prototype's length
    head.set_prototypes(torch.tensor([1]), 7.0 * protos[1:2])
    torch.testing.assert_close(head(x), out)


def test_prototype_head_add_task_and_set() -> None:
    """add_task reserves zero prototypes; set_prototypes fills given positions only."""
    head = PrototypeHead(3)
    assert head.num_classes == 0
    head.add_task(2)
    head.add_task(3)
    assert head.num_classes == 5
    assert torch.equal(head.prototypes, torch.zeros(5, 3))
    head.set_prototypes(torch.tensor([4, 1]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    assert head.prototypes[4].tolist() == [1.0, 0.0, 0.0]
    assert head.prototypes[1].tolist() == [0.0, 2.0, 0.0]
    assert head.prototypes[[0, 2, 3]].abs().sum() == 0
    # a zero (unset) prototype scores 0, a matching one scores `scale`
    logits = head(torch.tensor([[3.0, 0.0, 0.0]]))
    assert logits.shape == (1, 5)
    torch.testing.assert_close(logits, torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]]))
    # adding a task keeps the existing prototypes
    head.add_task(1)
    assert head.num_classes == 6 and head.prototypes[4].tolist() == [1.0, 0.0, 0.0]


def test_prototype_head_position_out_of_range() -> None:
    """A position beyond the reserved classes raises IndexError naming it; nothing is written."""
    head = PrototypeHead(2)
    head.add_task(3)
    with pytest.raises(IndexError, match=r"must lie in \[0, 3\), got \[0, 3\]"):
        head.set_prototypes(torch.tensor([0, 3]), torch.ones(2, 2))
    assert head.prototypes.abs().sum() == 0


def test_prototype_head_negative_position() -> None:
    """A negative position is out of range too; it must not silently overwrite the last class."""
    head = PrototypeHead(2)
    head.add_task(3)
    with pytest.raises(IndexError):
        head.set_prototypes(torch.tensor([-1]), torch.ones(1, 2))
    assert head.prototypes.abs().sum() == 0


def test_prototype_head_state_dict_round_trip() -> None:
    """A saved head loads into a fresh head of another size, which takes the saved size."""
    torch.manual_seed(0)
    head = PrototypeHead(4)
    head.add_task(3)
    head.add_task(2)
    head.set_prototypes(torch.arange(5), torch.randn(5, 4))
    state = head.state_dict()
    assert list(state) == ["prototypes"]

    fresh = PrototypeHead(4)
    fresh.add_task(1)
    fresh.load_state_dict(state)
    assert fresh.num_classes == 5
    assert torch.equal(fresh.prototypes, head.prototypes)
    x = torch.randn(2, 4)
    torch.testing.assert_close(fresh(x), head(x))

    # also when the head is a submodule (prefixed keys), and into a larger head
    class Model(nn.Module):
        def __init__(self, size: int) -> None:
            super().__init__()
            self.head = PrototypeHead(4)
            self.head.add_task(size)

    src, dst = Model(0), Model(9)
    src.head = head
    dst.load_state_dict(src.state_dict())
    assert dst.head.num_classes == 5
    assert torch.equal(dst.head.prototypes, head.prototypes)
