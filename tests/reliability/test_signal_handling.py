"""The stop-signal machinery in one process: immediate stop outside protected blocks, deferred inside, the
previous handler (submitit's requeue) called after a stop, handlers restored."""

from __future__ import annotations

import os
import signal

import pytest

from cl_bench import signals


def test_a_stop_signal_raises_at_once_with_exit_code_128_plus_signal() -> None:
    with pytest.raises(signals.StopRequested) as stop, signals.handling():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    assert stop.value.code == 143 and stop.value.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_deferred_block_finishes_and_the_stop_comes_at_the_next_check() -> None:
    done = []
    with pytest.raises(signals.StopRequested) as stop, signals.handling():
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
            done.append("write finished")
        assert signals.requested() == signal.SIGUSR1
        signals.check()
    assert done == ["write finished"] and stop.value.code == 128 + signal.SIGUSR1


def test_the_previous_handler_runs_after_a_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class Requeued(SystemExit):
        pass

    def requeue(signum, frame):  # what submitit's handler does: checkpoint, requeue, exit
        calls.append(signum)
        raise Requeued(144)

    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        with pytest.raises(Requeued), signals.handling():
            os.kill(os.getpid(), signal.SIGUSR2)
            for _ in range(1000):
                pass
        assert calls == [signal.SIGUSR2] and signal.getsignal(signal.SIGUSR2) is requeue
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_no_signal_no_stop_and_handlers_restored() -> None:
    before = {s: signal.getsignal(s) for s in signals.stop_signals()}
    with signals.handling():
        signals.check()
    assert {s: signal.getsignal(s) for s in signals.stop_signals()} == before
