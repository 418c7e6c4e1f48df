"""SLCA++: the Hybrid Slow Learner (LoRA rank 4 on qkv/fc1/fc2 of every block, SVD-initialised, output
unchanged at init; only norms, biases, cls_token and LoRA train), its learning-rate groups and cosine floor,
the symmetric-CE training loss, CA's old-head input scales that recall resets, and a tiny end-to-end run
(SLCA's test checks that runs repeat)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import ToyTasks, end_task

from cl_bench.backbones.timm_backbone import TimmBackbone
from cl_bench.methods.lora import LoRALinear
from cl_bench.methods.losses import symmetric_cross_entropy
from cl_bench.methods.slca import reset_final_layer_norm
from cl_bench.methods.slca_pp import ScaledIncrementalLinearHead, SLCAPlusPlus

DIM, DEPTH = 32, 2
SIZES = (2, 2, 2)
TOY = ToyTasks(SIZES, n_per_class=6, input_shape=(3, 16, 16), class_shift=0.3)
TINY_VIT = (
    "backbone=timm",
    "backbone.name=vit_tiny_patch16_224",
    "backbone.pretrained=false",
    "+backbone.model_kwargs={img_size: 16, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}",
    "dataset=fake",
    "dataset.image_size=16",
    "method.epochs=1",
    "method.batch_size=16",
    "method.ca_epochs=2",
    "method.ca_samples_per_class=8",
)


def _vit() -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone(
        "vit_tiny_patch16_224",
        pretrained=False,
        model_kwargs={"img_size": 16, "patch_size": 8, "depth": DEPTH, "embed_dim": DIM, "num_heads": 2},
    )


def _module(**kwargs) -> SLCAPlusPlus:
    kwargs = {"ca_samples_per_class": 8, "ca_batch_size": 16, "ca_epochs": 2, **kwargs}
    return SLCAPlusPlus(_vit(), **kwargs)


def test_hybrid_slow_learner_adds_svd_lora_and_keeps_the_output() -> None:
    reference = _vit()
    reset_final_layer_norm(reference)
    module = _module()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(module.backbone.eval()(x), reference.eval()(x))
    loras = {n: m for n, m in module.backbone.named_modules() if isinstance(m, LoRALinear)}
    expected = {f"model.blocks.{b}.{t}" for b in range(DEPTH) for t in ("attn.qkv", "mlp.fc1", "mlp.fc2")}
    assert set(loras) == expected
    qkv = loras["model.blocks.0.attn.qkv"]
    assert (qkv.rank, qkv.scale) == (4, 0.8) and torch.equal(qkv.lora_B, torch.zeros(3 * DIM, 4))
    torch.testing.assert_close(qkv.lora_A, torch.linalg.svd(qkv.weight.detach())[2][:4])


def test_only_norms_biases_cls_token_and_lora_train() -> None:
    module = _module()
    trainable = {n for n, p in module.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(any(k in n for k in ("norm", "bias", "cls_token", "lora")) for n in trainable)
    assert not module.backbone.model.pos_embed.requires_grad
    assert not module.backbone.model.blocks[0].attn.qkv.weight.requires_grad
    # LoRA 14 r D per block + LayerNorms 4 D per block + 2 D + biases 9 D per block + D + cls_token D
    # (ViT-B/16: 516,096 + 38,400 + 83,712 + 768 = 638,976, the spec's count).
    n = sum(p.numel() for p in module.backbone.parameters() if p.requires_grad)
    assert n == DEPTH * (14 * 4 * DIM + 4 * DIM + 9 * DIM) + 2 * DIM + DIM + DIM
    full = _module(hybrid=False)
    assert all(p.requires_grad for p in full.backbone.parameters())
    assert not any(isinstance(m, LoRALinear) for m in full.backbone.modules())


def test_param_groups_and_cosine_floor() -> None:
    module = _module(epochs=4)
    module.on_task_start(TOY.context(0))
    assert {g["name"]: g["lr"] for g in module.param_groups()} == {
        "lora": 5e-3,
        "backbone": 1e-3,
        "head": 0.01,
    }
    module.on_task_start(TOY.context(1))
    assert {g["name"]: g["lr"] for g in module.param_groups()} == {
        "lora": 1e-3,
        "backbone": 1e-3,
        "head": 0.01,
    }
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-4, 1e-4])
    fast = _module(slow=False)
    fast.on_task_start(TOY.context(0))
    assert {g["lr"] for g in fast.param_groups()} == {0.01}


def test_training_loss_is_symmetric_ce_on_the_current_task() -> None:
    module = _module(sce_alpha=0.5, sce_beta=0.5)
    module.on_task_start(TOY.context(0))
    module.on_task_start(TOY.context(1))
    module.log = lambda *args, **kwargs: None
    x, y = TOY.context(1).train_set.tensors
    loss = module.training_step((x, y), 0)
    torch.testing.assert_close(loss, symmetric_cross_entropy(module(x)[:, 2:4], y - 2, 0.5, 0.5))


def test_ca_scales_old_heads_for_evaluation_and_recall_resets_them() -> None:
    module = _module()
    assert isinstance(module.head, ScaledIncrementalLinearHead)
    for task in (0, 1, 2):
        module.on_task_start(TOY.context(task))
        assert torch.equal(module.head.input_scales, torch.ones(task + 1))  # recall: scales back to 1
        before = {k: v.clone() for k, v in module.head.state_dict().items()}
        end_task(module, TOY.context(task))
    torch.testing.assert_close(module.head.input_scales, torch.tensor([1.04, 1.02, 1.0]))
    assert not torch.equal(module.head.blocks[0].weight, before["blocks.0.weight"])
    features = torch.randn(3, DIM)
    expected = torch.cat(
        [b(features * s) for b, s in zip(module.head.blocks, (1.04, 1.02, 1.0), strict=True)], 1
    )
    torch.testing.assert_close(module.head(features), expected)


def test_ca_shrinks_old_samples_randomly_not_their_means() -> None:
    module = _module()
    assert not module.ca_mean_shrink
    generator = torch.Generator().manual_seed(0)
    scaler = module.ca_feature_scaler(torch.tensor([0, 0, 1, 1, 2, 2]), TOY.context(2), generator)
    scales = scaler(torch.tensor([0] * 50 + [5] * 5))
    assert (scales[:50] < 1 / (1 + 0.01 * 2) + 1e-6).all() and (scales[:50] > 1 / (1 + 0.03 * 2) - 1e-6).all()
    assert torch.equal(scales[50:], torch.ones(5))
    assert copy.deepcopy(module).ca_feature_scaler(torch.zeros(1), TOY.context(2), generator) is not None
    assert _module(feature_scale_mu=0.0).ca_feature_scaler(torch.zeros(1), TOY.context(2), generator) is None


def test_tiny_vit_run_is_complete(run_tiny) -> None:
    doc, _ = run_tiny("method=slca_pp", *TINY_VIT)
    assert doc["status"] == "complete" and len(doc["acc_matrix"]) == 2
