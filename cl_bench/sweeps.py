"""Sweeps (``cl-bench -m``): short job folder names and a summary when the sweep ends.

* Job folders are ``<job number>_<slug>``, the slug holding only the values the sweep varies
  (``3_method=lwf,seed=1``; paths shortened to their last two parts, at most :data:`MAX_SLUG` characters), so
  no override nests folders. Each job's full overrides stay in its ``.hydra/overrides.yaml``.
* Each job that fails writes ``error.txt`` (message first, then the traceback) in its folder, one whose method
  cannot run on the backbone or the scenario (DIL) writes ``skipped.txt`` (the reason); the sweep goes on with
  its other jobs.
* When the sweep ends, :class:`SweepCallback` prints one screen: how many jobs completed, failed or were
  skipped, the first error line of each failed job, and the ``cl-bench-report`` command that compares them.

This module imports no torch: Hydra loads it for every ``cl-bench`` command.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from cl_bench.storage import read_small_json, read_small_text

#: The longest slug of a job folder name; longer ones are cut and end with ``~`` and a hash of the whole.
MAX_SLUG = 60
ERROR_FILE = "error.txt"
SKIPPED_FILE = "skipped.txt"
#: Written in a job's (or run's) Hydra folder when the results went to another folder: the path of that
#: folder (an interrupted run of the same config that this one resumed, README: "in its own folder", or
#: paths.run_dir).
RESULTS_POINTER = "results_in.txt"
#: Failed and skipped jobs listed by name in the summary (the rest are counted).
MAX_LISTED = 12


def _short_value(value: str) -> str:
    """A path keeps its last two parts (``/data/w/vit.pth`` -> ``w-vit.pth``); ``/`` never nests folders."""
    value = value.strip("'\"")
    if "/" in value:
        value = "-".join([p for p in value.split("/") if p not in ("", ".")][-2:])
    return value


def job_slug(overrides: Iterable[str], exclude: Iterable[str]) -> str:
    """``key=value`` of the overrides whose key is not in ``exclude``, sorted, joined by ``,``, made safe."""
    excluded = set(exclude)
    parts = []
    for line in overrides:
        key, sep, value = line.partition("=")
        key = key.lstrip("+~")
        if sep and key not in excluded:
            parts.append(f"{key}={_short_value(value)}")
    slug = re.sub(r"[^\w.,=+-]", "-", ",".join(sorted(parts)))
    if len(slug) > MAX_SLUG:
        digest = hashlib.sha1(slug.encode()).hexdigest()[:8]
        slug = f"{slug[: MAX_SLUG - 9]}~{digest}"
    return slug


def sweep_subdir(num: int, overrides: Sequence[str], exclude: Sequence[str]) -> str:
    """``${sweep_subdir:...}`` (``hydra.sweep.subdir``): ``<num>_<slug>``, ``<num>`` when nothing varies."""
    slug = job_slug(list(overrides), list(exclude))
    return f"{num}_{slug}" if slug else str(num)


OmegaConf.register_new_resolver("sweep_subdir", sweep_subdir, replace=True)


def swept_keys(task_overrides: Sequence[str], params: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(keys the sweep varies, keys it sets to one value) from the command line and ``hydra.sweeper.params``;
    a command-line override replaces a preset axis of the same key (Hydra's basic sweeper)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    command_line = parser.parse_overrides(list(task_overrides))
    keys = {o.key_or_group for o in command_line}
    varied = {o.key_or_group for o in command_line if o.is_sweep_override()}
    for key, value in params.items():
        if key not in keys and parser.parse_override(f"{key}={value}").is_sweep_override():
            varied.add(key)
    return varied, (keys | set(params)) - varied


@dataclass
class JobOutcome:
    """One job of a finished sweep: its folder and ``complete``, ``failed`` or ``skipped`` with the reason."""

    folder: Path
    status: str
    detail: str = ""


def first_line(path: Path) -> str | None:
    """The first line of a job's ``error.txt`` or ``skipped.txt`` (untrusted: read by
    :func:`~cl_bench.storage.read_small_text`), ``""`` if it is empty, ``None`` if there is no such file."""
    try:
        lines = read_small_text(path, errors="replace").strip().splitlines()
    except OSError:
        return None
    return lines[0] if lines else ""


def pointed_folder(folder: Path) -> Path | None:
    """The run folder that ``folder``'s ``results_in.txt`` names (an untrusted file: ``None`` unless it names
    a folder)."""
    try:
        lines = read_small_text(folder / RESULTS_POINTER).strip().splitlines()
    except (OSError, ValueError):
        return None
    target = Path(lines[0]) if lines else None
    return target if target is not None and target.is_dir() else None


def results_folder(folder: Path) -> Path:
    """The folder holding the results of the run started in ``folder``: itself, or the folder its
    ``results_in.txt`` names (the interrupted run it resumed)."""
    if not (folder / "results.json").is_file():
        return pointed_folder(folder) or folder
    return folder


def job_outcome(folder: Path) -> JobOutcome:
    """What a job folder says about its job (its files are untrusted: unreadable ones count as failed)."""
    if (folder / SKIPPED_FILE).is_file():
        return JobOutcome(folder, "skipped", first_line(folder / SKIPPED_FILE) or "(empty)")
    if (folder / ERROR_FILE).is_file():
        return JobOutcome(folder, "failed", first_line(folder / ERROR_FILE) or "(empty)")
    results = results_folder(folder) / "results.json"
    if not results.is_file():
        return JobOutcome(folder, "failed", "no results.json: the job was killed or never started")
    try:
        doc = read_small_json(results)
    except (OSError, ValueError) as exc:
        return JobOutcome(folder, "failed", f"results.json is unreadable ({exc})")
    if isinstance(doc, dict) and doc.get("status") == "complete":
        return JobOutcome(folder, "complete")
    rows = len(doc.get("acc_matrix") or []) if isinstance(doc, dict) else 0
    return JobOutcome(folder, "failed", f"stopped after {rows} task(s) (results.json status incomplete)")


def job_folders(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (named ``<num>_...`` or holding ``.hydra/``), in job-number order."""
    if not sweep_dir.is_dir():
        return []

    def number(folder: Path) -> float:
        match = re.match(r"^(\d+)(_|$)", folder.name)
        return int(match.group(1)) if match else float("inf")

    jobs = [
        d for d in sweep_dir.iterdir() if d.is_dir() and ((d / ".hydra").is_dir() or number(d) < float("inf"))
    ]
    return sorted(jobs, key=lambda d: (number(d), d.name))


