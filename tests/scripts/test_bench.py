"""scripts/bench.py: its measurements run (the GPU ones on the CPU, tiny) and its run list composes."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import torch
from helpers import REPO_ROOT, compose_config

spec = importlib.util.spec_from_file_location("bench", REPO_ROOT / "scripts" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _args(**kw) -> argparse.Namespace:
    defaults = dict(data_dir="DATA", weights_dir="WEIGHTS", classes=10, tasks=2, epochs=1, only=None, pairs=1)
    return argparse.Namespace(**{**defaults, **kw})


def test_run_list_composes_with_the_reduction() -> None:
    """Every experiment of the list is a valid config; the reduction keeps the first classes of its order."""
    runs = bench.experiments(_args())
    assert list(runs) == ["quickstart", "simplecil_resnet32", "seq_ft_resnet32", "slca_vit_tiny"]
    for label, overrides in runs.items():
        cfg = compose_config(*overrides)
        if label == "quickstart":
            assert cfg.method.name == "seq_ft" and cfg.dataset.name == "digits"
            continue
        assert cfg.scenario.n_tasks == 2 and len(cfg.scenario.class_order) == 10
        assert cfg.backbone.checkpoint.startswith("WEIGHTS")
    assert compose_config(*runs["seq_ft_resnet32"]).scenario.class_order == bench.class_order("resnet32")[:10]
    vit = compose_config(*runs["slca_vit_tiny"])
    assert vit.method.epochs == 1 and list(vit.scenario.class_order) == bench.class_order("vit_tiny")[:10]


def test_alternate_reports_medians_and_ratios() -> None:
    calls: list[str] = []
    result = bench.alternate(3, lambda: calls.append("a"), lambda: calls.append("b"))
    assert calls == ["a", "b", "b", "a", "a", "b"]  # who goes first alternates
    assert len(result["cl_bench_s"]) == len(result["bare_s"]) == 3
    assert result["ratio_min"] <= result["ratio_median"] <= result["ratio_max"]


def test_augmentation_microbenchmark_runs() -> None:
    out = bench.augmentation(_args(), n=8)
    assert set(out) == {"crop_flip_32px", "rrc_32_to_224px_bicubic"}
    assert all(v["per_image_us"] > 0 and v["batch_us"] > 0 for v in out.values())


def test_gpu_measurements_run_on_the_cpu() -> None:
    """The GPU section's building blocks, tiny, on the CPU: throughput with FLOPs (fp32, bf16 autocast,
    channels_last) and the augmentation feed."""
    from cl_bench.backbones.cifar_resnet import CifarResNet

    cpu = torch.device("cpu")
    model = torch.nn.Sequential(CifarResNet(8), torch.nn.Linear(64, 10))
    result = bench.train_throughput(model, 4, 16, cpu, steps=1, warmup=0, classes=10)
    assert result["images_per_s"] > 0 and result["flops_per_image"] > 1e5
    bf16 = bench.train_throughput(
        model, 4, 16, cpu, torch.bfloat16, steps=1, warmup=0, channels_last=True, classes=10
    )
    assert bf16["flops_per_image"] == pytest.approx(result["flops_per_image"])
    feed = bench.augmentation_feed(cpu, workers=[0], n=16, batch=8)
    assert feed["per_image_0_workers_images_per_s"] > 0 and feed["batch_on_device_images_per_s"] > 0
    assert bench.gpu_peak("NVIDIA H200") == bench.GPU_PEAKS["H200"] and bench.gpu_peak("TPU") is None


@pytest.mark.slow
def test_a_run_is_measured_in_its_own_process(tmp_path) -> None:
    """measure_run on a tiny config: timers, results and memory come back."""
    overrides = ["dataset=digits", "dataset.size=16", "transform.input_size=16", "scenario.n_tasks=2"]
    overrides += ["method.epochs=1", "trainer.accelerator=cpu"]
    out = bench.measure_run("tiny", overrides, tmp_path)
    assert "error" not in out, out.get("error")
    assert 0 < out["startup_s"] < out["first_step_s"] < out["wall_s"]
    assert out["train_images"] > 0 and out["train_images_per_s"] > 0 and out["eval_images_per_s"] > 0
    assert len(out["task_time_s"]) == 2 and out["peak_host_mb"] > 0 and out["last_acc"] is not None
    json.dumps(out)


@pytest.mark.slow
def test_startup_breakdown_times_every_import() -> None:
    out = bench.startup_breakdown()
    assert list(out["imports_s"]) == list(bench.STARTUP_IMPORTS)
    assert out["python_interpreter_s"] > 0 and all(v >= 0 for v in out["imports_s"].values())


def test_every_section_can_be_chosen() -> None:
    args = bench.parse_args(["--out", "x.json", "--sections", "startup", "runs", "ratios", "gpu"])
    assert args.sections == ["startup", "runs", "ratios", "gpu"]
    assert bench.parse_args(["--out", "x.json"]).sections == args.sections
