"""Graceful stops on SIGTERM (SLURM's warning before a kill or requeue), SIGUSR1 and SIGUSR2 (submitit's
preemption signal; ``SUBMITIT_PREEMPT_SIGNAL`` may name another).

While :func:`handling` is active the first such signal requests a stop:

* during Lightning's ``fit`` the current training step finishes, then :class:`StopAtStepEnd` raises
  :class:`StopRequested` (Lightning's own SIGTERM handling would raise its ``SIGTERMException`` there, which
  exits 0; :func:`stop_from` turns it into ours);
* elsewhere (task-end work, evaluation) :class:`StopRequested` is raised at once, unless the code is inside
  :func:`deferred` (writing results, checkpoints, closing W&B), in which case it is raised at the next
  :func:`check`;
* once the last task's results are in (complete results, no checkpoint left to resume from), the run
  finishes its last writes (``final_model.pt``, W&B, the lock) and ends normally: stopping there would only
  lose the model file, and a requeued job would find a complete run it cannot resume.

:class:`StopRequested` is a ``SystemExit`` with code ``128 + signal number`` (143 for SIGTERM): no
``except Exception`` swallows it, the runner's ``finally`` writes the results, the lock is released and W&B
is closed, and the process exits non-zero. The run resumes from its last checkpoint (the last finished task)
when the same command runs again. When :func:`handling` ends after a stop, the handler that was installed
before (submitit's: checkpoint and requeue the job) is called, so a requeued job continues the run.

DataLoader worker processes inherit the handler through ``fork``; in them it does nothing (the main process
stops them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger(__name__)


def stop_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM, SIGUSR1, SIGUSR2 and submitit's preemption signal if it is another one."""
    signals = [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]
    preempt = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    if isinstance(preempt, signal.Signals) and preempt not in signals:
        signals.append(preempt)
    return tuple(signals)


class StopRequested(SystemExit):
    """A stop signal arrived: exit with ``128 + signum`` after writing what is finished."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class _State:
    def __init__(self) -> None:
        self.received: int | None = None
        self.deferring = 0
        self.owner_pid = 0


_state = _State()


def _handler(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _state.owner_pid:  # a forked DataLoader worker: the main process stops it
        return
    first = _state.received is None
    if first:
        _state.received = signum
        log.warning(
            "received %s: stopping after the current step; finished tasks' results and checkpoint are kept",
            signal.Signals(signum).name,
        )
    if first and not _state.deferring:
        raise StopRequested(signum)


def requested() -> int | None:
    """The signal number of a requested stop, or ``None``."""
    return _state.received


def check() -> None:
    """Raise :class:`StopRequested` if a stop was requested (call it where stopping is safe)."""
    if _state.received is not None and not _state.deferring:
        raise StopRequested(_state.received)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block that a stop signal must not interrupt (writing files, closing W&B): the stop waits for
    the next :func:`check`."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1


def stop_from(exc: BaseException) -> StopRequested | None:
    """``exc`` as a :class:`StopRequested` if it stands for a stop signal (ours, or Lightning's
    ``SIGTERMException`` after SIGTERM), else ``None``."""
    if isinstance(exc, StopRequested):
        return exc
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    if isinstance(exc, SIGTERMException):
        return StopRequested(_state.received or signal.SIGTERM)
    return None


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Install the stop handlers for the block (main thread only; elsewhere a no-op).

    A stop leaves the block as :class:`StopRequested` (Lightning's ``SIGTERMException`` is converted); the
    previous handlers are restored and the previous handler of the received signal is called if it is a
    Python function (submitit's checkpoint-and-requeue), so a requeued job continues the run.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.received, _state.deferring, _state.owner_pid = None, 0, os.getpid()
    previous = {int(s): signal.signal(s, _handler) for s in stop_signals()}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _state.received, _state.deferring, _state.owner_pid = None, 0, 0

    try:
        yield
    except BaseException as exc:
        stop = stop_from(exc)
        restore()
        if stop is None:
            raise
        chained = previous.get(stop.signum)
        if callable(chained):
            chained(stop.signum, None)
        if stop is exc:
            raise
        raise stop from exc
    if _state.received is not None:  # it came while the finished run wrote its last files
        log.warning("%s came after the run completed: it ends normally", signal.Signals(_state.received).name)
    restore()


class StopAtStepEnd(pl.Callback):
    """Lightning callback: while ``fit`` runs a stop waits for the end of the current training step."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _state.deferring += 1
        self._active = True

    def _leave(self) -> None:
        if getattr(self, "_active", False):
            _state.deferring -= 1
            self._active = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if _state.received is not None:
            self._leave()
            raise StopRequested(_state.received)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._leave()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._leave()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._leave()
