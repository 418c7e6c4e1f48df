"""Input-space tuning (Marullo et al., arXiv 2306.02947): frozen backbone, trained input transform, head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from cl_bench.backbones.base import Backbone, DataConfig
from cl_bench.backbones.cifar_resnet import CifarResNet
from cl_bench.config import ScenarioType
from cl_bench.errors import ConfigError
from cl_bench.methods.base import TaskContext
from cl_bench.methods.input_tuning import InputTuning
from cl_bench.scenario import Scenario, Task

pytestmark = pytest.mark.filterwarnings("ignore:.*the `self.trainer` reference is not registered")
#: Fake images at 16 px: a quick end-to-end run (nothing to learn, the mechanics are what is tested).
FAKE = ("dataset=fake", "dataset.image_size=16", "method.epochs=1", "method.batch_size=16")


def _start_tasks(module: InputTuning, sizes: list[int], shape: tuple[int, ...], til: bool = False) -> None:
    """Run ``on_task_start`` for tasks of ``sizes`` classes on images of ``shape``."""
    tasks, start = [], 0
    for index, size in enumerate(sizes):
        tasks.append(Task(index, start, start + size, tuple(range(start, start + size))))
        start += size
    scenario = Scenario(ScenarioType.til if til else ScenarioType.cil, tuple(range(start)), tuple(tasks))
    images = TensorDataset(torch.zeros(1, *shape), torch.zeros(1, dtype=torch.long))
    for task in tasks:
        module.on_task_start(TaskContext(task, scenario, images, images))


@pytest.mark.parametrize("transform", ["additive", "padding", "residual_conv"])
def test_identity_at_init_is_a_linear_probe(transform: str) -> None:
    module = InputTuning(CifarResNet(20), transform=transform).eval()
    _start_tasks(module, [3], (3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(module.transforms[0](x), x)
    assert torch.equal(module(x), module.head(module.backbone(x)))


@pytest.mark.parametrize("transform", ["additive", "padding", "residual_conv"])
def test_gradients_reach_only_transform_and_head_and_backbone_stays_identical(transform: str) -> None:
    module = InputTuning(CifarResNet(20), transform=transform, lr=0.1)
    _start_tasks(module, [3], (3, 16, 16))
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    assert not module.backbone.training and module.transforms.training and module.head.training
    for step in range(3):
        optimizer.zero_grad()
        loss = module.training_step((torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))), step)
        loss.backward()
        grads = {n: p.grad for n, p in module.named_parameters()}
        assert all(g is None for n, g in grads.items() if n.startswith("backbone."))
        assert all(g is not None for n, g in grads.items() if not n.startswith("backbone."))
        optimizer.step()
    assert sorted({n.split(".")[0] for n, p in module.named_parameters() if p.requires_grad}) == [
        "head",
        "transforms",
    ]
    x = torch.randn(2, 3, 16, 16)
    assert not torch.equal(module.transforms[0](x), x)  # the transform did train
    after = module.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats


def test_param_groups_use_transform_lr() -> None:
    module = InputTuning(CifarResNet(20), lr=0.01, transform_lr=2.0)
    _start_tasks(module, [4], (3, 32, 32))
    groups = {g["name"]: g for g in module.param_groups()}
    assert groups["transform"]["lr"] == 2.0 and groups["head"]["lr"] == 0.01
    assert sum(p.numel() for p in groups["transform"]["params"]) == 3 * 32 * 32
    assert sum(p.numel() for p in groups["head"]["params"]) == 64 * 4 + 4


def test_shared_keeps_one_transform_per_task_grows_and_freezes_them() -> None:
    shared = InputTuning(CifarResNet(20))
    _start_tasks(shared, [2, 2, 2], (3, 16, 16))
    assert len(shared.transforms) == 1 and not shared.capabilities.task_conditioned
    assert all(
        p.requires_grad for p in shared.parameters() if not any(p is q for q in shared.backbone.parameters())
    )
    per_task = InputTuning(CifarResNet(20), sharing="per_task")
    _start_tasks(per_task, [2, 2, 2], (3, 16, 16))
    assert (
        len(per_task.transforms) == 3
        and per_task.capabilities.task_conditioned
        and per_task.loss_scope == "task"
    )
    trainable = sorted(n for n, p in per_task.named_parameters() if p.requires_grad)
    assert trainable == ["head.blocks.2.bias", "head.blocks.2.weight", "transforms.2.delta"]


class Flatten(Backbone):
    """The identity on flattened images: the test controls the features through the transforms."""

    feat_dim = 2
    data_config = DataConfig(input_size=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_per_task_cil_picks_the_most_confident_task_model() -> None:
    module = InputTuning(Flatten(), sharing="per_task").eval()
    _start_tasks(module, [2, 2], (1, 1, 2))
    with torch.no_grad():
        module.transforms[1].delta.copy_(torch.tensor([[[0.0, 1.0]]]))  # g_1 shifts the second feature
        block0, block1 = module.head.blocks
        block0.weight.copy_(torch.tensor([[5.0, 0.0], [-5.0, 0.0]]))
        block1.weight.copy_(torch.tensor([[20.0, 0.0], [4.5, 0.0]]))
        block0.bias.zero_()
        block1.bias.copy_(torch.tensor([-10.0, 5.0]))
    x = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 0.0]]]])
    # Image 0: task 0's model is confident ([5, -5]); task 1's has larger logits but is unsure
    # ([10, 9.5] through g_1): the largest raw logit would pick class 2, the confidence rule class 0.
    # Image 1: task 0's model is unsure ([0, 0]); task 1's, through g_1, is confident ([-10, 5]): class 3.
    logits = module(x)
    assert logits.argmax(dim=1).tolist() == [0, 3]
    assert torch.cat([block0(x.flatten(1)), block1(x.flatten(1) + torch.tensor([0.0, 1.0]))], 1).argmax(
        dim=1
    ).tolist() == [2, 3]
    assert torch.allclose(logits[:, 2:].exp().sum(dim=1), torch.ones(2))  # per-task log-probabilities
    assert torch.allclose(module(x, task=1), module.head(x.flatten(1) + torch.tensor([0.0, 1.0])))
    assert module.capabilities.selects_task
    prediction = module.predict(x)
    assert torch.equal(prediction.logits, logits)
    assert prediction.chosen_task.tolist() == [0, 1]  # the task of each top class
    shared = InputTuning(Flatten()).eval()
    assert not shared.capabilities.selects_task


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"transform": "rotate"}, r"method\.transform='rotate'"),
        ({"sharing": "per_class"}, r"method\.sharing='per_class'"),
        ({"sharing": "per_task", "loss_scope": "seen"}, r"loss_scope=seen does not fit"),
        ({"identity_penalty": -1.0}, r"identity_penalty must be >= 0"),
    ],
)
def test_bad_options_raise_config_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        InputTuning(CifarResNet(20), **options)


def test_identity_penalty_is_added_to_the_loss() -> None:
    module = InputTuning(CifarResNet(20), transform="additive", identity_penalty=2.0)
    _start_tasks(module, [3], (3, 16, 16))
    with torch.no_grad():
        module.transforms[0].delta.fill_(0.5)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    ce = F.cross_entropy(module(x), y)
    assert torch.allclose(module.training_step((x, y), 0), ce + 2.0 * 0.25)


def test_shared_cil_run_keeps_the_checkpoint_bit_identical(run_tiny, tmp_path: Path) -> None:
    checkpoint = tmp_path / "backbone.pt"
    torch.save(CifarResNet(20).weights_state_dict(), checkpoint)
    doc, run_dir = run_tiny(
        "method=input_tuning",
        "method.transform=padding",
        f"backbone.checkpoint={checkpoint}",
        "save_model=true",
        *FAKE,
    )
    assert doc["status"] == "complete" and len(doc["acc_matrix"]) == 2
    saved = torch.load(run_dir / "final_model.pt", weights_only=True)["state_dict"]
    original = torch.load(checkpoint, weights_only=True)
    assert all(torch.equal(saved[f"backbone.{k}"], v) for k, v in original.items())
    assert any(k.startswith("transforms.0.") for k in saved)


@pytest.mark.parametrize("scenario", ["cil", "til"])
def test_per_task_run_cannot_forget_with_the_task_id(run_tiny, scenario: str) -> None:
    doc, _ = run_tiny(
        "method=input_tuning",
        "method.sharing=per_task",
        f"scenario={scenario}",
        "scenario.n_tasks=2",
        "scenario.order_seed=0",
        *FAKE,
    )
    til = doc["til_acc_matrix"]
    assert til[1][0] == til[0][0]  # task 0's transformation and head block are frozen after task 0
    selection = doc["extra_matrices"]["task_selection_acc"]
    assert len(selection) == 2 and selection[0][0] == 100.0  # one task: always chosen
    if scenario == "til":
        assert doc["acc_matrix"] == til
