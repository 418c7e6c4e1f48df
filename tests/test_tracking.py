"""Trackers: the per-task scalars and aggregates, run identity, and what each backend (W&B offline, CSV,
TensorBoard, MLflow) holds after a run, read back from its files."""

from __future__ import annotations

import csv
import json
import struct
import threading
from pathlib import Path

import pytest
from helpers import compose_config
from omegaconf import OmegaConf
from wandb_file import read_run

from cl_bench import tracking
from cl_bench.metrics import mean_task_accuracy
from cl_bench.results import build_results
from cl_bench.tracking import protocol, run_name, square, task_metrics

SEQ_FT = ("method=seq_ft", "method.epochs=1", "method.batch_size=64")


def synthetic_doc(rows: int = 2, status: str = "incomplete", error: str | None = None) -> dict:
    """A 3-task results document after ``rows`` tasks, with an extra matrix."""
    acc = [[80.0], [60.0, 70.0], [50.0, 55.0, 90.0]][:rows]
    til = [[90.0], [85.0, 80.0], [84.0, 79.0, 95.0]][:rows]
    sel = [[100.0], [75.0, 50.0], [60.0, 40.0, 20.0]][:rows]
    return build_results(
        acc, til, [10, 10, 20], [0, 1, 2, 3], [1.5, 2.5, 3.5][:rows], 12.0, status, {"seed": 0},
        {"task_selection_acc": sel}, error,
    )  # fmt: skip


def test_task_metrics_are_each_seen_tasks_accuracy_and_the_aggregates() -> None:
    doc = synthetic_doc(rows=2)
    metrics = task_metrics(1, doc)
    assert metrics["acc/task_00"] == 60.0 and metrics["acc/task_01"] == 70.0
    assert metrics["til_acc/task_00"] == 85.0 and metrics["til_acc/task_01"] == 80.0
    assert metrics["task_selection_acc/task_00"] == 75.0 and metrics["task_selection_acc/task_01"] == 50.0
    assert "acc/task_02" not in metrics  # not seen yet
    assert metrics["eval/acc_after_task"] == pytest.approx((60 * 10 + 70 * 10) / 20)  # weighted by test size
    assert metrics["eval/task_acc"] == 70.0
    assert metrics["eval/mean_task_acc"] == 65.0 and metrics["eval/til_mean_task_acc"] == 82.5
    assert metrics["eval/task_selection_acc"] == 62.5
    assert metrics["eval/forgetting"] == 20.0 and metrics["eval/bwt"] == -20.0
    assert metrics["eval/task_time_s"] == 2.5
    assert metrics["eval/avg_inc_acc"] == pytest.approx((80.0 + 65.0) / 2)
    assert square(doc["acc_matrix"])[2] == [None, None, None]


def test_task_keys_sort_with_many_tasks() -> None:
    rows = [[50.0] * (t + 1) for t in range(101)]
    doc = build_results(rows, rows, [1] * 101, list(range(101)), [1.0] * 101, 1.0, "complete", {})
    keys = [k for k in task_metrics(100, doc) if k.startswith("acc/")]
    assert keys[0] == "acc/task_000" and keys[-1] == "acc/task_100" and keys == sorted(keys)


def test_protocol_is_the_benchmark_and_ignores_method_and_seed() -> None:
    base = compose_config("paths.data_dir=/d")
    other = compose_config("paths.data_dir=/d", "method=ewc", "seed=3", "scenario.order_seed=7")
    assert protocol(base) == protocol(other) == "digits-cil-5tasks-resnet20_cifar"
    split = compose_config("scenario.init_classes=4", "scenario.increment=2", "scenario.type=til")
    assert protocol(split) == "digits-til-b4inc2-resnet20_cifar"
    subset = compose_config("scenario.class_order=[3,1,4,0]", "scenario.n_tasks=2")
    assert protocol(subset) == "digits-cil-2tasks-4classes-resnet20_cifar"


