"""SIGINT and SIGTERM for the commands that stop at once and clean up (``predict``, ``maskiges`` of videos).

Inside ``stop_on_signals`` both signals raise ``Stop`` in the main thread, wherever it is: a ``KeyboardInterrupt``
(so every ``finally`` and every ``except BaseException`` that removes a temp or kills an ffmpeg runs, as for
Ctrl-C), carrying the signal. The command catches it, says what was left unfinished and raises ``Interrupted``:
one line, exit code 128 + the signal (130 for SIGINT, 143 for SIGTERM, as a shell reports a process the signal
killed). Signals that come while the first one is being cleaned up are ignored, so the cleanup finishes.
(``train`` is different: it finishes the iteration and saves ``last/``, ``training.trainer.StopSignals``.)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from av2ts_cli.errors import Av2tsError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stop(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (``signum``)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class Interrupted(Av2tsError):
    """A command stopped by a signal, after cleaning up: its message says what was left unfinished."""

    def __init__(self, signum: int, unfinished: str):
        self.exit_code = 128 + signum
        super().__init__(f"{signal.Signals(signum).name}: {unfinished}")


def signum_of(err: KeyboardInterrupt) -> int:
    """The signal behind a KeyboardInterrupt (a ``Stop``'s, else SIGINT: Python's own Ctrl-C)."""
    return err.signum if isinstance(err, Stop) else signal.SIGINT


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Stop`` in the block (the main thread only: elsewhere signal handlers cannot be
    set, and the block runs unchanged); the previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = []

    def handle(signum, _frame):
        if raised:  # cleaning up after the first one: let it finish
            return
        raised.append(signum)
        raise Stop(signum)

    previous = {signum: signal.signal(signum, handle) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
