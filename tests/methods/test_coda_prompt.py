"""CODA-Prompt (Smith et al., CVPR 2023; cl_bench/methods/coda_prompt.py)."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from tiny_vit_tasks import RUN_OVERRIDES, context, fit, same, scenario, snapshot, task_data, tiny_vit

from cl_bench.errors import ConfigError
from cl_bench.methods.coda_prompt import CodaPromptMethod, coda_cosine_factor
from cl_bench.modules.prompts import coda_attention_weights, prompted_tokens

pytestmark = pytest.mark.filterwarnings("ignore:.*the `self.trainer` reference is not registered")


@pytest.fixture(scope="module")
def two_tasks() -> dict:
    pl.seed_everything(0, verbose=False)
    module = CodaPromptMethod(
        tiny_vit(), pool_size=8, prompt_length=4, layers=[0, 1], epochs=2, batch_size=16, lr=0.01
    )
    frozen = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    tasks = scenario()
    fit(module, context(0, tasks, task_data(0)))
    after_first = snapshot(module.prompts.parameters()) + snapshot(module.head.blocks[0].parameters())
    fit(module, context(1, tasks, task_data(1)))
    return {"module": module, "frozen": frozen, "after_first": after_first}


def test_frozen_parts_stay_bit_identical(two_tasks: dict) -> None:
    module = two_tasks["module"]
    assert all(torch.equal(module.backbone.state_dict()[k], v) for k, v in two_tasks["frozen"].items())
    task_0 = [p for name, p in module.prompts.named_parameters() if name.endswith(".0")]
    assert same(task_0 + list(module.head.blocks[0].parameters()), two_tasks["after_first"])
    assert all(p.requires_grad for name, p in module.prompts.named_parameters() if name.endswith(".1"))


def test_the_prompt_is_the_attention_weighted_sum_of_components() -> None:
    module = CodaPromptMethod(tiny_vit(), pool_size=4, prompt_length=4, layers=[1]).eval()
    tasks = scenario()
    for task in range(2):
        module.on_task_start(context(task, tasks, task_data(task)))
    x = task_data(1)[:3][0]
    with torch.no_grad():
        query = module.query(x)
        features, loss, chosen = module.prompted(x, query, None)
        components, keys, attention = module.prompts.layer_tensors(0)
        assert components.shape == (4, 4, 32)  # 2 components per task, both tasks
        alpha = coda_attention_weights(query, keys, attention)
        prompt = sum(alpha[:, m, None, None] * components[m] for m in range(4))
        expected = prompted_tokens(module.vit, x, prefixes={1: (prompt[:, :2], prompt[:, 2:])})[:, 0]
    torch.testing.assert_close(features, expected)
    assert loss is None and chosen is None


def test_gradients_reach_the_current_components_keys_and_attention_vectors() -> None:
    module = CodaPromptMethod(tiny_vit(), pool_size=4, prompt_length=2, layers=[0, 2], ortho_weight=0.1)
    tasks = scenario()
    for task in range(2):
        module.on_task_start(context(task, tasks, task_data(task)))
    x, y = task_data(1)[:6]
    module.train().training_step((x, y), 0).backward()
    got = {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {
        f"prompts.{kind}.{layer}.1" for kind in ("components", "keys", "attention") for layer in (0, 1)
    }
    assert got == expected | {"head.blocks.1.weight", "head.blocks.1.bias"}


def test_official_cosine_schedule() -> None:
    assert coda_cosine_factor(0, 20) == 1.0
    assert coda_cosine_factor(19, 20) == pytest.approx(math.cos(99 * math.pi / 200))
    assert coda_cosine_factor(0, 1) == 1.0
    module = CodaPromptMethod(tiny_vit(), epochs=4, layers=[0], pool_size=4)
    module.on_task_start(context(0, scenario(), task_data(0)))
    optimizer = module.make_optimizer()
    scheduler = module.make_scheduler(optimizer)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.001 * coda_cosine_factor(e, 4) for e in range(4)])


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="even"):
        CodaPromptMethod(tiny_vit(), prompt_length=5, layers=[0])
    with pytest.raises(ConfigError, match="distinct layer"):
        CodaPromptMethod(tiny_vit())  # layers 0-4 on a 3-block ViT
    with pytest.raises(ConfigError, match="scheduler"):
        CodaPromptMethod(tiny_vit(), scheduler="step", layers=[0])
    module = CodaPromptMethod(tiny_vit(), pool_size=1, layers=[0])
    with pytest.raises(ConfigError, match="no component"):
        module.on_task_start(context(0, scenario(), task_data(0)))


def test_runner_runs_it_deterministically(run_tiny) -> None:
    overrides = (
        *RUN_OVERRIDES,
        "method=coda_prompt",
        "method.epochs=1",
        "method.batch_size=8",
        "method.layers=[0,1]",
        "method.pool_size=8",
    )
    first, _ = run_tiny(*overrides)
    second, _ = run_tiny(*overrides)
    assert first["status"] == "complete" and first["acc_matrix"] == second["acc_matrix"]
