"""LayerNorm tuning with task keys (De Min et al., arXiv 2308.09610; cl_bench/methods/lnt.py)."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import learn, task_context, toy_scenario
from torch.utils.data import TensorDataset

from cl_bench.backbones.cifar_resnet import CifarResNet
from cl_bench.backbones.timm_backbone import TimmBackbone
from cl_bench.errors import ConfigError
from cl_bench.evaluation import TASK_SELECTION, Evaluator
from cl_bench.methods.lnt import LayerNormTuning
from cl_bench.methods.norm_sets import PER_LAYER
from cl_bench.methods.task_keys import AttendedKeys
from cl_bench.scenario import Scenario

pytestmark = pytest.mark.filterwarnings("ignore:.*the `self.trainer` reference is not registered")
TINY_VIT = {"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
SIZES = (3, 3)


def _tiny_vit() -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone("vit_tiny_patch16_224", model_kwargs=TINY_VIT)


def _scenario(sizes: tuple[int, ...] = SIZES) -> Scenario:
    return toy_scenario(sizes)


def _task_data(task: int, n_per_class: int = 16, seed: int = 0) -> TensorDataset:
    """Clearly separated tasks (task 0 bright, task 1 dark images), classes by a per-class colour tint."""
    generator = torch.Generator().manual_seed(seed * 10 + task)
    labels = torch.arange(task * 3, task * 3 + 3).repeat_interleave(n_per_class)
    tint = torch.eye(3)[labels % 3].view(-1, 3, 1, 1)
    images = (
        (2.0 if task == 0 else -2.0)
        + 1.5 * tint
        + 0.3 * torch.randn(len(labels), 3, 16, 16, generator=generator)
    )
    return TensorDataset(images, labels)


def _snapshot(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def two_tasks() -> dict:
    """Two tasks learned with 2 key, 2 LayerNorm and 2 rectification epochs; snapshots after task 0."""
    pl.seed_everything(0, verbose=False)
    module = LayerNormTuning(
        _tiny_vit(),
        epochs=2,
        key_epochs=2,
        rectification_epochs=2,
        batch_size=16,
        lr=0.05,
        rectification_lr=0.01,
    )
    frozen = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    scenario = _scenario()
    learn(module, task_context(scenario, 0, _task_data(0)))
    after_first = {
        "set": _snapshot(module.norm_sets.parameters_of(0)),
        "key": _snapshot([module.keys.keys[0]]),
        "head": _snapshot(module.head.blocks[0].parameters()),
        "fake_head": _snapshot(module.fake_head.blocks[0].parameters()),
    }
    learn(module, task_context(scenario, 1, _task_data(1)))
    return {"module": module, "frozen": frozen, "after_first": after_first, "scenario": scenario}


def _phases(module: LayerNormTuning) -> list[tuple[str, int]]:
    scenario = _scenario()
    data = _task_data(0)
    ctx = task_context(scenario, 0, data)
    module.on_task_start(ctx)
    return [(phase.name, phase.epochs) for phase in module.phases(ctx)]


def test_stages_are_three_phases() -> None:
    module = LayerNormTuning(_tiny_vit(), epochs=3, key_epochs=None, rectification_epochs=2)
    assert module.epochs == 3  # never changed
    assert _phases(module) == [("keys", 3), ("norms", 3), ("rectify", 2)]
    single = LayerNormTuning(_tiny_vit(), epochs=2, key_epochs=1, rectification_epochs=0)
    assert single.fake_head is None and _phases(single) == [("keys", 1), ("norms", 2), ("rectify", 0)]


def test_head_blocks_start_with_timm_init_and_fake_head_copies_them() -> None:
    """The official head is timm's ``init_weights_vit_timm``: trunc_normal(std 0.02) weights, zero bias."""
    module = LayerNormTuning(_tiny_vit())
    scenario = _scenario((200, 200))
    torch.manual_seed(5)
    module.on_task_start(task_context(scenario, 0, _task_data(0)))
    block, fake = module.head.blocks[0], module.fake_head.blocks[0]
    assert torch.equal(block.bias, torch.zeros(200))
    weight = block.weight.detach()
    assert abs(weight.std().item() - 0.02) < 0.001 and weight.abs().max().item() < 0.1  # PyTorch's: std ~0.1
    assert torch.equal(fake.weight, block.weight) and torch.equal(fake.bias, block.bias)
    module.on_task_start(task_context(scenario, 1, _task_data(1)))
    assert torch.equal(module.head.blocks[1].bias, torch.zeros(200))
    assert abs(module.head.blocks[1].weight.std().item() - 0.02) < 0.001


