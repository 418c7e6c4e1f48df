"""Task keys matched to a frozen model's query by cosine similarity (cl_bench/methods/task_keys.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cl_bench.errors import ConfigError
from cl_bench.methods.task_keys import TaskKeys


def test_orthogonal_initial_keys_and_independent_frozen_old_keys() -> None:
    torch.manual_seed(0)
    keys = TaskKeys(dim=16, num_tasks=4)
    gram = keys.initial @ keys.initial.T
    torch.testing.assert_close(gram, torch.eye(4), atol=1e-5, rtol=0)
    assert keys.add_key() == 0 and keys.add_key() == 1
    assert torch.equal(keys.keys[1], keys.initial[1]) and keys.keys[1].data_ptr() != keys.initial.data_ptr()
    assert not keys.keys[0].requires_grad and keys.keys[1].requires_grad
    keys.add_key(copy_previous=True)
    assert torch.equal(keys.keys[2], keys.keys[1]) and keys.keys[2].data_ptr() != keys.keys[1].data_ptr()
    keys.add_key()
    with pytest.raises(IndexError, match="all 4 keys"):
        keys.add_key()


def test_pull_loss_is_minus_the_mean_cosine_and_reaches_only_its_key() -> None:
    torch.manual_seed(1)
    keys = TaskKeys(dim=8, num_tasks=2, init="uniform")
    keys.add_key()
    keys.add_key()
    keys.keys[0].requires_grad_(True)  # to show that the loss itself leaves other keys alone
    queries = torch.randn(5, 8)
    loss = keys.pull_loss(queries, task=1)
    expected = -F.cosine_similarity(queries, keys.keys[1].detach().unsqueeze(0)).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert keys.keys[0].grad is None and keys.keys[1].grad is not None
    sims = keys.similarity(queries)
    assert sims.shape == (5, 2) and torch.equal(keys.select(queries), sims.argmax(dim=1))


def test_trained_keys_pick_the_right_task_on_separated_synthetic_tasks() -> None:
    """Four tasks whose queries cluster around their own random direction: after each task's key is
    trained (Adam, the official optimiser) the keys select every query's task, old tasks included."""
    torch.manual_seed(2)
    dim, n_tasks = 32, 4
    centres = F.normalize(torch.randn(n_tasks, dim), dim=1) * 4
    queries = [centres[t] + 0.3 * torch.randn(64, dim) for t in range(n_tasks)]
    keys = TaskKeys(dim, n_tasks)
    for task in range(n_tasks):
        keys.add_key()
        optimizer = torch.optim.Adam([keys.keys[task]], lr=0.05)
        for step in range(60):
            batch = queries[task][(step * 16) % 64 :][:16]
            optimizer.zero_grad()
            keys.pull_loss(batch, task).backward()
            optimizer.step()
        seen = torch.cat(queries[: task + 1])
        truth = torch.arange(task + 1).repeat_interleave(64)
        assert torch.equal(keys.select(seen), truth)
    # before training the orthogonal keys know nothing of the tasks
    fresh = TaskKeys(dim, n_tasks)
    for _ in range(n_tasks):
        fresh.add_key()
    assert (fresh.select(torch.cat(queries)) != torch.arange(n_tasks).repeat_interleave(64)).any()


def test_errors() -> None:
    with pytest.raises(ConfigError, match="orthogonal"):
        TaskKeys(4, 2, init="normal")
    with pytest.raises(RuntimeError, match="no task key"):
        TaskKeys(4, 2).select(torch.randn(1, 4))
