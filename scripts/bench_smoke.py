"""Wall time of ``debug=smoke`` for every preset whose data this machine has (CIFAR-100 at ``--data-dir``):
each run a fresh ``cl-bench`` process, from start to exit, as a user checking a preset before submitting it.
Presets whose pre-trained weights are absent run on random weights (what ``debug=smoke`` allows). Writes
``docs/bench/smoke_<machine>.json``.

    OMP_NUM_THREADS=2 python scripts/bench_smoke.py --data-dir ../shared/data [--only PRESET] [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO.parent / "shared" / "weights"

#: (experiment preset, extra overrides): the presets on CIFAR-100, the only dataset on these machines.
PRESETS: list[tuple[str, tuple[str, ...]]] = [
    ("cifar100_resnet32", ("method=seq_ft",)),
    ("input_tuning/cifar100_resnet32", ()),
    ("confit/cifar100_resnet32", ()),
    ("confit/cifar100", ()),
    ("cifar100_b50_vit_tiny", ("method=slca",)),
    ("slca/cifar100", ()),
    ("slca/cifar100_pp", ()),
    ("lnt/cifar100", ()),
    ("safe/cifar100", ()),
    ("ranpac/cifar100", ()),
    ("aper/cifar100", ()),
    ("simplecil/cifar100", ()),
    ("l2p/cifar100", ()),
    ("dualprompt/cifar100", ()),
    ("coda_prompt/cifar100", ()),
    ("ease/cifar100", ()),
]


def local_overrides(preset: str, data_dir: Path) -> tuple[str, ...]:
    """What this machine has instead of the preset's files: the small ViT's checkpoint, and CIFAR-100 as the
    arrays file when the python-pickle folder (``dataset=cifar100``) is absent."""
    extra: tuple[str, ...] = ()
    if preset == "cifar100_b50_vit_tiny" and (WEIGHTS / "vit_tiny6_c100first50.pth").is_file():
        extra += (f"backbone.checkpoint={WEIGHTS / 'vit_tiny6_c100first50.pth'}",)
    if not (data_dir / "cifar-100-python").is_dir() and (data_dir / "cifar100.npz").is_file():
        extra += ("dataset=cifar100_npz",)
    return extra


def smoke(preset: str, extra: tuple[str, ...], data_dir: Path, folder: Path) -> dict:
    extra = (*extra, *local_overrides(preset, data_dir))
    command = [
        sys.executable,
        "-m",
        "cl_bench",
        f"experiment={preset}",
        *extra,
        "debug=smoke",
        f"paths.data_dir={data_dir}",
        f"paths.run_dir={folder}",
        "logger=none",
        "trainer.accelerator=cpu",
        "quiet=true",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    row = {"preset": preset, "overrides": list(extra), "seconds": round(seconds, 1), "exit": done.returncode}
    results = folder / "results.json"
    if results.is_file():
        doc = json.loads(results.read_text())
        row |= {"status": doc["status"], "tasks": len(doc["acc_matrix"]), "task_time_s": doc["task_time_s"]}
    if done.returncode:
        row["error"] = done.stderr.strip().splitlines()[-1:]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--only", nargs="*", help="presets to run (default: all of PRESETS)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--note", default="", help="conditions, e.g. other jobs on the machine")
    args = parser.parse_args()
    chosen = [(p, e) for p, e in PRESETS if not args.only or p in args.only]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (preset, extra) in enumerate(chosen):
            rows.append(smoke(preset, extra, args.data_dir.resolve(), Path(tmp) / f"run{i}"))
            print(json.dumps(rows[-1]), flush=True)
    machine = f"{platform.machine()}_{os.cpu_count()}cpu"
    out = args.out or REPO / "docs" / "bench" / f"smoke_{machine}.json"
    doc = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "processor": platform.processor(),
        },
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "command": "python scripts/bench_smoke.py",
        "note": args.note,
        "runs": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
