"""SI: the path integral sums -g * delta_theta of the unregularised loss (lr * g^2 under plain SGD), the
importance is relu(Omega + omega / (Delta^2 + xi)) anchored at the task's end, and on a real run Lightning
drives the hooks and the first task's task-aware accuracy stays above seq_ft's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyBackbone, ToyTasks

from cl_bench.errors import ConfigError
from cl_bench.methods.base import TaskContext
from cl_bench.methods.si import SynapticIntelligence

SIZES = (2, 2)
TOY = ToyTasks(SIZES, n_per_class=4, input_shape=(4,))
LR = 0.1


def _module(**kwargs) -> SynapticIntelligence:
    torch.manual_seed(0)
    return SynapticIntelligence(TinyBackbone(), batch_size=4, **kwargs)


def _train(module: SynapticIntelligence, ctx: TaskContext, steps: int = 3) -> dict[str, torch.Tensor]:
    """The hooks in Lightning's order with plain SGD; returns sum_t lr * g_t^2 of the CE-only gradient
    (the path integral while there is no penalty)."""
    module.on_task_start(ctx)
    module.on_train_start()
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    x, y = ctx.train_set.tensors
    expected = {n: torch.zeros_like(p) for n, p in module.named_parameters()}
    for step in range(steps):
        ce_grads = torch.autograd.grad(F.cross_entropy(module(x), y), list(module.parameters()))
        for (name, _), g in zip(module.named_parameters(), ce_grads):
            expected[name] += LR * g**2
        optimizer.zero_grad()
        with pytest.warns(UserWarning, match="self.log"):
            module.training_step((x, y), step).backward()
        module.on_before_optimizer_step(optimizer)
        optimizer.step()
        module.on_train_batch_end(None, (x, y), step)
    return expected


def test_path_integral_is_lr_times_squared_gradient_under_plain_sgd() -> None:
    module = _module()
    expected = _train(module, TOY.context(0))
    assert set(module.omega) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(module.omega[name], value)
        assert (value > 0).any()


def test_path_integral_excludes_the_penalty_gradient() -> None:
    module = _module(c=5.0)
    _train(module, TOY.context(0))
    module.on_task_end(TOY.context(0))
    ctx = TOY.context(1)
    module.on_task_start(ctx)
    module.on_train_start()
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    x, y = ctx.train_set.tensors
    with torch.no_grad():
        module.backbone.fc.weight.add_(0.2)  # away from the anchor: the penalty has a gradient
    params = list(module.parameters())
    ce_grads = torch.autograd.grad(F.cross_entropy(module(x), y), params)
    before = [p.detach().clone() for p in params]
    optimizer.zero_grad()
    with pytest.warns(UserWarning, match="self.log"):
        module.training_step((x, y), 0).backward()
    total = [p.grad.clone() for p in params]
    module.on_before_optimizer_step(optimizer)
    optimizer.step()
    module.on_train_batch_end(None, (x, y), 0)
    names = [n for n, _ in module.named_parameters()]
    weight = names.index("backbone.fc.weight")
    assert not torch.allclose(total[weight], ce_grads[weight])  # the penalty contributes to .grad ...
    for name, g, b, p in zip(names, ce_grads, before, params):
        torch.testing.assert_close(module.omega[name], -g * (p.detach() - b))  # ... but not to omega


def test_task_end_sets_relu_importance_and_anchor() -> None:
    module = _module(xi=0.01)
    _train(module, TOY.context(0))
    omega = {n: v.clone() for n, v in module.omega.items()}
    start = dict(module.start)
    module.omega["backbone.fc.bias"][0] = -1.0  # a negative contribution is clipped at 0
    module.on_task_end(TOY.context(0))
    (term,) = module.penalty.terms
    for name, p in module.named_parameters():
        value = omega[name].clone()
        if name == "backbone.fc.bias":
            value[0] = -1.0
        expected = (value / ((p.detach() - start[name]) ** 2 + 0.01)).clamp(min=0)
        torch.testing.assert_close(term.importance[name], expected)
        assert torch.equal(term.anchor[name], p.detach())
    assert term.importance["backbone.fc.bias"][0] == 0
    assert module.penalty(dict(module.named_parameters())).item() == 0.0  # zero at the anchor


def test_second_task_adds_to_the_importance() -> None:
    module = _module()
    _train(module, TOY.context(0))
    module.on_task_end(TOY.context(0))
    first = {n: v.clone() for n, v in module.penalty.terms[0].importance.items()}
    _train(module, TOY.context(1))
    start, omega = dict(module.start), {n: v.clone() for n, v in module.omega.items()}
    module.on_task_end(TOY.context(1))
    for name, p in module.named_parameters():
        new = omega[name] / ((p.detach() - start[name]) ** 2 + module.xi)
        expected = (first.get(name, 0.0) + new).clamp(min=0)
        torch.testing.assert_close(module.penalty.terms[0].importance[name], expected)


def test_invalid_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="method.c"):
        SynapticIntelligence(TinyBackbone(), c=-1.0)
    with pytest.raises(ConfigError, match="xi"):
        SynapticIntelligence(TinyBackbone(), xi=0.0)


def test_si_on_real_digits_drives_the_path_integral_and_forgets_less_than_seq_ft(
    run_tiny, monkeypatch
) -> None:
    totals: list[float] = []
    original = SynapticIntelligence.on_task_end

    def spy(self: SynapticIntelligence, ctx: TaskContext) -> None:
        original(self, ctx)
        totals.append(sum(float(v.sum()) for v in self.penalty.terms[0].importance.values()))

    monkeypatch.setattr(SynapticIntelligence, "on_task_end", spy)
    common = ("method.epochs=1", "method.batch_size=16", "method.lr=0.02")
    doc, _ = run_tiny("method=si", *common)
    assert doc["status"] == "complete" and len(doc["acc_matrix"]) == 2
    assert len(totals) == 2 and totals[0] > 0 and totals[1] > 0 and totals[1] != totals[0]
    baseline, _ = run_tiny("method=seq_ft", *common)  # task-aware accuracy on the first task after the second
    assert doc["til_acc_matrix"][1][0] > baseline["til_acc_matrix"][1][0] + 10.0
