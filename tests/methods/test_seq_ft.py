"""Sequential fine-tuning: learns each task, forgets the old ones in CIL, and uses the right loss scope."""

from __future__ import annotations

import pytest
import torch

from cl_bench.backbones.cifar_resnet import CifarResNet
from cl_bench.methods.seq_ft import SequentialFineTuning
from cl_bench.scenario import Task


def test_seq_ft_learns_and_forgets_on_real_digits(run_tiny) -> None:
    doc, _ = run_tiny("method=seq_ft", "method.epochs=3", "method.batch_size=32", "method.lr=0.05")
    acc = doc["acc_matrix"]
    assert acc[0][0] > 60.0 and acc[1][1] > 60.0  # 5 classes per task: chance is 20 %
    assert acc[1][0] < acc[0][0] - 20.0  # catastrophic forgetting without task ids
    assert doc["avg_forgetting"] == pytest.approx(acc[0][0] - acc[1][0])
    assert doc["til_acc_matrix"][1][0] >= acc[1][0]


def test_task_incremental_uses_task_ids(run_tiny) -> None:
    doc, _ = run_tiny(
        "method=seq_ft",
        "method.epochs=2",
        "method.lr=0.05",
        "scenario=til",
        "scenario.n_tasks=2",
        "scenario.order_seed=0",
    )
    assert doc["acc_matrix"] == doc["til_acc_matrix"]
    assert doc["acc_matrix"][1][0] > 20.0


def _module(loss_scope: str) -> SequentialFineTuning:
    module = SequentialFineTuning(CifarResNet(20), loss_scope=loss_scope)
    module.head.add_task(3)
    module.head.add_task(2)
    module.task = Task(1, 3, 5, (7, 8))
    return module


def test_loss_scope_seen_keeps_all_logits_and_task_slices() -> None:
    logits = torch.arange(10.0).reshape(2, 5)
    y = torch.tensor([3, 4])
    seen_logits, seen_y = _module("seen").task_logits(logits, y)
    assert torch.equal(seen_logits, logits) and torch.equal(seen_y, y)
    task_logits, task_y = _module("task").task_logits(logits, y)
    assert torch.equal(task_logits, logits[:, 3:5]) and task_y.tolist() == [0, 1]


def test_slow_learner_parameter_groups() -> None:
    module = SequentialFineTuning(CifarResNet(20), lr=0.1, backbone_lr=0.001)
    module.head.add_task(4)
    groups = {g["name"]: g for g in module.param_groups()}
    assert groups["backbone"]["lr"] == 0.001 and groups["head"]["lr"] == 0.1
    n_backbone = sum(p.numel() for p in groups["backbone"]["params"])
    assert n_backbone == sum(p.numel() for p in module.backbone.parameters())
    assert sum(p.numel() for p in groups["head"]["params"]) == 64 * 4 + 4


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("epochs", -1, r"method.epochs=-1: must be >= 0"),
        ("batch_size", 0, r"method.batch_size=0: must be >= 1"),
        ("lr", -0.1, r"method.lr=-0.1: must be >= 0"),
    ],
)
def test_a_budget_value_out_of_range_is_refused_naming_it(key: str, value: float, message: str) -> None:
    from cl_bench.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        SequentialFineTuning(CifarResNet(20), **{key: value})
