"""RanPAC: PET and cosine head train on the first task only, then the backbone is frozen; the ridge head is
the closed-form solution over all tasks' features; a tiny run beats chance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ToyTasks

from cl_bench.backbones.cifar_resnet import CifarResNet
from cl_bench.backbones.timm_backbone import TimmBackbone
from cl_bench.errors import ConfigError
from cl_bench.methods.ranpac import RanPAC
from cl_bench.modules.peft import peft_parameters

SIZES = (3, 3)
TOY = ToyTasks(SIZES, n_per_class=4, input_shape=(3, 8, 8))
TINY_VIT = (
    "dataset.size=8",
    "transform.input_size=8",
    "backbone=timm",
    "backbone.name=vit_tiny_patch16_224",
    "backbone.pretrained=false",
    "+backbone.model_kwargs={img_size:8,patch_size:4,depth:1}",
    "method.epochs=1",
    "method.batch_size=128",
    "method.adapter_bottleneck=8",
)


def _vit() -> TimmBackbone:
    torch.manual_seed(0)
    kwargs = {"img_size": 8, "patch_size": 4, "depth": 1}
    return TimmBackbone("vit_tiny_patch16_224", pretrained=False, model_kwargs=kwargs)


def test_first_task_trains_pet_then_everything_is_frozen_and_the_head_is_ridge() -> None:
    module = RanPAC(_vit(), peft="ssf", rp_dim=16, ridge_exponents=[0, 0])
    assert (module.epochs, module.batch_size) == (20, 48)
    ctx0 = TOY.context(0)
    module.on_task_start(ctx0)
    assert module.train_dataset(ctx0) is ctx0.train_set
    trained = {id(p) for g in module.param_groups() for p in g["params"]}
    assert trained == {id(p) for p in [*peft_parameters(module.backbone), *module.cosine_head.parameters()]}
    module.on_task_end(ctx0)
    assert module.capabilities.frozen_backbone and not any(
        p.requires_grad for p in module.backbone.parameters()
    )
    ctx1 = TOY.context(1)
    module.on_task_start(ctx1)
    assert module.phases(ctx1) == []  # no training phase after the first task
    module.on_task_end(ctx1)
    with torch.no_grad():
        features = torch.cat([module.backbone.eval()(c.train_set.tensors[0]) for c in (ctx0, ctx1)])
    h = torch.relu(features @ module.head.projection).double().numpy()
    y = F.one_hot(torch.cat([c.train_set.tensors[1] for c in (ctx0, ctx1)]), 6).double().numpy()
    expected = np.linalg.solve(h.T @ h + np.eye(16), h.T @ y).T  # lambda = 10^0
    np.testing.assert_allclose(module.head.weight.numpy(), expected, rtol=1e-3, atol=1e-4)
    assert module(ctx1.train_set.tensors[0]).shape == (12, 6)


def test_no_phase_one_trains_nothing_and_pet_needs_a_vit() -> None:
    module = RanPAC(CifarResNet(20), peft="none", rp_dim=8)
    ctx0 = TOY.context(0)
    module.on_task_start(ctx0)
    assert module.phases(ctx0) == []
    with pytest.raises(ConfigError, match="timm ViT"):
        RanPAC(CifarResNet(20), peft="adapter")
    with pytest.raises(ConfigError, match="ridge_exponents"):
        RanPAC(_vit(), ridge_exponents=[1, 2, 3])


def test_tiny_run_beats_chance(run_tiny) -> None:
    doc, _ = run_tiny(*TINY_VIT, "method=ranpac", "method.rp_dim=64")
    assert doc["status"] == "complete" and len(doc["acc_matrix"]) == 2
    assert doc["extra_matrices"] == {}
    assert doc["last_acc"] > 30.0  # 10 digit classes: chance is 10 %