def summary(sweep_dir: Path, outcomes: Sequence[JobOutcome]) -> str:
    """The end-of-sweep screen."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("complete", "failed", "skipped")}
    head = (
        f"sweep {sweep_dir}: {len(outcomes)} jobs, {counts['complete']} complete, {counts['failed']} failed"
    )
    if counts["skipped"]:
        head += f", {counts['skipped']} skipped (the method cannot run on the backbone or scenario)"
    lines = [head]
    listed = [o for o in outcomes if o.status != "complete"]
    for o in listed[:MAX_LISTED]:
        lines.append(f"  {o.status:8s}{o.folder.name}: {o.detail}")
    if len(listed) > MAX_LISTED:
        lines.append(
            f"  ... and {len(listed) - MAX_LISTED} more ({ERROR_FILE} / {SKIPPED_FILE} in the job folders)"
        )
    lines.append(f"compare them: cl-bench-report {sweep_dir} --out {sweep_dir / 'report'}")
    return "\n".join(lines)


#: The outcomes of the sweep that ended last in this process (``cl-bench`` exits non-zero if one failed).
last_outcomes: list[JobOutcome] = []


class SweepCallback(Callback):
    """Hydra callback (``hydra.callbacks.sweep``): job folder names from the varied values; the summary."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Exclude every override the sweep does not vary from the job folder names: the jobs re-compose their
        config from ``hydra.overrides.hydra``, so the exclusion is added there."""
        preset = config.hydra.sweeper.get("params")
        params = {} if preset is None else OmegaConf.to_container(preset, resolve=False)
        assert isinstance(params, dict)
        _, fixed = swept_keys(list(config.hydra.overrides.task), params)
        exclude = list(config.hydra.job.config.override_dirname.exclude_keys)
        exclude += sorted(k for k in fixed if k not in exclude)
        with read_write(config.hydra.overrides):
            config.hydra.overrides.hydra.append(
                f"hydra.job.config.override_dirname.exclude_keys=[{','.join(exclude)}]"
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        last_outcomes[:] = [job_outcome(folder) for folder in job_folders(sweep_dir)]
        print(summary(sweep_dir, last_outcomes), flush=True)
