"""APER: the embedding is [pre-trained, adapted] from one backbone with PET off and on (adapter, shallow VPT);
prototypes are the class means of that embedding; only the first task trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import ToyTasks

from cl_bench.backbones.timm_backbone import TimmBackbone
from cl_bench.methods.aper import APER
from cl_bench.modules.peft import peft_disabled, peft_parameters

SIZES = (3, 3)
TOY = ToyTasks(SIZES, n_per_class=4, input_shape=(3, 8, 8))


@pytest.mark.parametrize("peft", ["adapter", "vpt_shallow"])
def test_embedding_concatenates_pretrained_and_adapted_features_and_prototypes_are_means(peft: str) -> None:
    torch.manual_seed(0)
    backbone = TimmBackbone(
        "vit_tiny_patch16_224", pretrained=False, model_kwargs={"img_size": 8, "patch_size": 4, "depth": 1}
    )
    module = APER(backbone, peft=peft, adapter_bottleneck=4)
    assert peft_parameters(module.backbone) == [p for p in module.parameters() if p.requires_grad]
    ctx0 = TOY.context(0)
    module.on_task_start(ctx0)
    (phase,) = module.phases(ctx0)
    assert phase.data is ctx0.train_set
    with torch.no_grad():
        for p in peft_parameters(module.backbone):
            p.add_(0.5 * torch.randn_like(p))  # as after the first-session training
    module.on_task_end(ctx0)
    ctx1 = TOY.context(1)
    module.on_task_start(ctx1)
    assert module.phases(ctx1) == []
    module.on_task_end(ctx1)
    module.eval()
    x = ctx1.train_set.tensors[0]
    with torch.no_grad():
        adapted = module.backbone(x)
        with peft_disabled(module.backbone):
            pretrained = module.backbone(x)
        embedding = module.embed(x)
    torch.testing.assert_close(embedding, torch.cat([pretrained, adapted], dim=1))
    assert not torch.allclose(pretrained, adapted)
    labels = ctx1.train_set.tensors[1]
    means = torch.stack([embedding[labels == c].mean(0) for c in (3, 4, 5)])
    torch.testing.assert_close(module.head.prototypes[3:], means)
    expected = F.normalize(embedding, dim=1) @ F.normalize(module.head.prototypes, dim=1).T
    torch.testing.assert_close(module(x), expected)


@pytest.mark.parametrize("peft", ["adapter", "vpt_shallow"])
def test_tiny_run_beats_chance(run_tiny, peft: str) -> None:
    doc, _ = run_tiny(
        f"method.peft={peft}",
        "dataset.size=8",
        "transform.input_size=8",
        "backbone=timm",
        "backbone.name=vit_tiny_patch16_224",
        "backbone.pretrained=false",
        "+backbone.model_kwargs={img_size:8,patch_size:4,depth:1}",
        "method=aper",
        "method.epochs=1",
        "method.batch_size=128",
        "method.adapter_bottleneck=8",
    )
    assert doc["status"] == "complete" and len(doc["acc_matrix"]) == 2
    assert doc["last_acc"] > 30.0  # 10 digit classes: chance is 10 %