@pytest.fixture
def hydra_overrides():
    """Install a Hydra run config whose command-line overrides are the given ones (as ``cl-bench`` does)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    def install(*overrides: str, mode: RunMode = RunMode.RUN):
        from hydra import compose, initialize_config_dir

        from cl_bench.cli import CONFIG_DIR

        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            full = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        OmegaConf.set_readonly(full.hydra, False)
        full.hydra.mode = mode
        full.hydra.sweep.dir = "x/sw-1"
        HydraConfig.instance().set_config(full)
        return compose_config(*overrides)

    yield install
    HydraConfig.instance().cfg = None


def test_run_name_is_the_method_and_the_overrides_that_differ_from_the_preset(hydra_overrides) -> None:
    from hydra.types import RunMode

    from cl_bench.cli import CONFIG_DIR

    preset_lr = compose_config("experiment=cifar100_resnet32").method.lr
    cfg = hydra_overrides(
        "experiment=cifar100_resnet32",
        f"method.lr={preset_lr}",  # the preset's own value: not a difference
        "method.weight_decay=0.123",
        "seed=2",
        "paths.data_dir=/data",
        "logger.mode=offline",
        "trainer.num_workers=4",
        "trainer.gradient_clip_val=1.0",
        "backbone=resnet20_cifar",
        "debug=smoke",
    )
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):  # as inside a Hydra app
        name = run_name(cfg)
    assert (
        name
        == "seq_ft backbone=resnet20_cifar method.weight_decay=0.123 seed=2 trainer.gradient_clip_val=1.0"
    )
    cfg = hydra_overrides("method.lr=0.5", "seed=1", mode=RunMode.MULTIRUN)
    identity = tracking.run_identity(cfg)
    assert identity.group == "digits-cil-5tasks-resnet20_cifar"  # the protocol, not the sweep
    assert "sweep-sw-1" in identity.tags and "smoke" not in identity.tags
    assert identity.name.startswith("seq_ft")


def test_explicit_name_and_group_win(hydra_overrides) -> None:
    cfg = hydra_overrides("logger.name=mine", "logger.group=ours", "debug=smoke")
    identity = tracking.run_identity(cfg)
    assert (identity.name, identity.group) == ("mine", "ours") and "smoke" in identity.tags


# ------------------------------------------------------------------------------------------------ W&B


def wandb_tracker(tmp_path: Path, **kwargs):
    cfg = compose_config("logger.mode=offline", "paths.data_dir=/d")
    identity = tracking.RunIdentity(name="unit", group="g", tags=["t"])
    return tracking.WandbTracker(cfg.logger, tmp_path, {"seed": 0}, identity, **kwargs)


def test_wandb_file_holds_scalars_tables_heatmaps_per_task_and_the_error(tmp_path: Path) -> None:
    tracker = wandb_tracker(tmp_path)
    for task in range(2):
        tracker.log_train_epoch({"train/loss": 1.0 / (task + 1), "train/task": task})
        tracker.log_task(task, synthetic_doc(rows=task + 1))
    crashed = synthetic_doc(rows=2, error="RuntimeError: CUDA out of memory")
    tracker.finish(crashed, "incomplete", crashed["error"])
    run = read_run(tmp_path)
    assert (run.name, run.group, run.tags, run.exit_code) == ("unit", "g", ["t"], 1)
    for prefix in ("acc", "til_acc", "task_selection_acc", "eval", "matrix", "heatmap"):
        assert run.metrics[f"{prefix}/*"] == "task"
    assert run.metrics["train/*"] == "train/epoch"
    tasks = [row for row in run.history if "task" in row]
    assert [row["task"] for row in tasks] == [0, 1]
    assert tasks[0]["acc/task_00"] == 80.0 and "acc/task_01" not in tasks[0]
    assert tasks[1]["acc/task_00"] == 60.0 and tasks[1]["til_acc/task_01"] == 80.0
    assert tasks[1]["task_selection_acc/task_01"] == 50.0
    for name in ("acc", "til_acc", "task_selection_acc"):
        assert tasks[1][f"matrix/{name}/_type"] == "table-file" and tasks[1][f"matrix/{name}/nrows"] == 2
        assert tasks[1][f"heatmap/{name}/_type"] == "image-file"
    media = next(tmp_path.glob("wandb/offline-run-*/files"))
    table = json.loads((media / tasks[1]["matrix/acc/path"]).read_text())
    assert table["columns"] == ["after_task", "task_00", "task_01", "task_02"]
    assert table["data"] == [[0, 80.0, None, None], [1, 60.0, 70.0, None]]
    assert (media / tasks[1]["heatmap/acc/path"]).read_bytes().startswith(b"\x89PNG")
    epochs = [row for row in run.history if "train/loss" in row]
    assert [(r["train/epoch"], r["train/task"]) for r in epochs] == [(0, 0), (1, 1)]
    assert run.summary["status"] == "incomplete" and run.summary["error"].startswith("RuntimeError: CUDA")
    assert run.summary["last_acc"] == crashed["last_acc"]


def test_wandb_starts_in_the_background_and_sends_what_was_queued(tmp_path: Path, monkeypatch) -> None:
    import wandb

    release = threading.Event()
    real_init = wandb.init

    def slow_init(*args, **kwargs):
        assert release.wait(60)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", slow_init)
    tracker = wandb_tracker(tmp_path)  # returns while wandb.init is held back
    assert tracker._thread.is_alive() and not tracker._ready.is_set()
    assert len(tracker.run_id) == 8  # known at once: checkpoints can store it
    tracker.log_task(0, synthetic_doc(rows=1))
    release.set()
    tracker.finish(synthetic_doc(rows=1), "complete")
    run = read_run(tmp_path)
    assert run.exit_code == 0 and [row["acc/task_00"] for row in run.history if "task" in row] == [80.0]
    assert next(tmp_path.glob("wandb/offline-run-*")).name.endswith(tracker.run_id)


def test_wandb_failing_to_start_costs_nothing_but_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("no service")

    monkeypatch.setattr(wandb, "init", broken)
    tracker = wandb_tracker(tmp_path)
    tracker.log_task(0, synthetic_doc(rows=1))
    tracker.finish(synthetic_doc(rows=1), "complete")
    assert "W&B could not start (no service)" in caplog.text


@pytest.mark.slow
def test_wandb_run_of_an_experiment_matches_results_json(run_tiny) -> None:
    doc, run_dir = run_tiny(*SEQ_FT, "logger.mode=offline")
    run = read_run(run_dir)
    assert run.group == "digits-cil-2tasks-resnet20_cifar" and run.name == "seq_ft"
    tasks = [row for row in run.history if "task" in row]
    for t, row in enumerate(tasks):
        for j in range(t + 1):
            assert row[f"acc/task_{j:02d}"] == pytest.approx(doc["acc_matrix"][t][j])
            assert row[f"til_acc/task_{j:02d}"] == pytest.approx(doc["til_acc_matrix"][t][j])
        assert row["eval/mean_task_acc"] == pytest.approx(mean_task_accuracy(doc["acc_matrix"], t))
    assert run.summary["last_acc"] == pytest.approx(doc["last_acc"]) and run.summary["status"] == "complete"
    assert any("train/loss" in row for row in run.history)


# ------------------------------------------------------------------------------- Lightning's loggers


@pytest.mark.slow
def test_csv_logger_writes_per_task_columns(run_tiny) -> None:
    doc, run_dir = run_tiny(*SEQ_FT, "logger=csv")
    (metrics_file,) = run_dir.glob("csv/version_0/metrics.csv")
    rows = list(csv.DictReader(metrics_file.open()))
    task_rows = [r for r in rows if r.get("task")]
    assert [float(r["task"]) for r in task_rows] == [0.0, 1.0]
    assert float(task_rows[1]["acc/task_00"]) == pytest.approx(doc["acc_matrix"][1][0])
    assert float(task_rows[1]["til_acc/task_01"]) == pytest.approx(doc["til_acc_matrix"][1][1])
    assert any(r.get("train/loss") for r in rows)
    assert any(r.get("final/last_acc") for r in rows)
    assert not (run_dir / "wandb").exists()


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of a TensorBoard event file (TFRecord framing: length, CRC, Event proto, CRC)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in folder.rglob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
                elif value.HasField("image"):
                    scalars.setdefault(value.tag, []).append(
                        (event.step, float(len(value.image.encoded_image_string)))
                    )
    return scalars


@pytest.mark.slow
def test_tensorboard_logger_holds_scalars_and_heatmaps(run_tiny) -> None:
    pytest.importorskip("tensorboardX", reason="tensorboardX is in the dev extra")
    doc, run_dir = run_tiny(*SEQ_FT, "logger=tensorboard")
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert [step for step, _ in scalars["acc/task_00"]] == [0, 1]
    assert scalars["acc/task_00"][1][1] == pytest.approx(doc["acc_matrix"][1][0], abs=1e-4)
    assert [step for step, _ in scalars["acc/task_01"]] == [1]
    assert [step for step, _ in scalars["heatmap/acc"]] == [0, 1]
    assert "train/loss" in scalars


@pytest.mark.slow
def test_mlflow_logger_holds_the_run_with_its_name_tags_and_metrics(run_tiny, tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="mlflow-skinny is in the dev extra")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    doc, _ = run_tiny(*SEQ_FT, "logger=mlflow", f"logger.save_dir={store}")
    client = MlflowClient(tracking_uri=f"file:{store}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "cl_bench"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "seq_ft" and run.info.status == "FINISHED"
    assert (
        run.data.tags["group"] == "digits-cil-2tasks-resnet20_cifar" and run.data.tags["status"] == "complete"
    )
    history = client.get_metric_history(run.info.run_id, "acc/task_00")
    assert sorted((m.step, round(m.value, 4)) for m in history) == [
        (0, round(doc["acc_matrix"][0][0], 4)),
        (1, round(doc["acc_matrix"][1][0], 4)),
    ]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "heatmap")]
    assert "heatmap/acc_task_01.png" in artifacts


@pytest.mark.slow
def test_mlflow_file_store_given_as_tracking_uri(run_tiny, tmp_path: Path, monkeypatch) -> None:
    """``logger.tracking_uri=file:///shared/mlruns`` (a file store shared by several run folders) stopped the
    run with MLflow's "filesystem tracking backend is in maintenance mode" traceback."""
    pytest.importorskip("mlflow", reason="mlflow-skinny is in the dev extra")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    store = tmp_path / "shared_mlruns"
    doc, _ = run_tiny(*SEQ_FT, "logger=mlflow", f"logger.tracking_uri=file://{store}")
    assert doc["status"] == "complete"
    client = MlflowClient(tracking_uri=f"file:{store}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "cl_bench"]
    assert [r.info.status for r in client.search_runs([experiment.experiment_id])] == ["FINISHED"]


def test_logger_none_writes_no_tracker_files(run_tiny) -> None:
    doc, run_dir = run_tiny(*SEQ_FT, "logger=none")
    assert doc["status"] == "complete"
    assert not any((run_dir / name).exists() for name in ("wandb", "csv", "tensorboard", "mlruns"))


def test_a_failing_tracker_costs_a_warning_not_the_run(run_tiny, monkeypatch, caplog) -> None:
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tracking, "task_metrics", broken)
    doc, run_dir = run_tiny("method=simplecil", "logger=csv")
    assert doc["status"] == "complete" and (run_dir / "results.json").is_file()
    assert caplog.text.count("LightningTracker could not log (OSError: disk full)") == 1
