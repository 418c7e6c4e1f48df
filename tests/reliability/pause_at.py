"""Run ``cl-bench`` and pause it at a chosen point, so that a test can signal or kill it exactly there.

    python pause_at.py POINT COUNT MARKER [cl-bench overrides...]

When the ``COUNT``-th call (1-based) of ``POINT`` begins, ``MARKER`` is created and the call waits (up to
120 s) until a stop signal is received or ``MARKER.go`` exists, then goes on: a SIGTERM/SIGUSR1 sent after
the marker appears arrives inside that call; a SIGKILL kills it there.
"""

from __future__ import annotations

import functools
import importlib
import sys
import time
from pathlib import Path

#: Point name -> (module, class or None, function).
POINTS = {
    "training_step": ("cl_bench.methods.base", "ContinualModule", "training_step"),
    "evaluation": ("cl_bench.evaluation", "Evaluator", "evaluate_rows"),
    "task_end": ("cl_bench.methods.base", "ContinualModule", "on_task_end"),
    "checkpoint_manifest": ("cl_bench.checkpointing", None, "write_text"),
    "results_write": ("cl_bench.runner", None, "write_results"),
    "final_model": ("cl_bench.runner", None, "save_model"),
}


def install(point: str, count: int, marker: Path) -> None:
    module_name, class_name, function_name = POINTS[point]
    owner = importlib.import_module(module_name)
    if class_name is not None:
        owner = getattr(owner, class_name)
    original = getattr(owner, function_name)
    calls = {"n": 0}

    @functools.wraps(original)
    def paused(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == count:
            from cl_bench import signals

            marker.write_text("paused\n")
            deadline = time.monotonic() + 120
            go = marker.with_name(marker.name + ".go")
            while signals.requested() is None and not go.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return original(*args, **kwargs)

    setattr(owner, function_name, paused)


def main() -> None:
    point, count, marker, *overrides = sys.argv[1:]
    install(point, int(count), Path(marker))
    sys.argv = ["cl-bench", *overrides]
    from cl_bench.cli import main as cl_bench_main

    cl_bench_main()


if __name__ == "__main__":
    main()
