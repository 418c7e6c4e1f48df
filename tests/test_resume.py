"""Resume after preemption: every method, killed between tasks and rerun, ends with the uninterrupted run's
accuracy matrices and final weights; the checkpoint is tensors and plain data (``weights_only``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, TINY, TINY_VIT_RUN, compose_config

import cl_bench.runner as runner
from cl_bench.checkpointing import MANIFEST_FILE, load_checkpoint
from cl_bench.errors import ConfigError
from cl_bench.locking import LOCK_FILE

METRICS = (
    "acc_matrix",
    "til_acc_matrix",
    "extra_matrices",
    "last_acc",
    "avg_inc_acc",
    "avg_forgetting",
    "bwt",
)
THREE_TASKS = ("scenario.init_classes=4", "scenario.increment=3", "save_model=true")
CNN = ("method.epochs=1", "method.batch_size=32")
#: Every method, with what its checkpoint must carry.
METHODS = {
    "seq_ft": ("method=seq_ft", *CNN),  # weights and growing heads
    "joint": ("method=joint", *CNN),  # one task: a killed run starts over
    "linear_probe": ("method=linear_probe", *CNN),  # frozen backbone in eval mode
    "simplecil": ("method=simplecil",),  # prototypes that size themselves
    "er": ("method=er", "method.buffer_size=20", *CNN),  # replay slots pointing into the training images
    "derpp": ("method=derpp", "method.buffer_size=20", *CNN),  # and their stored logits
    "ewc": ("method=ewc", *CNN),  # Fisher matrices and anchors (a declared attribute)
    "mas": ("method=mas", *CNN),  # importance and anchors
    "si": ("method=si", *CNN),  # Omega and anchors
    "lwf": ("method=lwf", *CNN),  # the teacher is rebuilt at the next task start
    "confit": ("method=confit", "scenario=til", *CNN),  # per-task BN snapshots (extra state)
    "input_tuning": ("method=input_tuning", "method.sharing=per_task", *CNN),  # one transform per task
    "aper": (
        "method=aper",
        *TINY_VIT_RUN,
        "method.adapter_bottleneck=4",
    ),  # first-session head, frozen backbone
    "ranpac": (
        "method=ranpac",
        *TINY_VIT_RUN,
        "method.adapter_bottleneck=4",
        "method.rp_dim=16",
    ),  # ridge stats
    "safe": (
        "method=safe",
        *TINY_VIT_RUN,
        "method.adapter_bottleneck=4",
        "method.rp_dim=16",
        "method.later_epochs=1",
    ),
    "slca": (
        "method=slca",
        *TINY_VIT_RUN,
        "method.ca_epochs=1",
        "method.ca_samples_per_class=4",
    ),  # class Gaussians
    "slca_pp": (
        "method=slca_pp",
        *TINY_VIT_RUN,
        "method.ca_epochs=1",
        "method.ca_samples_per_class=4",
    ),  # LoRA
    "lnt": ("method=lnt", *TINY_VIT_RUN, "method.rectification_epochs=1"),  # keys and LayerNorm sets
}


class Killed(BaseException):
    """Stands for SIGKILL/preemption: not an Exception, so nothing in the runner handles it."""


def kill_before_task(monkeypatch: pytest.MonkeyPatch, index: int) -> None:
    learn_task = runner.learn_task

    def learn_or_die(method, ctx, *args, **kwargs):
        if ctx.task.index == index:
            raise Killed
        return learn_task(method, ctx, *args, **kwargs)

    monkeypatch.setattr(runner, "learn_task", learn_or_die)


def record_learned_tasks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The indices of the tasks the run learns from now on, in order."""
    learn_task = runner.learn_task
    learned: list[int] = []

    def record(method, ctx, *args, **kwargs):
        learned.append(ctx.task.index)
        return learn_task(method, ctx, *args, **kwargs)

    monkeypatch.setattr(runner, "learn_task", record)
    return learned


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_model.pt", weights_only=True)["state_dict"]


