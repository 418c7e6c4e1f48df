"""The head-only fast path (cl_bench/modules/feature_fit.py) equals a Lightning fit of the same module."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import LinearBackbone
from torch.utils.data import TensorDataset

from cl_bench.config import ScenarioType
from cl_bench.methods.base import TaskContext
from cl_bench.methods.linear_probe import LinearProbe
from cl_bench.modules.feature_fit import fit_on_features
from cl_bench.scenario import Scenario, Task

TASKS = (Task(0, 0, 3, (0, 1, 2)), Task(1, 3, 6, (3, 4, 5)))
SCENARIO = Scenario(ScenarioType.cil, tuple(range(6)), TASKS)


def _features(task: int, n: int = 90) -> TensorDataset:
    g = torch.Generator().manual_seed(10 + task)
    labels = torch.arange(n) % 3 + 3 * task
    return TensorDataset(torch.randn(n, 3, generator=g) + labels[:, None].float() * 0.3, labels)


def _lightning_fit(
    module: LinearProbe, ctx: TaskContext, data: TensorDataset, precision: str, root: Path
) -> None:
    trainer = pl.Trainer(
        max_epochs=module.epochs,
        accelerator="cpu",
        devices=1,
        precision=precision,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
    )
    trainer.fit(module, train_dataloaders=ctx.loader(data, module.batch_size, shuffle=True))


@pytest.mark.parametrize(
    ("optimizer", "scheduler", "precision"),
    [("sgd", "cosine", "32-true"), ("adam", "none", "32-true"), ("sgd", "cosine", "bf16-mixed")],
)
def test_fast_path_equals_lightning_fit(
    tmp_path: Path, optimizer: str, scheduler: str, precision: str
) -> None:
    """Two tasks of linear probing on cached features (batch 32 over 90 samples: a partial last batch):
    the head after each task equals Lightning's to float tolerance, the same batch order included."""
    torch.manual_seed(0)
    kwargs = dict(
        epochs=4, batch_size=32, lr=0.05, optimizer=optimizer, scheduler=scheduler, weight_decay=1e-3
    )
    lightning = LinearProbe(LinearBackbone(), **kwargs)
    fast = copy.deepcopy(lightning)
    dtype = torch.bfloat16 if precision.startswith("bf16") else None
    epochs_seen: list[int] = []
    for t in range(2):
        ctx = TaskContext(TASKS[t], SCENARIO, None, None, seed=3, autocast_dtype=dtype)  # type: ignore[arg-type]
        data = _features(t)
        rng = torch.get_rng_state()  # the new head block is drawn alike for both
        for module in (lightning, fast):
            torch.set_rng_state(rng)
            module.on_task_start(ctx)
        _lightning_fit(lightning, ctx, data, precision, tmp_path)
        losses = fit_on_features(
            fast,
            ctx.loader(data, fast.batch_size, shuffle=True),
            fast.epochs,
            dtype,
            lambda e, _: epochs_seen.append(e),
        )
        assert len(losses) == 4 and losses[-1] < losses[0]
        for (name, a), (_, b) in zip(
            lightning.head.named_parameters(), fast.head.named_parameters(), strict=True
        ):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"task {t} {name}")
    assert epochs_seen == [0, 1, 2, 3] * 2


def test_a_different_batch_order_gives_a_different_head() -> None:
    """The comparison above can fail: another shuffling seed moves the weights."""
    torch.manual_seed(0)
    first = LinearProbe(LinearBackbone(), epochs=2, batch_size=16, lr=0.1)
    second = copy.deepcopy(first)
    data = _features(0)
    rng = torch.get_rng_state()
    for module, seed in ((first, 0), (second, 1)):
        ctx = TaskContext(TASKS[0], SCENARIO, None, None, seed=seed)  # type: ignore[arg-type]
        torch.set_rng_state(rng)
        module.on_task_start(ctx)
        fit_on_features(module, ctx.loader(data, 16, shuffle=True), 2)
    assert not torch.allclose(first.head.blocks[0].weight, second.head.blocks[0].weight, rtol=1e-3, atol=1e-4)
