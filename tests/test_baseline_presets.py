"""RanPAC, APER and SimpleCIL presets: the benchmarks of their released configs (RanPAC/RanPAC
args/*_publish.csv row 7, in SAFE's protocols where SAFE follows them; RevisitingCIL
exps/{aper_adapter,simplecil}/*.json in protocol aper/<dataset>) with the official input handling ([0, 1]
inputs, no mean/std)."""

from __future__ import annotations

import pytest
from conftest import compose_config

from cl_bench.config import validate_config
from cl_bench.scenario import task_sizes

RANPAC = {  # name: (dataset, backbone tag, PET, task sizes, shuffled)
    "cifar100": ("cifar100", "augreg_in21k", "adapter", [10] * 10, True),
    "imagenet_r": ("imagenet_r", "augreg_in21k_ft_in1k", "ssf", [20] * 10, True),
    "imagenet_a": ("imagenet_a", "augreg_in21k_ft_in1k", "ssf", [20] * 10, True),
    "cub": ("cub", "augreg_in21k_ft_in1k", "adapter", [20] * 10, True),
    "omnibenchmark": ("omnibenchmark", "augreg_in21k", "vpt", [30] * 10, True),
    "vtab": ("vtab", "augreg_in21k_ft_in1k", "ssf", [10] * 5, False),
    "cars": ("stanford_cars", "augreg_in21k", "vpt", [16] + [20] * 9, True),
}
REVISITING = {  # name: (dataset, task sizes, shuffled)
    "cifar100": ("cifar100", [5] * 20, True),
    "cub": ("cub", [10] * 20, True),
    "imagenet_r": ("imagenet_r", [5] * 40, True),
    "imagenet_a": ("imagenet_a", [10] * 20, True),
    "omnibenchmark": ("omnibenchmark", [30] * 10, True),
    "vtab": ("vtab", [10] * 5, False),
}
NUM_CLASSES = {
    "cifar100": 100,
    "imagenet_r": 200,
    "imagenet_a": 200,
    "cub": 200,
    "omnibenchmark": 300,
    "vtab": 50,
    "stanford_cars": 196,
}


def _unnormalised(cfg) -> bool:
    """[0, 1] inputs: no normalisation, or mean 0 and std 1 (the SAFE protocols)."""
    t = cfg.transform
    return t.normalize is False or (list(t.mean) == [0.0] * 3 and list(t.std) == [1.0] * 3)


def _scenario_sizes(cfg) -> list[int]:
    s = cfg.scenario
    return task_sizes(NUM_CLASSES[cfg.dataset.name], s.n_tasks, s.init_classes, s.increment)


@pytest.mark.parametrize("name", list(RANPAC))
def test_ranpac_presets_follow_the_released_args(name: str) -> None:
    dataset, tag, peft, sizes, shuffled = RANPAC[name]
    cfg = compose_config(f"experiment=ranpac/{name}")
    validate_config(cfg)
    assert cfg.method.name == "ranpac" and cfg.dataset.name == dataset and cfg.method.peft == peft
    assert cfg.backbone.name == f"vit_base_patch16_224.{tag}"
    assert _scenario_sizes(cfg) == sizes and (cfg.scenario.order_seed == 1993) == shuffled
    assert (cfg.method.epochs, cfg.method.batch_size, cfg.method.lr, cfg.method.weight_decay) == (
        20,
        48,
        0.01,
        5e-4,
    )
    assert (cfg.method.rp_dim, list(cfg.method.ridge_exponents)) == (10000, [-8, 8])
    assert _unnormalised(cfg)


@pytest.mark.parametrize("method", ["aper", "simplecil"])
@pytest.mark.parametrize("name", list(REVISITING))
def test_revisiting_cil_presets_follow_the_released_configs(method: str, name: str) -> None:
    dataset, sizes, shuffled = REVISITING[name]
    cfg = compose_config(f"experiment={method}/{name}")
    validate_config(cfg)
    assert cfg.method.name == method and cfg.dataset.name == dataset
    assert cfg.backbone.name == "vit_base_patch16_224.augreg_in21k"
    assert _scenario_sizes(cfg) == sizes and (cfg.scenario.order_seed == 1993) == shuffled
    assert _unnormalised(cfg)
    if method == "aper":
        expected = (0.05, 24, 0.005) if name == "imagenet_r" else (0.01, 48, 5e-4)
        assert (cfg.method.lr, cfg.method.batch_size, cfg.method.weight_decay) == expected
        assert cfg.method.peft == "adapter" and cfg.method.epochs == 20