def equal(a: object, b: object) -> bool:
    """Exact equality of tensors, also inside lists, tuples and dicts (a module's extra state)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_run(resumed: dict, resumed_dir: Path, uninterrupted: dict, uninterrupted_dir: Path) -> None:
    for key in METRICS:
        assert resumed[key] == uninterrupted[key], key
    weights, reference = final_weights(resumed_dir), final_weights(uninterrupted_dir)
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        assert equal(weights[name], tensor), name


@pytest.mark.parametrize("method", list(METHODS))
def test_killed_run_resumes_with_the_same_results_and_weights(
    run_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    overrides = [*METHODS[method], *THREE_TASKS]
    uninterrupted, full_dir = run_tiny(*overrides)
    assert uninterrupted["status"] == "complete"
    kill_at = 0 if method == "joint" else 2

    run_dir = tmp_path / "preempted"
    with monkeypatch.context() as patch:
        kill_before_task(patch, kill_at)
        with pytest.raises(Killed):
            run_tiny(*overrides, run_dir=run_dir)
    if method != "joint":
        partial = json.loads((run_dir / "results.json").read_text())
        assert partial["status"] == "incomplete" and len(partial["acc_matrix"]) == 2
        checkpoint = load_checkpoint(run_dir)  # weights_only: tensors and plain data
        assert checkpoint["tasks_done"] == 2

    with monkeypatch.context() as patch:
        trained = record_learned_tasks(patch)
        resumed, _ = run_tiny(*overrides, run_dir=run_dir)  # the same command again
    assert resumed["status"] == "complete"
    # it continued from the checkpoint (a checkpoint set aside would restart from task 0 with equal results)
    assert trained == ([0] if method == "joint" else [2])
    assert not list(run_dir.glob("*.corrupt-*"))
    assert_same_run(resumed, run_dir, uninterrupted, full_dir)
    assert not (run_dir / MANIFEST_FILE).exists() and not (run_dir / LOCK_FILE).exists()
    assert not list(run_dir.glob("checkpoint-task*.pt")) and not list(run_dir.glob(".*.tmp"))


def test_checkpoint_refers_to_the_images_instead_of_copying_them(
    run_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ER buffer points into the training images; the checkpoint stores indices, not the images."""
    overrides = (
        "method=er",
        "method.buffer_size=20",
        *CNN,
        "scenario.init_classes=4",
        "scenario.increment=3",
        "dataset.size=64",
        "transform.input_size=64",
    )
    run_dir = tmp_path / "er"
    kill_before_task(monkeypatch, 1)
    with pytest.raises(Killed):
        run_tiny(*overrides, run_dir=run_dir)
    images_bytes = 1797 * 64 * 64  # digits at 64 px, uint8, grey: what a copy would add at least
    (data_file,) = run_dir.glob("checkpoint-task*.pt")
    assert data_file.stat().st_size < images_bytes


