"""Stopping on a signal the way a scheduler and a terminal expect, for every command.

SIGINT raises ``KeyboardInterrupt`` (Python's default). :func:`stop_on_sigterm` makes SIGTERM (what SLURM,
``scancel`` and the DeepSpeed launcher send first) raise :class:`Stopped` the same way, so the same
``finally`` blocks clean up and the command prints one line and exits 128 + the signal's number. Training
needs more than an exception at any point: :class:`StopRequest` notes the signal and lets the trainer
stop every rank after the same step. No torch here: `brats-gan preprocess` uses it too.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


class Stopped(KeyboardInterrupt):
    """A stop asked for by a signal; ``exit_status`` is the one a shell reports for it (128 + signal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_status = 128 + signum


def _raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises :class:`Stopped` in the main thread while inside (elsewhere it does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopRequest:
    """SIGINT, SIGTERM (a scheduler's or the launcher's stop) or SIGUSR1 (SLURM's ``--signal``), noted, not
    raised: the trainer reads :attr:`signum` at each step boundary and shares it in the step's all-reduce, so
    every rank stops after the same step and leaves the process group cleanly (a rank stopped inside a
    collective leaves its peers failing there). Further signals are ignored (a scheduler signals every
    process of the job and the launcher signals its ranks again), except a second Ctrl-C a second or more
    after the first, which stops this process at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    INSIST_AFTER_S = 1.0

    def __init__(self) -> None:
        self.signum: int | None = None
        self._noted_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum, self._noted_at = signum, time.monotonic()
            log.info("%s received: stopping after this step", signal.Signals(signum).name)
        elif signum == signal.SIGINT and time.monotonic() - self._noted_at >= self.INSIST_AFTER_S:
            raise KeyboardInterrupt
