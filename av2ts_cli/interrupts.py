"""SIGINT and SIGTERM: every signal handler av2ts sets is set here (the one exception: the training DataLoader's
workers ignore SIGINT, ``training.data_order``). Which command uses which:

- ``stop_on_signals`` (``predict``: stop at once and clean up). Inside it both signals raise ``Stop`` in the main
  thread, wherever it is: a ``KeyboardInterrupt`` (so every ``finally`` and every ``except BaseException`` that
  removes a temp or kills an ffmpeg runs, as for Ctrl-C), carrying the signal. The command catches it, says what was
  left unfinished and raises ``Interrupted``: one line, exit code 128 + the signal (130 for SIGINT, 143 for SIGTERM,
  as a shell reports a process the signal killed). Signals that come while the first one is being cleaned up are
  ignored, so the cleanup finishes.
- ``StopSignals`` (``train``: finish the iteration, save ``last/``, then stop). Both signals set a flag the training
  loop checks after each iteration; it then raises ``Interrupted``. A second SIGINT interrupts at once.
- ``ignore_sigterm`` (``processes.Processes.finish_together`` and ``stop``, in ``train``, ``eval`` and ``predict``
  under ``torchrun``): a rank whose work is combined ignores SIGTERM, so it finishes and exits with its own code;
  leaving a block above keeps it ignored.
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
    set, and the block runs unchanged); the previous handlers come back after it, except where the block set one
    itself (``ignore_sigterm``)."""
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
        _restore(previous, handle)


class StopSignals:
    """SIGINT/SIGTERM set ``signum``, which the loop checks after each iteration; a second SIGINT interrupts at once
    (``KeyboardInterrupt``). In the main thread only (elsewhere signal handlers cannot be set, and nothing changes);
    the previous handlers come back on exit, except where the block set one itself (``ignore_sigterm``)."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        _restore(self._previous, self._handle)


def _restore(previous: dict, ours) -> None:
    """Put back the handlers ``previous`` had, for each signal whose handler is still ``ours``: one the block set
    itself (``ignore_sigterm`` once a rank's work is combined) stays. Restoring SIGTERM's default there (the CLI's block
    around every command) let torchrun kill rank 0 (exitcode -15) while it exited after printing the combined
    report, when rank 1 had exited 3 first (seen twice in CI; reproduced with a sleep at rank 0's exit)."""
    for signum, handler in previous.items():
        if signal.getsignal(signum) == ours:
            signal.signal(signum, handler)


def ignore_sigterm() -> None:
    """Ignore SIGTERM from here on, for good (the main thread only: elsewhere signal handlers cannot be set)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
