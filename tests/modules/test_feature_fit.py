"""The head-only fast path (cl_bench/modules/feature_fit.py) equals a Lightning fit of the same module."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import LinearBackbone
from torch.utils.data import TensorDataset

from cl_bench.config import ScenarioType
from cl_bench.learning import HeadFit
from cl_bench.methods.base import TaskContext
from cl_bench.methods.linear_probe import LinearProbe
from cl_bench.modules.feature_fit import fit_on_features
from cl_bench.scenario import Scenario, Task

TASKS = (Task(0, 0, 3, (0, 1, 2)), Task(1, 3, 6, (3, 4, 5)))
SCENARIO = Scenario(ScenarioType.cil, tuple(range(6)), TASKS)


def _images(task: int, n: int = 90) -> TensorDataset:
    """4-d inputs that LinearBackbone embeds into the 3-d features the head trains on."""
    g = torch.Generator().manual_seed(10 + task)
    labels = torch.arange(n) % 3 + 3 * task
    return TensorDataset(torch.randn(n, 4, generator=g) + labels[:, None].float() * 0.3, labels)


def _trainer(epochs: int, precision: str, root: Path) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
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


@pytest.mark.parametrize(
    ("optimizer", "scheduler", "precision"),
    [("sgd", "cosine", "32-true"), ("adam", "none", "32-true"), ("sgd", "cosine", "bf16-mixed")],
)
def test_fast_path_equals_lightning_fit(
    tmp_path: Path, optimizer: str, scheduler: str, precision: str
) -> None:
    """linear_probe's head-only phase over two tasks (batch 32 over 90 samples: a partial last batch): the
    head after each task equals a Lightning fit's to float tolerance, the same batch order included."""
    torch.manual_seed(0)
    kwargs = dict(
        epochs=4, batch_size=32, lr=0.05, optimizer=optimizer, scheduler=scheduler, weight_decay=1e-3
    )
    methods = {"lightning": LinearProbe(LinearBackbone(), **kwargs)}
    methods["fast"] = copy.deepcopy(methods["lightning"])
    dtype = torch.bfloat16 if precision.startswith("bf16") else None
    epochs_seen: list[int] = []
    for t in range(2):
        rng = torch.get_rng_state()  # the new head block is drawn alike for both
        for name, method in methods.items():
            torch.set_rng_state(rng)
            ctx = TaskContext(TASKS[t], SCENARIO, _images(t), _images(t), seed=3, autocast_dtype=dtype)
            method.on_task_start(ctx)
            (phase,) = method.phases(ctx)
            module = HeadFit(phase, phase.head_training)
            loader = ctx.loader(phase.data, phase.batch_size, shuffle=True, in_memory=True)
            if name == "lightning":
                _trainer(phase.epochs, precision, tmp_path).fit(module, train_dataloaders=loader)
            else:
                losses = fit_on_features(
                    module, loader, phase.epochs, dtype, lambda e, _: epochs_seen.append(e)
                )
                assert len(losses) == 4 and losses[-1] < losses[0]
        pairs = zip(
            methods["lightning"].head.named_parameters(), methods["fast"].head.named_parameters(), strict=True
        )
        for (name, a), (_, b) in pairs:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"task {t} {name}")
    assert epochs_seen == [0, 1, 2, 3] * 2


def test_a_different_batch_order_gives_a_different_head() -> None:
    """The comparison above can fail: another shuffling seed moves the weights."""
    torch.manual_seed(0)
    first = LinearProbe(LinearBackbone(), epochs=2, batch_size=16, lr=0.1)
    second = copy.deepcopy(first)
    rng = torch.get_rng_state()
    for method, seed in ((first, 0), (second, 1)):
        ctx = TaskContext(TASKS[0], SCENARIO, _images(0), _images(0), seed=seed)
        torch.set_rng_state(rng)
        method.on_task_start(ctx)
        (phase,) = method.phases(ctx)
        loader = ctx.loader(phase.data, 16, shuffle=True, in_memory=True)
        fit_on_features(HeadFit(phase, phase.head_training), loader, 2)
    assert not torch.allclose(first.head.blocks[0].weight, second.head.blocks[0].weight, rtol=1e-3, atol=1e-4)


def test_runner_fast_path_equals_its_lightning_fit() -> None:
    """learn_task with trainer.head_fast_path=true (the default) gives the weights and the logged epoch
    losses of trainer.head_fast_path=false: linear probing over two tasks, as the runner drives it."""
    from pathlib import Path

    from cl_bench.config import TrainerConfig
    from cl_bench.learning import learn_task

    torch.manual_seed(0)
    template = LinearProbe(LinearBackbone(), epochs=3, batch_size=16, lr=0.05)
    results = {}
    for fast in (True, False):
        method = copy.deepcopy(template)
        cfg = TrainerConfig(accelerator="cpu", head_fast_path=fast)
        logged: list[dict[str, float]] = []
        torch.manual_seed(1)  # the new head blocks are drawn alike
        for t in range(2):
            g = torch.Generator().manual_seed(t)
            images = TensorDataset(torch.randn(50, 4, generator=g), torch.arange(50) % 3 + 3 * t)
            ctx = TaskContext(TASKS[t], SCENARIO, images, images, seed=5)
            learn_task(method, ctx, cfg, torch.device("cpu"), Path("."), logged.append)
        results[fast] = (method.head.state_dict(), logged)
    (fast_state, fast_log), (slow_state, slow_log) = results[True], results[False]
    for key, value in slow_state.items():
        torch.testing.assert_close(fast_state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert len(fast_log) == len(slow_log) == 6
    for a, b in zip(fast_log, slow_log, strict=True):
        assert set(a) == set(b) == {"train/loss", "train/task"}
        assert (
            a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5) and a["train/task"] == b["train/task"]
        )


