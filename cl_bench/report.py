"""``cl-bench-report PATH... --out DIR``: compare finished runs in one page.

Reads any set of run folders (a run folder, a sweep folder, a whole ``outputs/`` tree, shell globs) and
writes ``DIR/index.html`` (self-contained: figures embedded, configs inline), ``DIR/report.md`` and the PNG
figures in ``DIR/figures/``:

* methods x benchmarks tables of last accuracy, average incremental accuracy and average forgetting, each
  cell the mean +- sample standard deviation over the cell's complete runs (seeds, class orders) and their
  count;
* per benchmark, the accuracy-vs-task curve of every method (mean over runs, +- one std band);
* per cell, the heatmap of the mean accuracy matrix;
* every run with its seed, class order, status and a link to its ``config.yaml``;
* runs that failed, stopped early or never started (a sweep's ``multirun.yaml`` names its jobs), listed
  and left out of the means.

A *benchmark* is dataset, backbone, scenario type and task split; a *method* is ``method.name``. Config keys
that differ between runs of the same benchmark or method (a swept learning rate, say) are appended to the
column or row label, so such runs are never averaged together. Seeds, class orders, paths, logging and
data-loading settings do not split cells.

The accuracy-vs-task curve is the unweighted mean of the seen tasks' accuracies after each task:
``results.json`` stores the accuracy matrix but not the test-set sizes that ``last_acc`` weights by, so
the curve's last point equals ``last_acc`` when the tasks' test sets are equally large (all shipped
benchmarks with ``scenario.n_tasks`` dividing the classes evenly).
"""

from __future__ import annotations

import argparse
import base64
import glob
import html
import json
import os
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_bench.errors import ConfigError
from cl_bench.metrics import mean_task_accuracy
from cl_bench.results import RESULTS_FILE, write_text_atomic

#: Headline metrics of the tables: (results.json key, title).
TABLE_METRICS = (
    ("last_acc", "Last accuracy (%)"),
    ("avg_inc_acc", "Average incremental accuracy (%)"),
    ("avg_forgetting", "Average forgetting (points)"),
)
#: Flattened config keys that never split cells: repetitions, where files live, logging and loader settings.
IGNORED_KEYS = frozenset(
    {
        "seed",
        "scenario.order_seed",
        "scenario.class_order",
        "save_model",
        "dataset.root",
        "dataset.download",
        "trainer.num_workers",
        "trainer.eval_batch_size",
        "trainer.enable_progress_bar",
        "trainer.log_every_n_steps",
    }
)
IGNORED_PREFIXES = ("paths.", "logger.", "hydra.")
#: Config groups that define the benchmark (column); every other key belongs to the method (row).
BENCHMARK_PREFIXES = ("dataset.", "backbone.", "scenario.", "transform.")
#: Folders never searched for runs.
SKIPPED_FOLDERS = frozenset({"wandb", ".submitit", ".hydra", "__pycache__", "checkpoints"})


@dataclass
class Run:
    """One run folder: its results (``None`` if it has no readable ``results.json``) and its config."""

    folder: Path
    config: dict[str, Any]
    doc: dict[str, Any] | None
    problem: str | None
    overrides: list[str] = field(default_factory=list)
    benchmark: str = ""
    method: str = ""

    @property
    def complete(self) -> bool:
        return self.problem is None

    @property
    def config_file(self) -> Path | None:
        for candidate in (self.folder / "config.yaml", self.folder / ".hydra" / "config.yaml"):
            if candidate.is_file():
                return candidate
        return None


def mean_std(values: Sequence[float]) -> str:
    """``mean ± sample std`` (two decimals), the value alone for one run, ``n/a`` for none."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def read_results(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``results.json`` document, or ``None`` if the file does not exist."""
    path = run_dir / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _is_run_folder(folder: Path) -> bool:
    if (folder / RESULTS_FILE).is_file() or (folder / ".hydra" / "config.yaml").is_file():
        return True
    return (folder / "config.yaml").is_file() and (folder / "environment.json").is_file()


