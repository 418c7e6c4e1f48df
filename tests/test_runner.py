"""The runner: results file schema, determinism, W&B offline runs, and errors that keep finished tasks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, compose_config

from cl_bench.errors import ConfigError, DataError, TrainingDivergedError
from cl_bench.methods.base import ContinualModule
from cl_bench.results import RESULT_KEYS

#: TINY without the digits-specific keys, for runs on other datasets.
TINY_ANY_DATA = tuple(o for o in TINY if not o.startswith("dataset"))
FAST_SEQ_FT = ("method=seq_ft", "method.epochs=1", "method.batch_size=32", "method.lr=0.05")


def test_results_file_schema_and_csv(run_tiny) -> None:
    doc, run_dir = run_tiny(*FAST_SEQ_FT, "save_model=true")
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert tuple(on_disk) == RESULT_KEYS
    assert on_disk == json.loads(json.dumps(doc))
    assert on_disk["status"] == "complete"
    assert len(on_disk["task_time_s"]) == 2 and all(t > 0 for t in on_disk["task_time_s"])
    assert on_disk["peak_mem_mb"] > 0
    assert on_disk["acc_matrix"][0][1] is None
    assert on_disk["config"]["method"]["name"] == "seq_ft" and on_disk["config"]["scenario"]["type"] == "cil"
    assert on_disk["class_order"] == np.random.RandomState(0).permutation(10).tolist()
    rows = list(csv.reader((run_dir / "acc_matrix.csv").open()))
    assert rows[0] == ["after_task", "task_0", "task_1"]
    assert float(rows[2][1]) == pytest.approx(doc["acc_matrix"][1][0], abs=1e-4) and rows[1][2] == ""
    assert (run_dir / "config.yaml").is_file() and (run_dir / "til_acc_matrix.csv").is_file()
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["torch"] == torch.__version__
    checkpoint = torch.load(run_dir / "final_model.pt", weights_only=True)
    assert checkpoint["class_order"] == doc["class_order"]
    assert checkpoint["task_boundaries"] == [[0, 5], [5, 10]]
    assert "head.blocks.1.weight" in checkpoint["state_dict"]


@pytest.mark.parametrize("method", ["seq_ft", "linear_probe"])
def test_same_seed_same_metrics(run_tiny, method: str) -> None:
    overrides = (f"method={method}", "method.epochs=2", "method.batch_size=32")
    first, _ = run_tiny(*overrides, "seed=7")
    second, _ = run_tiny(*overrides, "seed=7")
    for key in ("acc_matrix", "til_acc_matrix", "last_acc", "avg_inc_acc", "avg_forgetting", "bwt"):
        assert first[key] == second[key], key


def test_explicit_class_order_is_respected(run_tiny) -> None:
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    doc, _ = run_tiny("method=simplecil", f"scenario.class_order=[{','.join(map(str, order))}]")
    assert doc["class_order"] == order


def test_class_order_subset_uses_only_listed_classes(run_tiny) -> None:
    from cl_bench.data.digits import load_digits
    from cl_bench.experiment import task_datasets
    from cl_bench.scenario import build_scenario

    doc, _ = run_tiny("method=simplecil", "scenario.class_order=[3,1,4,0]")
    assert doc["class_order"] == [3, 1, 4, 0] and len(doc["acc_matrix"]) == 2
    data = load_digits(size=16)
    scenario = build_scenario(
        compose_config("scenario.class_order=[3,1,4,0]", "scenario.n_tasks=2").scenario, 10
    )
    _, _, test = task_datasets(data, scenario, None, None)
    expected = int(np.isin(data.test.labels, [3, 1, 4, 0]).sum())
    assert sum(len(t) for t in test) == expected
    assert sorted({int(y) for t in test for y in t.targets}) == [0, 1, 2, 3]


def test_b_init_increment_split(run_tiny) -> None:
    doc, _ = run_tiny("method=simplecil", "scenario.init_classes=4", "scenario.increment=2")
    assert len(doc["acc_matrix"]) == 4  # 4 + 2 + 2 + 2


def test_wandb_offline_run_is_written(run_tiny) -> None:
    doc, run_dir = run_tiny("method=simplecil", "logger.mode=offline")
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert doc["status"] == "complete"


def test_existing_results_are_never_overwritten(run_tiny, tmp_path: Path) -> None:
    run_dir = tmp_path / "same"
    run_tiny("method=simplecil", run_dir=run_dir)
    before = (run_dir / "results.json").read_text()
    with pytest.raises(ConfigError, match="already exists"):
        run_tiny("method=simplecil", run_dir=run_dir)
    assert (run_dir / "results.json").read_text() == before


def test_nan_loss_stops_with_clear_error_and_keeps_finished_tasks(
    run_tiny, tmp_path: Path, monkeypatch
) -> None:
    original = ContinualModule.task_logits

    def poisoned(self: ContinualModule, logits: torch.Tensor, targets: torch.Tensor):
        if self.task.index == 1:
            logits = logits * float("nan")
        return original(self, logits, targets)

    monkeypatch.setattr(ContinualModule, "task_logits", poisoned)
    run_dir = tmp_path / "nan"
    with pytest.raises(TrainingDivergedError, match=r"became nan at task 1.*Lower method\.lr"):
        run_tiny(*FAST_SEQ_FT, run_dir=run_dir)
    doc = json.loads((run_dir / "results.json").read_text())
    assert doc["status"] == "incomplete"
    assert len(doc["acc_matrix"]) == 1 and doc["acc_matrix"][0][0] is not None
    assert doc["last_acc"] == doc["acc_matrix"][0][0]


def test_missing_dataset_folder_names_it(tmp_path: Path) -> None:
    from cl_bench.runner import run_experiment

    cfg = compose_config(
        *TINY_ANY_DATA,
        f"paths.run_dir={tmp_path / 'r'}",
        "dataset=cifar100",
        "dataset.download=false",
        f"paths.data_dir={tmp_path / 'nowhere'}",
    )
    with pytest.raises(DataError, match=r"nowhere/cifar-100-python/train"):
        run_experiment(cfg)
    assert not (tmp_path / "r" / "results.json").exists()


def test_malformed_npz_is_reported(tmp_path: Path) -> None:
    from cl_bench.runner import run_experiment

    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((4, 8, 8, 3), np.uint8), y_train=np.zeros(4, np.int64))
    cfg = compose_config(
        *TINY_ANY_DATA, f"paths.run_dir={tmp_path / 'r'}", "dataset=npz", f"dataset.path={bad}"
    )
    with pytest.raises(DataError, match=r"lacks arrays \['x_test', 'y_test'\]"):
        run_experiment(cfg)


def test_wrong_checkpoint_is_reported(tmp_path: Path) -> None:
    from cl_bench.backbones.cifar_resnet import CifarResNet
    from cl_bench.errors import CheckpointError
    from cl_bench.runner import run_experiment

    ckpt = tmp_path / "r56.pth"
    torch.save({"state_dict": CifarResNet(56).state_dict()}, ckpt)
    cfg = compose_config(
        *TINY, f"paths.run_dir={tmp_path / 'r'}", "backbone=resnet20_cifar", f"backbone.checkpoint={ckpt}"
    )
    with pytest.raises(CheckpointError, match="unexpected .* keys"):
        run_experiment(cfg)


def test_any_timm_model_runs_end_to_end(run_tiny) -> None:
    doc, _ = run_tiny(
        "backbone=timm", "backbone.name=resnet18", "backbone.pretrained=false", "method=simplecil"
    )
    assert doc["status"] == "complete" and doc["last_acc"] > 20.0
