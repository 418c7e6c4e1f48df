"""How long the runner waits for W&B at the start of a run: ``wandb.init`` in the runner's thread (how the
tracker started before) against :class:`cl_bench.tracking.WandbTracker`, which starts W&B in a background
thread. Each measure runs in a fresh process that has already imported what the runner imports (torch,
Lightning, timm), with the runner's own config, offline.

    python scripts/bench_wandb_start.py --repeats 5 --out docs/bench/wandb_start.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: One measure, run in a fresh interpreter: prints {"blocked_s": ..., "ready_s": ...}.
PROBE = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, "tests")
import pytorch_lightning, timm, torch  # the runner has these loaded before the tracker starts
from conftest import compose_config
from omegaconf import OmegaConf
from cl_bench.runner import tracker_config
from cl_bench.tracking import FINAL_METRICS, WandbTracker, run_identity
cfg = compose_config("logger.mode=offline", "paths.data_dir=/data")
config = tracker_config(cfg, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
run_dir, mode = Path(sys.argv[1]), sys.argv[2]
start = time.perf_counter()
if mode == "blocking":
    import wandb
    run = wandb.init(mode="offline", dir=str(run_dir), project="cl_bench", config=config)
    run.define_metric("task")
    blocked = ready = time.perf_counter() - start
    run.finish()
else:
    tracker = WandbTracker(cfg.logger, run_dir, config, run_identity(cfg))
    blocked = time.perf_counter() - start
    tracker._ready.wait()
    ready = time.perf_counter() - start
    tracker.finish(dict.fromkeys(FINAL_METRICS), "complete")
print(json.dumps({"blocked_s": blocked, "ready_s": ready}))
"""


def measure(mode: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
        out = subprocess.run(
            [sys.executable, "-c", PROBE, folder, mode],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=True,
        )  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench" / "wandb_start.json")
    args = parser.parse_args()
    results: dict[str, dict[str, list[float] | float]] = {}
    for mode in ("blocking", "background"):
        runs = [measure(mode) for _ in range(args.repeats)]  # alternate nothing: each is a fresh process
        blocked = [r["blocked_s"] for r in runs]
        ready = [r["ready_s"] for r in runs]
        results[mode] = {
            "blocked_s": blocked,
            "ready_s": ready,
            "blocked_median_s": statistics.median(blocked),
            "ready_median_s": statistics.median(ready),
        }
        print(f"{mode}: runner blocked {statistics.median(blocked):.3f} s (median of {args.repeats}), "
              f"W&B ready after {statistics.median(ready):.2f} s")  # fmt: skip
    import wandb

    doc = {
        "what": "seconds the runner's thread waits for W&B to start (offline), and until W&B is ready",
        "command": "python scripts/bench_wandb_start.py --repeats " + str(args.repeats),
        "wandb": wandb.__version__,
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
