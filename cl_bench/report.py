"""``cl-bench-report PATH... [--out DIR]``: compare finished runs in one page.

Reads any set of run folders (a run folder, a sweep folder, a whole ``outputs/`` tree, shell globs; the same
folder reached twice counts once) and writes ``DIR/index.html`` (default ``report/``; self-contained:
figures embedded, configs inline, tables sortable by a click on their header and filterable by text, with
plain inline JavaScript and no network), ``DIR/report.md`` and the PNG figures in ``DIR/figures/``:

* methods x benchmarks tables of last accuracy, average incremental accuracy and average forgetting, each
  cell the mean +- sample standard deviation over the cell's complete runs (seeds, class orders) and their
  count (hover a cell for the runs' values);
* one row per cell with every metric: those three, backward transfer, the task-incremental (TIL) last
  accuracy, the training time and the peak memory;
* per benchmark, a bar chart of the last accuracy (mean, error bar = std), the accuracy-vs-task curve of
  every method (mean over runs, +- one std band) and, per cell, the heatmap of the mean accuracy matrix;
* every run with its seed, class order, status, metrics and a link to its ``config.yaml``;
* runs that failed (with the first line of their error), were skipped (the method cannot run on the
  backbone or scenario: the sweep job's ``skipped.txt``), stopped early or never started (a sweep's
  ``multirun.yaml`` names its jobs), and inputs that could not be read, listed and left out of the means;
* smoke runs (``debug=smoke``) listed with the runs but never in the tables or figures.

A *benchmark* is dataset, backbone, scenario type and task split; a *method* is ``method.name``. Config keys
that differ between runs of the same benchmark or method (a swept learning rate, say) are appended to the
column or row label, so such runs are never averaged together. Seeds, class orders, paths, logging and
data-loading settings do not split cells.

The accuracy-vs-task curve and the TIL last accuracy are unweighted means over the seen tasks:
``results.json`` stores the accuracy matrices but not the test-set sizes that ``last_acc`` weights by, so
they equal the weighted figures when the tasks' test sets are equally large (all shipped benchmarks with
``scenario.n_tasks`` dividing the classes evenly).
"""

from __future__ import annotations

import argparse
import base64
import glob
import html
import json
import math
import os
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_bench.errors import ConfigError
from cl_bench.metrics import mean_task_accuracy
from cl_bench.results import RESULTS_FILE, write_text_atomic
from cl_bench.storage import read_small_json
from cl_bench.sweeps import SKIPPED_FILE, first_line, results_folder

#: Output folder when ``--out`` is not given.
DEFAULT_OUT = Path("report")


def _til_last(doc: dict[str, Any]) -> float | None:
    rows = doc["til_acc_matrix"]
    return mean_task_accuracy(rows, len(rows) - 1) if rows else None


def _minutes(doc: dict[str, Any]) -> float | None:
    return sum(doc["task_time_s"]) / 60 if doc["task_time_s"] else None


@dataclass(frozen=True)
class Metric:
    """A per-run number shown in the tables: its key, title, and how to read it from ``results.json``."""

    key: str
    title: str
    read: Callable[[dict[str, Any]], float | None]


#: Every metric of the per-cell and per-run tables, in column order.
METRICS = (
    Metric("last_acc", "Last accuracy (%)", lambda d: d["last_acc"]),
    Metric("avg_inc_acc", "Average incremental accuracy (%)", lambda d: d["avg_inc_acc"]),
    Metric("avg_forgetting", "Average forgetting (points)", lambda d: d["avg_forgetting"]),
    Metric("bwt", "Backward transfer (points)", lambda d: d["bwt"]),
    Metric("til_last_acc", "TIL last accuracy (%)", _til_last),
    Metric("time_min", "Time (min)", _minutes),
    Metric("peak_mem_mb", "Peak memory (MB)", lambda d: d["peak_mem_mb"]),
)
#: The metrics that get a methods x benchmarks table of their own.
TABLE_METRICS = METRICS[:3]
#: Flattened config keys that never split cells: repetitions, where files live, logging and loader settings.
IGNORED_KEYS = frozenset(
    {
        "seed",
        "scenario.order_seed",
        "scenario.class_order",
        "save_model",
        "save_checkpoints",
        "resume",
        "quiet",
        "dataset.root",
        "dataset.download",
        "trainer.num_workers",
        "trainer.eval_batch_size",
        "trainer.enable_progress_bar",
        "trainer.log_every_n_steps",
        "trainer.profiler",
        "debug.smoke",  # smoke runs never reach the tables
        "debug.random_weights_if_missing",
    }
)
IGNORED_PREFIXES = ("paths.", "logger.", "hydra.")
#: Config groups that define the benchmark (column); every other key belongs to the method (row).
BENCHMARK_PREFIXES = ("dataset.", "backbone.", "scenario.", "transform.")
#: Folders never searched for runs.
SKIPPED_FOLDERS = frozenset(
    {"wandb", ".submitit", ".hydra", "__pycache__", "checkpoints", "csv", "tensorboard"}
)