def test_each_stage_sends_gradients_only_where_the_official_code_does() -> None:
    module = LayerNormTuning(_tiny_vit())
    scenario = _scenario()
    for task in range(2):
        module.on_task_start(task_context(scenario, task, _task_data(task)))
    x, y = _task_data(1)[:8]
    expected = {
        "keys": {"keys.keys.1"},
        "norms": {f"{n}.{kind}.1" for n in module.norm_sets.names for kind in ("weights", "biases")}
        | {"fake_head.blocks.1.weight", "fake_head.blocks.1.bias"},
        "rectify": {"head.blocks.1.weight", "head.blocks.1.bias"},
    }
    for stage, names in expected.items():
        module.zero_grad(set_to_none=True)
        module.stage_loss(stage, x, y).backward()
        got = {n.removeprefix("backbone.") for n, p in module.named_parameters() if p.grad is not None}
        assert got == names, stage
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert all(".1" in n or n.endswith(".1.weight") for n in trainable)  # only task 1's tensors train


def test_training_keeps_frozen_weights_and_task_0_bit_identical(two_tasks: dict) -> None:
    module, first = two_tasks["module"], two_tasks["after_first"]
    state = module.backbone.state_dict()
    per_task = (".weights.", ".biases.")
    assert all(torch.equal(state[k], v) for k, v in two_tasks["frozen"].items())  # incl. pre-trained LNs
    assert set(state) - set(two_tasks["frozen"]) == {k for k in state if any(p in k for p in per_task)}
    assert _same(module.norm_sets.parameters_of(0), first["set"])
    assert _same([module.keys.keys[0]], first["key"])
    assert _same(module.head.blocks[0].parameters(), first["head"])
    assert _same(module.fake_head.blocks[0].parameters(), first["fake_head"])
    assert not _same(module.norm_sets.parameters_of(1), first["set"])  # task 1 did train its own set


def test_keys_pick_the_right_task_and_the_evaluator_reports_it(two_tasks: dict) -> None:
    module = two_tasks["module"].eval()
    tests = [_task_data(t, n_per_class=8, seed=1) for t in range(2)]
    with torch.no_grad():
        for task, data in enumerate(tests):
            chosen = module.predict(data.tensors[0]).chosen_task
            assert (chosen == task).all()
    rows = Evaluator(two_tasks["scenario"], tests, batch_size=16).evaluate_rows(module, 1)
    assert rows.extra == {TASK_SELECTION: [100.0, 100.0]}
    assert len(rows.cil) == len(rows.til) == 2
    assert Evaluator(two_tasks["scenario"], tests, batch_size=16).evaluate(module, 1) == (rows.cil, rows.til)


def test_a_perfect_oracle_reduces_to_task_specific_layernorm_tuning(two_tasks: dict, monkeypatch) -> None:
    module = two_tasks["module"].eval()
    x = torch.cat([_task_data(0, 2).tensors[0], _task_data(1, 2).tensors[0]])
    truth = torch.tensor([0] * 6 + [1] * 6)
    monkeypatch.setattr(module.keys, "select", lambda queries: truth)
    with torch.no_grad():
        prediction = module.predict(x)
        logits, chosen = prediction.logits, prediction.chosen_task
        assert torch.equal(chosen, truth)
        for task in range(2):
            plain = copy.deepcopy(module.backbone)  # a backbone whose LayerNorms simply hold set `task`
            for layer in module.norm_sets.layers:
                layer.selection = None
            for name, layer in zip(module.norm_sets.names, module.norm_sets.layers, strict=True):
                target = plain.get_submodule(name)
                target.pretrained.weight.copy_(layer.weights[task])
                target.pretrained.bias.copy_(layer.biases[task])
            rows = truth == task
            expected = module.head(plain(x[rows]))
            torch.testing.assert_close(logits[rows], expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(module(x[rows], task=task), expected, rtol=1e-5, atol=1e-5)


def test_six_block_vit_of_the_cifar_experiments() -> None:
    """The 32 px ViT-Tiny with 6 blocks (backbone=vit_tiny6_cifar): 13 LayerNorms of 192 channels."""
    backbone = TimmBackbone(
        "vit_tiny_patch16_224", model_kwargs={"img_size": 32, "patch_size": 4, "depth": 6}
    )
    module = LayerNormTuning(backbone)
    assert len(module.norm_sets.layers) == 13 and module.norm_sets.params_per_set == 13 * 2 * 192
    scenario = _scenario((2, 2))
    data = TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))
    for task in range(2):
        module.on_task_start(task_context(scenario, task, data))
    prediction = module.eval().predict(data.tensors[0])
    logits, chosen = prediction.logits, prediction.chosen_task
    assert logits.shape == (4, 4) and chosen.shape == (4,)


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="constant learning rate"):
        LayerNormTuning(_tiny_vit(), scheduler="cosine")
    with pytest.raises(ConfigError, match="ln_init"):
        LayerNormTuning(_tiny_vit(), ln_init="zeros")
    with pytest.raises(ConfigError, match="key_init"):
        LayerNormTuning(_tiny_vit(), key_init="normal")
    with pytest.raises(ConfigError, match="no nn.LayerNorm"):
        LayerNormTuning(CifarResNet(20))


