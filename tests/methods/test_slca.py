"""SLCA: the fresh final LayerNorm (and a warning for backbones without one), one trunc-normal head per task
with old heads frozen, slow-learner learning rates and the multi-step schedule, task-local CE, class
statistics of the new classes under the evaluation transform, CA that changes only the classifier and is
repeatable, recall of the pre-CA heads, the class-to-task rule, and a tiny end-to-end run."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import ToyTasks, end_task
from torch import nn

from cl_bench.backbones.base import Backbone, DataConfig
from cl_bench.errors import ConfigError
from cl_bench.methods.slca import SLCA, final_layer_norm_name

SIZES = (2, 2, 1)
TOY = ToyTasks(SIZES, n_per_class=12, input_shape=(6,), class_shift=1.0)
TINY_VIT = (
    "backbone=timm",
    "backbone.name=vit_tiny_patch16_224",
    "backbone.pretrained=false",
    "+backbone.model_kwargs={img_size: 16, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
    "dataset=fake",
    "dataset.image_size=16",
    "method.epochs=1",
    "method.batch_size=16",
    "method.ca_epochs=2",
    "method.ca_samples_per_class=8",
)


class ToyViT(Backbone):
    """One 'block' and a final LayerNorm with a pre-trained (non-default) affine."""

    feat_dim = 4
    data_config = DataConfig(input_size=1)

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4))])
        self.norm = nn.LayerNorm(4, eps=1e-6)
        with torch.no_grad():
            self.norm.weight.fill_(3.0)
            self.norm.bias.fill_(-1.0)

    def blocks(self) -> list[nn.Module]:
        return list(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.tanh(self.layers[0](x)))


class NoNorm(Backbone):
    feat_dim = 4
    data_config = DataConfig(input_size=1)

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def blocks(self) -> list[nn.Module]:
        return [self.fc]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _module(backbone: Backbone | None = None, **kwargs) -> SLCA:
    torch.manual_seed(0)
    kwargs = {"ca_samples_per_class": 16, "ca_batch_size": 16, **kwargs}
    return SLCA(backbone or ToyViT(), **kwargs)


def _train_head_a_bit(module: SLCA) -> None:
    """Stand-in for stage 1: move the trainable weights (backbone and current head)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


def test_final_layer_norm_is_replaced_by_a_fresh_one() -> None:
    module = _module()
    norm = module.backbone.norm
    assert final_layer_norm_name(module.backbone) == "norm"
    assert type(norm) is nn.LayerNorm and norm.eps == 1e-5
    assert torch.equal(norm.weight, torch.ones(4)) and torch.equal(norm.bias, torch.zeros(4))
    assert module.backbone.layers[0][1].weight.requires_grad  # the block's own LayerNorm is untouched
    kept = _module(reset_final_norm=False).backbone.norm
    assert torch.equal(kept.weight, torch.full((4,), 3.0))


def test_backbone_without_final_layer_norm_warns_and_changes_nothing(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        module = _module(NoNorm())
    assert "reset_final_norm" in caplog.text and isinstance(module.backbone.fc, nn.Linear)


def test_heads_are_trunc_normal_and_old_ones_frozen_and_lrs_are_slow() -> None:
    module = _module()
    module.on_task_start(TOY.context(0))
    module.on_task_start(TOY.context(1))
    old, new = module.head.blocks
    assert not old.weight.requires_grad and new.weight.requires_grad
    # trunc-normal(std 0.02), not nn.Linear's uniform(+-1/sqrt(4))
    assert new.weight.abs().max() < 0.1 and torch.equal(new.bias, torch.zeros(2))
    groups = {g["name"]: g for g in module.param_groups()}
    assert groups["backbone"]["lr"] == 1e-4 and groups["head"]["lr"] == 0.01
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in new.parameters()}
    fast = _module(slow=False)
    fast.on_task_start(TOY.context(0))
    assert {g["name"]: g["lr"] for g in fast.param_groups()} == {"backbone": 0.01, "head": 0.01}


def test_multistep_schedule_decays_at_the_milestones() -> None:
    module = _module(epochs=4, milestones=[2], lr_decay=0.1)
    module.on_task_start(TOY.context(0))
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    lrs = []
    for _ in range(4):
        lrs.extend(g["lr"] for g in optimizer.param_groups)
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1e-4, 0.01, 1e-4, 0.01, 1e-5, 0.001, 1e-5, 0.001])


