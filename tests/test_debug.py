"""Debug runs and trainer knobs: smoke runs, data subsets, batch limits, clipping, accumulation, profiler,
random weights for smoke runs, and the error recorded in results.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, compose_config

from cl_bench import debug
from cl_bench.data.base import ArrayImages, TaskDataset
from cl_bench.errors import CheckpointError, ConfigError

SEQ_FT = ("method=seq_ft", "method.epochs=3", "method.batch_size=16")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.limit_train_batches=0", "trainer.limit_train_batches=0"),
        ("trainer.limit_train_batches=1.5", "fraction of the loader"),
        ("trainer.limit_train_batches=abc", "number of batches"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 must be at least 1"),
        ("trainer.limit_eval_batches=0", "trainer.limit_eval_batches=0"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1"),
        ("trainer.gradient_clip_algorithm=max", "use norm or value"),
        ("trainer.profiler=nvprof", "trainer.profiler='nvprof'"),
        ("debug.samples_per_class=0", "debug.samples_per_class=0"),
        ("debug.random_weights_if_missing=true", "smoke runs only"),
        ("debug.max_tasks=0", "debug.max_tasks=0"),
        ("debug.input_size=0", "debug.input_size=0"),
        ("+debug.method_caps.batch_size=-1", "debug.method_caps.batch_size=-1"),
    ],
)
def test_bad_knobs_fail_at_start_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        debug.check_options(compose_config(override))


def test_trainer_options() -> None:
    from cl_bench.config import TrainerConfig

    cfg = TrainerConfig(max_epochs=2, limit_train_batches=0.25, gradient_clip_val=1.0)
    assert debug.trainer_options(cfg, 5, Path("/r"), "task_00_train") == {
        "max_epochs": 2,
        "limit_train_batches": 0.25,
        "gradient_clip_val": 1.0,
        "gradient_clip_algorithm": "norm",
    }
    assert debug.trainer_options(TrainerConfig(), 5, Path("/r"), "x") == {"max_epochs": 5}
    assert debug.trainer_options(TrainerConfig(accumulate_grad_batches=3), 1, Path("/r"), "x") == {
        "max_epochs": 1,
        "accumulate_grad_batches": 3,
    }


def test_first_per_class_and_subset() -> None:
    labels = np.array([2, 0, 2, 1, 0, 2, 0, 1, 2])
    picked = debug.first_per_class(labels, 2)
    expected = sorted(i for c in range(3) for i in [k for k, y in enumerate(labels) if y == c][:2])
    assert picked.tolist() == expected
    images = ArrayImages(np.arange(9 * 2 * 2 * 3, dtype=np.uint8).reshape(9, 2, 2, 3), labels)
    subset = debug.SubsetImages(images, picked)
    assert subset.labels.tolist() == labels[picked].tolist() and len(subset) == 6
    assert torch.equal(subset.image(2), images.image(int(picked[2])))


def test_first_tasks_keeps_the_first_tasks_and_their_classes() -> None:
    from cl_bench.config import ScenarioConfig
    from cl_bench.scenario import build_scenario

    full = build_scenario(ScenarioConfig(init_classes=4, increment=2), 10)
    cut = debug.first_tasks(full, 2)
    assert cut.tasks == full.tasks[:2] and cut.class_order == full.class_order[:6]
    assert (cut.label_map >= 0).sum() == 6 and cut.label_map[list(full.class_order[:6])].tolist() == list(
        range(6)
    )
    assert debug.first_tasks(full, None) is full and debug.first_tasks(full, 9) is full


def test_cap_method_lowers_only_the_keys_the_method_has() -> None:
    cfg = compose_config(
        "method=ranpac",
        "method.batch_size=48",
        "+debug.method_caps={batch_size: 4, rp_dim: 256, buffer_size: 9}",
    )
    capped = debug.cap_method(cfg)
    assert (
        capped.method.batch_size == 4 and capped.method.rp_dim == 256 and "buffer_size" not in capped.method
    )
    assert cfg.method.batch_size == 48  # the caller's config is left alone
    small = compose_config(
        "method=ranpac",
        "method.batch_size=2",
        "method.rp_dim=0",
        "+debug.method_caps={batch_size: 4, rp_dim: 256}",
    )
    assert debug.cap_method(small) is small  # nothing above its cap: rp_dim 0 (no projection) stays


def test_shrink_input_sets_a_vit_to_the_smaller_patch_grid() -> None:
    """A 224 px ViT/16 asked for 40 px takes 48 (whole patches): its position embedding keeps the [CLS] entry
    and resamples the 14x14 grid to 3x3 (bicubic with antialiasing, as timm resizes weights of another
    resolution); the pipelines keep the 224 px recipe (``auto``: RandomResizedCrop), resize sides scaled."""
    import torch.nn.functional as F

    from cl_bench.backbones.timm_backbone import TimmBackbone
    from cl_bench.data.transforms import build_transforms

    backbone = TimmBackbone("vit_tiny_patch16_224", model_kwargs={"depth": 1})
    before = backbone.model.pos_embed.detach().clone()
    transform = compose_config("transform.eval_resize=256").transform
    shrunk = debug.shrink_input(backbone, transform, 40)
    assert backbone.data_config.input_size == 48 and backbone.model.patch_embed.grid_size == (3, 3)
    after = backbone.model.pos_embed.detach()
    grid = before[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(3, 3), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(after[:, 0], before[:, 0])
    torch.testing.assert_close(after[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 9, -1))
    assert backbone(torch.zeros(2, 3, 48, 48)).shape == (2, 192)
    assert (shrunk.train, shrunk.input_size, shrunk.eval_resize) == ("rrc_flip", 48, 55)  # 256 * 48/224
    assert transform.input_size is None and transform.eval_resize == 256  # the run's config is unchanged
    train_tf, eval_tf = build_transforms(backbone.data_config, shrunk, True)
    image = torch.zeros(3, 90, 120, dtype=torch.uint8)
    assert train_tf(image).shape == eval_tf(image).shape == (3, 48, 48)


def test_shrink_input_keeps_a_cnn_and_the_resize_recipe() -> None:
    from cl_bench.backbones.cifar_resnet import CifarResNet

    backbone = CifarResNet(depth=20)
    transform = compose_config("transform.train=resize_crop_flip", "transform.train_resize=40").transform
    shrunk = debug.shrink_input(backbone, transform, 16)
    assert backbone.data_config.input_size == 16
    assert (shrunk.train, shrunk.input_size, shrunk.train_resize) == ("resize_crop_flip", 16, 20)
    assert backbone(torch.zeros(1, 3, 16, 16)).shape == (1, backbone.feat_dim)
    for size in (None, 16, 64):  # unset, or not smaller: nothing changes
        assert debug.shrink_input(backbone, transform, size) is transform
    assert backbone.data_config.input_size == 16


def test_limit_eval_spreads_the_kept_images() -> None:
    images = ArrayImages(np.zeros((100, 2, 2, 3), np.uint8), np.repeat(np.arange(10), 10))
    full = TaskDataset(images, np.arange(100), np.arange(10), lambda x: x)
    (limited,) = debug.limit_eval([full], n_batches=2, batch_size=5)
    assert len(limited) == 10 and len(full) == 100
    assert sorted(set(limited.targets.tolist())) == list(range(10))  # every class kept
    assert debug.limit_eval([full], None, 5)[0] is full


def test_smoke_run_is_short_and_says_so(run_tiny) -> None:
    batches: list[int] = []
    from cl_bench.methods.base import ContinualModule

    original = ContinualModule.on_train_batch_end

    def count(self, outputs, batch, batch_idx):
        batches.append(self.task.index)
        return original(self, outputs, batch, batch_idx)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ContinualModule, "on_train_batch_end", count)
        doc, run_dir = run_tiny(*SEQ_FT, "scenario.n_tasks=5", "debug=smoke", "debug.samples_per_class=20")
    assert doc["config"]["debug"]["smoke"] is True and doc["status"] == "complete"
    assert batches == [0, 0, 1, 1]  # the first two tasks (of five), one epoch of two batches each
    assert len(doc["acc_matrix"]) == 2 and len(doc["class_order"]) == 4
    assert doc["config"]["method"]["batch_size"] == 4  # capped (debug.method_caps), and recorded so
    assert not (run_dir / "final_model.pt").exists()


def test_samples_per_class_subset_reaches_the_test_sets(run_tiny) -> None:
    doc, _ = run_tiny("method=simplecil", "debug.samples_per_class=3")
    assert doc["status"] == "complete"
    # 5 classes per task, 3 test images each: accuracies are multiples of 100/15
    assert all(round(v * 15 / 100, 6) == round(v * 15 / 100) for row in doc["acc_matrix"] for v in row if v)


def test_missing_weights_stop_a_real_run_and_not_a_smoke_run(run_tiny, tmp_path: Path, caplog) -> None:
    absent = f"backbone.checkpoint={tmp_path / 'absent.th'}"
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        run_tiny("method=simplecil", absent)
    doc, _ = run_tiny("method=simplecil", absent, "debug=smoke")
    assert doc["status"] == "complete" and "SMOKE RUN WITH RANDOM BACKBONE WEIGHTS" in caplog.text


def test_clipping_and_accumulation_reach_the_optimizer(run_tiny, monkeypatch) -> None:
    import pytorch_lightning as pl

    seen: list[dict] = []
    original = pl.Trainer.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "__init__", spy)
    doc, _ = run_tiny(
        *SEQ_FT,
        "trainer.gradient_clip_val=0.5",
        "trainer.gradient_clip_algorithm=value",
        "trainer.accumulate_grad_batches=2",
    )
    assert doc["status"] == "complete"
    assert all(
        k["gradient_clip_val"] == 0.5
        and k["gradient_clip_algorithm"] == "value"
        and k["accumulate_grad_batches"] == 2
        for k in seen
    )


@pytest.mark.parametrize("profiler", ["simple", "pytorch"])
def test_profiler_writes_per_task_reports(run_tiny, profiler: str) -> None:
    _, run_dir = run_tiny(
        "method=seq_ft", "method.epochs=1", "trainer.limit_train_batches=2", f"trainer.profiler={profiler}"
    )
    reports = sorted(p.name for p in (run_dir / "profiler").iterdir())
    assert any("task_00" in name for name in reports) and any("task_01" in name for name in reports)
    if profiler == "pytorch":
        assert any(name.endswith(".pt.trace.json") for name in reports)


def test_a_failed_run_records_its_error(tmp_path: Path, monkeypatch) -> None:
    from cl_bench.methods.base import ContinualModule
    from cl_bench.runner import run_experiment

    original = ContinualModule.on_task_start

    def boom(self, ctx):
        if ctx.task.index == 1:
            raise RuntimeError("boom at task 1\nsecond line")
        original(self, ctx)

    monkeypatch.setattr(ContinualModule, "on_task_start", boom)
    cfg = compose_config(*TINY, f"paths.run_dir={tmp_path / 'r'}", "method=simplecil")
    with pytest.raises(RuntimeError, match="boom"):
        run_experiment(cfg)
    doc = json.loads((tmp_path / "r" / "results.json").read_text())
    assert doc["status"] == "incomplete" and doc["error"] == "RuntimeError: boom at task 1\nsecond line"
    assert len(doc["acc_matrix"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simplecil", "slca"])
def test_smoke_run_of_the_vit_preset(tmp_path: Path, method: str) -> None:
    """``debug=smoke`` on the small-ViT preset with its real weights and data (where the machine has them):
    the preset's own dataset and split, not the tiny digits of the other tests."""
    from helpers import SHARED_DATA, SHARED_WEIGHTS

    weights, data = SHARED_WEIGHTS / "vit_tiny6_c100first50.pth", SHARED_DATA / "cifar100.npz"
    if not (weights.is_file() and data.is_file()):
        pytest.skip(f"{weights} or {data} absent (only the project's build machines have them)")
    cfg = compose_config(
        "experiment=cifar100_b50_vit_tiny",
        f"method={method}",
        f"backbone.checkpoint={weights}",
        f"paths.data_dir={SHARED_DATA}",
        f"paths.run_dir={tmp_path / 'run'}",
        "logger.mode=disabled",
        "trainer.accelerator=cpu",
        "save_model=false",
        "debug=smoke",
    )
    from cl_bench.runner import run_experiment

    doc = run_experiment(cfg)
    assert doc["status"] == "complete" and doc["config"]["debug"]["smoke"] is True
    assert len(doc["acc_matrix"]) == 2  # debug.max_tasks: the first two of its five tasks


