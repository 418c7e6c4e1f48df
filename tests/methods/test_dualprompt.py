"""DualPrompt (Wang et al., ECCV 2022; cl_bench/methods/dualprompt.py)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from tiny_vit_tasks import RUN_OVERRIDES, context, fit, same, scenario, snapshot, task_data, tiny_vit

from cl_bench.errors import ConfigError
from cl_bench.evaluation import TASK_SELECTION, Evaluator
from cl_bench.methods.dualprompt import DualPrompt
from cl_bench.modules.prompts import prompted_tokens

pytestmark = pytest.mark.filterwarnings("ignore:.*the `self.trainer` reference is not registered")


@pytest.fixture(scope="module")
def two_tasks() -> dict:
    pl.seed_everything(0, verbose=False)
    module = DualPrompt(tiny_vit(), g_layers=[0], e_layers=[1, 2], epochs=3, batch_size=16, lr=0.01)
    frozen = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    tasks = scenario()
    fit(module, context(0, tasks, task_data(0)))
    after_first = {
        "e_prompt": snapshot([module.e_pool.prompts[0], module.e_pool.keys[0]]),
        "head": snapshot(module.head.blocks[0].parameters()),
        "g_prompt": snapshot([module.g_prompt]),
    }
    fit(module, context(1, tasks, task_data(1)))
    return {"module": module, "frozen": frozen, "after_first": after_first, "scenario": tasks}


def test_frozen_parts_stay_bit_identical_and_the_task_prompt_learns(two_tasks: dict) -> None:
    module, first = two_tasks["module"], two_tasks["after_first"]
    state = module.backbone.state_dict()
    assert all(torch.equal(state[k], v) for k, v in two_tasks["frozen"].items())
    assert same([module.e_pool.prompts[0], module.e_pool.keys[0]], first["e_prompt"])
    assert same(module.head.blocks[0].parameters(), first["head"])
    assert not same([module.g_prompt], first["g_prompt"])  # shared across tasks: still trained
    assert not torch.equal(module.e_pool.keys[1], first["e_prompt"][1])


def test_training_uses_the_task_prompt_and_sends_gradients_only_to_it() -> None:
    module = DualPrompt(tiny_vit(), g_layers=[0], e_layers=[1, 2])
    tasks = scenario()
    for task in range(2):
        module.on_task_start(context(task, tasks, task_data(task)))
    assert torch.equal(module.e_pool.prompts[1], module.e_pool.prompts[0])  # shared_prompt_pool copy
    x, y = task_data(1)[:6]
    module.train().training_step((x, y), 0).backward()
    got = {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {
        "g_prompt",
        "e_pool.keys.1",
        "e_pool.prompts.1",
        "head.blocks.1.weight",
        "head.blocks.1.bias",
    }


def test_prefix_prompts_reach_attention_as_keys_and_values() -> None:
    module = DualPrompt(tiny_vit(), g_layers=[0], g_length=2, e_layers=[2], e_length=3).eval()
    tasks = scenario()
    module.on_task_start(context(0, tasks, task_data(0)))
    x = task_data(0)[:4][0]
    with torch.no_grad():
        features, _, chosen = module.prompted(x, module.query(x), None)
        g, e = module.g_prompt[0], module.e_pool.prompts[0][0]
        expected = prompted_tokens(
            module.vit,
            x,
            prefixes={
                0: (g[0].expand(4, -1, -1), g[1].expand(4, -1, -1)),
                2: (e[0].expand(4, -1, -1), e[1].expand(4, -1, -1)),
            },
        )[:, 0]
    torch.testing.assert_close(features, expected)
    assert chosen.tolist() == [0] * 4


def test_keys_pick_the_right_task_and_the_evaluator_reports_it(two_tasks: dict) -> None:
    module = two_tasks["module"].eval()
    tests = [task_data(t, n_per_class=8, seed=1) for t in range(2)]
    with torch.no_grad():
        for task, data in enumerate(tests):
            chosen = module.predict(data.tensors[0]).chosen_task
            assert (chosen == task).all()
            similarity = module.e_pool.similarity(module.query(data.tensors[0]))
            assert torch.equal(chosen, similarity.argmax(dim=1))  # the nearest key
    rows = Evaluator(two_tasks["scenario"], tests, batch_size=16).evaluate_rows(module, 1)
    assert rows.extra == {TASK_SELECTION: [100.0, 100.0]}


def test_a_given_task_id_uses_that_tasks_prompt(two_tasks: dict) -> None:
    module = two_tasks["module"].eval()
    x = task_data(1, n_per_class=2, seed=2).tensors[0]
    with torch.no_grad():
        oracle = module(x, task=0)
        features, _, chosen = module.prompted(x, module.query(x), 0)
    assert chosen.tolist() == [0] * len(x)
    torch.testing.assert_close(oracle, module.head(features))


def test_prompt_tuning_switch_appends_tokens() -> None:
    module = DualPrompt(tiny_vit(), g_layers=[0], e_layers=[1], insertion="prompt").eval()
    module.on_task_start(context(0, scenario(), task_data(0)))
    prefixes, appended = module.layer_prompts(module.e_pool.gather(torch.zeros(2, 1, dtype=torch.long))[:, 0])
    assert prefixes == {} and {k: v.shape for k, v in appended.items()} == {0: (2, 5, 32), 1: (2, 5, 32)}


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="insertion"):
        DualPrompt(tiny_vit(), insertion="suffix")
    with pytest.raises(ConfigError, match="distinct layer"):
        DualPrompt(tiny_vit(), g_layers=[0, 1], e_layers=[1, 2])
    with pytest.raises(ConfigError, match="distinct layer"):
        DualPrompt(tiny_vit(), e_layers=[7])


def test_runner_writes_task_selection_and_is_deterministic(run_tiny) -> None:
    overrides = (
        *RUN_OVERRIDES,
        "method=dualprompt",
        "method.epochs=1",
        "method.batch_size=8",
        "method.g_layers=[0]",
        "method.e_layers=[1,2]",
    )
    first, run_dir = run_tiny(*overrides)
    second, _ = run_tiny(*overrides)
    assert first["status"] == "complete"
    selection = first["extra_matrices"][TASK_SELECTION]
    assert len(selection) == 2 and selection[0][1] is None and all(0 <= v <= 100 for v in selection[1])
    for key in ("acc_matrix", "til_acc_matrix", "extra_matrices"):
        assert first[key] == second[key], key
