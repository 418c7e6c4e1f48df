"""DDP: task-end passes (features, prototypes, EWC Fisher) and evaluation split among two gloo processes give
what one process computes; a real ``cl-bench trainer=ddp_cpu`` run equals the one-process run; bad process
layouts fail with a clear message."""

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
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import TINY, TinyBackbone
from torch.utils.data import TensorDataset

from cl_bench import distributed
from cl_bench.checkpointing import CHECKPOINT_FILE
from cl_bench.config import ScenarioType
from cl_bench.evaluation import Evaluator
from cl_bench.methods.base import TaskContext
from cl_bench.methods.seq_ft import SequentialFineTuning
from cl_bench.methods.simplecil import SimpleCIL
from cl_bench.modules.regularizers import gradient_importance
from cl_bench.scenario import Scenario, Task

REPO_ROOT = Path(__file__).resolve().parent.parent
TASK = Task(0, 0, 3, (0, 1, 2))
BATCH = 8  # 37 images: 5 batches, 3 on rank 0 and 2 on rank 1


def _context() -> TaskContext:
    gen = torch.Generator().manual_seed(3)
    labels = torch.arange(37) % 3
    data = TensorDataset(torch.randn(37, 4, generator=gen) + labels[:, None].float(), labels)
    scenario = Scenario(ScenarioType.cil, (0, 1, 2), (TASK,))
    return TaskContext(TASK, scenario, data, data, eval_batch_size=BATCH)


