"""L2P (Wang et al., CVPR 2022; cl_bench/methods/l2p.py)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from tiny_vit_tasks import RUN_OVERRIDES, context, fit, same, scenario, snapshot, task_data, tiny_vit

from cl_bench.errors import ConfigError
from cl_bench.methods.l2p import L2P
from cl_bench.modules.prompts import prompted_tokens, pull_constraint, select_top_k

pytestmark = pytest.mark.filterwarnings("ignore:.*the `self.trainer` reference is not registered")


def test_selected_prompts_enter_at_the_input_and_the_head_reads_their_mean() -> None:
    module = L2P(tiny_vit(), pool_size=4, prompt_length=2, top_k=2).eval()
    module.on_task_start(context(0, scenario(), task_data(0)))
    x = task_data(0)[:5][0]
    with torch.no_grad():
        query = module.query(x)
        features, loss, chosen = module.prompted(x, query, None)
        similarity = module.pool.similarity(query)
        nearest = similarity.topk(2, dim=1).indices  # per image at test time (batchwise only in training)
        prompts = torch.stack([torch.cat([module.pool.prompts[int(i)] for i in row]) for row in nearest])
        expected = prompted_tokens(module.vit, x, input_prompts=prompts)[:, 1:5].mean(dim=1)
    torch.testing.assert_close(features, expected)
    assert loss is None and chosen is None  # L2P selects prompts, not tasks
    torch.testing.assert_close(query, module.backbone(x))  # the frozen model's [CLS] feature


def test_training_votes_over_the_batch_and_pulls_the_chosen_keys() -> None:
    module = L2P(tiny_vit(), pool_size=4, prompt_length=2, top_k=2, pull_coefficient=0.5)
    module.on_task_start(context(0, scenario(), task_data(0)))
    x = task_data(0)[:6][0]
    module.train()
    query = module.query(x)
    _, loss, _ = module.prompted(x, query, 0)
    similarity = module.pool.similarity(query)
    chosen = select_top_k(similarity, 2, batchwise=True)
    assert (chosen == chosen[0]).all()
    torch.testing.assert_close(loss, -0.5 * pull_constraint(similarity, chosen))


def test_gradients_reach_only_prompts_keys_and_the_current_head() -> None:
    module = L2P(tiny_vit(), pool_size=4, prompt_length=2, top_k=2, batchwise_selection="never")
    tasks = scenario()
    for task in range(2):
        module.on_task_start(context(task, tasks, task_data(task)))
    x, y = task_data(1)[:6]
    module.train().training_step((x, y), 0).backward()
    chosen = select_top_k(module.pool.similarity(module.query(x)), 2).unique().tolist()
    got = {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {f"pool.{kind}.{i}" for i in chosen for kind in ("keys", "prompts")}
    assert got == expected | {"head.blocks.1.weight", "head.blocks.1.bias"}
    assert not any(p.requires_grad for p in module.backbone.parameters())


def test_frozen_parts_stay_bit_identical_across_training() -> None:
    pl.seed_everything(0, verbose=False)
    module = L2P(tiny_vit(), pool_size=4, prompt_length=2, top_k=2, epochs=2, batch_size=16, lr=0.01)
    frozen = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    tasks = scenario()
    fit(module, context(0, tasks, task_data(0)))
    head_0, pool_0 = snapshot(module.head.blocks[0].parameters()), snapshot(module.pool.parameters())
    fit(module, context(1, tasks, task_data(1)))
    assert all(torch.equal(module.backbone.state_dict()[k], v) for k, v in frozen.items())
    assert same(module.head.blocks[0].parameters(), head_0)
    assert not same(module.pool.parameters(), pool_0)  # the pool is shared by all tasks


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="batchwise_selection"):
        L2P(tiny_vit(), batchwise_selection="sometimes")
    with pytest.raises(ConfigError, match="top_k"):
        L2P(tiny_vit(), pool_size=3, top_k=4)


def test_runner_runs_it_deterministically(run_tiny) -> None:
    overrides = (*RUN_OVERRIDES, "method=l2p", "method.epochs=1", "method.batch_size=8")
    first, _ = run_tiny(*overrides)
    second, _ = run_tiny(*overrides)
    assert first["status"] == "complete" and "task_selection_acc" not in first.get("extra_matrices", {})
    assert first["acc_matrix"] == second["acc_matrix"]


def test_the_gradient_norm_is_clipped_before_each_step() -> None:
    """SGD with lr 1 and one step: the parameters move by exactly the clipped gradient (norm 1e-3)."""
    pl.seed_everything(0, verbose=False)
    module = L2P(
        tiny_vit(),
        pool_size=4,
        prompt_length=2,
        top_k=2,
        optimizer="sgd",
        momentum=0.0,
        lr=1.0,
        clip_grad_norm=1e-3,
        epochs=1,
        batch_size=48,
    )
    ctx = context(0, scenario(), task_data(0))
    module.on_task_start(ctx)
    trainable = [p for p in module.parameters() if p.requires_grad]
    before = snapshot(trainable)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, train_dataloaders=ctx.loader(ctx.train_set, 48, shuffle=True))  # 48 images: one step
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(trainable, before, strict=True)))
    assert float(moved) == pytest.approx(1e-3, rel=1e-3)