def _single(**kwargs) -> tuple[LayerNormTuning, Scenario]:
    module = LayerNormTuning(_tiny_vit(), stages="single", **kwargs)
    scenario = _scenario()
    for task in range(2):
        module.on_task_start(task_context(scenario, task, _task_data(task)))
    return module, scenario


def test_single_stage_is_two_phases_with_per_layer_keys_copied_from_the_previous_task() -> None:
    module = LayerNormTuning(_tiny_vit(), stages="single", epochs=3, rectification_epochs=2)
    assert _phases(module) == [("norms", 3), ("rectify", 2)]
    assert module.keys is None and not module.capabilities.selects_task
    assert LayerNormTuning(_tiny_vit()).new_key and not module.new_key  # the official scripts' choices
    module, _ = _single()
    for layer in module.norm_sets.layers:
        selector = layer.selector
        assert selector is not None and selector.num_keys == 2
        assert torch.equal(selector.keys.keys[1], selector.keys.keys[0])  # train_single.sh: no --new_key
        assert torch.equal(selector.attention.keys[1], selector.attention.keys[0])
    keys = [layer.selector.keys.initial for layer in module.norm_sets.layers]
    assert not torch.equal(keys[0], keys[1])  # each LayerNorm draws its own keys
    with pytest.raises(ConfigError, match="stages"):
        LayerNormTuning(_tiny_vit(), stages="three")


def test_attended_keys_match_the_formula() -> None:
    torch.manual_seed(0)
    selector = AttendedKeys(4, 3)
    for _ in range(3):
        selector.add_key()
    q = torch.randn(5, 4)
    keys, att = selector.keys.stacked(), selector.attention.stacked()
    expected = torch.stack(
        [F.cosine_similarity(q * att[t], keys[t].expand(5, -1), dim=1) for t in range(3)], dim=1
    )
    torch.testing.assert_close(selector.similarity(q), expected)
    assert torch.equal(selector.select(q), expected.argmax(dim=1))
    torch.testing.assert_close(selector.match(q, 2), expected[:, 2].mean())


def test_single_stage_loss_is_ce_minus_the_blockwise_mean_match() -> None:
    module, _ = _single()
    x, y = _task_data(1)[:8]
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
        for name, layer in zip(module.norm_sets.names, module.norm_sets.layers, strict=True)
    ]
    loss = module.stage_loss("norms", x, y)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        logits = module.fake_head(module.embed(x, 1))[:, 3:6]
        matches = {
            name: layer.selector.match(inputs[name][:, 0], 1)
            for name, layer in zip(module.norm_sets.names, module.norm_sets.layers, strict=True)
        }
    depth = len(module.backbone.model.blocks)
    blocks = [
        (matches[f"model.blocks.{i}.norm1"] + matches[f"model.blocks.{i}.norm2"]) / 2 for i in range(depth)
    ]
    s_term = torch.stack([*blocks, matches["model.norm"]]).mean()  # depth + 1 terms
    torch.testing.assert_close(loss.detach(), F.cross_entropy(logits, y - 3) - s_term)
    module.zero_grad(set_to_none=True)
    loss.backward()
    got = {n.removeprefix("backbone.") for n, p in module.named_parameters() if p.grad is not None}
    per_layer = {
        f"{n}.{kind}"
        for n in module.norm_sets.names
        for kind in ("weights.1", "biases.1", "selector.keys.keys.1", "selector.attention.keys.1")
    }
    assert got == per_layer | {"fake_head.blocks.1.weight", "fake_head.blocks.1.bias"}
    ctx = task_context(_scenario(), 1, _task_data(1))
    assert {id(p) for p in module.phases(ctx)[0].trainable} == {
        id(p) for n, p in module.named_parameters() if n.removeprefix("backbone.") in got
    }


