"""The SAFE presets: the two released configs (CIFAR-100, ImageNet-A) as in MIFA-Lab/SAFE args/*.csv, and
the other five datasets with their task splits; RanPAC and APER run in the same protocol."""

from __future__ import annotations

import pytest
from helpers import compose_config

from cl_bench.config import validate_config

SPLITS = {  # name: (dataset, tasks, order seed, PET)
    "cifar100": ("cifar100", 10, 1993, "adapter"),
    "imagenet_a": ("imagenet_a", 10, 1993, "ssf"),
    "imagenet_r": ("imagenet_r", 10, 1993, "ssf"),
    "cub": ("cub", 10, 1993, "adapter"),
    "omnibenchmark": ("omnibenchmark", 10, 1993, "vpt"),
    "vtab": ("vtab", 5, None, "ssf"),
    "domainnet": ("domainnet", 5, 1993, "adapter"),
}


@pytest.mark.parametrize("name", list(SPLITS))
def test_safe_preset_protocol(name: str) -> None:
    dataset, tasks, seed, peft = SPLITS[name]
    cfg = compose_config(f"experiment=safe/{name}")
    validate_config(cfg)
    assert cfg.method.name == "safe" and cfg.dataset.name == dataset and cfg.method.peft == peft
    assert (cfg.scenario.n_tasks, cfg.scenario.order_seed) == (tasks, seed)
    assert (cfg.method.epochs, cfg.method.later_epochs, cfg.method.batch_size, cfg.method.lr) == (
        20,
        15,
        48,
        0.01,
    )
    assert (cfg.method.momentum, cfg.method.weight_decay, cfg.method.rp_dim) == (0.9, 0.0005, 10000)
    assert list(cfg.transform.mean) == [0.0, 0.0, 0.0] and list(cfg.transform.std) == [1.0, 1.0, 1.0]


def test_released_loss_weights() -> None:
    cifar = compose_config("experiment=safe/cifar100").method
    assert (cifar.diag_weight, cifar.redundancy_weight, cifar.align_weight, cifar.cross_weight) == (
        5e-10,
        5e-9,
        0.5,
        1.0,
    )
    assert cifar.gamma == 1.0 and compose_config("experiment=safe/cifar100").backbone.name.endswith("in21k")
    ina = compose_config("experiment=safe/imagenet_a")
    weights = (
        ina.method.diag_weight,
        ina.method.redundancy_weight,
        ina.method.align_weight,
        ina.method.cross_weight,
    )
    assert weights == (0.01, 10.0, 1.0, 0.0) and ina.method.gamma == 100.0
    assert ina.backbone.name == "vit_base_patch16_224.augreg_in21k_ft_in1k"


@pytest.mark.parametrize("method", ["ranpac", "aper"])
def test_baselines_compose_in_the_safe_protocol(method: str) -> None:
    cfg = compose_config("experiment=safe/cifar100", f"method={method}")
    validate_config(cfg)
    assert cfg.method.name == method and cfg.method.peft == "adapter"
    assert (cfg.method.epochs, cfg.method.batch_size, cfg.method.lr) == (20, 48, 0.01)


def test_safe_domain_incremental_domainnet_preset() -> None:
    """The DIL branch of SAFE's trainer.py: the six domains in the code's order, all 345 classes each,
    identity class order; RanPAC's DomainNet PET (adapter on in21k-ft-in1k) and inputs."""
    cfg = compose_config("experiment=safe/domainnet_dil")
    validate_config(cfg)
    assert cfg.method.name == "safe" and cfg.dataset.name == "domainnet" and cfg.scenario.type == "dil"
    assert list(cfg.scenario.domains) == ["real", "quickdraw", "painting", "sketch", "infograph", "clipart"]
    assert (cfg.scenario.n_tasks, cfg.scenario.order_seed, cfg.dataset.domains) == (6, None, None)
    assert cfg.method.domain_sessions == "heads_only" and cfg.method.peft == "adapter"
    assert (cfg.method.epochs, cfg.method.batch_size, cfg.method.lr, cfg.method.rp_dim) == (
        20,
        48,
        0.01,
        10000,
    )
    assert cfg.backbone.name == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert (cfg.transform.eval_resize, list(cfg.transform.rrc_scale)) == (256, [0.05, 1.0])
    assert list(cfg.transform.mean) == [0.0, 0.0, 0.0] and list(cfg.transform.std) == [1.0, 1.0, 1.0]
    for method in ("seq_ft", "simplecil", "ranpac", "aper"):
        validate_config(compose_config("experiment=safe/domainnet_dil", f"method={method}"))