@dataclass
class Run:
    """One run folder: its results (``None`` if it has no usable ``results.json``) and its config."""

    folder: Path
    config: dict[str, Any]
    doc: dict[str, Any] | None
    problem: str | None
    overrides: list[str] = field(default_factory=list)
    benchmark: str = ""
    method: str = ""
    #: The Hydra folder this run was reached from when its results are in ``folder`` (``results_in.txt``:
    #: a rerun that resumed the interrupted run of the same config in its own folder).
    alias: Path | None = None

    @property
    def smoke(self) -> bool:
        """A smoke run (``debug=smoke``): never in the tables."""
        debug = self.config.get("debug")
        return isinstance(debug, dict) and bool(debug.get("smoke"))

    @property
    def complete(self) -> bool:
        return self.problem is None

    @property
    def counted(self) -> bool:
        """Complete and not a smoke run: part of the tables and figures."""
        return self.complete and not self.smoke

    @property
    def config_file(self) -> Path | None:
        for candidate in (self.folder / "config.yaml", self.folder / ".hydra" / "config.yaml"):
            if candidate.is_file():
                return candidate
        return None

    def value(self, metric: Metric) -> float | None:
        return None if self.doc is None else metric.read(self.doc)


def mean_std(values: Sequence[float]) -> str:
    """``mean ± sample std`` (two decimals), the value alone for one run, ``n/a`` for none."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _is_number_or_none(value: Any) -> bool:
    """``None`` or a finite number (JSON allows ``NaN`` and ``Infinity``, which no cl_bench metric is)."""
    return value is None or (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    )


def _is_matrix(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(row, list) and all(_is_number_or_none(v) for v in row) for row in value
    )


def malformed(doc: Any) -> str | None:
    """What is wrong with a ``results.json`` document the report relies on, or ``None``."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    for key in ("acc_matrix", "til_acc_matrix"):
        if not _is_matrix(doc.get(key)):
            return f"{key} is missing or not a list of rows of numbers"
    for key in ("acc_matrix", "til_acc_matrix"):  # til_acc_matrix is [] under DIL
        rows = doc[key]
        if rows and (len({len(r) for r in rows}) != 1 or len(rows) > len(rows[0])):
            return f"{key} rows differ in length or outnumber the tasks"
        if any(r[t] is None for t, r in enumerate(rows)):
            return f"{key} has no value on its diagonal"
    for key in ("last_acc", "avg_inc_acc", "avg_forgetting", "bwt", "peak_mem_mb"):
        if not _is_number_or_none(doc.get(key)):
            return f"{key} is missing or not a number"
    times = doc.get("task_time_s")
    if not isinstance(times, list) or not all(_is_number_or_none(t) and t is not None for t in times):
        return "task_time_s is missing or not a list of numbers"
    if doc.get("status") not in ("complete", "incomplete"):
        return f"status is {doc.get('status')!r}, not complete or incomplete"
    if not isinstance(doc.get("config"), dict):
        return "config is missing or not a mapping"
    return None


