"""``cl-bench``: the Hydra entry point. ``cl-bench --help`` lists the config groups and their options.

Nothing here imports torch at module level: ``--help``, ``--cfg`` and shell completion start in well under two
seconds, and a run imports the training stack only when it starts.

Errors a user can fix end the command with one message and exit status 2: a misspelt group option lists the
close matches, a key set for a method (or dataset, backbone) that lacks it names the options that have it.
In a sweep (``-m``) a failing job writes ``error.txt`` in its folder and the sweep goes on; a job whose method
cannot run on the backbone writes ``skipped.txt``; the summary at the end (:mod:`cl_bench.sweeps`) lists both,
and the command exits with status 1 if a job failed.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
import time
import traceback
from importlib import resources
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, read_write

import cl_bench.config  # noqa: F401  (registers the schemas and the budget resolver)
from cl_bench import sweeps
from cl_bench.compatibility import UnsupportedBackboneError, UnsupportedScenarioError
from cl_bench.config import options_with_key
from cl_bench.errors import ClBenchError, CompleteRunError

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")
#: Groups whose keys differ between options (a struct error there names the options that have the key).
TARGET_GROUPS = ("method", "dataset", "backbone")
log = logging.getLogger("cl_bench")


def format_report(doc: dict[str, Any], run_dir: str) -> str:
    """A plain-text table of the accuracy matrix and the final metrics."""
    matrix = doc["acc_matrix"]
    n = len(matrix[0]) if matrix else 0
    lines = [
        "",
        "accuracy (%) on task j (columns) after task t (rows):",
        "t\\j " + "".join(f"{j:>8d}" for j in range(n)),
    ]
    for t, row in enumerate(matrix):
        lines.append(f"{t:>3d} " + "".join(f"{'':>8s}" if v is None else f"{v:8.2f}" for v in row))

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    lines += [
        "",
        f"last accuracy          {fmt(doc['last_acc'])}",
        f"avg incremental acc    {fmt(doc['avg_inc_acc'])}",
        f"avg forgetting         {fmt(doc['avg_forgetting'])}",
        f"backward transfer      {fmt(doc['bwt'])}",
        f"time per task (s)      {' '.join(f'{t:.1f}' for t in doc['task_time_s'])}",
        f"peak memory (MB)       {doc['peak_mem_mb']:.0f}",
        f"run folder             {run_dir}",
    ]
    return "\n".join(lines)


class KeepHydraRecord(Callback):
    """Hydra callback (``hydra.callbacks.keep_record``): when ``hydra.run.dir`` already holds a run's
    ``.hydra/`` record, this command's record goes to ``.hydra/rerun-<time>/`` instead of replacing it.

    Hydra writes that record before any cl-bench code runs, so the folder's lock and its refusal of another
    config's results come too late to protect it. Sweep jobs (fresh folders) are left as Hydra makes them.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        subdir = config.hydra.output_subdir
        if subdir is None or not (Path(str(config.hydra.run.dir)) / str(subdir) / "config.yaml").is_file():
            return
        with read_write(config.hydra):
            config.hydra.output_subdir = f"{subdir}/rerun-{time.strftime('%Y%m%d-%H%M%S')}"


def _record(name: str, text: str) -> None:
    """Write ``name`` (``error.txt``, ``skipped.txt``, ``results_in.txt``) in this job's Hydra folder."""
    from hydra.core.hydra_config import HydraConfig

    from cl_bench import distributed

    if distributed.is_main_process():
        Path(HydraConfig.get().runtime.output_dir, name).write_text(text)


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """One experiment (a Hydra job): the results document, or ``None`` for a failed or skipped sweep job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from cl_bench import distributed
    from cl_bench.runner import resolve_run_dir, run_experiment

    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    if in_sweep and distributed.is_main_process():  # a rerun sweep: what an earlier attempt left is stale
        for name in (sweeps.ERROR_FILE, sweeps.SKIPPED_FILE, sweeps.RESULTS_POINTER):
            (hydra_dir / name).unlink(missing_ok=True)
    try:
        doc = run_experiment(cfg)
    except CompleteRunError as exc:
        if not in_sweep:
            log.error("%s", exc)
            print(f"cl-bench: error: {exc}", file=sys.stderr)
            sys.exit(2)
        log.info("kept: %s", exc)  # a sweep run again in its folder: this job had finished
        return None
    except (UnsupportedBackboneError, UnsupportedScenarioError) as exc:
        if not in_sweep:
            print(f"cl-bench: error: {exc}", file=sys.stderr)
            sys.exit(2)
        log.warning("skipped: %s", exc)
        _record(sweeps.SKIPPED_FILE, f"{exc}\n")
        return None
    except ClBenchError as exc:
        log.error("%s", exc)
        if not in_sweep:
            print(f"cl-bench: error: {exc}", file=sys.stderr)
            sys.exit(2)
        _record(sweeps.ERROR_FILE, f"{exc}\n")
        return None
    except Exception as exc:
        if not in_sweep:
            raise
        log.exception("the job failed")  # into the job's log; the sweep goes on with its other jobs
        _record(sweeps.ERROR_FILE, f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
        return None
    run_dir = Path(doc["config"]["paths"]["run_dir"] or resolve_run_dir(cfg))
    if distributed.is_main_process():
        if run_dir.resolve() != hydra_dir.resolve():  # a resumed run's folder, or paths.run_dir: say where
            _record(sweeps.RESULTS_POINTER, f"{run_dir.resolve()}\n")
        print(format_report(doc, str(run_dir)))
    return doc


_hydra_main = hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")(run)


def _search_roots(message: str) -> list[Path]:
    """The config folders of Hydra's search path, as its error messages list them."""
    roots = []
    for line in message.splitlines():
        if "path=" not in line:
            continue
        path = line.split("path=", 1)[1].strip()
        if path.startswith("file://"):
            roots.append(Path(path[len("file://") :]))
        elif path.startswith("pkg://"):
            module, _, sub = path[len("pkg://") :].partition("/")
            try:
                roots.append(Path(str(resources.files(module))) / sub)
            except (ImportError, TypeError):
                continue
    return roots


