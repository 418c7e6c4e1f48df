"""What a run shows while it trains, and what a sweep shows as its jobs end.

* In a terminal (stderr is a TTY, not a multirun): one status line rewritten in place, for the whole run:
  ``task 2/10 · epoch 3/20 · step 45/120 · loss 0.532 · 412 img/s · task ETA 1:20 · run ETA 14:05``.
* Elsewhere (SLURM logs, a file, a sweep's jobs): one log line per epoch with the same facts.
* ``quiet=true``: neither.

ETAs: the task's from its own batches so far (seconds per batch times the batches left in all its epochs);
the run's adds, for every later task, its training images times the seconds per training image of the tasks
done (the current one while it is the first), so an unequal split (B50 then 5 by 5) is accounted for.

:class:`SweepProgress` (a Hydra callback in ``cl_bench/conf/config.yaml``) prints one line per job of a
``-m`` sweep as the job's ``results.json`` becomes final, whatever the launcher.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import pytorch_lightning as pl
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cl_bench.storage import read_small_json
from cl_bench.sweeps import ERROR_FILE, SKIPPED_FILE, first_line, results_folder

log = logging.getLogger(__name__)

#: Seconds between two redraws of the terminal status line.
REDRAW_S = 0.25
#: Seconds between two looks at a sweep's run folders.
SWEEP_POLL_S = 2.0


def duration(seconds: float | None) -> str:
    """``1:05:03``, ``5:03`` or ``?``."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = round(seconds)
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def progress_mode(quiet: bool, stream: TextIO, multirun: bool) -> str:
    """``bar`` (a TTY, one run), ``lines`` (anything else) or ``off`` (``quiet``)."""
    if quiet:
        return "off"
    return "bar" if stream.isatty() and not multirun else "lines"


class _ClearLine(logging.Filter):
    """Erases the status line before a log record is written to the same terminal, then asks to redraw."""

    def __init__(self, progress: RunProgress) -> None:
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear()
        return True


class RunProgress:
    """Run-level progress over all tasks. ``train_sizes``: the training images of each task (for the run's
    ETA); ``mode``: see :func:`progress_mode`."""

    def __init__(self, train_sizes: Sequence[int], mode: str, stream: TextIO | None = None) -> None:
        self.train_sizes = list(train_sizes)
        self.mode = mode
        self.stream = stream or sys.stderr
        self.task = 0
        self.done_seconds = 0.0
        self.done_images = 0
        self._shown = False
        self._last_draw = 0.0
        self._filters: list[tuple[logging.Handler, logging.Filter]] = []
        if mode == "bar":
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "isatty", bool)():
                    flt = _ClearLine(self)
                    handler.addFilter(flt)
                    self._filters.append((handler, flt))

    @classmethod
    def for_run(cls, cfg: DictConfig, train_sizes: Sequence[int], enabled: bool = True) -> RunProgress:
        """The display ``cfg.quiet`` and the terminal call for (``enabled=False``: DDP ranks > 0, off)."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        return cls(train_sizes, progress_mode(cfg.quiet or not enabled, sys.stderr, multirun), sys.stderr)

    def callback(self, task: int) -> pl.Callback:
        """The callback for task ``task``'s Trainer."""
        self.task = task
        return TaskProgress(self, task)

    def task_done(self, task: int, seconds: float) -> None:
        """Task ``task`` took ``seconds`` in all (training, task-end work, evaluation)."""
        self.done_seconds += seconds
        self.done_images += self.train_sizes[task]

    def run_eta(self, task: int, task_eta: float | None, task_elapsed: float) -> float | None:
        """Seconds left in the run: this task's ETA plus the later tasks at the rate seen so far."""
        if task_eta is None:
            return None
        later = sum(self.train_sizes[task + 1 :])
        if self.done_images:
            rate = self.done_seconds / self.done_images
        else:
            rate = (task_elapsed + task_eta) / max(self.train_sizes[task], 1)
        return task_eta + rate * later

    def show(self, text: str, force: bool = False) -> None:
        """Redraw the status line (at most every :data:`REDRAW_S` unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._last_draw < REDRAW_S:
            return
        self._last_draw = now
        width = 200
        self.stream.write("\r\x1b[K" + text[:width])
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Erase the status line (before other output); the next update redraws it."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False
            self._last_draw = 0.0

    def close(self) -> None:
        """Erase the status line and stop watching the log handlers."""
        self.clear()
        for handler, flt in self._filters:
            handler.removeFilter(flt)
        self._filters = []


class TaskProgress(pl.Callback):
    """Feeds :class:`RunProgress` from one task's ``fit``: steps, loss, throughput, ETAs."""

    def __init__(self, run: RunProgress, task: int) -> None:
        self.run = run
        self.task = task
        self.n_tasks = len(run.train_sizes)
        self.start = time.perf_counter()
        self.batches_done = 0
        self.epoch_start = self.start
        self.epoch_images = 0
        self.loss_sum = 0.0
        self.loss_count = 0

    def _task_eta(self, trainer: pl.Trainer, batch_idx: int) -> float | None:
        per_epoch = trainer.num_training_batches
        if not self.batches_done or per_epoch in (0, float("inf")):
            return None
        left = (trainer.max_epochs - trainer.current_epoch - 1) * per_epoch + (per_epoch - batch_idx - 1)
        return left * (time.perf_counter() - self.start) / self.batches_done

    def _status(self, trainer: pl.Trainer, step: int, loss: float | None) -> tuple[str, float | None]:
        elapsed = time.perf_counter() - self.start
        task_eta = self._task_eta(trainer, step - 1)
        run_eta = self.run.run_eta(self.task, task_eta, elapsed)
        speed = self.epoch_images / max(time.perf_counter() - self.epoch_start, 1e-9)
        parts = [
            f"task {self.task + 1}/{self.n_tasks}",
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}",
            f"step {step}/{trainer.num_training_batches}",
            "loss ?" if loss is None else f"loss {loss:.4f}",
            f"{speed:.0f} img/s",
            f"task ETA {duration(task_eta)}",
            f"run ETA {duration(run_eta)}",
        ]
        return " · ".join(parts), task_eta

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_start = time.perf_counter()
        self.epoch_images = 0
        self.loss_sum, self.loss_count = 0.0, 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batches_done += 1
        self.epoch_images += _batch_size(batch)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and hasattr(loss, "item"):
            self.loss_sum += float(loss.detach())
            self.loss_count += 1
        if self.run.mode == "bar":
            mean = self.loss_sum / self.loss_count if self.loss_count else None
            last = batch_idx + 1 == trainer.num_training_batches  # an epoch's end is always drawn
            self.run.show(self._status(trainer, batch_idx + 1, mean)[0], force=last)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run.mode != "lines":
            return
        loss = self.loss_sum / self.loss_count if self.loss_count else _logged_loss(trainer)
        text, _ = self._status(trainer, trainer.num_training_batches, loss)
        seconds = time.perf_counter() - self.epoch_start
        log.info("%s · %s this epoch", text.replace(" · step ", " · steps ", 1), duration(seconds))


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, list | tuple) else batch
    return int(first.shape[0]) if hasattr(first, "shape") else 0