def _compute() -> dict[str, object]:
    """Features, SimpleCIL prototypes, a Fisher estimate and both evaluator paths, in this process."""
    torch.manual_seed(0)
    ctx = _context()
    prototypes = SimpleCIL(TinyBackbone())
    prototypes.on_task_start(ctx)
    features, labels = prototypes.extract_features(ctx, ctx.train_eval_set)
    prototypes.on_task_end(ctx)
    trained = SequentialFineTuning(TinyBackbone())
    trained.on_task_start(ctx)

    def loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(trained(x), y)

    params = dict(trained.named_parameters())
    fisher = gradient_importance(params, ctx.shard_loader(ctx.train_eval_set, BATCH), loss, torch.square)
    evaluator = Evaluator(ctx.scenario, [ctx.train_eval_set], batch_size=BATCH)
    my_batches = distributed.batch_shard(ctx.train_eval_set, BATCH) or []
    return {
        "features": features,
        "labels": labels,
        "prototypes": prototypes.head.state_dict(),
        "fisher": fisher,
        "simplecil_rows": evaluator.evaluate(prototypes, 0),
        "seq_ft_rows": evaluator.evaluate(trained, 0),
        "counts": distributed.sum_counts({"batches": len(my_batches)}),
        "world": distributed.world_size(),
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        torch.save(_compute(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_passes_split_among_two_processes_match_one_process(tmp_path: Path) -> None:
    mp.start_processes(
        _worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    single = _compute()
    assert single["world"] == 1
    for rank in (0, 1):
        shared = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert shared["world"] == 2
        assert shared["counts"] == {"batches": 5}  # 3 + 2 batches: each process had its share
        torch.testing.assert_close(shared["features"], single["features"])
        assert torch.equal(shared["labels"], single["labels"])  # the one-process order
        for name, value in single["prototypes"].items():
            torch.testing.assert_close(shared["prototypes"][name], value)
        for name, value in single["fisher"].items():
            torch.testing.assert_close(shared["fisher"][name], value)
            assert value.abs().sum() > 0
        assert shared["simplecil_rows"] == single["simplecil_rows"]
        assert shared["seq_ft_rows"] == single["seq_ft_rows"]


def test_batch_shard_covers_every_batch_once() -> None:
    assert distributed.batch_shard(list(range(10)), 4) is None  # one process: an ordinary loader
    assert distributed.gather_batches([1, 2]) == [1, 2]
    assert distributed.sum_counts({"a": 3}) == {"a": 3}


# A tiny ViT without BatchNorm, APER with learning rate 0: training leaves the weights as they are, so the
# two-process run must reproduce the one-process run exactly (prototypes from gathered features).
TINY_DDP = (
    *(o for o in TINY if not o.startswith(("trainer.", "save_model"))),
    "backbone=timm",
    "backbone.name=vit_tiny_patch16_224",
    "backbone.pretrained=false",
    "+backbone.model_kwargs={img_size: 16, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
    "method=aper",
    "method.epochs=1",
    "method.lr=0",
    "method.batch_size=16",
    "trainer.eval_batch_size=64",
)


def _cl_bench(tmp_path: Path, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    for name in (*distributed.RANK_VARIABLES, distributed.RUN_DIR_VARIABLE, "SLURM_NTASKS"):
        env.pop(name, None)
    command = [sys.executable, "-m", "cl_bench", *(["-m"] if multirun else []), *TINY_DDP, *overrides]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_ddp_run_on_two_cpu_processes_equals_one_process(tmp_path: Path) -> None:
    one = _cl_bench(tmp_path, "trainer=cpu", f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = _cl_bench(tmp_path, "trainer=ddp_cpu", "trainer.devices=2", f"hydra.run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr
    assert (tmp_path / "two" / "train_ddp_process_1.log").is_file()  # Lightning started rank 1
    assert "follows the run in" in (tmp_path / "two" / "train_ddp_process_1.log").read_text()
    docs = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two")]
    assert docs[1]["status"] == "complete"
    assert docs[1]["acc_matrix"] == docs[0]["acc_matrix"]
    assert docs[1]["config"]["trainer"]["strategy"] == "ddp_find_unused_parameters_true"
    models = [torch.load(tmp_path / name / "final_model.pt", weights_only=True) for name in ("one", "two")]
    prototypes = [m["state_dict"]["head.prototypes"] for m in models]
    assert prototypes[0].shape[0] == 10
    torch.testing.assert_close(prototypes[1], prototypes[0])
    assert two.stdout.count("last accuracy") == 1  # only rank 0 reports


@pytest.mark.slow
def test_global_batch_must_divide_among_processes(tmp_path: Path) -> None:
    result = _cl_bench(
        tmp_path,
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "method.batch_size=15",
        f"hydra.run.dir={tmp_path}/r",
    )
    assert result.returncode == 2
    assert "must divide evenly among the 2 DDP processes" in result.stderr


@pytest.mark.slow
def test_local_sweep_refuses_several_processes_per_run(tmp_path: Path) -> None:
    result = _cl_bench(
        tmp_path,
        "trainer=ddp_cpu",
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path}/sweep",
        "hydra.sweep.subdir=job${hydra.job.num}",
        multirun=True,
    )
    assert result.returncode != 0
    assert "in a local -m sweep" in result.stdout + result.stderr


@pytest.mark.slow
def test_killed_ddp_run_resumes_on_every_process(tmp_path: Path) -> None:
    """Both processes of a DDP run are killed after the first checkpoint; rerunning the command resumes the
    run on both (rank 1 loads rank 0's checkpoint) and ends with the uninterrupted run's results."""
    seq_ft = ("method=seq_ft", "method.epochs=2", "method.lr=0.05", "scenario.n_tasks=5", "trainer=ddp_cpu")
    full = _cl_bench(tmp_path, *seq_ft, "trainer.devices=2", f"hydra.run.dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr

    killed_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    for name in (*distributed.RANK_VARIABLES, distributed.RUN_DIR_VARIABLE, "SLURM_NTASKS"):
        env.pop(name, None)
    overrides = [*TINY_DDP, *seq_ft, "trainer.devices=2", f"hydra.run.dir={killed_dir}"]
    command = [sys.executable, "-m", "cl_bench", *overrides]
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # rank 0 and the rank Lightning starts share this process group
    )
    deadline = time.monotonic() + 240
    while not (killed_dir / CHECKPOINT_FILE).exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert json.loads((killed_dir / "results.json").read_text())["status"] == "incomplete"

    rerun = _cl_bench(tmp_path, *seq_ft, "trainer.devices=2", f"hydra.run.dir={killed_dir}")
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming after task" in rerun.stderr + rerun.stdout
    docs = [json.loads((folder / "results.json").read_text()) for folder in (tmp_path / "full", killed_dir)]
    assert docs[1]["status"] == "complete"
    assert docs[1]["acc_matrix"] == docs[0]["acc_matrix"]
