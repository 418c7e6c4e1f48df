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


def _tiny_gpu_section(monkeypatch: pytest.MonkeyPatch, stop_after: int) -> list[str]:
    """The GPU section's measurements replaced by instant ones; the call ``stop_after`` is killed (as a time
    limit would kill the one GPU shot) and the second one raises."""
    import timm

    calls: list[str] = []

    def fake_throughput(model, batch, size, device, dtype=None, **kw):
        calls.append(f"{size}px {dtype} {sorted(kw)}")
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        if len(calls) == stop_after:
            raise SystemExit("killed")
        return {"images_per_s": 1.0, "achieved_tflops": 1e-3}

    monkeypatch.setattr(bench, "train_throughput", fake_throughput)
    monkeypatch.setattr(bench, "augmentation_feed", lambda device, workers: {"images_per_s": 1.0})
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: torch.nn.Linear(1, 1))
    return calls


def test_gpu_section_saves_each_measurement_as_it_goes(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one GPU shot: a variant that fails is recorded and the others run; one killed midway leaves the
    JSON of every measurement before it on disk; the slow torch.compile variants come last."""
    out = tmp_path / "gpu.json"
    calls = _tiny_gpu_section(monkeypatch, stop_after=4)
    monkeypatch.setattr(bench, "gpu_device", lambda: torch.device("cpu"))
    with pytest.raises(SystemExit):
        bench.main(["--out", str(out), "--sections", "gpu"])
    gpu = json.loads(out.read_text())["gpu"]
    assert gpu["vit_b16_fp32"] == {"images_per_s": 1.0, "achieved_tflops": 1e-3}
    assert "out of memory" in gpu["vit_b16_bf16"]["error"]
    assert len(calls) == 4 and len(gpu) >= 4  # device, peak, the two ViT entries and what followed
    calls = _tiny_gpu_section(monkeypatch, stop_after=0)
    bench.main(["--out", str(out), "--sections", "gpu"])
    keys = list(json.loads(out.read_text())["gpu"])
    compiled = [k for k in keys if k.endswith("compile")]
    assert len(compiled) == 2 and keys.index(compiled[0]) > keys.index("augmentation_feed_vit224")
    assert len(calls) == 10 and all("compile_model" in c for c in calls[-2:])
    assert not any("compile_model" in c for c in calls[:-2])


def test_a_failing_ratio_is_recorded_and_the_rest_run(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Missing data on the GPU machine must not stop the bench before its GPU section."""

    def missing(*_a):
        raise FileNotFoundError("cifar100.npz")

    for name in ("augmentation", "head_fit", "seq_ft_epoch", "simplecil_run"):
        monkeypatch.setattr(bench, name, missing if name == "seq_ft_epoch" else lambda *_a: {"ok": 1})
    out = tmp_path / "r.json"
    bench.main(["--out", str(out), "--sections", "ratios", "gpu"])
    doc = json.loads(out.read_text())
    assert "cifar100.npz" in doc["ratios"]["seq_ft_epoch"]["error"]
    assert doc["ratios"]["simplecil_run"] == {"ok": 1} and "gpu" in doc


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA A10G", None),  # not an A10: its peaks are unknown here
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_gpu_peak_matches_whole_model_names(name: str, model: str | None) -> None:
    assert bench.gpu_peak(name) == (None if model is None else bench.GPU_PEAKS[model])


def test_a_failing_feed_keeps_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-image loading that dies (e.g. workers out of shared memory) is recorded; the batch figure stays."""
    import cl_bench.data.transforms as transforms

    def broken(_spec):
        def transform(_image):
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Bus error")

        return transform

    monkeypatch.setattr(transforms, "train_pipeline", broken)
    feed = bench.augmentation_feed(torch.device("cpu"), workers=[0], n=16, batch=8)
    assert feed["batch_on_device_images_per_s"] > 0
    assert "Bus error" in feed["per_image_0_workers_images_per_s"]["error"]