def test_a_resumed_run_continues_the_trackers_epoch_axis(
    run_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train/epoch`` is the run-wide step of the epoch metrics: a resumed run numbers its epochs after the
    interrupted run's, as the uninterrupted run does, instead of starting again at 0."""
    import csv

    overrides = ("method=seq_ft", "method.epochs=2", "method.batch_size=32", "logger=csv", *THREE_TASKS)

    def epochs(run_dir: Path) -> list[tuple[int, int]]:
        """(train/epoch, train/task) of every epoch row, over the CSV logger's versions in order."""
        rows = []
        for version in sorted((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
            with (version / "metrics.csv").open() as f:
                rows += [
                    (int(float(r["train/epoch"])), int(float(r["train/task"])))
                    for r in csv.DictReader(f)
                    if r.get("train/epoch")
                ]
        return rows

    _, full_dir = run_tiny(*overrides)
    run_dir = tmp_path / "preempted"
    with monkeypatch.context() as patch:
        kill_before_task(patch, 2)
        with pytest.raises(Killed):
            run_tiny(*overrides, run_dir=run_dir)
    run_tiny(*overrides, run_dir=run_dir)
    assert epochs(full_dir) == [(e, e // 2) for e in range(6)]
    assert epochs(run_dir) == epochs(full_dir)


def test_resume_never_and_a_changed_config_start_no_resume(
    run_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        kill_before_task(patch, 1)
        with pytest.raises(Killed):
            run_tiny("method=simplecil", run_dir=run_dir)
    with pytest.raises(ConfigError, match="resume=never, but .* holds an interrupted run of this config"):
        run_tiny("method=simplecil", "resume=never", run_dir=run_dir)
    with pytest.raises(ConfigError, match=r"results of another config \(differing in: .*seed"):
        run_tiny("method=simplecil", "seed=1", run_dir=run_dir)
    with pytest.raises(ConfigError, match="no run of this config there"):
        run_tiny("method=simplecil", "seed=1", f"resume={run_dir}", run_dir=tmp_path / "other")
    done, _ = run_tiny("method=simplecil", run_dir=run_dir)
    assert done["status"] == "complete"
    with pytest.raises(ConfigError, match="already holds a complete run of this config"):
        run_tiny("method=simplecil", run_dir=run_dir)


def test_a_run_started_before_keys_were_added_resumes_with_their_defaults(
    run_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run interrupted under an older cl_bench, whose config.yaml lacks keys added since (a schema field,
    ``debug.input_size``, and a dataset constructor parameter, ``dataset.split_seed``), resumes when this
    command gives them their declared defaults, and ends with the uninterrupted run's matrix; a missing key
    set to another value is a difference, named."""
    import yaml

    reference, _ = run_tiny("method=simplecil", run_dir=tmp_path / "reference")
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        kill_before_task(patch, 1)
        with pytest.raises(Killed):
            run_tiny("method=simplecil", run_dir=run_dir)
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    del stored["debug"]["input_size"], stored["dataset"]["split_seed"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(stored))
    with pytest.raises(ConfigError, match=r"another config \(differing in: dataset\.split_seed\)"):
        run_tiny("method=simplecil", "dataset.split_seed=1", run_dir=run_dir)
    learned = record_learned_tasks(monkeypatch)
    resumed, _ = run_tiny("method=simplecil", run_dir=run_dir)
    assert learned == [1] and resumed["acc_matrix"] == reference["acc_matrix"]
    assert "keys added since take their defaults: dataset.split_seed, debug.input_size" in caplog.text


def test_the_resume_index_finds_a_run_an_older_version_registered(
    run_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In Hydra's folders runs are found through the index, keyed by the config hash, which a key added
    since changes: with nothing under this command's hash, the runs listed under another hash whose stored
    config is this one's (up to keys at their defaults) are found, and completing one unlists it there."""
    import yaml
    from helpers import compose_config
    from omegaconf import OmegaConf

    from cl_bench.run_folder import indexed_runs, unregister

    run_dir, outputs = tmp_path / "run", f"paths.output_dir={tmp_path / 'out'}"
    with monkeypatch.context() as patch:
        kill_before_task(patch, 1)
        with pytest.raises(Killed):
            run_tiny("method=simplecil", outputs, run_dir=run_dir)
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    del stored["debug"]["input_size"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(stored))
    old_entry = tmp_path / "out" / ".cl_bench" / "resume" / "0123456789abcdef" / "entry.json"
    old_entry.parent.mkdir(parents=True)
    old_entry.write_text(json.dumps({"run_dir": str(run_dir)}))

    def command(*overrides: str):
        cfg = compose_config(*TINY, "method=simplecil", outputs, *overrides)
        return cfg, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)

    assert indexed_runs(*command()) == [run_dir]
    assert indexed_runs(*command("seed=1")) == []  # another experiment
    monkeypatch.setattr("cl_bench.run_folder._index_entry", lambda cfg, config, folder: old_entry)
    unregister(*command(), run_dir)
    assert not old_entry.exists()


@pytest.mark.slow
def test_rerunning_the_command_resumes_a_killed_process(tmp_path: Path) -> None:
    """A real ``cl-bench`` process killed with SIGKILL after its first task; the same command, run again
    (Hydra makes a new timestamped folder), finds the interrupted run through the resume index and finishes
    it in its own folder; the final report names that folder."""
    command = [
        sys.executable,
        "-m",
        "cl_bench",
        *TINY,
        "scenario.n_tasks=5",
        "method=seq_ft",
        "method.epochs=2",
        f"paths.output_dir={tmp_path / 'outputs'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    while not list((tmp_path / "outputs" / "runs").rglob(MANIFEST_FILE)):
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (killed_dir,) = {p.parent for p in (tmp_path / "outputs").rglob("results.json")}
    assert json.loads((killed_dir / "results.json").read_text())["status"] == "incomplete"

    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming the interrupted run in {killed_dir}" in rerun.stderr + rerun.stdout
    assert f"run folder             {killed_dir}" in rerun.stdout
    doc = json.loads((killed_dir / "results.json").read_text())
    assert doc["status"] == "complete" and len(doc["acc_matrix"]) == 5
    assert len({p.parent for p in (tmp_path / "outputs").rglob("results.json")}) == 1
    assert not list((tmp_path / "outputs" / ".cl_bench" / "resume").rglob("*.json"))  # unregistered


def test_a_folder_named_by_hydra_run_dir_is_the_only_one_resumed(
    run_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``hydra.run.dir=B`` on the command line names the run folder, as ``paths.run_dir`` does: an
    interrupted run of the same config listed in the resume index (folder A) is left alone and B starts
    afresh. It used to resume A, leaving B unused. Hydra's own timestamped folder still finds A."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from cl_bench.cli import CONFIG_DIR
    from cl_bench.run_folder import claim_run_folder, register

    outputs = f"paths.output_dir={tmp_path / 'out'}"
    interrupted = tmp_path / "A"
    with monkeypatch.context() as patch:
        kill_before_task(patch, 1)
        with pytest.raises(Killed):
            run_tiny("method=simplecil", outputs, run_dir=interrupted)

    def claim(*hydra_overrides: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            full = compose("config", [*TINY, "method=simplecil", outputs, *hydra_overrides], True)
        OmegaConf.set_readonly(full.hydra, False)
        full.hydra.mode = RunMode.RUN
        HydraConfig.instance().set_config(full)
        try:
            cfg = compose_config(*TINY, "method=simplecil", outputs)
            config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
            register(cfg, config, interrupted)
            return claim_run_folder(cfg, Path(full.hydra.run.dir), config)
        finally:
            HydraConfig.instance().cfg = None

    named = claim(f"hydra.run.dir={tmp_path / 'B'}")
    named.release()
    assert named.run_dir == tmp_path / "B" and named.checkpoint is None
    timestamped = claim()
    timestamped.release()
    assert timestamped.run_dir == interrupted and timestamped.checkpoint["tasks_done"] == 1