def read_results(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``results.json`` document, or ``None`` if the file does not exist (raises ``ValueError``
    with the reason if it cannot be read or lacks what the report needs)."""
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        doc = read_small_json(path)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"unreadable {RESULTS_FILE} ({exc})") from exc
    problem = malformed(doc)
    if problem is not None:
        raise ValueError(f"malformed {RESULTS_FILE}: {problem}")
    return doc


def _is_run_folder(folder: Path) -> bool:
    if (folder / RESULTS_FILE).is_file() or (folder / ".hydra" / "config.yaml").is_file():
        return True
    return (folder / "config.yaml").is_file() and (folder / "environment.json").is_file()


def find_run_folders(paths: Iterable[str]) -> tuple[list[Path], list[Path], list[str]]:
    """Run folders under ``paths`` (shell globs expanded; a folder reached twice, e.g. through two
    overlapping paths or a link, counts once), the sweeps' ``multirun.yaml`` files, and the paths that name
    no folder."""
    runs: dict[Path, Path] = {}  # resolved -> as found
    sweeps: dict[Path, Path] = {}
    missing: list[str] = []
    for pattern in paths:
        matches = sorted(glob.glob(pattern, recursive=True)) or [pattern]
        for match in matches:
            path = Path(match)
            if path.is_file() and path.name == RESULTS_FILE:
                path = path.parent
            if not path.is_dir():
                missing.append(match)
                continue
            for folder, subfolders, files in os.walk(path):
                here = Path(folder)
                if "multirun.yaml" in files:
                    sweeps.setdefault((here / "multirun.yaml").resolve(), here / "multirun.yaml")
                if _is_run_folder(here):
                    runs.setdefault(here.resolve(), here)
                    subfolders.clear()  # runs do not nest
                else:
                    subfolders[:] = sorted(d for d in subfolders if d not in SKIPPED_FOLDERS)
    return list(runs.values()), list(sweeps.values()), missing


def _load_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _load_config(path: Path) -> Any:
    """A run's config file with its interpolations resolved where they can be (Hydra's ``.hydra/config.yaml``
    of a job that stopped before ``results.json`` holds ``${paths.data_dir}/...``), so that it labels like
    the resolved configs of the runs that finished."""
    from omegaconf import OmegaConf

    import cl_bench.config  # noqa: F401  (registers the ``budget`` resolver)

    config = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(config, resolve=True)
    except Exception:  # an interpolation that cannot be resolved here: keep the file's text
        return OmegaConf.to_container(config, resolve=False)


def first_error_line(folder: Path) -> str | None:
    """The first ``[ERROR]`` line of the run's Hydra log (for runs that stopped before ``results.json``)."""
    for log_file in sorted(folder.glob("*.log")):
        try:
            for line in log_file.read_text(errors="replace").splitlines():
                if "][ERROR] - " in line:
                    return line.split("][ERROR] - ", 1)[1].strip()
        except OSError:
            continue
    return None


def _read_overrides(folder: Path) -> tuple[list[str], str | None]:
    """The run's Hydra overrides (``folder/.hydra/overrides.yaml``) and what is wrong with them."""
    overrides_file = folder / ".hydra" / "overrides.yaml"
    try:
        loaded = _load_yaml(overrides_file) if overrides_file.is_file() else []
    except Exception as exc:
        return [], f"unreadable .hydra/overrides.yaml ({type(exc).__name__})"
    return ([str(o) for o in loaded] if isinstance(loaded, list) else []), None


def load_run(folder: Path, follow: bool = True) -> Run:
    """Read ``folder``'s results, config and Hydra overrides; say what is wrong if it did not finish. A folder
    whose ``results_in.txt`` names the folder holding its results (``follow``) reads that one."""
    target = results_folder(folder) if follow else folder
    if target != folder:  # the job's overrides are its own (its sweep's multirun.yaml lists them)
        run = load_run(target, follow=False)
        run.alias, run.overrides = folder, _read_overrides(folder)[0]
        return run
    overrides, problem = _read_overrides(folder)
    try:
        doc = read_results(folder)
    except ValueError as exc:
        doc, problem = None, str(exc)
    if doc is not None:
        if doc["status"] != "complete":
            done, total = len(doc["acc_matrix"]), len(doc["acc_matrix"][0]) if doc["acc_matrix"] else 0
            error = doc.get("error")
            reason = f": {str(error).splitlines()[0]}" if error else ""
            verb = "failed" if error else doc["status"]
            problem = f"{verb} after {done} of {total or '?'} tasks{reason}"
        return Run(folder, doc["config"], doc, problem, overrides)
    config: dict[str, Any] = {}
    config_file = next(
        (p for p in (folder / "config.yaml", folder / ".hydra" / "config.yaml") if p.is_file()), None
    )
    if config_file is not None:
        try:
            loaded = _load_config(config_file)
            config = loaded if isinstance(loaded, dict) else {}
        except Exception as exc:
            problem = problem or f"unreadable {config_file.name} ({type(exc).__name__})"
    reason = first_line(folder / SKIPPED_FILE) if problem is None else None
    if reason is not None:
        problem = f"skipped: {reason or 'the method cannot run on the backbone or scenario'}"
    if problem is None:
        error = first_error_line(folder)
        problem = f"failed before its first task ended (no {RESULTS_FILE})" + (f": {error}" if error else "")
    return Run(folder, config, None, problem, overrides)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys to JSON-encoded values (lists and scalars); ``_target_`` keys included."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = json.dumps(value, sort_keys=True, default=str)
    return flat