def missing_option_message(missing: str, message: str) -> str | None:
    """``experiment=slca/cifar``: no such option, with the close matches among the group's options."""
    roots = _search_roots(message)
    parts = missing.split("/")
    for i in range(1, len(parts)):
        group = "/".join(parts[:i])
        folders = [r / group for r in roots if (r / group).is_dir()]
        if folders:
            name = "/".join(parts[i:])
            options = sorted(
                {p.relative_to(f).with_suffix("").as_posix() for f in folders for p in f.rglob("*.yaml")}
            )
            close = difflib.get_close_matches(name, options, n=5, cutoff=0.5)
            text = f"{group}={name}: no such {group}."
            if close:
                text += f" Close matches: {', '.join(close)}."
            return text + f" All options: {', '.join(options)}."
    return None


def struct_key_message(full_key: str) -> str | None:
    """``method.epochs=2`` for a method without ``epochs``: which options of the group have the key."""
    group, _, key = full_key.partition(".")
    if group not in TARGET_GROUPS or not key or "." in key:
        return None
    owners = options_with_key(group, key)
    if not owners:
        return None
    text = (
        f"{full_key}: the {group} of this run (or of some jobs of the sweep) has no key {key!r}; "
        f"the {group} options that have it: {', '.join(owners)}. Set it only for those (e.g. one sweep per "
        f"{group})"
    )
    if group == "method" and key in cl_bench.config.BudgetConfig.__dataclass_fields__:
        text += f", or set budget.{key}=VALUE: the training budget of every method that has the key"
    return text + "."


def unknown_key_message(full_key: str, parent: Any) -> str | None:
    """``trainer.max_epoch=1``: a key that no option of its group has, with the close matches among the keys
    of the config it was set in (Hydra's own message suggests ``+trainer.max_epoch``, which fails later)."""
    from omegaconf import DictConfig

    if not isinstance(parent, DictConfig):
        return None
    section, _, key = full_key.rpartition(".")
    valid = sorted(str(k) for k in parent.keys() if k not in ("_target_", "name", "hydra"))
    name = parent.get("name") if section in TARGET_GROUPS else None
    where = f"{section}={name}" if name else (section or "the config")
    close = difflib.get_close_matches(key, valid, n=3)
    hint = (
        f" Did you mean {' or '.join('.'.join(filter(None, (section, c))) for c in close)}?" if close else ""
    )
    return f"{full_key}: {where} has no key {key!r}.{hint} Its keys: {', '.join(valid)}."


def explain(exc: Exception) -> str | None:
    """A one-paragraph message for a Hydra composition error a user can fix, else ``None``."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        return missing_option_message(exc.missing_cfg_file, str(exc))
    cause = exc.__cause__
    if (
        isinstance(cause, OmegaConfBaseException)
        and cause.full_key
        and ("not in struct" in str(cause) or " not in '" in str(cause))  # a dict, or a schema dataclass
    ):
        full_key = str(cause.full_key)
        return struct_key_message(full_key) or unknown_key_message(full_key, cause.parent_node)
    return None


#: The groups ``--help`` lists, in this order.
HELP_GROUPS = (
    "protocol",
    "experiment",
    "method",
    "dataset",
    "backbone",
    "scenario",
    "trainer",
    "logger",
    "paths",
    "launcher",
    "sweep",
    "debug",
)


def help_text() -> str:
    """``cl-bench --help``: the shipped options of every group, read from the config folder (Hydra's own help
    builds a config repository per group and takes seconds)."""
    lines = [
        "cl-bench: one continual experiment; -m runs a sweep.",
        "usage: cl-bench [GROUP=OPTION] [KEY=VALUE] ...   e.g. cl-bench protocol=slca/cifar100 method=seq_ft",
        "",
        f"== Configuration groups == (files in {CONFIG_DIR}/<group>/; add your own with --config-dir DIR)",
    ]
    root = Path(CONFIG_DIR)
    for group in HELP_GROUPS:
        names = sorted(
            p.relative_to(root / group).with_suffix("").as_posix() for p in (root / group).rglob("*.yaml")
        )
        lines.append(f"{group}: {', '.join(names)}")
    lines += [
        "tuned: the values a paper tuned for its method in a protocol (tuned/<method>/<protocol>.yaml),",
        "       applied automatically when that method runs in that protocol",
        "",
        "== Other flags ==",
        "--cfg job [--resolve]   print the composed config instead of running (with the overrides given)",
        "--config-dir DIR        add a folder of your own presets (same layout as above)",
        "-m / --multirun         sweep: comma-separated values, glob(...), sweep=all_methods|seeds_x_orders",
        "--hydra-help            Hydra's own options (launchers, logging, output folders)",
    ]
    return "\n".join(lines)


def main() -> None:
    """The ``cl-bench`` command."""
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        print(help_text())
        return
    from hydra.errors import CompactHydraException

    # Hydra then raises composition errors here instead of printing them, so they can be explained.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        _hydra_main()
    except CompactHydraException as exc:  # bad overrides or config files: no traceback
        text = explain(exc) or "\n".join(str(e) for e in (exc, exc.__cause__) if e is not None)
        print(f"cl-bench: error: {text}", file=sys.stderr)
        sys.exit(2)
    if any(o.status == "failed" for o in sweeps.last_outcomes):
        sys.exit(1)


if __name__ == "__main__":  # python -m cl_bench.cli
    main()
