"""Presets of L2P, DualPrompt, CODA-Prompt and EASE: each official per-benchmark setting composes, validates
and carries the official values (shared/research/methods_vit.md §5)."""

from __future__ import annotations

import pytest
from helpers import compose_config

from cl_bench.config import validate_config

PRESETS = {  # preset: (dataset, tasks, order seed, {method key: official value})
    "l2p/cifar100": ("cifar100", 10, None, {"epochs": 5, "batch_size": 16, "lr": 0.001875, "top_k": 5}),
    "l2p/imagenet_r": ("imagenet_r", 10, 1993, {"epochs": 10, "batch_size": 32, "lr": 0.001875}),
    "dualprompt/cifar100": ("cifar100", 10, None, {"epochs": 5, "e_length": 5, "lr": 0.0028125}),
    "dualprompt/imagenet_r": ("imagenet_r_split", 10, None, {"epochs": 50, "e_length": 20, "lr": 0.00046875}),
    "coda_prompt/cifar100": ("cifar100", 10, None, {"epochs": 20, "pool_size": 100, "prompt_length": 8}),
    "coda_prompt/imagenet_r": ("imagenet_r_coda", 10, None, {"epochs": 50, "batch_size": 128}),
    "ease/cifar100": ("cifar100", 20, 1993, {"lr": 0.025, "batch_size": 48, "alpha": 0.1}),
    "ease/imagenet_r": ("imagenet_r", 10, 1993, {"lr": 0.05, "batch_size": 16, "weight_decay": 0.005}),
    "ease/cub": ("cub", 20, 1993, {"lr": 0.005, "alpha": 0.005, "use_init_ptm": True, "beta": 1.0}),
    "ease/imagenet_a": ("imagenet_a", 10, 1993, {"lr": 0.05, "batch_size": 32}),
    "ease/vtab": ("vtab", 5, None, {"epochs": 45, "adapter_bottleneck": 16, "lr": 0.03}),
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_carries_the_official_values(preset: str) -> None:
    dataset, tasks, order_seed, values = PRESETS[preset]
    cfg = compose_config(f"experiment={preset}")
    validate_config(cfg)
    assert cfg.method.name == preset.split("/")[0] and cfg.dataset.name == dataset
    assert (cfg.scenario.n_tasks, cfg.scenario.order_seed) == (tasks, order_seed)
    assert cfg.backbone.name == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert list(cfg.transform.mean) == [0.0, 0.0, 0.0] and list(cfg.transform.std) == [1.0, 1.0, 1.0]
    assert {key: cfg.method[key] for key in values} == values


@pytest.mark.parametrize("method", ["l2p", "dualprompt", "coda_prompt", "ease"])
def test_methods_compose_with_the_small_vit_protocol(method: str) -> None:
    validate_config(compose_config("experiment=cifar100_b50_vit_tiny", f"method={method}"))
