"""The method contract (cl_bench/methods/README.md): its smallest complete example runs as written, each
phase is one fit of what it names, and the evaluator reads only the capabilities and ``Prediction``."""

from __future__ import annotations

import re

import torch
from helpers import REPO_ROOT, TinyBackbone, fit_phase, learn, task_context, toy_scenario
from torch.utils.data import TensorDataset

from cl_bench.evaluation import Evaluator
from cl_bench.methods.base import Capabilities, ContinualModule, HeadTraining, Phase


def _example_class() -> type[ContinualModule]:
    text = (REPO_ROOT / "cl_bench" / "methods" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "methods/README.md", "exec"), namespace)  # noqa: S102 (the repository's own README)
    return namespace["WarmStart"]


def _data(task: int, n: int = 24) -> TensorDataset:
    generator = torch.Generator().manual_seed(task)
    labels = torch.arange(2 * task, 2 * task + 2).repeat(n // 2)
    return TensorDataset(torch.randn(n, 4, generator=generator) + labels[:, None].float(), labels)


def test_the_readme_example_learns_two_tasks_and_reports_its_alternative() -> None:
    torch.manual_seed(0)
    method = _example_class()(TinyBackbone(), warmup_epochs=2, epochs=1, batch_size=8, lr=0.1)
    scenario = toy_scenario((2, 2))
    tests = [_data(t, 12) for t in range(2)]
    evaluator = Evaluator(scenario, tests, batch_size=8)
    for task in range(2):
        ctx = task_context(scenario, task, _data(task))
        method.on_task_start(ctx)
        warmup, train = method.phases(ctx)
        assert (warmup.name, warmup.epochs, train.name, train.epochs) == ("warmup", 2, "train", 1)
        others = {
            n: p.detach().clone() for n, p in method.named_parameters() if not n.endswith(f"{task}.weight")
        }
        fit_phase(method, warmup, ctx)
        moved = {n for n, p in method.named_parameters() if n in others and not torch.equal(p, others[n])}
        assert moved == {f"head.blocks.{task}.bias"}  # the warm-up trains the new block only
        fit_phase(method, train, ctx)
        method.on_task_end(ctx)
        rows = evaluator.evaluate_rows(method, task)
        assert set(rows.extra) == {"nearest_mean_acc"} and len(rows.extra["nearest_mean_acc"]) == task + 1
    assert method.means.shape == (4, 3)


def test_a_phase_trains_only_what_it_names_and_flags_come_back() -> None:
    method = ContinualModule(TinyBackbone(), epochs=1, batch_size=4, lr=0.5)
    scenario = toy_scenario((2,))
    ctx = task_context(scenario, 0, _data(0, 8))
    method.on_task_start(ctx)
    head = tuple(method.head.parameters())
    backbone = {n: p.detach().clone() for n, p in method.backbone.named_parameters()}
    fit_phase(method, Phase("head", 2, ctx.train_set, 4, trainable=head), ctx)
    assert all(torch.equal(p, backbone[n]) for n, p in method.backbone.named_parameters())
    assert all(p.requires_grad for p in method.parameters())  # restored after the phase
    assert method.phase is None


def test_head_training_phase_fits_the_head_alone_with_its_own_optimiser() -> None:
    method = ContinualModule(TinyBackbone(), epochs=0)
    scenario = toy_scenario((2,))
    ctx = task_context(scenario, 0, _data(0, 8))
    method.on_task_start(ctx)
    before = method.head.blocks[0].weight.detach().clone()
    features = TensorDataset(torch.randn(8, 3), torch.arange(2).repeat(4))
    training = HeadTraining(
        method.head, torch.nn.functional.cross_entropy, lambda p: torch.optim.SGD(p, lr=1.0)
    )
    fit_phase(method, Phase("probe", 3, features, 4, head_training=training), ctx)
    assert not torch.equal(method.head.blocks[0].weight, before)
    assert learn(method, ctx) >= 0  # epochs=0: the default phase does not train, the task still ends


def test_capabilities_are_one_frozen_declaration() -> None:
    assert ContinualModule.CAPABILITIES == Capabilities()
    from cl_bench.methods.lnt import LayerNormTuning
    from cl_bench.methods.simplecil import SimpleCIL

    assert LayerNormTuning.CAPABILITIES == Capabilities(task_conditioned=True, selects_task=True)
    assert SimpleCIL.CAPABILITIES.frozen_backbone


def test_drop_last_follows_the_phase_unless_the_run_overrides_it() -> None:
    scenario = toy_scenario([2])
    data = TensorDataset(torch.randn(10, 4), torch.zeros(10, dtype=torch.long))
    ctx = task_context(scenario, 0, data)
    assert [len(b[1]) for b in ctx.loader(data, 4, shuffle=True)] == [4, 4, 2]
    assert [len(b[1]) for b in ctx.loader(data, 4, shuffle=True, drop_last=True)] == [4, 4]
    ctx.drop_last = False  # trainer.drop_last=false keeps it whatever the phase says
    assert [len(b[1]) for b in ctx.loader(data, 4, shuffle=True, drop_last=True)] == [4, 4, 2]
    ctx.drop_last = True
    assert [len(b[1]) for b in ctx.loader(data, 4, shuffle=False)] == [4, 4]


def test_confit_drops_the_last_partial_batch_as_its_official_loader() -> None:
    from cl_bench.backbones.cifar_resnet import CifarResNet
    from cl_bench.methods.confit import ConFiT

    scenario = toy_scenario([2])
    data = TensorDataset(torch.randn(5, 3, 32, 32), torch.zeros(5, dtype=torch.long))
    ctx = task_context(scenario, 0, data)
    method = ConFiT(CifarResNet(20), epochs=5)
    method.on_task_start(ctx)
    assert all(phase.drop_last for phase in method.phases(ctx))
    assert not any(phase.drop_last for phase in ContinualModule(TinyBackbone()).phases(ctx))