@pytest.mark.slow
def test_smoke_run_of_a_preset_whose_weights_are_absent(run_tiny, tmp_path: Path) -> None:
    """A ViT-B/16 preset whose pre-trained weights cannot be fetched (no network) still runs as a smoke run,
    on random weights and at 32 px (``debug.input_size``: 2x2 patches); the digits data stand in for its
    dataset."""
    doc, _ = run_tiny(
        "experiment=slca/cifar100",
        "dataset=digits",
        "transform.input_size=null",
        "scenario.n_tasks=2",
        "debug=smoke",
    )
    assert doc["status"] == "complete" and len(doc["acc_matrix"]) == 2
    assert doc["config"]["debug"]["input_size"] == 32
    assert doc["config"]["backbone"]["name"].startswith("vit_base")


def test_smoke_runs_never_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside ``hub_offline`` the Hugging Face client is offline (a missing file fails at once instead of
    ~45 s of retries against an unreachable hub), and the setting is restored afterwards."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with debug.hub_offline():
        assert constants.is_offline_mode()
    assert constants.HF_HUB_OFFLINE is False
    seen: list[bool] = []

    def build(group, cfg, **kwargs):
        seen.append(constants.is_offline_mode())
        return "backbone"

    monkeypatch.setattr("cl_bench.config.build_from_config", build)
    assert debug.build_backbone(compose_config("debug=smoke")) == "backbone"
    assert debug.build_backbone(compose_config()) == "backbone"
    assert seen == [True, False]  # offline for the smoke run only