def test_training_loss_is_task_local_cross_entropy() -> None:
    module = _module()
    module.on_task_start(TOY.context(0))
    module.on_task_start(TOY.context(1))
    x, y = TOY.context(1).train_set.tensors
    module.log = lambda *args, **kwargs: None
    loss = module.training_step((x, y), 0)
    torch.testing.assert_close(loss, F.cross_entropy(module(x)[:, 2:4], y - 2))


def test_statistics_then_ca_changes_only_the_classifier_and_recall_restores_it() -> None:
    module = _module()
    ctx0 = TOY.context(0)
    module.on_task_start(ctx0)
    end_task(module, ctx0)
    assert module.statistics.classes == [0, 1] and module._stage1_head is None  # no CA on task 0
    x0, y0 = ctx0.train_eval_set.tensors
    with torch.no_grad():
        torch.testing.assert_close(module.statistics.means[0], module.backbone(x0[y0 == 0]).mean(0))
    ctx1 = TOY.context(1)
    module.on_task_start(ctx1)
    _train_head_a_bit(module)
    backbone_before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in module.head.state_dict().items()}
    end_task(module, ctx1)
    assert module.statistics.classes == [0, 1, 2, 3]
    assert all(torch.equal(v, backbone_before[k]) for k, v in module.backbone.state_dict().items())
    assert all(not torch.equal(v, head_before[k]) for k, v in module.head.state_dict().items())
    assert [b.weight.requires_grad for b in module.head.blocks] == [False, True]
    module.on_task_start(TOY.context(2))  # recall: the pre-CA heads come back before the new one is added
    assert all(torch.equal(module.head.state_dict()[k], v) for k, v in head_before.items())


def test_without_recall_the_aligned_heads_stay() -> None:
    module = _module(recall=False)
    for task in (0, 1):
        module.on_task_start(TOY.context(task))
        _train_head_a_bit(module)
        end_task(module, TOY.context(task))
    aligned = {k: v.clone() for k, v in module.head.state_dict().items()}
    module.on_task_start(TOY.context(2))
    assert all(torch.equal(module.head.state_dict()[k], v) for k, v in aligned.items())


def test_ca_is_repeatable_and_can_be_switched_off() -> None:
    heads = []
    for kwargs in ({}, {}, {"ca": False}):
        module = _module(**kwargs)
        for task in (0, 1):
            module.on_task_start(TOY.context(task))
            _train_head_a_bit(module)
            end_task(module, TOY.context(task))
        heads.append(module.head.state_dict())
    assert all(torch.equal(v, heads[1][k]) for k, v in heads[0].items())
    assert not torch.equal(heads[0]["blocks.0.weight"], heads[2]["blocks.0.weight"])


def test_class_tasks_follow_the_scenario_or_the_official_rule() -> None:
    module = _module()
    assert module.class_tasks(TOY.context(2)).tolist() == [0, 0, 1, 1, 2]
    official = _module(official_task_index=True)  # c // 1 with the last task's single class
    assert official.class_tasks(TOY.context(2)).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("options", "message"),
    [({"scheduler": "step"}, "scheduler"), ({"ca_epochs": -1}, "ca_"), ({"ca_logit_norm": -0.1}, "logit")],
)
def test_bad_options_raise_config_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _module(**options)


def test_tiny_vit_run_is_complete_and_repeatable(run_tiny) -> None:
    docs = [run_tiny("method=slca", *TINY_VIT)[0] for _ in range(2)]
    assert docs[0]["status"] == "complete" and len(docs[0]["acc_matrix"]) == 2
    assert docs[0]["acc_matrix"] == docs[1]["acc_matrix"]


def test_cnn_run_without_final_layer_norm_still_aligns(run_tiny, caplog) -> None:
    with caplog.at_level(logging.INFO):
        doc, _ = run_tiny(
            "method=slca", *(o for o in TINY_VIT if not o.startswith(("backbone", "+backbone")))
        )
    assert doc["status"] == "complete" and doc["config"]["backbone"]["name"] == "resnet20_cifar"
    assert "reset_final_norm has no effect" in caplog.text and "classifier alignment on" in caplog.text
