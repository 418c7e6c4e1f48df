"""Soak test (not in CI): a sweep of tiny runs killed at random moments, each rerun until it completes;
reports every run whose results were lost or differ from an uninterrupted run of the same config.

Each run is a real ``cl-bench`` process on tiny digits. A random moment after its start it receives SIGKILL,
SIGTERM or SIGUSR1 (up to ``--max-kills`` times); then the same command runs again until the run completes
(resumed from its checkpoint, or started over). Its ``results.json`` must equal the uninterrupted run's and
the folder must hold no temporary file, lock or checkpoint.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/soak.py --runs 50 --out soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TINY = (
    "dataset=digits",
    "dataset.size=16",
    "transform.input_size=16",
    "scenario.init_classes=4",
    "scenario.increment=3",
    "logger.mode=disabled",
    "trainer.accelerator=cpu",
    "save_model=true",
)
#: One config per method kind of state (weights, replay, penalties, teacher, prototypes, BN snapshots).
CONFIGS = (
    ("method=seq_ft", "method.epochs=2", "method.batch_size=32"),
    ("method=er", "method.buffer_size=50", "method.epochs=2", "method.batch_size=32"),
    ("method=ewc", "method.epochs=1", "method.batch_size=32"),
    ("method=lwf", "method.epochs=1", "method.batch_size=32"),
    ("method=simplecil",),
    ("method=confit", "scenario=til", "method.epochs=1", "method.batch_size=32"),
)
METRICS = ("acc_matrix", "til_acc_matrix", "extra_matrices", "last_acc", "avg_inc_acc", "class_order")
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1)
LEFTOVERS = (".*.tmp", "running.lock*", ".writable-probe-*", "checkpoint.json", "checkpoint-task*.pt")


def command(config: tuple[str, ...], seed: int, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "cl_bench", *TINY, *config, f"seed={seed}", f"hydra.run.dir={run_dir}"]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def run_to_end(cmd: list[str], cwd: Path) -> tuple[int, float]:
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=cwd, env=environment(), capture_output=True, text=True)
    return done.returncode, time.monotonic() - start


def soak_one(cmd: list[str], cwd: Path, duration: float, rng: random.Random, max_kills: int) -> list[str]:
    """Start, kill at random moments, rerun until complete; returns the signals sent."""
    sent = []
    for _ in range(rng.randint(1, max_kills)):
        process = subprocess.Popen(cmd, cwd=cwd, env=environment(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(rng.uniform(0.5, duration))
        if process.poll() is None:
            signum = rng.choice(SIGNALS)
            process.send_signal(signum)
            sent.append(signal.Signals(signum).name)
        process.wait()
    code, _ = run_to_end(cmd, cwd)
    if code not in (0, 2):  # 2: a complete run refuses to run again (the results are checked after)
        sent.append(f"final rerun exited {code}")
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--max-kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="cl_bench_soak_"))
    references: dict[int, tuple[dict[str, Any], float]] = {}
    report: dict[str, Any] = {
        "runs": args.runs,
        "folder": str(work),
        "lost": [],
        "differing": [],
        "leftovers": [],
    }
    rows = []
    for k in range(args.runs):
        index, seed = k % len(CONFIGS), k // len(CONFIGS) % 2
        key = index * 2 + seed
        if key not in references:
            ref_dir = work / f"reference-{key}"
            code, duration = run_to_end(command(CONFIGS[index], seed, ref_dir), work)
            assert code == 0, f"the uninterrupted run of {CONFIGS[index]} failed"
            references[key] = (json.loads((ref_dir / "results.json").read_text()), duration)
        reference, duration = references[key]
        run_dir = work / f"run-{k:03d}"
        sent = soak_one(command(CONFIGS[index], seed, run_dir), work, duration, rng, args.max_kills)
        row = {"run": k, "config": list(CONFIGS[index]), "seed": seed, "signals": sent}
        try:
            doc = json.loads((run_dir / "results.json").read_text())
        except (OSError, ValueError):
            report["lost"].append(row)
            doc = None
        if doc is not None and (doc["status"] != "complete" or any(doc[m] != reference[m] for m in METRICS)):
            report["differing"].append(row)
        left = sorted(p.name for pattern in LEFTOVERS for p in run_dir.glob(pattern))
        if left:
            report["leftovers"].append({**row, "files": left})
        rows.append(row)
        print(f"run {k + 1}/{args.runs}: {' '.join(CONFIGS[index])} seed={seed} signals={sent}", flush=True)
    report["signals_sent"] = sum(len([s for s in r["signals"] if s.startswith("SIG")]) for r in rows)
    summary = {k: len(v) if isinstance(v, list) else v for k, v in report.items()}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps({**report, "rows": rows}, indent=2) + "\n")
    sys.exit(1 if report["lost"] or report["differing"] or report["leftovers"] else 0)


if __name__ == "__main__":
    main()
