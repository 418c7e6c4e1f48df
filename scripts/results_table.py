"""Run a method x seed sweep with ``cl-bench -m`` (or reuse finished runs) and write a Markdown table.

Each cell is mean +- std over seeds of last accuracy, average incremental accuracy and forgetting, read
from the runs' ``results.json``; runs that are missing or incomplete are listed under the table.

Split CIFAR-100 (10 tasks, order seed 1993) from the CIFAR-10 ResNet-32 in ``../shared/weights``:

    .venv/bin/python scripts/results_table.py --out docs/results_cifar100_resnet32.md \
        --methods simplecil linear_probe seq_ft --seeds 0 1 2 -- \
        experiment=cifar100_resnet32 paths.data_dir=../shared/data \
        backbone.checkpoint=../shared/weights/cifar10_akamaster_resnet32-d509ac18.th
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from cl_bench.report import mean_std as fmt
from cl_bench.report import read_results


def sweep(methods: list[str], seeds: list[int], overrides: list[str], sweep_dir: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "cl_bench",
        "-m",
        f"method={','.join(methods)}",
        f"seed={','.join(map(str, seeds))}",
        *overrides,
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweep.subdir=${method.name}_seed${seed}",
    ]
    print("running:", shlex.join(command), flush=True)
    subprocess.run(command, check=False)


def table(methods: list[str], seeds: list[int], sweep_dir: Path, command: str) -> str:
    lines = [
        "| method | runs | last acc (%) | avg incremental acc (%) | avg forgetting (pt) | time per run (s) |",
        "|---|---|---|---|---|---|",
    ]
    problems = []
    for method in methods:
        docs = []
        for seed in seeds:
            path = sweep_dir / f"{method}_seed{seed}" / "results.json"
            doc = read_results(path.parent)
            if doc is None or doc["status"] != "complete":
                problems.append(
                    f"- {method}, seed {seed}: {'missing' if doc is None else doc['status']} ({path})"
                )
                continue
            docs.append(doc)
        forgetting = [d["avg_forgetting"] for d in docs if d["avg_forgetting"] is not None]
        lines.append(
            f"| {method} | {len(docs)} | {fmt([d['last_acc'] for d in docs])} | "
            f"{fmt([d['avg_inc_acc'] for d in docs])} | {fmt(forgetting)} | "
            f"{fmt([sum(d['task_time_s']) for d in docs])} |"
        )
    out = [*lines, "", f"Reproduce: `{command}`"]
    if problems:
        out += ["", "Runs missing or incomplete:", *problems]
    return "\n".join(out) + "\n"


def extras(doc: dict) -> str:
    """Each extra matrix's last row, averaged over tasks (e.g. ``task_selection_acc 91.2``)."""
    parts = []
    for name, matrix in sorted(doc.get("extra_matrices", {}).items()):
        row = [v for v in matrix[len(doc["acc_matrix"]) - 1] if v is not None] if doc["acc_matrix"] else []
        if row:
            parts.append(f"{name} {sum(row) / len(row):.2f}")
    return ", ".join(parts)


def runs_table(labelled_runs: list[str], title: str) -> str:
    """One row per ``LABEL=RUN_DIR`` (single runs, e.g. ablations), read from each ``results.json``."""
    lines = [
        f"| {title} | last acc (%) | last acc given the task id (%) | avg incremental acc (%) "
        "| avg forgetting (pt) | BWT (pt) | time (s) | status | extra metrics after the last task (%) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for item in labelled_runs:
        label, _, folder = item.rpartition("=")  # labels may contain "=" (e.g. an override)
        doc = read_results(Path(folder))
        if doc is None:
            lines.append(f"| {label} | | | | | | | missing ({Path(folder) / 'results.json'}) | |")
            continue

        def num(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.2f}"

        til = doc["til_acc_matrix"][-1] if doc["til_acc_matrix"] else []
        til_last = sum(til) / len(til) if til else None
        lines.append(
            f"| {label} | {num(doc['last_acc'])} | {num(til_last)} | {num(doc['avg_inc_acc'])} "
            f"| {num(doc['avg_forgetting'])} "
            f"| {num(doc['bwt'])} | {sum(doc['task_time_s']):.0f} | {doc['status']} | {extras(doc)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    parser.add_argument("--methods", nargs="+", help="methods to sweep (with --seeds)")
    parser.add_argument(
        "--runs", nargs="+", metavar="LABEL=RUN_DIR", help="tabulate finished single runs instead of a sweep"
    )
    parser.add_argument("--title", default="run", help="first column's header for --runs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sweep-dir", type=Path, default=Path("outputs/tables/latest"))
    parser.add_argument("--no-run", action="store_true", help="only aggregate runs already in --sweep-dir")
    parser.add_argument("overrides", nargs="*", help="cl-bench overrides shared by every run (after --)")
    args = parser.parse_args()
    if args.runs:
        text = runs_table(args.runs, args.title)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(text)
        return
    if not args.methods:
        parser.error("give --methods (a sweep) or --runs (finished runs)")
    if not args.no_run:
        sweep(args.methods, args.seeds, args.overrides, args.sweep_dir)
    command = shlex.join(
        ["python", "scripts/results_table.py", *(a for a in sys.argv[1:] if a != "--no-run")]
    )
    text = table(args.methods, args.seeds, args.sweep_dir, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