def _kept(key: str) -> bool:
    return key not in IGNORED_KEYS and not key.startswith(IGNORED_PREFIXES)


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def _base_benchmark(config: dict[str, Any]) -> str:
    dataset = _section(config, "dataset").get("name", "?")
    backbone = _section(config, "backbone").get("name", "?")
    scenario = _section(config, "scenario")
    if scenario.get("type") == "dil":  # the tasks are the domains (n_tasks does not count them)
        domains = scenario.get("domains")
        split = "domains " + ",".join(map(str, domains)) if domains else "all domains"
    elif scenario.get("increment"):
        split = f"B{scenario.get('init_classes')} Inc{scenario['increment']}"
    else:
        split = f"{scenario.get('n_tasks', '?')} tasks"
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
    """Set each run's benchmark (column) and method (row) label; keys that vary within one are appended.

    The keys are those that vary among the runs that reach the tables (complete, not smoke), where a label
    has any: a smoke run's caps or a failed job's config never rename the cells of the others."""
    flats = {id(run): flatten(run.config) for run in runs}

    def varying(members: Sequence[Run]) -> list[str]:
        counted = [r for r in members if r.counted] or members
        return _varying_keys([flats[id(r)] for r in counted])

    by_benchmark: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_benchmark[_base_benchmark(run.config)].append(run)
    for base, members in by_benchmark.items():
        keys = [k for k in varying(members) if k.startswith(BENCHMARK_PREFIXES)]
        for run in members:
            run.benchmark = _with_keys(base, flats[id(run)], keys)
    by_method: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        by_method[(run.benchmark, str(_section(run.config, "method").get("name", "?")))].append(run)
    for (_, name), members in by_method.items():
        keys = [k for k in varying(members) if not k.startswith(BENCHMARK_PREFIXES)]
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
    loaded = _load_yaml(multirun_file)
    hydra_cfg = loaded["hydra"]
    expected = expand_sweep(hydra_cfg["sweeper"].get("params") or {}, hydra_cfg["overrides"]["task"])
    sweep_dir = multirun_file.parent.resolve()
    found = {
        frozenset(r.overrides)
        for r in runs
        if any(sweep_dir in p.resolve().parents for p in (r.folder, r.alias) if p is not None)
    }
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


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(benchmark: str, cells: dict[str, list[Run]], path: Path) -> None:
    """Accuracy after each task (mean of the seen tasks' accuracies), one line per method, +- std band."""
    import matplotlib.ticker

    plt = _pyplot()
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


