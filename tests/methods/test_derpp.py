"""DER++: the buffer keeps the full-width logits of insertion time (every class of the scenario, as
Mammoth's fixed-size head), the loss is CE + alpha * MSE over every column + beta * CE on two independent
buffer draws (one draw and no CE term when beta = 0, i.e. DER), evaluation sees the seen classes only, and a
task-incremental run completes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import task_context, toy_scenario
from torch import nn

from cl_bench.backbones.base import Backbone, DataConfig
from cl_bench.data.base import ArrayImages, TaskDataset
from cl_bench.errors import ConfigError
from cl_bench.methods.base import TaskContext
from cl_bench.methods.derpp import DERPlusPlus

SIZES = (2, 2)
SCENARIO = toy_scenario(SIZES)
TASKS = SCENARIO.tasks


class TinyBackbone(Backbone):
    feat_dim = 4
    data_config = DataConfig(input_size=4)

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x.flatten(1)))


def _sets() -> tuple[ArrayImages, list[TaskDataset]]:
    rng = np.random.RandomState(0)
    images = ArrayImages(rng.randint(0, 256, (40, 4, 4, 3), dtype=np.uint8), np.arange(40) % 4)
    sets = [
        TaskDataset(
            images,
            np.flatnonzero(np.isin(images.labels, t.original_classes)),
            np.arange(4),
            lambda img: img.float() / 255.0,
        )
        for t in TASKS
    ]
    return images, sets


def _module(**kwargs) -> DERPlusPlus:
    torch.manual_seed(0)
    return DERPlusPlus(TinyBackbone(), batch_size=4, **kwargs)


def _batches(module: DERPlusPlus, ctx: TaskContext) -> list[tuple[torch.Tensor, ...]]:
    module.on_task_start(ctx)
    return list(ctx.loader(module.train_dataset(ctx), module.batch_size, shuffle=True))


def _step(module: DERPlusPlus, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with pytest.warns(UserWarning, match="self.log"):
        return module.training_step(batch, 0)


def test_stored_logits_are_those_at_insertion_time() -> None:
    _, sets = _sets()
    module = _module(buffer_size=8)
    first, second, *_ = _batches(module, task_context(SCENARIO, 0, sets[0]))
    with torch.no_grad():
        at_insertion = module.all_logits(first[0])
    assert at_insertion.shape == (4, 4)  # task 1's classes too, before task 1 starts
    _step(module, first)  # empty buffer: the four examples fill slots 0-3
    assert module.buffer.logits.shape == (8, 4)
    torch.testing.assert_close(module.buffer.logits[:4], at_insertion)
    assert torch.equal(module.buffer.index[:4], first[2])
    with torch.no_grad():
        module.head.blocks[0].bias.add_(1.0)  # the model moves on...
    _step(module, second)
    torch.testing.assert_close(module.buffer.logits[:4], at_insertion)  # ...the stored logits do not
    with torch.no_grad():
        assert not torch.allclose(module.all_logits(first[0]), at_insertion)
        torch.testing.assert_close(
            module.buffer.logits[4:8], module.all_logits(second[0])
        )  # the new rows: current logits
        assert module(first[0]).shape == (4, 2)  # evaluation: the seen classes only


def _filled(module: DERPlusPlus) -> tuple[list[TaskDataset], tuple[torch.Tensor, ...]]:
    """Module after task 0 (buffer full) with its head moved; returns the sets and a task-1 batch."""
    _, sets = _sets()
    for batch in _batches(module, task_context(SCENARIO, 0, sets[0])):
        _step(module, batch)
    batch = _batches(module, task_context(SCENARIO, 1, sets[1]))[0]
    with torch.no_grad():
        module.backbone.fc.weight.add_(0.05)
    return sets, batch


def _buffer_inputs(module: DERPlusPlus, sets: list[TaskDataset], slots: torch.Tensor) -> torch.Tensor:
    return torch.stack([sets[0].images.image(int(i)).float() / 255.0 for i in module.buffer.index[slots]])


def _step_then_rewind(module: DERPlusPlus, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One training step from seed 123; then the buffer is put back as the step found it."""
    before = {k: v.clone() for k, v in module.buffer.state_dict().items()}
    torch.manual_seed(123)
    loss = _step(module, batch)
    module.buffer.load_state_dict(before)
    torch.manual_seed(123)  # the next buffer.sample calls repeat the step's draws
    return loss


