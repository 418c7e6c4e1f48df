"""ER and its reservoir buffer: a uniform sample of the stream that never exceeds capacity and survives a
state_dict round trip; training batches join buffered examples of old tasks, re-read and re-transformed; the
task-incremental loss is per task; and replay keeps old classes alive on a real run where seq_ft loses them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import task_context, toy_scenario
from scipy.stats import chisquare
from torch import nn

from cl_bench.backbones.base import Backbone, DataConfig
from cl_bench.data.base import ArrayImages, TaskDataset
from cl_bench.errors import ConfigError
from cl_bench.methods.base import TaskContext
from cl_bench.methods.er import ExperienceReplay
from cl_bench.modules.replay import ReservoirBuffer

SIZES = (2, 2)
SCENARIO = toy_scenario(SIZES)
TASKS = SCENARIO.tasks


def _stream_counts(n_items: int, capacity: int, runs: int, chunk: int) -> np.ndarray:
    """How often each of ``n_items`` stream items ends in the buffer, offered ``chunk`` at a time."""
    torch.manual_seed(0)
    counts = np.zeros(n_items, dtype=np.int64)
    for _ in range(runs):
        buffer = ReservoirBuffer(capacity)
        for start in range(0, n_items, chunk):
            items = torch.arange(start, min(start + chunk, n_items))
            buffer.add(items, items, task=0)
            assert len(buffer) == min(capacity, int(buffer.num_seen))
        kept = buffer.index[: len(buffer)]
        assert len(set(kept.tolist())) == capacity  # distinct items, exactly full
        counts[kept.numpy()] += 1
    return counts


def test_reservoir_keeps_each_stream_item_with_probability_capacity_over_n() -> None:
    counts = _stream_counts(n_items=40, capacity=8, runs=1500, chunk=7)  # batches draw shared slots too
    expected = 1500 * 8 / 40
    assert chisquare(counts).pvalue > 1e-3
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected * (1 - 8 / 40))


def test_reservoir_exact_small_case() -> None:
    counts = _stream_counts(n_items=3, capacity=1, runs=3000, chunk=1)
    assert np.abs(counts / 3000 - 1 / 3).max() < 0.04  # keeping the last (or first) item would fail


def test_reservoir_never_exceeds_capacity_and_round_trips_through_state_dict() -> None:
    buffer = ReservoirBuffer(5, store_logits=True)
    buffer.add(torch.arange(3), torch.tensor([0, 1, 0]), task=0, logits=torch.randn(3, 4))
    buffer.add(torch.arange(3, 20), torch.randint(0, 4, (17,)), task=1, logits=torch.randn(17, 4))
    assert len(buffer) == 5 and int(buffer.num_seen) == 20 and buffer.logits.shape == (5, 4)
    restored = ReservoirBuffer(5, store_logits=True)
    restored.load_state_dict(buffer.state_dict())
    for name, value in buffer.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    assert len(restored) == 5


def test_reservoir_rejects_a_capacity_below_one() -> None:
    with pytest.raises(ConfigError, match="slot"):
        ReservoirBuffer(0)


class TinyBackbone(Backbone):
    feat_dim = 4
    data_config = DataConfig(input_size=4)

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x.flatten(1)))


class CountingTransform:
    """Deterministic, so that replayed inputs can be compared; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return image.float() / 255.0


def _data() -> tuple[ArrayImages, list[TaskDataset], CountingTransform]:
    rng = np.random.RandomState(0)
    images = ArrayImages(rng.randint(0, 256, (40, 4, 4, 3), dtype=np.uint8), np.arange(40) % 4)
    transform = CountingTransform()
    identity = np.arange(4)
    sets = [
        TaskDataset(images, np.flatnonzero(np.isin(images.labels, t.original_classes)), identity, transform)
        for t in TASKS
    ]
    return images, sets, transform


def _steps(module: ExperienceReplay, ctx: TaskContext) -> list[tuple[torch.Tensor, ...]]:
    """Start the task and run one pass of training steps (no optimiser); returns the batches."""
    module.on_task_start(ctx)
    loader = ctx.loader(module.train_dataset(ctx), module.batch_size, shuffle=True)
    batches = list(loader)
    with pytest.warns(UserWarning, match="self.log"):
        for i, batch in enumerate(batches):
            module.training_step(batch, i)
    return batches


