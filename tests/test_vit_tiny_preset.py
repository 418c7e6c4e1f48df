"""The small-ViT preset continues on exactly the CIFAR-100 classes its backbone was not pre-trained on."""

from __future__ import annotations

import torch
from helpers import compose_config

from cl_bench.config import build_from_config, validate_config
from cl_bench.scenario import class_order


def test_preset_uses_the_second_half_of_the_1993_order() -> None:
    cfg = compose_config("experiment=cifar100_b50_vit_tiny", "method=seq_ft")
    validate_config(cfg)
    order = class_order(100, 1993, None)
    assert list(cfg.scenario.class_order) == order[50:]
    assert not set(cfg.scenario.class_order) & set(order[:50])  # disjoint from the pre-training classes
    assert cfg.scenario.n_tasks == 5 and cfg.dataset.name == "cifar100"


def test_backbone_is_a_six_block_vit_for_32px_images() -> None:
    cfg = compose_config("experiment=cifar100_b50_vit_tiny", "backbone.checkpoint=null")
    backbone = build_from_config("backbone", cfg.backbone)
    assert backbone.data_config.input_size == 32 and len(backbone.blocks()) == 6
    assert backbone(torch.zeros(1, 3, 32, 32)).shape == (1, 192)
