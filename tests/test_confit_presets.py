"""The ConFiT presets reproduce the official code's protocol (shared/research/methods_cnn.md §1.6-1.7)."""

from __future__ import annotations

import pytest
import torch
from helpers import compose_config

from cl_bench.config import validate_config

PROTOCOL = {  # name: (classes used, tasks, epochs, batch size, dataset size of randperm)
    "cifar100": (100, 20, 10, 128, 100),
    "cub": (200, 10, 50, 32, 200),
    "caltech101": (100, 10, 20, 32, 101),
    "flowers102": (100, 10, 10, 32, 102),
}


@pytest.mark.parametrize("name", list(PROTOCOL))
def test_confit_preset_matches_the_official_protocol(name: str) -> None:
    classes, tasks, epochs, batch_size, randperm_size = PROTOCOL[name]
    cfg = compose_config(f"experiment=confit/{name}")
    validate_config(cfg)
    assert cfg.method.name == "confit" and cfg.backbone.name == "resnet18.tv_in1k"
    assert str(cfg.scenario.type) == "til" and str(cfg.transform.train) == "none"
    assert (cfg.scenario.n_tasks, cfg.method.epochs, cfg.method.batch_size) == (tasks, epochs, batch_size)
    assert (cfg.method.lr, cfg.method.momentum, cfg.method.weight_decay) == (0.01, 0.0, 0.0)
    torch.manual_seed(0)  # Avalanche nc_benchmark(seed=0): classes[torch.randperm(n)]
    assert list(cfg.scenario.class_order) == torch.randperm(randperm_size).tolist()[:classes]


def test_dataset_specifics() -> None:
    assert compose_config("experiment=confit/cub").dataset.crop_to_bbox is True
    assert compose_config("experiment=confit/flowers102").dataset.split == "stratified"


@pytest.mark.parametrize("method", ["seq_ft", "ewc", "lwf", "er", "derpp", "si", "mas", "input_tuning"])
def test_baselines_run_in_the_confit_protocol(method: str) -> None:
    cfg = compose_config("experiment=confit/cifar100_resnet32", f"method={method}")
    validate_config(cfg)
    assert cfg.method.name == method and cfg.backbone.name == "resnet32_cifar"
    assert (cfg.method.epochs, cfg.method.batch_size, cfg.method.momentum) == (10, 128, 0.0)
    assert cfg.scenario.n_tasks == 20
