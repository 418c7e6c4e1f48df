"""Corrupt and hostile checkpoints: each is reported precisely, set aside, never executed, and the run
starts over to the uninterrupted run's results."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from reliability.harness import RUN, cl_bench, leftovers, results, same_results

import cl_bench.runner as runner
from cl_bench.checkpointing import LEGACY_FILE, MANIFEST_FILE

OVERRIDES = (
    "method=seq_ft",
    "method.epochs=1",
    "method.batch_size=32",
    "scenario.init_classes=4",
    "scenario.increment=3",
)


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the runner handles it."""


def killed_run(run_tiny, run_dir: Path, monkeypatch: pytest.MonkeyPatch, before_task: int = 2) -> None:
    learn_task = runner.learn_task

    def learn_or_die(method, ctx, *args, **kwargs):
        if ctx.task.index == before_task:
            raise Killed
        return learn_task(method, ctx, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "learn_task", learn_or_die)
        with pytest.raises(Killed):
            run_tiny(*OVERRIDES, run_dir=run_dir)
    assert (run_dir / MANIFEST_FILE).is_file()


class Payload:
    """Unpickling calls ``os.system`` (what a planted file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(run_dir: Path, content: bytes) -> Path:
    """Replace the checkpoint file by ``content`` and rewrite the manifest to match it (an attacker can)."""
    manifest = json.loads((run_dir / MANIFEST_FILE).read_text())
    path = run_dir / manifest["file"]
    path.write_bytes(content)
    manifest.update(bytes=len(content), sha256=hashlib.sha256(content).hexdigest())
    (run_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    return path


def data_file(run_dir: Path) -> Path:
    return run_dir / json.loads((run_dir / MANIFEST_FILE).read_text())["file"]


def truncate(run_dir: Path) -> str:
    path = data_file(run_dir)
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.truncate(size // 2)
    return f"is truncated at byte {size // 2} of {size}"


def flip_a_byte(run_dir: Path) -> str:
    path = data_file(run_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return "checksum mismatch"


def garbage(run_dir: Path) -> str:
    plant(run_dir, os.urandom(4096))
    return "cannot be read as tensors and plain data"


def foreign_state(run_dir: Path) -> str:
    """A well-formed checkpoint whose method state does not fit (another code version's parameters)."""
    payload = torch.load(data_file(run_dir), weights_only=True)
    payload["method"]["state_dict"]["head.blocks.0.weight"] = torch.zeros(3, 3)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    plant(run_dir, buffer.getvalue())
    return "does not fit this method"


def _rewritten(run_dir: Path, **fields) -> None:
    """Replace fields of the checkpoint's payload, keeping it well-formed and matching its manifest."""
    payload = torch.load(data_file(run_dir), weights_only=True)
    payload.update(fields)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    plant(run_dir, buffer.getvalue())


def malformed_rng(run_dir: Path) -> str:
    """Plain data that passes every file check but is no generator state: it used to stop every later run
    of the config with a raw ``TypeError`` instead of being set aside."""
    _rewritten(run_dir, rng={"python": 1})
    return "does not fit this method"


def rows_beyond_tasks_done(run_dir: Path) -> str:
    """Results rows that disagree with the checkpoint's ``tasks_done`` (they would be reported as done)."""
    payload = torch.load(data_file(run_dir), weights_only=True)
    state = payload["run_state"]
    _rewritten(run_dir, run_state={**state, "acc_rows": state["acc_rows"] * 3})
    return "does not fit this method"


def hostile_wandb_id(run_dir: Path) -> str:
    _rewritten(run_dir, wandb_id="../../../outside")
    return "does not fit this method"


def bad_manifest(run_dir: Path) -> str:
    (run_dir / MANIFEST_FILE).write_text('{"format": "cl_bench.checkpoint/2", "file": "../../etc/passwd"}')
    return "names an invalid checkpoint file"


@pytest.fixture
def reference(run_tiny) -> dict:
    doc, _ = run_tiny(*OVERRIDES)
    return doc


@pytest.mark.parametrize(
    "damage",
    [
        truncate,
        flip_a_byte,
        garbage,
        foreign_state,
        malformed_rng,
        rows_beyond_tasks_done,
        hostile_wandb_id,
        bad_manifest,
    ],
    ids=lambda f: f.__name__,
)
def test_a_damaged_checkpoint_is_reported_set_aside_and_the_run_starts_over(
    run_tiny, reference: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, damage
) -> None:
    run_dir = tmp_path / "run"
    killed_run(run_tiny, run_dir, monkeypatch)
    expected = damage(run_dir)
    doc, _ = run_tiny(*OVERRIDES, run_dir=run_dir)
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "checkpoint set aside" in messages and expected in messages, messages
    assert list(run_dir.glob(f"{MANIFEST_FILE}.corrupt-*"))
    assert doc["status"] == "complete" and same_results(doc, reference)
    assert leftovers(run_dir) == []


def test_an_os_system_payload_in_a_checkpoint_never_runs(
    run_tiny, reference: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    run_dir = tmp_path / "run"
    killed_run(run_tiny, run_dir, monkeypatch)
    marker = tmp_path / "PAYLOAD_RAN"
    plant(run_dir, pickle.dumps(Payload(marker)))
    (run_dir / LEGACY_FILE).write_bytes(pickle.dumps(Payload(marker)))  # the old format's name too
    doc, _ = run_tiny(*OVERRIDES, run_dir=run_dir)
    assert not marker.exists()
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "cannot be read as tensors and plain data" in messages and "is never loaded" in messages
    assert doc["status"] == "complete" and same_results(doc, reference)


@pytest.mark.slow
def test_planted_files_under_the_output_folder_are_never_loaded(tmp_path: Path) -> None:
    """Issue 17.1: a ``checkpoint.pt`` with an ``os.system`` payload beside a copied ``config.yaml`` anywhere
    under ``paths.output_dir``, and a resume-index entry pointing at a hostile folder: an ordinary command
    of that config runs none of them and completes."""
    outputs = tmp_path / "outputs"
    command = (*RUN, f"paths.output_dir={outputs}")
    first = cl_bench(tmp_path, *command)
    assert first.returncode == 0, first.stderr
    (done,) = {p.parent for p in outputs.rglob("results.json")}
    marker = tmp_path / "PAYLOAD_RAN"
    planted = outputs / "elsewhere" / "copied"
    planted.mkdir(parents=True)
    (planted / "config.yaml").write_text((done / "config.yaml").read_text())
    (planted / LEGACY_FILE).write_bytes(pickle.dumps(Payload(marker)))
    content = pickle.dumps(Payload(marker))
    name = "checkpoint-task001.pt"
    (planted / name).write_bytes(content)
    manifest = {"format": "cl_bench.checkpoint/2", "file": name, "bytes": len(content), "tasks_done": 1,
                "sha256": hashlib.sha256(content).hexdigest()}  # fmt: skip
    (planted / MANIFEST_FILE).write_text(json.dumps(manifest))
    (index,) = (outputs / ".cl_bench" / "resume").iterdir()
    (index / "planted.json").write_text(json.dumps({"run_dir": str(planted)}))

    second = cl_bench(tmp_path, *command)
    assert second.returncode == 0, second.stderr
    assert not marker.exists()
    assert "cannot be read as tensors and plain data" in second.stdout + second.stderr
    assert same_results(results(done), json.loads(next(iter(_new_results(outputs, done))).read_text()))


def _new_results(outputs: Path, old: Path) -> list[Path]:
    return [p for p in outputs.glob("runs/**/results.json") if p.parent != old]