def plot_bars(benchmark: str, cells: dict[str, list[Run]], path: Path) -> None:
    """Last accuracy per method: the mean over runs, error bars of one sample std (none for one run)."""
    plt = _pyplot()
    methods = sorted(cells)
    values = [[v for r in cells[m] if (v := r.value(METRICS[0])) is not None] for m in methods]
    means = [statistics.mean(v) if v else 0.0 for v in values]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 + 0.9 * len(methods)), 4.2), dpi=100)
    positions = list(range(len(methods)))
    bars = ax.bar(positions, means, yerr=stds, capsize=4, color="#4c72b0", alpha=0.85)
    for bar, v, mean, std in zip(bars, values, means, stds):
        x = bar.get_x() + bar.get_width() / 2
        label = f"{mean:.1f}\n(n={len(v)})"
        ax.annotate(label, (x, mean + std), ha="center", va="bottom", fontsize=7, xytext=(0, 3),
                    textcoords="offset points")  # fmt: skip
    ax.set_xticks(positions, methods, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("last accuracy (%), mean ± std")
    ax.set_ylim(0, max(100.0, *(m + s + 8 for m, s in zip(means, stds))))
    ax.set_title(benchmark, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_matrix(title: str, runs: Sequence[Run], path: Path) -> None:
    """Heatmap of the mean accuracy matrix (rows: after task t, columns: task j)."""
    from cl_bench.figures import matrix_figure

    plt = _pyplot()
    fig = matrix_figure(_mean_matrix([r.doc for r in runs if r.doc is not None]), f"{title} (n={len(runs)})")
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ report


@dataclass
class Report:
    """Everything the page shows, in display order."""

    benchmarks: list[str]
    methods: list[str]
    cells: dict[tuple[str, str], list[Run]]  # (benchmark, method) -> complete runs, smoke runs excluded
    runs: list[Run]
    problems: list[str]
    figures: dict[str, list[tuple[str, Path]]]  # benchmark -> (caption, png)


def build_report(paths: Sequence[str], out_dir: Path) -> Report:
    """Read the runs under ``paths``, aggregate them and draw the figures into ``out_dir/figures``."""
    folders, sweeps, missing = find_run_folders(paths)
    if not folders and not sweeps:
        where = f"; no such run or sweep folder: {', '.join(missing)}" if missing else ""
        raise ConfigError(f"no run folders (with results.json or .hydra/) under {' '.join(paths)}{where}")
    loaded = [load_run(f) for f in folders]
    unique: dict[Path, Run] = {}  # a resumed run is reached from its own folder and from the rerun's
    for run in loaded:
        unique.setdefault(run.folder.resolve(), run)
    runs = list(unique.values())
    label_runs(runs)
    problems = [f"{m}: no such run or sweep folder" for m in missing]
    problems += [f"{r.folder}: {r.problem}" for r in runs if not r.complete]
    for sweep in sweeps:
        try:
            problems += [f"{sweep.parent}: never ran: {job}" for job in missing_jobs(sweep, loaded)]
        except Exception as exc:  # a malformed multirun.yaml: list it, report the rest
            problems.append(
                f"{sweep}: unreadable sweep file, its missing jobs are unknown ({type(exc).__name__})"
            )
    cells: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        if run.counted:
            cells[(run.benchmark, run.method)].append(run)
    benchmarks = sorted({b for b, _ in cells})
    methods = sorted({m for _, m in cells})
    figures_dir = out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, list[tuple[str, Path]]] = {}
    for benchmark in benchmarks:
        row_cells = {m: cells[(benchmark, m)] for m in methods if (benchmark, m) in cells}
        bars = figures_dir / f"bars_{_slug(benchmark)}.png"
        plot_bars(benchmark, row_cells, bars)
        curve = figures_dir / f"curves_{_slug(benchmark)}.png"
        plot_curves(benchmark, row_cells, curve)
        figures[benchmark] = [("last accuracy (mean ± std)", bars), ("accuracy after each task", curve)]
        for method, members in row_cells.items():
            heatmap = figures_dir / f"matrix_{_slug(benchmark)}__{_slug(method)}.png"
            plot_matrix(method, members, heatmap)
            figures[benchmark].append((f"accuracy matrix: {method}", heatmap))
    return Report(benchmarks, methods, dict(cells), runs, problems, figures)


def _values(runs: Sequence[Run], metric: Metric) -> list[float]:
    return [v for r in runs if (v := r.value(metric)) is not None]


def _cell_text(runs: Sequence[Run], metric: Metric) -> str:
    return f"{mean_std(_values(runs, metric))} (n={len(runs)})" if runs else "–"


def _sort_key(runs: Sequence[Run], metric: Metric) -> str:
    values = _values(runs, metric)
    return f"{statistics.mean(values):.6f}" if values else ""


def _link(target: Path | None, out_dir: Path) -> str | None:
    return None if target is None else os.path.relpath(target.resolve(), out_dir.resolve())


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _status(run: Run) -> str:
    return run.problem or ("complete (smoke run, not in the tables)" if run.smoke else "complete")


def _run_cells(run: Run) -> list[tuple[str, str]]:
    """The runs table's cells of ``run``: (text, sort key)."""
    seed = str(run.config.get("seed", "?"))
    order = str(_section(run.config, "scenario").get("order_seed", "?"))
    cells = [(run.benchmark, run.benchmark), (run.method, run.method), (seed, seed), (order, order)]
    cells.append((_status(run), _status(run)))
    for metric in METRICS:
        value = run.value(metric)
        cells.append((_fmt(value), "" if value is None else f"{value:.6f}"))
    return cells


RUN_COLUMNS = ["benchmark", "method", "seed", "order seed", "status", *(m.title for m in METRICS)]
CELL_COLUMNS = ["benchmark", "method", "runs", *(m.title for m in METRICS)]


def render_markdown(report: Report, out_dir: Path, command: str) -> str:
    lines = ["# cl-bench report", "", f"`{command}`", ""]
    for metric in TABLE_METRICS:
        if not report.benchmarks:
            lines += [f"## {metric.title}", "", "no complete runs (smoke runs are never in the tables)", ""]
            continue
        lines += [f"## {metric.title}", "", "| method | " + " | ".join(report.benchmarks) + " |"]
        lines.append("|---" * (len(report.benchmarks) + 1) + "|")
        for method in report.methods:
            cells = [_cell_text(report.cells.get((b, method), []), metric) for b in report.benchmarks]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## All metrics per cell (mean ± std)", "", "| " + " | ".join(CELL_COLUMNS) + " |"]
    lines.append("|---" * len(CELL_COLUMNS) + "|")
    for (benchmark, method), runs in sorted(report.cells.items()):
        values = [mean_std(_values(runs, m)) for m in METRICS]
        lines.append(f"| {benchmark} | {method} | {len(runs)} | " + " | ".join(values) + " |")
    lines += ["", "## Runs failed, skipped, incomplete, missing or unreadable (not in the tables)", ""]
    lines += [f"- {p}" for p in report.problems] or ["none"]
    lines += ["", "## Figures", ""]
    for benchmark, figures in report.figures.items():
        lines += [f"### {benchmark}", ""]
        lines += [f"![{caption}]({_link(png, out_dir)})" for caption, png in figures]
        lines.append("")
    lines += ["## Runs", "", "| " + " | ".join([*RUN_COLUMNS, "config"]) + " |"]
    lines.append("|---" * (len(RUN_COLUMNS) + 1) + "|")
    for run in report.runs:
        link = _link(run.config_file, out_dir)
        texts = [text for text, _ in _run_cells(run)]
        lines.append("| " + " | ".join(texts) + f" | {f'[config]({link})' if link else 'none'} |")
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:14px}th{background:#f3f3f3}
thead th{cursor:pointer;user-select:none}thead th:hover{background:#e6e6e6}
thead th[aria-sort=ascending]::after{content:" ▲"}thead th[aria-sort=descending]::after{content:" ▼"}
td.num{text-align:right;font-variant-numeric:tabular-nums}figure{display:inline-block;margin:0.5em;vertical-align:top}
figcaption{font-size:12px;color:#555}pre{font-size:11px;max-height:24em;overflow:auto;background:#f8f8f8}
.problem{color:#a00}input.filter{font-size:13px;padding:3px 6px;width:22em}
"""

#: Sorting (click a header: ascending, again: descending; empty cells last) and filtering (every word typed
#: must occur in the row) of every ``table.sortable``; no library, no network.
_JS = """
(function () {
  function key(cell) {
    var raw = cell.getAttribute("data-sort");
    if (raw === null) raw = cell.textContent.trim();
    if (raw === "") return null;
    var n = Number(raw);
    return isNaN(n) ? raw.toLowerCase() : n;
  }
  function compare(a, b) {
    if (typeof a === typeof b) return a < b ? -1 : a > b ? 1 : 0;
    return typeof a === "number" ? -1 : 1;
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.tabIndex = 0;
      th.title = "sort by " + th.textContent;
      function sort() {
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (r1, r2) {
          var a = key(r1.cells[col]), b = key(r2.cells[col]);
          if (a === null || b === null) return (a === null) - (b === null);
          return ascending ? compare(a, b) : compare(b, a);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) { if (e.key === "Enter") sort(); });
    });
  });
  document.querySelectorAll("input.filter").forEach(function (input) {
    var table = document.getElementById(input.getAttribute("data-table"));
    input.addEventListener("input", function () {
      var words = input.value.toLowerCase().split(/\\s+/).filter(Boolean);
      Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
        var text = row.textContent.toLowerCase();
        row.hidden = !words.every(function (w) { return text.indexOf(w) >= 0; });
      });
    });
  });
})();
"""


def _filter(table_id: str) -> str:
    return f'<input class="filter" type="search" data-table="{table_id}" placeholder="filter rows (words)">'


def _td(text: str, sort: str, numeric: bool, title: str | None = None) -> str:
    esc = html.escape
    cls = ' class="num"' if numeric else ""
    tip = f' title="{esc(title)}"' if title else ""
    return f'<td{cls} data-sort="{esc(sort)}"{tip}>{esc(text)}</td>'


def render_html(report: Report, out_dir: Path, command: str) -> str:
    """One self-contained page: figures as data URIs, each run's config inline as well as linked."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>cl-bench report</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>cl-bench report</h1>",
        f"<p><code>{esc(command)}</code></p>",
        "<p>Click a column header to sort, type in a box to filter.</p>",
    ]
    for metric in TABLE_METRICS:
        table_id = f"table-{metric.key}"
        parts += [
            f"<h2>{esc(metric.title)}</h2>",
            _filter(table_id),
            f'<table class="summary sortable" id="{table_id}">',
        ]
        parts.append("<thead><tr><th>method</th>" + "".join(f"<th>{esc(b)}</th>" for b in report.benchmarks))
        parts.append("</tr></thead><tbody>")
        for method in report.methods:
            cells = ""
            for b in report.benchmarks:
                runs = report.cells.get((b, method), [])
                tip = ", ".join(f"{v:.2f}" for v in _values(runs, metric))
                cells += _td(_cell_text(runs, metric), _sort_key(runs, metric), True, tip and f"runs: {tip}")
            parts.append(f'<tr class="method-row"><th>{esc(method)}</th>{cells}</tr>')
        parts.append("</tbody></table>")
    parts += [
        "<h2>All metrics per cell (mean ± std)</h2>",
        _filter("cells"),
        '<table class="sortable" id="cells">',
    ]
    parts.append("<thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in CELL_COLUMNS) + "</tr></thead><tbody>")
    for (benchmark, method), runs in sorted(report.cells.items()):
        row = (
            _td(benchmark, benchmark, False)
            + _td(method, method, False)
            + _td(str(len(runs)), str(len(runs)), True)
        )
        for metric in METRICS:
            values = _values(runs, metric)
            tip = ", ".join(f"{v:.2f}" for v in values)
            row += _td(mean_std(values), _sort_key(runs, metric), True, tip and f"runs: {tip}")
        parts.append(f'<tr class="cell-row">{row}</tr>')
    parts.append("</tbody></table>")
    parts.append(
        "<h2>Runs failed, skipped, incomplete, missing or unreadable (not in the tables)</h2>"
        '<ul id="problems">'
    )
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
    parts += ["<h2>Runs</h2>", _filter("runs"), '<table class="sortable" id="runs"><thead><tr>']
    parts.append("".join(f"<th>{esc(c)}</th>" for c in [*RUN_COLUMNS, "config"]) + "</tr></thead><tbody>")
    for run in report.runs:
        config = run.config_file
        link = _link(config, out_dir)
        inline = (
            f'<a href="{esc(link)}">{esc(str(run.folder))}</a><details><summary>show</summary>'
            f"<pre>{esc(config.read_text(errors='replace'))}</pre></details>"
            if config is not None and link is not None
            else esc(str(run.folder))
        )
        cells = "".join(_td(text, sort, i >= 5) for i, (text, sort) in enumerate(_run_cells(run)))
        parts.append(f'<tr class="run-row">{cells}<td data-sort="{esc(str(run.folder))}">{inline}</td></tr>')
    parts.append(f"</tbody></table><script>{_JS}</script></body></html>")
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
        "orders), all metrics per cell, bar charts, accuracy curves and matrices, failed and missing runs.",
    )
    parser.add_argument(
        "paths", nargs="+", help="run folders, sweep folders or globs (e.g. 'outputs/multiruns/*')"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder for index.html, report.md, figures/ (default: {DEFAULT_OUT}/)",
    )
    args = parser.parse_args(argv)
    command = "cl-bench-report " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        report = write_report(args.paths, args.out, command)
    except ConfigError as exc:
        print(f"cl-bench-report: error: {exc}", file=sys.stderr)
        sys.exit(2)
    counted = sum(r.counted for r in report.runs)
    smoke = sum(r.smoke for r in report.runs)
    print(
        f"{counted} complete run(s) in {len(report.cells)} cell(s), {len(report.problems)} failed, "
        f"skipped, incomplete, missing or unreadable"
        + (f", {smoke} smoke run(s) left out" if smoke else "")
        + f"; wrote {args.out / 'index.html'} and {args.out / 'report.md'}"
    )


if __name__ == "__main__":  # python -m cl_bench.report
    main()