def test_single_stage_inference_selects_per_layer_from_each_layers_input() -> None:
    module, _ = _single()
    module.eval()
    with torch.no_grad():  # make the two tasks' sets and selectors differ
        for param in module.norm_sets.parameters_of(1) + module.norm_sets.selector_parameters(1):
            param.add_(0.5 * torch.randn_like(param))
    x = torch.cat([_task_data(0, 2).tensors[0], _task_data(1, 2).tensors[0]])
    chosen: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, args: chosen.append(m.selector.select(args[0][:, 0])))
        for layer in module.norm_sets.layers
    ]
    with torch.no_grad():
        prediction = module.predict(x)
    for hook in hooks:
        hook.remove()
    assert prediction.chosen_task is None and prediction.logits.shape == (12, 6)
    assert len({tuple(c.tolist()) for c in chosen}) > 1  # the layers choose differently
    with torch.no_grad():
        for layer, tasks in zip(module.norm_sets.layers, chosen, strict=True):
            layer.selection = tasks  # each layer told the choice it made on its own input
        expected = module.head(module.backbone(x))
        for layer in module.norm_sets.layers:
            layer.selection = None
    torch.testing.assert_close(prediction.logits, expected)
    with pytest.raises(ValueError, match="per_layer"):
        module.norm_sets.select("per_task")
    assert module.norm_sets.layers[0].selection is None and PER_LAYER == "per_layer"


def test_single_stage_learns_two_tasks_and_keeps_task_0() -> None:
    pl.seed_everything(0, verbose=False)
    module = LayerNormTuning(
        _tiny_vit(), stages="single", epochs=2, rectification_epochs=1, batch_size=16, lr=0.05
    )
    scenario = _scenario()
    learn(module, task_context(scenario, 0, _task_data(0)))
    first = _snapshot(module.norm_sets.parameters_of(0) + module.norm_sets.selector_parameters(0))
    learn(module, task_context(scenario, 1, _task_data(1)))
    assert _same(module.norm_sets.parameters_of(0) + module.norm_sets.selector_parameters(0), first)
    rows = Evaluator(scenario, [_task_data(t, 8, seed=1) for t in range(2)], batch_size=16).evaluate_rows(
        module.eval(), 1
    )
    assert len(rows.cil) == 2 and rows.extra == {}


def test_runner_writes_task_selection_accuracy_and_is_deterministic(run_tiny) -> None:
    overrides = (
        "dataset=fake",
        "dataset.image_size=16",
        "transform.input_size=16",
        "backbone=timm",
        "backbone.name=vit_tiny_patch16_224",
        "backbone.pretrained=false",
        "backbone.model_kwargs={img_size:16,patch_size:8,depth:1,embed_dim:32,num_heads:2}",
        "method=lnt",
        "method.epochs=1",
        "method.rectification_epochs=1",
        "method.batch_size=16",
    )
    first, run_dir = run_tiny(*overrides)
    second, _ = run_tiny(*overrides)
    assert first["status"] == "complete"
    selection = first["extra_matrices"][TASK_SELECTION]
    assert len(selection) == 2 and selection[0][1] is None and all(0 <= v <= 100 for v in selection[1])
    assert (run_dir / f"{TASK_SELECTION}_matrix.csv").is_file()
    for key in ("acc_matrix", "til_acc_matrix", "extra_matrices"):
        assert first[key] == second[key], key


def test_runner_runs_the_single_stage_variant(run_tiny) -> None:
    doc, run_dir = run_tiny(
        "dataset=fake",
        "dataset.image_size=16",
        "transform.input_size=16",
        "backbone=timm",
        "backbone.name=vit_tiny_patch16_224",
        "backbone.pretrained=false",
        "backbone.model_kwargs={img_size:16,patch_size:8,depth:1,embed_dim:32,num_heads:2}",
        "method=lnt",
        "method.stages=single",
        "method.epochs=1",
        "method.rectification_epochs=1",
        "method.batch_size=16",
        "trainer.drop_last=true",
    )
    assert doc["status"] == "complete" and len(doc["acc_matrix"]) == 2
    assert TASK_SELECTION not in doc.get("extra_matrices", {})
