"""The LayerNorm-tuning presets follow the official protocol (shared/research/methods_vit.md §4.5-4.6)."""

from __future__ import annotations

import random

import pytest
from helpers import compose_config

from cl_bench.config import build_from_config, validate_config
from cl_bench.methods.lnt import LayerNormTuning

PROTOCOL = {  # name: (dataset, classes, effective lr = config lr x 128/256)
    "cifar100": ("cifar100", 100, 0.0025),
    "imagenet_r": ("imagenet_r_split", 200, 0.005),
}


@pytest.mark.parametrize("name", list(PROTOCOL))
def test_lnt_preset_composes_builds_and_matches_the_official_protocol(name: str) -> None:
    dataset, classes, lr = PROTOCOL[name]
    cfg = compose_config(f"experiment=lnt/{name}", "backbone.pretrained=false")
    validate_config(cfg)
    assert cfg.dataset.name == dataset and cfg.method.name == "lnt" and cfg.seed == 0
    assert cfg.backbone.name == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert (cfg.scenario.n_tasks, cfg.method.batch_size, cfg.method.lr) == (10, 128, lr)
    assert (cfg.method.epochs, cfg.method.rectification_epochs, cfg.method.rectification_lr) == (5, 5, 0.001)
    assert list(cfg.transform.mean) == [0.0] * 3 and list(cfg.transform.std) == [1.0] * 3  # no normalisation
    random.seed(0)  # couple/datasets.py: random.shuffle of the labels after seeding with --seed 0
    order = list(range(classes))
    random.shuffle(order)
    assert list(cfg.scenario.class_order) == order
    backbone = build_from_config("backbone", cfg.backbone)
    method = build_from_config("method", cfg.method, backbone=backbone)
    assert isinstance(method, LayerNormTuning) and method.stage_epochs == {
        "keys": 5,
        "norms": 5,
        "rectify": 5,
    }
    assert len(method.norm_sets.layers) == 25 and method.norm_sets.params_per_set == 38_400  # §4.2
