"""Sweep presets (``sweep=seeds_x_orders``, ``sweep=all_methods``), job folder names, end-of-sweep summary."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from helpers import CONF_DIR
from omegaconf import OmegaConf

from cl_bench.report import expand_sweep


def composed(*overrides: str):
    from hydra import compose, initialize_config_dir

    import cl_bench.config  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def jobs(*overrides: str) -> list[dict[str, str]]:
    """The runs ``cl-bench -m OVERRIDES`` starts, each as {key: value}."""
    sweep_overrides = [o for o in overrides if "," in o or "glob(" in o]
    cfg = composed(*(o for o in overrides if o not in sweep_overrides))
    preset = cfg.hydra.sweeper.params
    params = {} if preset is None else OmegaConf.to_container(preset)
    assert isinstance(params, dict)
    return [dict(o.split("=", 1) for o in job) for job in expand_sweep(params, list(overrides))]


def test_seeds_x_orders_is_three_seeds_times_three_orders_per_method() -> None:
    runs = jobs("sweep=seeds_x_orders", "method=seq_ft,simplecil")
    assert len(runs) == 18
    combos = {(r["method"], r["seed"], r["scenario.order_seed"]) for r in runs}
    expected = set(itertools.product(["seq_ft", "simplecil"], ["0", "1", "2"], ["1993", "0", "1"]))
    assert combos == expected


def test_a_command_line_override_replaces_the_presets_axis() -> None:
    runs = jobs("sweep=seeds_x_orders", "seed=5")
    assert len(runs) == 3 and {r["seed"] for r in runs} == {"5"}


def test_the_issues_sweep_command_expands_to_every_combination() -> None:
    runs = jobs("method=seq_ft,lwf", "scenario.order_seed=1993,0,1", "seed=0,1,2")
    assert len(runs) == 18 and len({tuple(sorted(r.items())) for r in runs}) == 18


def test_all_methods_runs_every_method_config() -> None:
    runs = jobs("sweep=all_methods")
    methods = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
    assert sorted(r["method"] for r in runs) == methods


@pytest.mark.parametrize("preset", ["seeds_x_orders", "all_methods"])
def test_presets_leave_the_run_config_alone(preset: str) -> None:
    cfg = composed(f"sweep={preset}")
    default = composed()
    for key in ("seed", "scenario", "method"):
        assert cfg[key] == default[key]


# ------------------------------------------------------------------------------ job folders, summary


def test_job_folder_names_hold_only_the_varied_values_without_nesting() -> None:
    from cl_bench.sweeps import MAX_SLUG, sweep_subdir, swept_keys

    overrides = ["method=lwf", "seed=1", "backbone.checkpoint=/data/weights/vit.pth", "dataset=fake"]
    varied, fixed = swept_keys(
        ["method=seq_ft,lwf", "seed=0,1", "dataset=fake", "backbone.checkpoint=/a/b"], {}
    )
    assert varied == {"method", "seed"} and fixed == {"dataset", "backbone.checkpoint"}
    assert sweep_subdir(3, overrides, list(fixed)) == "3_method=lwf,seed=1"
    assert (
        sweep_subdir(4, overrides, ["dataset"]) == "4_backbone.checkpoint=weights-vit.pth,method=lwf,seed=1"
    )
    assert sweep_subdir(0, overrides, ["dataset", "method", "seed", "backbone.checkpoint"]) == "0"
    long = sweep_subdir(7, [f"method.k{i}={'x' * 20}" for i in range(5)], [])
    assert "/" not in long and len(long) <= len("7_") + MAX_SLUG and long.count("~") == 1


def test_a_sweep_presets_axis_counts_as_varied_unless_the_command_line_fixes_it() -> None:
    from cl_bench.sweeps import swept_keys

    assert swept_keys(["sweep=all_methods"], {"method": "glob(*)"})[0] == {"method"}
    assert swept_keys(["seed=5"], {"seed": "0,1,2"}) == (set(), {"seed"})


def test_summary_counts_complete_failed_and_skipped_jobs(tmp_path: Path) -> None:
    import json

    from cl_bench.sweeps import job_folders, job_outcome, summary

    for name, files in {
        "0_method=seq_ft": {"results.json": json.dumps({"status": "complete", "acc_matrix": [[1.0]]})},
        "1_method=lwf": {"error.txt": "the training loss became nan at task 1\n\nTraceback ..."},
        "2_method=confit": {"skipped.txt": "method=confit cannot run on the backbone vit\n"},
        "10_method=er": {"results.json": json.dumps({"status": "incomplete", "acc_matrix": [[1.0]]})},
        "11_method=si": {},
        "12_method=mas": {"results.json": "{not json"},
    }.items():
        (tmp_path / name).mkdir()
        for file, text in files.items():
            (tmp_path / name / file).write_text(text)
    folders = job_folders(tmp_path)
    assert [f.name.split("_")[0] for f in folders] == ["0", "1", "2", "10", "11", "12"]
    text = summary(tmp_path, [job_outcome(f) for f in folders])
    assert text.splitlines()[0].endswith(
        "6 jobs, 1 complete, 4 failed, 1 skipped (the method cannot run on the backbone or scenario)"
    )
    assert "1_method=lwf: the training loss became nan at task 1" in text and "Traceback" not in text
    assert "stopped after 1 task(s)" in text and "no results.json" in text and "unreadable" in text
    assert text.splitlines()[-1] == f"compare them: cl-bench-report {tmp_path} --out {tmp_path / 'report'}"


def test_a_job_whose_results_went_to_another_folder_counts_by_them(tmp_path: Path) -> None:
    """A rerun sweep's job that resumed the interrupted run of its config in that run's own folder leaves
    ``results_in.txt`` in its Hydra folder: the summary reads the results there (not "no results.json")."""
    import json

    from cl_bench.sweeps import job_outcome

    old = tmp_path / "old" / "1_seed=1"
    old.mkdir(parents=True)
    (old / "results.json").write_text(json.dumps({"status": "complete", "acc_matrix": [[1.0]]}))
    new = tmp_path / "new" / "1_seed=1"
    new.mkdir(parents=True)
    (new / "results_in.txt").write_text(f"{old}\n")
    assert job_outcome(new).status == "complete"
    (new / "results_in.txt").write_text(f"{tmp_path / 'nowhere'}\n")  # an untrusted file: nothing there
    assert job_outcome(new).status == "failed"
    (new / "results_in.txt").unlink()
    (tmp_path / "planted.txt").write_text(f"{old}\n")
    (new / "results_in.txt").symlink_to(tmp_path / "planted.txt")  # a link is never followed
    assert job_outcome(new).status == "failed"


@pytest.mark.slow
def test_a_sweep_run_again_keeps_its_finished_jobs_and_follows_moved_results(tmp_path: Path) -> None:
    """The same sweep command run again into its folder (hydra.sweep.dir) reports its finished jobs as
    complete (before: "already holds a complete run" in error.txt, counted failed, exit 1); a job whose
    results went to another folder (paths.run_dir, or a resumed run's own folder) counts by them."""
    import os
    import subprocess
    import sys

    from cl_bench.report import build_report

    def sweep(*overrides: str) -> subprocess.CompletedProcess:
        command = [
            sys.executable, "-m", "cl_bench", "-m", "dataset=fake", "dataset.num_classes=4",
            "method=simplecil", "scenario.n_tasks=2", "logger=none", "trainer=cpu", "save_model=false",
            *overrides,
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    first = sweep("seed=0,1", f"hydra.sweep.dir={tmp_path / 's'}")
    assert first.returncode == 0, first.stderr[-3000:]
    again = sweep("seed=0,1", f"hydra.sweep.dir={tmp_path / 's'}")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2 jobs, 2 complete, 0 failed" in again.stdout
    assert not list((tmp_path / "s").glob("*/error.txt"))

    moved = sweep("seed=0", f"paths.run_dir={tmp_path / 'elsewhere'}", f"hydra.sweep.dir={tmp_path / 'm'}")
    assert moved.returncode == 0, moved.stdout[-3000:] + moved.stderr[-3000:]
    assert "1 jobs, 1 complete, 0 failed" in moved.stdout
    assert "job 1/1 0: done" in moved.stdout or "job 1/1 0_" in moved.stdout
    report = build_report([str(tmp_path / "m")], tmp_path / "report")
    assert not report.problems and [r.folder for r in report.runs] == [tmp_path / "elsewhere"]


#: A user's protocol outside the package (hydra.searchpath) for the tiny sweep: digits at 16 px, 2 tasks, one
#: epoch, a 1-block ViT small enough for a CPU, and tuned values that keep the analytic heads tiny.
TINY_PROTOCOL = """# @package _global_
defaults:
  - override /dataset: digits
  - override /backbone: timm
dataset:
  size: 16
backbone:
  name: vit_tiny_patch16_224
  pretrained: false
  model_kwargs: {img_size: 16, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}
transform:
  input_size: 16
budget:
  epochs: 1
  batch_size: 64
scenario:
  n_tasks: 2
  order_seed: 0
"""
TINY_TUNED = {
    "ranpac": "rp_dim: 64\n",
    "safe": "rp_dim: 64\nlater_epochs: 1\n",
    "slca": "ca_epochs: 1\nca_samples_per_class: 8\n",
    "slca_pp": "ca_epochs: 1\nca_samples_per_class: 8\n",
    "lwf": "warmup_epochs: 0\n",
    "lnt": "rectification_epochs: 1\n",
    "dualprompt": "g_length: 0\ne_layers: [0]\n",  # a one-block ViT
    "coda_prompt": "layers: [0]\npool_size: 4\n",
}


@pytest.mark.slow
def test_all_methods_sweep_finishes_every_job_the_backbone_allows(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    user = tmp_path / "my_configs"
    (user / "protocol").mkdir(parents=True)
    (user / "protocol" / "tiny_vit.yaml").write_text(TINY_PROTOCOL)
    for method, text in TINY_TUNED.items():
        (user / "tuned" / method).mkdir(parents=True)
        (user / "tuned" / method / "tiny_vit.yaml").write_text(text)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cl_bench",
            "-m",
            "sweep=all_methods",
            "protocol=tiny_vit",
            f"hydra.searchpath=[file://{user}]",
            "logger.mode=disabled",
            "save_model=false",
            "save_checkpoints=false",
            "trainer.accelerator=cpu",
            f"paths.output_dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "out" / "multiruns").iterdir()
    methods = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
    folders = sorted(d.name for d in sweep_dir.iterdir() if d.is_dir())
    assert sorted(f.split("=", 1)[1] for f in folders) == methods  # "<n>_method=<name>", nothing else
    done = {}
    for folder in sweep_dir.iterdir():
        if folder.is_dir():
            assert (folder / ".hydra" / "overrides.yaml").is_file()
            method = folder.name.split("=", 1)[1]
            done[method] = (folder / "results.json").is_file() and json.loads(
                (folder / "results.json").read_text()
            )["status"] == "complete"
            assert done[method] or (method == "confit" and (folder / "skipped.txt").is_file())
    assert [m for m, ok in done.items() if not ok] == ["confit"]
    assert f"{len(methods)} jobs, {len(methods) - 1} complete, 0 failed, 1 skipped" in out.stdout
    assert f"cl-bench-report {sweep_dir}" in out.stdout


def test_a_jobs_error_and_skipped_files_are_read_as_untrusted(tmp_path: Path) -> None:
    """A FIFO planted as ``error.txt`` never blocks the summary, the progress lines or the report (it used to
    hang them), and a link is never followed; an empty file still counts."""
    import os
    import signal

    from cl_bench.progress import stopped_job_line
    from cl_bench.report import load_run
    from cl_bench.sweeps import first_line, job_outcome

    job = tmp_path / "0_seed=0"
    job.mkdir()
    os.mkfifo(job / "error.txt")
    (tmp_path / "secret.txt").write_text("outside the folder\n")
    (job / "skipped.txt").symlink_to(tmp_path / "secret.txt")
    signal.alarm(10)  # a blocking read fails the test instead of hanging it
    try:
        assert first_line(job / "error.txt") is None and first_line(job / "skipped.txt") is None
        assert job_outcome(job).status == "skipped" and job_outcome(job).detail == "(empty)"
        assert stopped_job_line(job, 1, 1, 0.0) is None
        assert "outside" not in (load_run(job).problem or "")
    finally:
        signal.alarm(0)
    (job / "skipped.txt").unlink()
    (job / "skipped.txt").write_text("")
    assert stopped_job_line(job, 1, 1, 0.0).endswith("skipped: (no reason given)")
