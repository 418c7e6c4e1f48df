"""Start-up time of the ``cl-bench`` command: ``--help`` (also what each shell-completion TAB pays) and
``--cfg job``, median of several runs in fresh processes. Writes ``docs/bench/cli_startup.json``.

    python scripts/bench_cli.py [--repeats 5] [--out docs/bench/cli_startup.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {"help": ["--help"], "cfg_job": ["--cfg", "job"], "import_torch": None}


def seconds(args: list[str] | None) -> float:
    command = (
        [sys.executable, "-c", "import torch"] if args is None else [sys.executable, "-m", "cl_bench", *args]
    )
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/cli_startup.json"))
    args = parser.parse_args()
    result = {
        name: {"median_s": round(statistics.median(seconds(a) for _ in range(args.repeats)), 3)}
        for name, a in COMMANDS.items()
    }
    result["note"] = "import_torch: the cost --help no longer pays (cl_bench.cli imports torch lazily)"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
