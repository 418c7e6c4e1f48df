"""L2P, DualPrompt, CODA-Prompt and EASE: a run killed between tasks resumes with the uninterrupted results
(their prompt pools, per-task components, adapters and prototypes grow during the run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_vit_tasks import RUN_OVERRIDES

import cl_bench.runner as runner
from cl_bench.methods.base import TaskContext

METHODS = {
    "l2p": ("method=l2p", "method.pool_size=4", "method.top_k=2"),
    "dualprompt": ("method=dualprompt", "method.g_layers=[0]", "method.e_layers=[1,2]"),
    "coda_prompt": ("method=coda_prompt", "method.layers=[0,1]", "method.pool_size=9"),
    "ease": ("method=ease", "method.adapter_bottleneck=8"),
}
THREE_TASKS = ("scenario.init_classes=4", "scenario.increment=3", "method.epochs=1", "method.batch_size=16")
METRICS = ("acc_matrix", "til_acc_matrix", "extra_matrices", "last_acc", "avg_inc_acc")


class Killed(BaseException):
    """Stands for SIGKILL/preemption (not an Exception: nothing in the runner handles it)."""


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_killed_run_resumes_with_the_same_results(run_tiny, tmp_path: Path, monkeypatch, method: str) -> None:
    overrides = (*RUN_OVERRIDES, *METHODS[method], *THREE_TASKS)
    uninterrupted, _ = run_tiny(*overrides)
    run_dir = tmp_path / "preempted"
    learn_task = runner.learn_task

    def learn_or_die(*args, **kwargs):
        (ctx,) = [a for a in args if isinstance(a, TaskContext)]
        if ctx.task.index == 2:
            raise Killed
        return learn_task(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "learn_task", learn_or_die)
        with pytest.raises(Killed):
            run_tiny(*overrides, run_dir=run_dir)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "incomplete"
    learned: list[int] = []

    def record(*args, **kwargs):
        (ctx,) = [a for a in args if isinstance(a, TaskContext)]
        learned.append(ctx.task.index)
        return learn_task(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "learn_task", record)
        resumed, _ = run_tiny(*overrides, run_dir=run_dir)
    assert resumed["status"] == "complete" and len(resumed["acc_matrix"]) == 3
    # it continued from the checkpoint (a checkpoint set aside would restart from task 0 with equal results)
    assert learned == [2] and not list(run_dir.glob("*.corrupt-*"))
    for key in METRICS:
        assert resumed.get(key) == uninterrupted.get(key), key