def _logged_loss(trainer: pl.Trainer) -> float | None:
    """The epoch's ``train/*loss`` a method logged itself (methods that return no loss, e.g. LNT)."""
    for key, value in trainer.callback_metrics.items():
        if key.startswith("train/") and key.endswith("loss"):
            return float(value)
    return None


# ------------------------------------------------------------------------------------------------- sweeps


def job_line(folder: Path, doc: dict[str, Any], done: int, total: int | None, elapsed: float) -> str | None:
    """The line for a finished sweep job (``None`` while its ``results.json`` is not final)."""
    error = doc.get("error")
    if doc.get("status") != "complete" and not error:
        return None
    count = f"{done}/{total}" if total else str(done)
    head = f"[sweep {duration(elapsed)}] job {count} {folder.name}"
    if doc.get("status") == "complete":
        last = doc.get("last_acc")
        return f"{head}: done, last acc {f'{last:.2f}' if isinstance(last, int | float) else 'n/a'}"
    return f"{head}: FAILED after {len(doc.get('acc_matrix') or [])} task(s): {str(error).splitlines()[0]}"


def stopped_job_line(folder: Path, done: int, total: int | None, elapsed: float) -> str | None:
    """The line for a sweep job that ended without a final ``results.json``: skipped (``skipped.txt``, the
    method cannot run on the backbone or scenario) or failed before its first task (``error.txt``)."""
    count = f"{done}/{total}" if total else str(done)
    head = f"[sweep {duration(elapsed)}] job {count} {folder.name}"
    for name, verb in ((SKIPPED_FILE, "skipped"), (ERROR_FILE, "FAILED")):
        line = first_line(folder / name)
        if line is not None:
            return f"{head}: {verb}: {line or '(no reason given)'}"
    return None


class SweepProgress(Callback):
    """Prints a line as each job of a ``-m`` sweep finishes, fails or is skipped (its ``results.json``, else
    its ``error.txt`` or ``skipped.txt``), for every launcher, from the process that launched the sweep;
    ``quiet=true`` prints nothing."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: set[Path] = set()

    def __getstate__(self) -> dict[str, Any]:
        """Launchers pickle Hydra's callbacks into each job (submitit): without the watcher thread."""
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("quiet"):
            return
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.total = _job_count(config)
        self.start = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="sweep-progress", daemon=True)
        self._thread.start()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.poll()

    def _watch(self) -> None:
        while not self._stop.wait(SWEEP_POLL_S):
            self.poll()

    def poll(self) -> None:
        """Print the jobs that became final since the last look."""
        for folder in sorted(p for p in self.sweep_dir.glob("*") if p.is_dir()):
            if folder in self._seen:
                continue
            done, elapsed = len(self._seen) + 1, time.monotonic() - self.start
            try:
                doc = read_small_json(results_folder(folder) / "results.json")  # untrusted input
            except (OSError, ValueError):
                doc = None
            line = job_line(folder, doc, done, self.total, elapsed) if isinstance(doc, dict) else None
            if line is None:  # error.txt follows a failed run's results.json: that line came first
                line = stopped_job_line(folder, done, self.total, elapsed)
            if line is not None:
                self._seen.add(folder)
                print(line, file=self.stream or sys.stdout, flush=True)


def _job_count(config: DictConfig) -> int | None:
    """The number of jobs of the sweep (as Hydra's basic sweeper expands it), ``None`` if unknown."""
    from omegaconf import OmegaConf

    from cl_bench.report import expand_sweep

    try:
        params = config.hydra.sweeper.get("params")
        params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
        assert isinstance(params, dict)
        return len(expand_sweep(params, list(config.hydra.overrides.task)))
    except Exception:  # another sweeper (optuna...): no total
        return None
