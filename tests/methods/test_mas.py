"""MAS: the importance is the hand-derived mean absolute gradient of the squared (Avalanche) or unsquared
(FACIL) output norm; tasks fold in as current Avalanche (Omega = Omega_1 after the first task, then
alpha * Omega + (1 - alpha) * Omega_new, a new parameter takes Omega_new) or as FACIL (from Omega = 0, penalty
halved); the penalty is zero at the anchor, and a task-incremental run completes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LinearBackbone, ToyTasks

from cl_bench.errors import ConfigError
from cl_bench.methods.mas import MAS

SIZES = (2, 2)
TOY = ToyTasks(SIZES, n_per_class=3, input_shape=(4,))


def _module(**kwargs) -> MAS:
    torch.manual_seed(0)
    return MAS(LinearBackbone(), batch_size=4, **kwargs)


def _hand_importance(module: MAS, x: torch.Tensor, squared: bool) -> dict[str, torch.Tensor]:
    """Mean over the mini-batches (4 and 2 rows) of |d mean_i n(out_i) / d theta|, derived by hand."""
    fc, block = module.backbone.fc, module.head.blocks[0]
    expected: dict[str, torch.Tensor] = {}
    for rows in (slice(0, 4), slice(4, 6)):
        xb = x[rows]
        feats = xb @ fc.weight.T + fc.bias
        out = feats @ block.weight.T + block.bias
        if squared:  # d ||out||^2 = 2 out
            d_out = 2 * out / len(xb)
        else:  # d ||out|| = out / ||out||
            d_out = out / out.norm(dim=1, keepdim=True) / len(xb)
        back = d_out @ block.weight
        grads = {
            "head.blocks.0.weight": d_out.T @ feats,
            "head.blocks.0.bias": d_out.sum(0),
            "backbone.fc.weight": back.T @ xb,
            "backbone.fc.bias": back.sum(0),
        }
        for name, g in grads.items():
            expected[name] = expected.get(name, 0) + g.detach().abs() / 2
    return expected


@pytest.mark.parametrize("convention", ["avalanche", "facil"])
def test_importance_equals_hand_computation(convention: str) -> None:
    module = _module(convention=convention)
    ctx = TOY.context(0)
    module.on_task_start(ctx)
    expected = _hand_importance(module, ctx.train_eval_set.tensors[0], squared=convention == "avalanche")
    importance = module.importance(ctx)
    assert set(importance) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(importance[name], value)


def _two_tasks(module: MAS) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Runs the task hooks of both tasks; returns the importances of task 0 and task 1."""
    module.on_task_start(TOY.context(0))
    first = module.importance(TOY.context(0))
    module.on_task_end(TOY.context(0))
    module.on_task_start(TOY.context(1))
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1)
    second = module.importance(TOY.context(1))
    module.on_task_end(TOY.context(1))
    return first, second


def test_avalanche_omega_is_omega_1_after_task_1_then_folds_with_alpha() -> None:
    module = _module(alpha=0.25)
    module.on_task_start(TOY.context(0))
    first = module.importance(TOY.context(0))
    module.on_task_end(TOY.context(0))
    (term,) = module.penalty.terms
    for name, value in first.items():  # Omega = Omega_1, not (1 - alpha) Omega_1
        torch.testing.assert_close(term.importance[name], value)
    module = _module(alpha=0.25)
    first, second = _two_tasks(module)
    (term,) = module.penalty.terms
    assert "head.blocks.1.weight" not in first
    for name, value in second.items():
        expected = 0.25 * first[name] + 0.75 * value if name in first else value
        torch.testing.assert_close(term.importance[name], expected)
    assert module.penalty(dict(module.named_parameters())).item() == 0.0


def test_facil_omega_starts_at_zero() -> None:
    module = _module(alpha=0.25, convention="facil")
    first, second = _two_tasks(module)
    (term,) = module.penalty.terms
    for name, value in second.items():
        expected = 0.25 * 0.75 * first[name] + 0.75 * value if name in first else 0.75 * value
        torch.testing.assert_close(term.importance[name], expected)


@pytest.mark.parametrize(("convention", "factor"), [("avalanche", 1.0), ("facil", 0.5)])
def test_training_loss_adds_lambda_times_penalty(convention: str, factor: float) -> None:
    module = _module(lambda_reg=2.0, convention=convention)
    module.on_task_start(TOY.context(0))
    module.on_task_end(TOY.context(0))
    module.on_task_start(TOY.context(1))
    with torch.no_grad():
        module.backbone.fc.weight.add_(0.3)
    x, y = TOY.context(1).train_set.tensors
    (term,) = module.penalty.terms
    params = dict(module.named_parameters())
    by_hand = sum(
        (omega * (params[name] - term.anchor[name]) ** 2).sum() for name, omega in term.importance.items()
    )
    assert by_hand.item() > 0
    with pytest.warns(UserWarning, match="self.log"):
        loss = module.training_step((x, y), 0)
    torch.testing.assert_close(loss, F.cross_entropy(module(x), y) + factor * 2.0 * by_hand)


def test_task_incremental_importance_uses_the_task_block_only() -> None:
    module = _module()
    module.on_task_start(TOY.context(0, til=True))
    module.on_task_end(TOY.context(0, til=True))
    module.on_task_start(TOY.context(1, til=True))
    importance = module.importance(TOY.context(1, til=True))
    assert importance["head.blocks.0.weight"].abs().sum() == 0
    assert importance["head.blocks.1.weight"].abs().sum() > 0


def test_invalid_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="lambda_reg"):
        MAS(LinearBackbone(), lambda_reg=-1.0)
    with pytest.raises(ConfigError, match="alpha"):
        MAS(LinearBackbone(), alpha=1.0)
    with pytest.raises(ConfigError, match="convention"):
        MAS(LinearBackbone(), convention="paper")


def test_mas_runs_task_incrementally_on_real_digits(run_tiny) -> None:
    doc, _ = run_tiny(
        "method=mas",
        "method.lambda_reg=0.1",  # full Omega_1 (Avalanche) on raw digits: lambda 1 passes SGD's stable step
        "method.epochs=1",
        "method.batch_size=16",
        "method.lr=0.01",
        "scenario=til",
        "scenario.n_tasks=2",
        "scenario.order_seed=0",
    )
    assert doc["status"] == "complete" and doc["acc_matrix"] == doc["til_acc_matrix"]
    acc = doc["acc_matrix"]
    assert acc[0][0] > 40.0 and acc[1][0] > 25.0  # 5 classes per task: chance is 20 %