def test_first_task_fills_the_buffer_with_its_own_examples() -> None:
    _, sets, _ = _data()
    module = ExperienceReplay(TinyBackbone(), buffer_size=6, batch_size=4)
    _steps(module, task_context(SCENARIO, 0, sets[0]))
    assert int(module.buffer.num_seen) == len(sets[0]) == 20
    assert set(module.buffer.task.tolist()) == {0}
    for index, label in zip(module.buffer.index.tolist(), module.buffer.label.tolist()):
        assert index in sets[0].indices and label == index % 4  # labels follow their images


def test_training_batches_join_re_read_buffer_examples_of_old_tasks(monkeypatch) -> None:
    images, sets, transform = _data()
    module = ExperienceReplay(TinyBackbone(), buffer_size=6, batch_size=4, replay_batch_size=3)
    _steps(module, task_context(SCENARIO, 0, sets[0]))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = module.scoped_cross_entropy

    def spy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append((logits, targets))
        return original(logits, targets)

    inputs: list[torch.Tensor] = []
    monkeypatch.setattr(module, "scoped_cross_entropy", spy)
    monkeypatch.setattr(module, "training_logits", lambda x: inputs.append(x) or module(x))
    calls = transform.calls
    batches = _steps(module, task_context(SCENARIO, 1, sets[1]))
    replayed = []
    for (x, y, _), joined, (_, targets) in zip(batches, inputs, seen):
        assert len(joined) == len(x) + 3 and torch.equal(joined[: len(x)], x)
        replayed.append(targets[len(y) :])
        # each replayed input is a stored image read again through the transform
        for k in range(len(x), len(joined)):
            assert any(torch.equal(joined[k], images.image(i).float() / 255.0) for i in range(len(images)))
    # the first step replays task 0 only; later ones may also replay task-1 examples buffered meanwhile
    assert (replayed[0] < 2).all() and (torch.cat(replayed) < 2).sum() > len(batches)
    assert transform.calls - calls == len(sets[1]) + 3 * len(batches)  # replayed examples re-transformed


def test_task_incremental_loss_is_each_example_over_its_own_task() -> None:
    _, sets, _ = _data()
    module = ExperienceReplay(TinyBackbone(), buffer_size=6, batch_size=4)
    scenario = toy_scenario(SIZES, til=True)
    module.on_task_start(task_context(scenario, 0, sets[0]))
    module.on_task_start(task_context(scenario, 1, sets[1]))
    logits = torch.randn(4, 4)
    targets = torch.tensor([0, 1, 2, 3])
    expected = torch.stack(
        [
            F.cross_entropy(logits[:2, :2], targets[:2], reduction="none"),
            F.cross_entropy(logits[2:, 2:], targets[2:] - 2, reduction="none"),
        ]
    ).mean()
    torch.testing.assert_close(module.scoped_cross_entropy(logits, targets), expected)
    module.task_incremental = False  # class-incremental: over all seen classes
    torch.testing.assert_close(module.scoped_cross_entropy(logits, targets), F.cross_entropy(logits, targets))


def test_buffer_is_part_of_the_state_dict() -> None:
    _, sets, _ = _data()
    module = ExperienceReplay(TinyBackbone(), buffer_size=6, batch_size=4)
    _steps(module, task_context(SCENARIO, 0, sets[0]))
    state = module.state_dict()
    assert torch.equal(state["buffer.index"], module.buffer.index) and int(state["buffer.num_seen"]) == 20


def test_invalid_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="buffer_size"):
        ExperienceReplay(TinyBackbone(), buffer_size=0)
    with pytest.raises(ConfigError, match="replay_batch_size"):
        ExperienceReplay(TinyBackbone(), replay_batch_size=0)


def test_er_on_real_digits_keeps_old_classes_where_seq_ft_forgets_them(run_tiny) -> None:
    # Class-incremental seq_ft ends with 0 % on the first task here (test_seq_ft checks its forgetting).
    doc, _ = run_tiny(
        "method=er", "method.epochs=1", "method.batch_size=16", "method.lr=0.02", "method.buffer_size=200"
    )
    assert doc["status"] == "complete" and len(doc["acc_matrix"]) == 2
    assert doc["acc_matrix"][1][0] > 25.0
