"""The ``cl-bench`` command as users type it (subprocesses: Hydra's real entry point)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SHARED_WEIGHTS

pytestmark = pytest.mark.slow  # every test starts cl-bench in a subprocess


def cl_bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, "-m", "cl_bench", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def tiny_npz(path: Path, n_classes: int = 10, greyscale: bool = False) -> Path:
    rng = np.random.default_rng(0)
    shape = (32, 32) if greyscale else (32, 32, 3)
    y_train, y_test = np.repeat(np.arange(n_classes), 6), np.repeat(np.arange(n_classes), 3)
    # Class-dependent brightness so the classes are separable.
    x_train = (
        rng.integers(0, 40, (len(y_train), *shape)) + 20 * y_train.reshape(-1, *[1] * len(shape))
    ).astype(np.uint8)
    x_test = (rng.integers(0, 40, (len(y_test), *shape)) + 20 * y_test.reshape(-1, *[1] * len(shape))).astype(
        np.uint8
    )
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def resnet32_checkpoint(tmp_path: Path) -> Path:
    """The real CIFAR-10 ResNet-32 where the shared folder exists, else one in the same format."""
    real = sorted(SHARED_WEIGHTS.glob("cifar10_akamaster_resnet32-*.th")) if SHARED_WEIGHTS.is_dir() else []
    if real:
        return real[0]
    from cl_bench.backbones.cifar_resnet import CifarResNet

    state = {f"module.{k}": v for k, v in CifarResNet(32).state_dict().items()}
    state.update({"module.linear.weight": torch.zeros(10, 64), "module.linear.bias": torch.zeros(10)})
    path = tmp_path / "resnet32.th"
    torch.save({"state_dict": state, "best_prec1": 0.0}, path)
    return path


def test_the_documented_npz_command_works_as_written(tmp_path: Path) -> None:
    data = tiny_npz(tmp_path / "tiny.npz", greyscale=True)
    ckpt = resnet32_checkpoint(tmp_path)
    run_dir = tmp_path / "run"
    out = cl_bench(
        "dataset=npz",
        f"dataset.path={data}",
        "backbone=resnet32_cifar",
        f"backbone.checkpoint={ckpt}",
        "method=simplecil",
        "scenario=cil",
        "scenario.n_tasks=10",
        "scenario.order_seed=1993",
        "seed=0",
        "logger.mode=offline",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((run_dir / "results.json").read_text())
    assert doc["status"] == "complete" and len(doc["acc_matrix"]) == 10
    assert doc["class_order"] == np.random.RandomState(1993).permutation(10).tolist()
    assert "last accuracy" in out.stdout and str(run_dir) in out.stdout
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "final_model.pt").is_file()


def test_multirun_sweeps_seeds(tmp_path: Path) -> None:
    out = cl_bench(
        "-m",
        "dataset=fake",
        "dataset.num_classes=4",
        "method=simplecil",
        "scenario.n_tasks=2",
        "seed=0,1",
        "logger.mode=disabled",
        "save_model=false",
        f"paths.output_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = sorted((tmp_path / "multiruns").rglob("results.json"))
    assert len(results) == 2
    assert {json.loads(p.read_text())["config"]["seed"] for p in results} == {0, 1}


def test_unknown_method_lists_the_options(tmp_path: Path) -> None:
    out = cl_bench("method=sequential", cwd=tmp_path)
    assert out.returncode != 0
    assert out.returncode == 2 and "method=sequential: no such method" in out.stderr
    assert "seq_ft" in out.stderr and "simplecil" in out.stderr and "Traceback" not in out.stderr


def test_bad_input_exits_with_a_one_line_error(tmp_path: Path) -> None:
    out = cl_bench(
        "dataset=npz",
        f"dataset.path={tmp_path / 'missing.npz'}",
        "logger.mode=disabled",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "cl-bench: error: npz dataset file not found" in out.stderr and "Traceback" not in out.stderr


def test_help_imports_no_torch(tmp_path: Path) -> None:
    """``cl-bench --help`` (and shell completion, the same path) must not pay for importing torch."""
    code = (
        "import sys\nsys.argv = ['cl-bench', '--help']\nfrom cl_bench.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    protocols = [line for line in out.stdout.splitlines() if line.startswith("protocol: ")]
    assert "== Configuration groups ==" in out.stdout and len(protocols) == 1
    assert "cifar100_b50_vit_tiny" in protocols[0].split(": ", 1)[1].split(", ")
    assert out.stdout.strip().endswith("TORCH False"), out.stdout[-500:] + out.stderr[-2000:]


def test_a_misspelt_preset_fails_at_once_with_close_matches(tmp_path: Path) -> None:
    out = cl_bench("experiment=slca/cifar", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "experiment=slca/cifar: no such experiment. Close matches: slca/cifar100" in out.stderr
    assert not (tmp_path / "outputs").exists()  # nothing ran


def test_a_method_key_swept_for_a_method_without_it_names_the_methods_that_have_it(tmp_path: Path) -> None:
    out = cl_bench("-m", "method=seq_ft,simplecil", "method.epochs=2", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        "method.epochs: the method of this run (or of some jobs of the sweep) has no key 'epochs'"
        in out.stderr
    )
    assert "seq_ft" in out.stderr and "simplecil" not in out.stderr.split("have it:")[1]
    assert "budget.epochs=VALUE" in out.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "trainer.max_epoch=1",
            "trainer.max_epoch: trainer has no key 'max_epoch'. Did you mean trainer.max_epochs?",
        ),
        ("method.lrr=0.1", "method.lrr: method=seq_ft has no key 'lrr'. Did you mean method.lr?"),
        ("sed=1", "sed: the config has no key 'sed'. Did you mean seed?"),
    ],
)
def test_a_misspelt_key_gets_its_close_matches_not_hydras_append_hint(
    tmp_path: Path, override: str, message: str
) -> None:
    """Hydra's own message says "To append to your config use +trainer.max_epoch=1", which then fails."""
    out = cl_bench(override, "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert message in out.stderr and "To append" not in out.stderr


@pytest.mark.parametrize("module", ["cl_bench", "cl_bench.cli"])
def test_python_dash_m_runs_the_command(tmp_path: Path, module: str) -> None:
    """``python -m cl_bench.cli --help`` printed nothing and exited 0 (the module had no main guard)."""
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "== Configuration groups ==" in out.stdout


def test_python_dash_m_runs_the_report(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cl_bench.report", "--help"], cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0 and "usage: cl-bench-report" in out.stdout


def test_a_method_that_cannot_run_on_the_backbone_stops_before_training(tmp_path: Path) -> None:
    out = cl_bench("method=lnt", "logger.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "method=lnt cannot run on the backbone resnet20_cifar: it needs LayerNorm layers" in out.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_refused_command_keeps_the_folders_hydra_record(tmp_path: Path) -> None:
    """Hydra writes ``.hydra/{config,hydra,overrides}.yaml`` before cl-bench can refuse a folder: a command
    refused there (another config's results, a live lock) used to replace the record of the run that made
    those results. The later command's record goes to ``.hydra/rerun-<time>/``."""
    run_dir = tmp_path / "run"
    first = cl_bench("method.lr=nan", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert first.returncode == 2 and "method.lr=nan" in first.stderr
    record = (run_dir / ".hydra" / "overrides.yaml").read_text()
    again = cl_bench("method.lr=-1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert again.returncode == 2 and "method.lr=-1" in again.stderr
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == record
    (rerun,) = (run_dir / ".hydra").glob("rerun-*/overrides.yaml")
    assert "method.lr=-1" in rerun.read_text()