def find_run_folders(paths: Iterable[str]) -> tuple[list[Path], list[Path]]:
    """Run folders under ``paths`` (shell globs expanded) and the sweeps' ``multirun.yaml`` files found."""
    runs: dict[Path, None] = {}
    sweeps: dict[Path, None] = {}
    for pattern in paths:
        matches = sorted(glob.glob(pattern, recursive=True)) or [pattern]
        for match in matches:
            path = Path(match)
            if path.is_file() and path.name == RESULTS_FILE:
                path = path.parent
            if not path.is_dir():
                raise ConfigError(f"{match}: no such run or sweep folder")
            for folder, subfolders, files in os.walk(path):
                here = Path(folder)
                if "multirun.yaml" in files:
                    sweeps[here / "multirun.yaml"] = None
                if _is_run_folder(here):
                    runs[here] = None
                    subfolders.clear()  # runs do not nest
                else:
                    subfolders[:] = sorted(d for d in subfolders if d not in SKIPPED_FOLDERS)
    return list(runs), list(sweeps)


def load_run(folder: Path) -> Run:
    """Read ``folder``'s results, config and Hydra overrides; say what is wrong if it did not finish."""
    from omegaconf import OmegaConf

    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
    try:
        doc = read_results(folder)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        doc, problem = None, f"unreadable {RESULTS_FILE} ({exc})"
    else:
        problem = None
    if doc is not None:
        config = doc["config"]
        if doc["status"] != "complete":
            done, total = len(doc["acc_matrix"]), len(doc["acc_matrix"][0]) if doc["acc_matrix"] else 0
            problem = f"{doc['status']}: {done} of {total or '?'} tasks finished"
        return Run(folder, config, doc, problem, overrides)
    config_file = next(
        (p for p in (folder / "config.yaml", folder / ".hydra" / "config.yaml") if p.is_file()), None
    )
    config: dict[str, Any] = {}
    if config_file is not None:
        loaded = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
        config = loaded if isinstance(loaded, dict) else {}
    return Run(
        folder, config, None, problem or f"failed before its first task ended (no {RESULTS_FILE})", overrides
    )


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys to JSON-encoded values (lists and scalars); ``_target_`` keys included."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = json.dumps(value, sort_keys=True)
    return flat


def _kept(key: str) -> bool:
    return key not in IGNORED_KEYS and not key.startswith(IGNORED_PREFIXES)


def _base_benchmark(config: dict[str, Any]) -> str:
    dataset = config.get("dataset", {}).get("name", "?")
    backbone = config.get("backbone", {}).get("name", "?")
    scenario = config.get("scenario", {})
    split = (
        f"B{scenario['init_classes']} Inc{scenario['increment']}"
        if scenario.get("increment")
        else f"{scenario.get('n_tasks', '?')} tasks"
    )
    return f"{dataset} · {backbone} · {scenario.get('type', '?')} {split}"


def _varying_keys(flats: Sequence[dict[str, str]]) -> list[str]:
    keys = sorted({k for flat in flats for k in flat})
    return [k for k in keys if _kept(k) and len({flat.get(k) for flat in flats}) > 1]


def _with_keys(base: str, flat: dict[str, str], keys: Sequence[str]) -> str:
    if not keys:
        return base
    values = ", ".join(f"{k}={json.loads(flat[k]) if k in flat else 'unset'}" for k in keys)
    return f"{base} ({values})"


