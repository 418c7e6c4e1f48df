"""The SLCA / SLCA++ presets reproduce the official configs (GengDavid/SLCA exps/slca/*.json,
exps/slcapp/*.json; shared/research/methods_vit.md §2.5-2.6), and every preset builds its method."""

from __future__ import annotations

import pytest
import torch
from helpers import CONF_DIR, compose_config

from cl_bench.backbones.timm_backbone import TimmBackbone
from cl_bench.config import build_from_config, validate_config
from cl_bench.methods.slca import SLCA
from cl_bench.methods.slca_pp import SLCAPlusPlus
from cl_bench.scenario import build_scenario

# name: (dataset, number of classes, task sizes, epochs, logit-norm tau)
BENCHMARKS = {
    "cifar100": ("cifar100", 100, [10] * 10, 20, 0.1),
    "imagenet_r": ("imagenet_r_split", 200, [20] * 10, 50, 0.1),
    "cub": ("cub", 200, [20] * 10, 50, 0.1),
    "cars": ("stanford_cars", 196, [20] * 9 + [16], 50, 0.05),
}
CIFAR_MEAN = [0.5071, 0.4867, 0.4408]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment" / "slca").glob("*.yaml"))


def test_every_benchmark_has_slca_slcapp_and_their_mocov3_variants() -> None:
    expected = {f"{b}{pp}{moco}" for b in BENCHMARKS for pp in ("", "_pp") for moco in ("", "_mocov3")}
    assert set(PRESETS) == expected


@pytest.mark.parametrize("benchmark", list(BENCHMARKS))
def test_slca_preset_matches_the_official_config(benchmark: str) -> None:
    dataset, n_classes, sizes, epochs, tau = BENCHMARKS[benchmark]
    cfg = compose_config(f"experiment=slca/{benchmark}")
    validate_config(cfg)
    assert (cfg.dataset.name, cfg.backbone.name, cfg.method.name) == (
        dataset,
        "vit_base_patch16_224.augreg_in21k",
        "slca",
    )
    scenario = build_scenario(cfg.scenario, n_classes)
    assert [t.num_classes for t in scenario.tasks] == sizes and cfg.scenario.order_seed == 1993
    m = cfg.method
    assert (m.epochs, m.batch_size, m.lr, m.backbone_lr, m.weight_decay) == (epochs, 128, 0.01, 1e-4, 5e-4)
    assert (m.scheduler, list(m.milestones), m.lr_decay) == (
        "multistep",
        [epochs - 2 if epochs == 20 else 40],
        0.1,
    )
    assert (m.ca_epochs, m.ca_samples_per_class, m.ca_batch_size, m.ca_logit_norm) == (5, 256, 256, tau)
    assert m.ca_mean_shrink and m.recall and m.reset_final_norm and m.loss_scope == "task"
    assert list(cfg.transform.mean) == (CIFAR_MEAN if benchmark == "cifar100" else IMAGENET_MEAN)
    official_train = "resize_crop_flip" if benchmark in ("cub", "cars") else "rrc_flip"  # utils/data.py
    assert cfg.seed == 1 and str(cfg.transform.train) == official_train


@pytest.mark.parametrize("benchmark", list(BENCHMARKS))
def test_slcapp_preset_matches_the_official_config(benchmark: str) -> None:
    _, _, _, epochs, tau = BENCHMARKS[benchmark]
    cfg = compose_config(f"experiment=slca/{benchmark}_pp")
    validate_config(cfg)
    m = cfg.method
    no_decay = benchmark in ("imagenet_r", "cars")
    assert (m.name, m.epochs, m.lr, m.backbone_lr, m.lora_lr_first_task) == (
        "slca_pp",
        epochs,
        0.01,
        1e-3,
        5e-3,
    )
    assert (m.scheduler, m.eta_min, m.weight_decay) == ("cosine", 1e-4, 0.0 if no_decay else 5e-4)
    assert (m.sce_alpha, m.sce_beta) == ((0.5, 0.5) if no_decay else (1.0, 0.1))
    assert (m.lora_rank, m.lora_scale, list(m.lora_targets), m.lora_init) == (
        4,
        0.8,
        ["attn.qkv", "mlp.fc1", "mlp.fc2"],
        "svd",
    )
    assert (m.ca_logit_norm, m.feature_scale_mu, m.ca_mean_shrink) == (tau, 0.02, False)


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.endswith("_mocov3")])
def test_mocov3_presets_swap_the_backbone_and_the_schedule(preset: str) -> None:
    cfg = compose_config(f"experiment=slca/{preset}")
    validate_config(cfg)
    assert (cfg.backbone.name, cfg.backbone.pretrained) == ("vit_base_patch16_224", False)
    assert cfg.backbone.checkpoint == "mocov3-vit-base-300ep.pth" and cfg.method.epochs == 90
    if "_pp" in preset:
        assert cfg.method.eta_min == 1e-5
    else:
        assert list(cfg.method.milestones) == [80]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_its_method(preset: str) -> None:
    cfg = compose_config(f"experiment=slca/{preset}")
    torch.manual_seed(0)
    backbone = TimmBackbone(
        "vit_tiny_patch16_224",
        pretrained=False,
        model_kwargs={"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
    )
    method = build_from_config("method", cfg.method, backbone=backbone)
    assert type(method) is (SLCAPlusPlus if "_pp" in preset else SLCA)
    assert method.epochs == cfg.method.epochs and method.alignment.logit_norm == cfg.method.ca_logit_norm