def test_fast_path_only_where_it_reproduces_the_fit() -> None:
    """Head-only phases on one process in fp32/bf16-mixed/16-mixed; not under DDP, true half precision,
    trainer.head_fast_path=false or the Lightning knobs the loop does not reproduce (batch limit, clipping,
    accumulation, profiler); never for a phase that trains the method itself."""
    from cl_bench.config import TrainerConfig
    from cl_bench.learning import head_fast_path
    from cl_bench.methods.base import HeadTraining, Phase

    head = torch.nn.Linear(3, 2)
    training = HeadTraining(head, torch.nn.functional.cross_entropy, lambda p: torch.optim.SGD(p, lr=0.1))
    data = TensorDataset(torch.randn(4, 3), torch.arange(4) % 2)
    phase = Phase("train", 1, data, 2, head_training=training)
    assert head_fast_path(phase, TrainerConfig())
    assert head_fast_path(phase, TrainerConfig(precision="bf16-mixed"))
    assert not head_fast_path(phase, TrainerConfig(head_fast_path=False))
    assert not head_fast_path(phase, TrainerConfig(precision="bf16-true"))
    assert not head_fast_path(phase, TrainerConfig(devices=2, strategy="ddp"))
    assert not head_fast_path(Phase("train", 1, data, 2), TrainerConfig())
    for knob in ({"limit_train_batches": 2}, {"gradient_clip_val": 1.0}, {"accumulate_grad_batches": 2}):
        assert not head_fast_path(phase, TrainerConfig(**knob)), knob
    assert not head_fast_path(phase, TrainerConfig(profiler="simple"))


def test_fast_path_keeps_the_head_modules_modes_as_lightning_fit_does(tmp_path: Path) -> None:
    """Lightning's fit leaves every submodule's train/eval mode as it is; so does the fast path: a head whose
    dropout is in eval mode trains to the same weights and stays in eval mode."""
    from cl_bench.methods.base import HeadTraining, Phase

    torch.manual_seed(0)
    template = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(3, 2))
    template[0].eval()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 3, generator=g), torch.arange(40) % 2)
    heads = {}
    for name in ("lightning", "fast"):
        head = copy.deepcopy(template)
        optimizer = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
        phase = Phase("train", 2, data, 8, head_training=HeadTraining(head, F.cross_entropy, optimizer))
        module = HeadFit(phase, phase.head_training)
        loader = torch.utils.data.DataLoader(data, batch_size=8)
        torch.manual_seed(1)
        if name == "lightning":
            _trainer(2, "32-true", tmp_path).fit(module, train_dataloaders=loader)
        else:
            fit_on_features(module, loader, 2)
        heads[name] = head
    assert not heads["fast"][0].training and heads["fast"][1].training == heads["lightning"][1].training
    torch.testing.assert_close(heads["fast"][1].weight, heads["lightning"][1].weight, rtol=1e-6, atol=1e-7)


def test_fast_path_sets_trainer_deterministic_as_the_trainer_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """pl.Trainer(deterministic=True) turns on torch's deterministic algorithms (and cuBLAS's workspace
    setting) for the process; a run whose only phases take the fast path builds no Trainer, so the fast path
    does it, and its evaluation and feature passes on a GPU stay as reproducible as before."""
    from cl_bench.config import TrainerConfig
    from cl_bench.learning import learn_task

    before = torch.are_deterministic_algorithms_enabled()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        for deterministic in (True, False):
            torch.use_deterministic_algorithms(not deterministic)
            method = LinearProbe(LinearBackbone(), epochs=1, batch_size=16)
            ctx = TaskContext(TASKS[0], SCENARIO, _images(0), _images(0))
            cfg = TrainerConfig(accelerator="cpu", deterministic=deterministic)
            learn_task(method, ctx, cfg, torch.device("cpu"), Path("."), lambda _: None)
            assert torch.are_deterministic_algorithms_enabled() == deterministic
            assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("fast", [True, False])
def test_a_diverging_head_phase_names_its_epoch(fast: bool) -> None:
    """A loss that becomes inf in the third epoch is reported as epoch 2 by both paths (the fast path has
    no trainer to count epochs)."""
    from cl_bench.config import TrainerConfig
    from cl_bench.errors import TrainingDivergedError
    from cl_bench.learning import run_phase
    from cl_bench.methods.base import HeadTraining, Phase

    calls = []

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        value = F.cross_entropy(logits, labels)
        return value * float("inf") if len(calls) > 4 else value  # 2 batches per epoch

    data = TensorDataset(torch.randn(8, 3), torch.arange(8) % 2)
    training = HeadTraining(torch.nn.Linear(3, 2), loss, lambda p: torch.optim.SGD(p, lr=0.1))
    phase = Phase("align", 5, data, 4, head_training=training)
    method = LinearProbe(LinearBackbone())
    ctx = TaskContext(TASKS[0], SCENARIO, data, data)
    cfg = TrainerConfig(accelerator="cpu", head_fast_path=fast, enable_progress_bar=False)
    with pytest.raises(TrainingDivergedError, match="align loss became inf in epoch 2, batch 0"):
        run_phase(method, phase, ctx, cfg, Path("."), [])
