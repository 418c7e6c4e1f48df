"""Benchmark: what caching frozen-backbone features saves in a continual run.

Runs a frozen-backbone method (default SimpleCIL) twice on the same config: once as shipped (each test
image is embedded once per run, each training image once per task) and once with the cache disabled (every
evaluation re-embeds the test sets of all seen tasks, as PyCIL-style runners do). Writes wall times, the
number of images the backbone processed, and the final metrics of both to a JSON file; the metrics must be
identical. A discarded warm-up run goes first.

    .venv/bin/python scripts/bench_feature_cache.py --out bench_feature_cache.json -- \
        dataset=npz dataset.path=../shared/data/cifar100.npz backbone=resnet32_cifar \
        backbone.checkpoint=../shared/weights/cifar10_akamaster_resnet32-d509ac18.th method=simplecil
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import cl_bench.config  # noqa: F401  (registers the schemas)
from cl_bench.evaluation import Evaluator
from cl_bench.methods.base import ContinualModule
from cl_bench.runner import run_experiment

CONF_DIR = Path(__file__).resolve().parent.parent / "cl_bench" / "conf"


def run_once(overrides: list[str], cache: bool) -> dict:
    """One run; counts the images the backbone embeds by wrapping ``ContinualModule.embed``."""
    seen = {"images": 0}
    original_embed = ContinualModule.embed
    original_cached = Evaluator._cached_features

    def counting_embed(self: ContinualModule, x: torch.Tensor) -> torch.Tensor:
        seen["images"] += len(x)
        return original_embed(self, x)

    def uncached(self: Evaluator, module: ContinualModule, j: int):
        self._features.pop(j, None)
        return original_cached(self, module, j)

    ContinualModule.embed = counting_embed  # type: ignore[method-assign]
    if not cache:
        Evaluator._cached_features = uncached  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(
                    "config", overrides=[*overrides, f"paths.run_dir={run_dir}", "logger.mode=disabled"]
                )
            start = time.perf_counter()
            doc = run_experiment(cfg)
            wall = time.perf_counter() - start
    finally:
        ContinualModule.embed = original_embed  # type: ignore[method-assign]
        Evaluator._cached_features = original_cached  # type: ignore[method-assign]
    return {
        "wall_s": wall,
        "task_time_s": doc["task_time_s"],
        "images_embedded": seen["images"],
        "last_acc": doc["last_acc"],
        "avg_inc_acc": doc["avg_inc_acc"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench_feature_cache.json"))
    parser.add_argument("overrides", nargs="*", help="cl-bench overrides (after --)")
    args = parser.parse_args()
    overrides = args.overrides or ["method=simplecil", "trainer.accelerator=cpu"]
    run_once(overrides, cache=True)  # warm-up: imports, allocator, data loading code paths
    uncached = run_once(overrides, cache=False)
    cached = run_once(overrides, cache=True)
    report = {
        "overrides": overrides,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "cached": cached,
        "uncached": uncached,
        "speedup": uncached["wall_s"] / cached["wall_s"],
        "same_metrics": cached["last_acc"] == uncached["last_acc"]
        and cached["avg_inc_acc"] == uncached["avg_inc_acc"],
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("speedup", "same_metrics")}), f"-> {args.out}")
    if not report["same_metrics"]:
        sys.exit("cached and uncached runs disagree: the feature cache is wrong")


if __name__ == "__main__":
    main()
