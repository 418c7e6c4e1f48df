"""ConFiT: hierarchical stages freeze exactly what they should, per-task BN state with Xconv recovery is used
at test time, the ablation switches, and tiny end-to-end runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_bench.backbones.cifar_resnet import CifarResNet
from cl_bench.errors import ConfigError
from cl_bench.methods.confit import ConFiT
from cl_bench.scenario import Task


def _confit(**kwargs: object) -> ConFiT:
    torch.manual_seed(0)
    return ConFiT(CifarResNet(20), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("epochs", "stages"),
    [
        (10, ["head"] * 2 + ["bn"] * 3 + ["all"] * 5),  # CIFAR-100 in the official code
        (50, ["head"] * 10 + ["bn"] * 15 + ["all"] * 25),  # CUB-200
        (5, ["head", "bn", "all", "all", "all"]),
        (3, ["head", "all", "all"]),  # E//5 = 0: the code's elif chain skips the BN stage
        (1, ["head"]),
    ],
)
def test_stage_schedule_follows_the_official_code(epochs: int, stages: list[str]) -> None:
    module = _confit(epochs=epochs)
    assert [module.stage(e) for e in range(epochs)] == stages


def test_stage_schedule_options() -> None:
    assert _confit(epochs=4, hierarchical=False).stage(0) == "all"
    assert [_confit(epochs=4, stage_epochs=[1, 3]).stage(e) for e in range(4)] == ["head", "bn", "bn", "all"]
    with pytest.raises(ConfigError, match="stage_epochs"):
        _confit(stage_epochs=[3, 1])


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _sgd_steps(module: ConFiT, steps: int = 2) -> None:
    """A few optimizer steps as Lightning takes them (with momentum and decay, the risky case)."""
    optimizer = module.configure_optimizers()
    module.train()
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
        loss = nn.functional.cross_entropy(module(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def test_stages_train_exactly_the_intended_parameters() -> None:
    module = _confit(momentum=0.9, weight_decay=5e-4)
    module.head.add_task(3)
    bn_affine = {id(p) for p in module.bn_affine_parameters()}
    before = dict(module.backbone.named_parameters())
    before = {k: v.detach().clone() for k, v in before.items()}
    head_before = module.head.blocks[0].weight.detach().clone()

    module.set_stage("head")
    _sgd_steps(module)
    assert not torch.equal(module.head.blocks[0].weight, head_before)
    for name, p in module.backbone.named_parameters():
        assert torch.equal(p, before[name]), f"{name} moved in the head stage"

    module.set_stage("bn")
    _sgd_steps(module)
    for name, p in module.backbone.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (id(p) in bn_affine), f"{name}: moved={moved} in the BN stage"

    module.set_stage("all")
    _sgd_steps(module)
    convs = [p for n, p in module.backbone.named_parameters() if "conv" in n]
    assert all(not torch.equal(p, before[n]) for n, p in module.backbone.named_parameters() if "conv" in n)
    assert convs


def test_bn_layers_keep_updating_running_stats_in_the_head_stage() -> None:
    """Pitfall 12: BN stays in train mode in stage A (not a frozen feature extractor)."""
    module = _confit()
    module.head.add_task(3)
    module.set_stage("head")
    bn = module.backbone.bn1
    before = bn.running_mean.clone()
    module.train()
    module(torch.randn(4, 3, 32, 32))
    assert not torch.equal(bn.running_mean, before)


class _Ctx:
    """The parts of TaskContext the ConFiT hooks use."""

    def __init__(self, task: Task, til: bool = True) -> None:
        self.task = task
        self.scenario = type("S", (), {"task_incremental": til})()


def _train_two_tasks(**kwargs: object) -> ConFiT:
    module = _confit(**kwargs)
    for index in range(2):
        module.on_task_start(_Ctx(Task(index, 3 * index, 3 * index + 3, (0, 1, 2))))
        module.set_stage("all")
        _sgd_steps(module, steps=3)
        module.train()
        with torch.no_grad():  # a shifted input moves the BN statistics between tasks
            module(torch.randn(16, 3, 32, 32) + 2.0 * index)
        module.on_task_end(_Ctx(module.task))
    module.eval()
    return module


def test_old_task_is_tested_with_its_own_bn_state_and_recovered_means() -> None:
    module = _train_two_tasks()
    x = torch.randn(5, 3, 32, 32)
    logits_old = module(x, task=0)
    bn = module.backbone.bn1
    snap = module.bn_state.snapshots[0]
    assert torch.equal(bn.weight, snap["bn1.weight"]) and torch.equal(bn.running_var, snap["bn1.running_var"])
    recovered = module.bn_state.recovered_means(0)["bn1"]
    assert torch.equal(bn.running_mean, recovered) and not torch.equal(recovered, snap["bn1.running_mean"])
    # the current task keeps its tracked means, and switching back and forth is exact
    module(x, task=1)
    assert torch.equal(bn.running_mean, module.bn_state.snapshots[1]["bn1.running_mean"])
    torch.testing.assert_close(module(x, task=0), logits_old, rtol=0, atol=0)


def test_task_bn_without_xconv_uses_the_stored_means() -> None:
    module = _train_two_tasks(xconv_bn=False)
    module(torch.randn(2, 3, 32, 32), task=0)
    assert torch.equal(module.backbone.bn1.running_mean, module.bn_state.snapshots[0]["bn1.running_mean"])
    assert not module.bn_state.trackers


def test_shared_bn_ablation_never_swaps_state() -> None:
    module = _train_two_tasks(xconv_bn=False, task_bn=False)
    state = _snapshot(module.backbone)
    module(torch.randn(2, 3, 32, 32), task=0)
    assert all(torch.equal(v, state[k]) for k, v in module.backbone.state_dict().items())
    with pytest.raises(ConfigError, match="task_bn"):
        _confit(xconv_bn=True, task_bn=False)


def test_old_task_snapshot_is_untouched_by_later_training() -> None:
    module = _confit()
    module.on_task_start(_Ctx(Task(0, 0, 3, (0, 1, 2))))
    _sgd_steps(module)
    module.on_task_end(_Ctx(module.task))
    first = {k: v.clone() for k, v in module.bn_state.snapshots[0].items()}
    module.on_task_start(_Ctx(Task(1, 3, 6, (3, 4, 5))))
    module.set_stage("all")
    _sgd_steps(module)
    assert all(torch.equal(v, first[k]) for k, v in module.bn_state.snapshots[0].items())


def test_predicted_task_mode_rescores_within_the_predicted_task() -> None:
    module = _train_two_tasks(cil_bn="predicted_task")
    x = torch.randn(6, 3, 32, 32)
    module.cil_bn = "shared"
    shared = module(x)
    module.cil_bn = "predicted_task"
    out = module(x)
    predicted = shared.argmax(dim=1) // 3
    for row, task in enumerate(predicted.tolist()):
        inside = slice(3 * task, 3 * task + 3)
        expected = module(x[row : row + 1], task=task)[0, inside]
        torch.testing.assert_close(out[row, inside], expected)
        assert torch.isinf(out[row]).sum() == 3


def test_confit_runs_task_incremental_end_to_end(run_tiny) -> None:
    doc, run_dir = run_tiny(
        "method=confit",
        "scenario=til",
        "method.epochs=3",
        "method.lr=0.05",
        "method.momentum=0.9",
        "method.batch_size=32",
        "save_model=true",
    )
    assert doc["status"] == "complete"
    saved = torch.load(run_dir / "final_model.pt", weights_only=True)["state_dict"]
    snapshots = saved["bn_state._extra_state"]["snapshots"]  # per-task BN state travels with the model
    assert len(snapshots) == 2 and "backbone.bn1.running_mean" not in snapshots[0]
    assert torch.equal(snapshots[1]["bn1.running_var"], saved["backbone.bn1.running_var"])
    assert doc["acc_matrix"] == doc["til_acc_matrix"]
    # each task is learned (5 classes: chance is 20 %) from a random ResNet-20 in 3 epochs
    assert doc["acc_matrix"][0][0] > 40.0 and doc["acc_matrix"][1][1] > 40.0


@pytest.mark.parametrize(
    "overrides",
    [
        ("method.xconv_bn=false",),
        ("method.xconv_bn=false", "method.task_bn=false", "method.hierarchical=false"),
        ("method.cil_bn=predicted_task", "scenario=cil"),
    ],
    ids=["task_bn", "shared_bn_flat", "cil_predicted_task"],
)
def test_confit_ablations_run(run_tiny, overrides: tuple[str, ...]) -> None:
    doc, _ = run_tiny("method=confit", "scenario=til", "method.epochs=1", "method.batch_size=64", *overrides)
    assert doc["status"] == "complete" and len(doc["acc_matrix"]) == 2


def test_timm_resnet18_downsample_bns_are_recovered() -> None:
    """A drop-in on timm's ImageNet ResNet-18 (the paper's backbone): every BN is paired, and an old task's
    downsample BN (1x1 stride-2 conv) gets the recovered mean from its four parity means."""
    from cl_bench.backbones.timm_backbone import TimmBackbone

    torch.manual_seed(0)
    module = ConFiT(TimmBackbone("resnet18.tv_in1k", pretrained=False))
    assert not module.bn_state.unpaired and len(module.bn_state.pairs) == 20
    tracker = module.bn_state.trackers["model__layer2__0__downsample__0"]
    assert tracker.running_mean.shape == (4, 64)
    for index in range(2):
        module.on_task_start(_Ctx(Task(index, 3 * index, 3 * index + 3, (0, 1, 2))))
        module.train()
        with torch.no_grad():
            module(torch.randn(4, 3, 64, 64) + index)
        module.on_task_end(_Ctx(module.task))
    module.eval()
    module(torch.randn(2, 3, 64, 64), task=0)
    bn = module.backbone.model.layer2[0].downsample[1]
    torch.testing.assert_close(
        bn.running_mean, module.bn_state.recovered_means(0)["model.layer2.0.downsample.1"]
    )