def _matching(module: DERPlusPlus, sets: list[TaskDataset], slots: torch.Tensor) -> torch.Tensor:
    """Mammoth: ``F.mse_loss(net(x'), z')`` over all columns (stored during task 0, task 1's included)."""
    return F.mse_loss(module.all_logits(_buffer_inputs(module, sets, slots)), module.buffer.logits[slots])


def test_loss_is_ce_plus_alpha_mse_plus_beta_ce_on_two_draws() -> None:
    module = _module(alpha=0.3, beta=0.5, buffer_size=6, replay_batch_size=3)
    sets, (x, y, index) = _filled(module)
    loss = _step_then_rewind(module, (x, y, index))
    first, second = module.buffer.sample(3), module.buffer.sample(3)
    assert not torch.equal(first, second)
    ce = F.cross_entropy(module(x), y)
    buf_ce = F.cross_entropy(module(_buffer_inputs(module, sets, second)), module.buffer.label[second])
    torch.testing.assert_close(loss, ce + 0.3 * _matching(module, sets, first) + 0.5 * buf_ce)


def test_beta_zero_is_der_with_one_draw(monkeypatch) -> None:
    module = _module(alpha=0.3, beta=0.0, buffer_size=6, replay_batch_size=3)
    sets, (x, y, index) = _filled(module)
    draws = []
    original = module.buffer.sample
    monkeypatch.setattr(module.buffer, "sample", lambda n: draws.append(original(n)) or draws[-1])
    loss = _step_then_rewind(module, (x, y, index))
    assert len(draws) == 1
    torch.testing.assert_close(loss, F.cross_entropy(module(x), y) + 0.3 * _matching(module, sets, draws[0]))


def test_logit_matching_is_the_mean_over_every_column_and_holds_future_classes() -> None:
    module = _module(buffer_size=4)
    module.on_task_start(task_context(SCENARIO, 0, _sets()[1][0]))
    stored = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 2.0]])
    module.buffer.add(torch.arange(2), torch.tensor([0, 1]), 0, logits=stored)
    current = torch.zeros(2, 4, requires_grad=True)
    loss = module.logit_matching(torch.arange(2), current)
    torch.testing.assert_close(loss, torch.tensor((1 + 4 + 9 + 16 + 4) / 8))
    loss.backward()
    assert current.grad is not None and current.grad[:, 2:].abs().sum() > 0  # future columns are matched
    with pytest.raises(ValueError, match="width"):
        module.buffer.add(torch.arange(2, 4), torch.tensor([2, 3]), 1, logits=torch.ones(2, 2))


def test_head_reserves_every_task_block_and_opens_them_in_order() -> None:
    _, sets = _sets()
    module = _module()
    module.on_task_start(task_context(SCENARIO, 0, sets[0]))
    assert module.head.task_sizes == [2, 2] and module.head.num_classes == 2
    future = module.head.blocks[1]
    module.on_task_start(task_context(SCENARIO, 1, sets[1]))
    assert module.head.blocks[1] is future and module.head.num_classes == 4  # opened, not re-created


def test_invalid_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        DERPlusPlus(TinyBackbone(), alpha=-0.1)
    with pytest.raises(ConfigError, match="beta"):
        DERPlusPlus(TinyBackbone(), beta=-1.0)


def test_derpp_runs_task_incrementally_on_real_digits(run_tiny) -> None:
    doc, _ = run_tiny(
        "method=derpp",
        "method.epochs=1",
        "method.batch_size=16",
        "method.lr=0.02",
        "method.buffer_size=200",
        "scenario=til",
        "scenario.n_tasks=2",
        "scenario.order_seed=0",
    )
    assert doc["status"] == "complete" and doc["acc_matrix"] == doc["til_acc_matrix"]
    assert doc["acc_matrix"][1][0] > 30.0 and doc["acc_matrix"][1][1] > 30.0