def label_runs(runs: Sequence[Run]) -> None:
    """Set each run's benchmark (column) and method (row) label; keys that vary within one are appended."""
    flats = {id(run): flatten(run.config) for run in runs}
    by_benchmark: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_benchmark[_base_benchmark(run.config)].append(run)
    for base, members in by_benchmark.items():
        keys = [k for k in _varying_keys([flats[id(r)] for r in members]) if k.startswith(BENCHMARK_PREFIXES)]
        for run in members:
            run.benchmark = _with_keys(base, flats[id(run)], keys)
    by_method: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        by_method[(run.benchmark, str(run.config.get("method", {}).get("name", "?")))].append(run)
    for (_, name), members in by_method.items():
        keys = [
            k for k in _varying_keys([flats[id(r)] for r in members]) if not k.startswith(BENCHMARK_PREFIXES)
        ]
        for run in members:
            run.method = _with_keys(name, flats[id(run)], keys)


def expand_sweep(params: dict[str, Any], task_overrides: Sequence[str]) -> list[list[str]]:
    """The jobs (override lists) that Hydra's basic sweeper makes from ``hydra.sweeper.params`` (a sweep
    preset) and the command-line overrides; a command-line override replaces a preset axis of the same key."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cl_bench.cli import CONFIG_DIR

    arguments = [f"{k}={v}" for k, v in params.items()] + list(task_overrides)
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(CONFIG_DIR))
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def missing_jobs(multirun_file: Path, runs: Sequence[Run]) -> list[str]:
    """The jobs of a multirun (its ``multirun.yaml``) that have no run folder, each as its overrides."""
    from omegaconf import OmegaConf

    hydra_cfg = OmegaConf.to_container(OmegaConf.load(multirun_file).hydra, resolve=False)
    assert isinstance(hydra_cfg, dict)
    expected = expand_sweep(hydra_cfg["sweeper"].get("params") or {}, hydra_cfg["overrides"]["task"])
    sweep_dir = multirun_file.parent
    found = {frozenset(r.overrides) for r in runs if sweep_dir in r.folder.parents}
    return [" ".join(job) for job in expected if frozenset(job) not in found]


# ----------------------------------------------------------------------------------------------- figures


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:80] or "x"


def _mean_matrix(docs: Sequence[dict[str, Any]]) -> list[list[float | None]]:
    matrices = [d["acc_matrix"] for d in docs]
    rows, cols = len(matrices[0]), len(matrices[0][0])
    return [
        [
            None if matrices[0][t][j] is None else statistics.mean(m[t][j] for m in matrices)
            for j in range(cols)
        ]
        for t in range(rows)
    ]


def plot_curves(benchmark: str, cells: dict[str, list[Run]], path: Path) -> None:
    """Accuracy after each task (mean of the seen tasks' accuracies), one line per method, +- std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for method, runs in sorted(cells.items()):
        curves = [
            [mean_task_accuracy(r.doc["acc_matrix"], t) for t in range(len(r.doc["acc_matrix"]))]
            for r in runs
            if r.doc is not None
        ]
        tasks = list(range(1, len(curves[0]) + 1))
        mean = [statistics.mean(c[t] for c in curves) for t in range(len(tasks))]
        (line,) = ax.plot(tasks, mean, marker="o", label=f"{method} (n={len(curves)})")
        if len(curves) > 1:
            std = [statistics.stdev(c[t] for c in curves) for t in range(len(tasks))]
            ax.fill_between(
                tasks, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2
            )
        line.set_markersize(4)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("mean accuracy over seen tasks (%)")
    ax.set_title(benchmark, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_matrix(title: str, runs: Sequence[Run], path: Path) -> None:
    """Heatmap of the mean accuracy matrix (rows: after task t, columns: task j)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = _mean_matrix([r.doc for r in runs if r.doc is not None])
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    n = values.shape[1]
    fig, ax = plt.subplots(figsize=(max(3.2, 1.2 + 0.45 * n), max(2.8, 1.0 + 0.4 * n)), dpi=100)
    image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis")
    if n <= 12:
        for (t, j), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(j, t, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
    ax.set_xlabel("task j")
    ax.set_ylabel("after task t")
    ax.set_title(f"{title} (n={len(runs)})", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ report


@dataclass
class Report:
    """Everything the page shows, in display order."""

    benchmarks: list[str]
    methods: list[str]
    cells: dict[tuple[str, str], list[Run]]  # (benchmark, method) -> complete runs
    runs: list[Run]
    problems: list[str]
    figures: dict[str, list[tuple[str, Path]]]  # benchmark -> (caption, png)


def build_report(paths: Sequence[str], out_dir: Path) -> Report:
    """Read the runs under ``paths``, aggregate them and draw the figures into ``out_dir/figures``."""
    folders, sweeps = find_run_folders(paths)
    if not folders and not sweeps:
        raise ConfigError(f"no run folders (with results.json or .hydra/) under {' '.join(paths)}")
    runs = [load_run(f) for f in folders]
    label_runs(runs)
    problems = [f"{r.folder}: {r.problem}" for r in runs if not r.complete]
    for sweep in sweeps:
        problems += [f"{sweep.parent}: never ran: {job}" for job in missing_jobs(sweep, runs)]
    cells: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        if run.complete:
            cells[(run.benchmark, run.method)].append(run)
    benchmarks = sorted({b for b, _ in cells})
    methods = sorted({m for _, m in cells})
    figures_dir = out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, list[tuple[str, Path]]] = {}
    for benchmark in benchmarks:
        row_cells = {m: cells[(benchmark, m)] for m in methods if (benchmark, m) in cells}
        curve = figures_dir / f"curves_{_slug(benchmark)}.png"
        plot_curves(benchmark, row_cells, curve)
        figures[benchmark] = [("accuracy after each task", curve)]
        for method, members in row_cells.items():
            heatmap = figures_dir / f"matrix_{_slug(benchmark)}__{_slug(method)}.png"
            plot_matrix(method, members, heatmap)
            figures[benchmark].append((f"accuracy matrix: {method}", heatmap))
    return Report(benchmarks, methods, dict(cells), runs, problems, figures)


def _cell_text(runs: Sequence[Run], key: str) -> str:
    values = [r.doc[key] for r in runs if r.doc is not None and r.doc[key] is not None]
    return f"{mean_std(values)} (n={len(runs)})" if runs else "–"


def _link(target: Path | None, out_dir: Path) -> str | None:
    return None if target is None else os.path.relpath(target.resolve(), out_dir.resolve())


def _run_row(run: Run) -> tuple[str, str, str, str, str, str]:
    seed = str(run.config.get("seed", "?"))
    order = str(run.config.get("scenario", {}).get("order_seed", "?"))
    last = "n/a" if run.doc is None or run.doc["last_acc"] is None else f"{run.doc['last_acc']:.2f}"
    return run.benchmark, run.method, seed, order, run.problem or "complete", last


def render_markdown(report: Report, out_dir: Path, command: str) -> str:
    lines = ["# cl-bench report", "", f"`{command}`", ""]
    for key, title in TABLE_METRICS:
        lines += [f"## {title}", "", "| method | " + " | ".join(report.benchmarks) + " |"]
        lines.append("|---" * (len(report.benchmarks) + 1) + "|")
        for method in report.methods:
            cells = [_cell_text(report.cells.get((b, method), []), key) for b in report.benchmarks]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Runs failed, incomplete or missing (not in the tables)", ""]
    lines += [f"- {p}" for p in report.problems] or ["none"]
    lines += ["", "## Figures", ""]
    for benchmark, figures in report.figures.items():
        lines += [f"### {benchmark}", ""]
        lines += [f"![{caption}]({_link(png, out_dir)})" for caption, png in figures]
        lines.append("")
    lines += ["## Runs", "", "| benchmark | method | seed | order seed | status | last acc | config |"]
    lines.append("|---|---|---|---|---|---|---|")
    for run in report.runs:
        link = _link(run.config_file, out_dir)
        lines.append("| " + " | ".join(_run_row(run)) + f" | {f'[config]({link})' if link else 'none'} |")
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:14px}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}figure{display:inline-block;margin:0.5em;vertical-align:top}
figcaption{font-size:12px;color:#555}pre{font-size:11px;max-height:24em;overflow:auto;background:#f8f8f8}
.problem{color:#a00}
"""


def render_html(report: Report, out_dir: Path, command: str) -> str:
    """One self-contained page: figures as data URIs, each run's config inline as well as linked."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>cl-bench report</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>cl-bench report</h1>",
        f"<p><code>{esc(command)}</code></p>",
    ]
    for key, title in TABLE_METRICS:
        parts += [f'<h2>{esc(title)}</h2><table class="summary" id="table-{key}">']
        parts.append(
            "<tr><th>method</th>" + "".join(f"<th>{esc(b)}</th>" for b in report.benchmarks) + "</tr>"
        )
        for method in report.methods:
            cells = "".join(
                f'<td class="num">{esc(_cell_text(report.cells.get((b, method), []), key))}</td>'
                for b in report.benchmarks
            )
            parts.append(f'<tr class="method-row"><th>{esc(method)}</th>{cells}</tr>')
        parts.append("</table>")
    parts.append('<h2>Runs failed, incomplete or missing (not in the tables)</h2><ul id="problems">')
    parts += [f'<li class="problem">{esc(p)}</li>' for p in report.problems] or ["<li>none</li>"]
    parts.append("</ul><h2>Figures</h2>")
    for benchmark, figures in report.figures.items():
        parts.append(f"<h3>{esc(benchmark)}</h3>")
        for caption, png in figures:
            data = base64.b64encode(png.read_bytes()).decode()
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
                f"<figcaption>{esc(caption)}</figcaption></figure>"
            )
    parts.append('<h2>Runs</h2><table id="runs"><tr><th>benchmark</th><th>method</th><th>seed</th>')
    parts.append("<th>order seed</th><th>status</th><th>last acc</th><th>config</th></tr>")
    for run in report.runs:
        config = run.config_file
        link = _link(config, out_dir)
        inline = (
            f'<a href="{esc(link)}">{esc(str(run.folder))}</a><details><summary>show</summary>'
            f"<pre>{esc(config.read_text())}</pre></details>"
            if config is not None and link is not None
            else esc(str(run.folder))
        )
        cells = "".join(f"<td>{esc(v)}</td>" for v in _run_row(run))
        parts.append(f'<tr class="run-row">{cells}<td>{inline}</td></tr>')
    parts.append("</table></body></html>")
    return "\n".join(parts) + "\n"


def write_report(paths: Sequence[str], out_dir: Path, command: str) -> Report:
    """Build the report and write ``index.html``, ``report.md`` and ``figures/*.png`` into ``out_dir``."""
    report = build_report(paths, out_dir)
    write_text_atomic(out_dir / "index.html", render_html(report, out_dir, command))
    write_text_atomic(out_dir / "report.md", render_markdown(report, out_dir, command))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cl-bench-report",
        description="Compare cl-bench runs: methods x benchmarks tables (mean ± std over seeds and class "
        "orders), accuracy curves and matrices, failed and missing runs.",
    )
    parser.add_argument(
        "paths", nargs="+", help="run folders, sweep folders or globs (e.g. 'outputs/multiruns/*')"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for index.html, report.md, figures/")
    args = parser.parse_args(argv)
    command = "cl-bench-report " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        report = write_report(args.paths, args.out, command)
    except ConfigError as exc:
        print(f"cl-bench-report: error: {exc}", file=sys.stderr)
        sys.exit(2)
    complete = sum(r.complete for r in report.runs)
    print(
        f"{complete} complete run(s) in {len(report.cells)} cell(s), {len(report.problems)} failed, "
        f"incomplete or missing; wrote {args.out / 'index.html'} and {args.out / 'report.md'}"
    )
