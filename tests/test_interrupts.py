"""av2ts_cli/interrupts.py: the training stop flag (``StopSignals``), ``ignore_sigterm``, and the rule that only
interrupts.py sets signal handlers (``stop_on_signals`` is tested through predict, tests/test_predict.py)."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import av2ts_cli
from av2ts_cli.interrupts import StopSignals, ignore_sigterm

PACKAGE = Path(av2ts_cli.__file__).parent
# the one home of signal handlers, and the DataLoader workers' SIGINT (set in each worker process)
MAY_SET_HANDLERS = {"interrupts.py", "training/data_order.py"}


def test_stop_signals_set_a_flag_and_restore_the_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopSignals() as stop:
        assert stop.signum == 0
        os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, between two bytecodes
        assert stop.signum == signal.SIGTERM  # a flag only: the code goes on
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_second_sigint_interrupts_at_once():
    with pytest.raises(KeyboardInterrupt), StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the second SIGINT did not interrupt")


def test_stop_signals_leave_the_handlers_alone_outside_the_main_thread():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def enter():
        with StopSignals() as stop:
            seen.append((stop.signum, signal.getsignal(signal.SIGTERM)))
        ignore_sigterm()  # nothing either
        seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == [(0, before), before]


def test_after_ignore_sigterm_a_sigterm_changes_nothing():
    code = ("import os, signal, sys; from av2ts_cli.interrupts import ignore_sigterm; ignore_sigterm(); "
            "os.kill(os.getpid(), signal.SIGTERM); print('still here'); sys.exit(3)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (3, "still here\n"), done.stderr


def _sets_a_handler(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "signal" and any(
                alias.name == "signal" for alias in node.names):
            return True
        if isinstance(node, ast.Attribute) and node.attr == "signal" and isinstance(node.value, ast.Name) \
                and node.value.id == "signal":
            return True  # signal.signal, called or passed on
    return False


def test_only_interrupts_sets_signal_handlers():
    setters = {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
               if _sets_a_handler(ast.parse(path.read_text(), str(path)))}
    assert setters == MAY_SET_HANDLERS


def test_ignore_sigterm_inside_a_block_outlasts_the_block():
    """torchrun predict: each rank ignores SIGTERM once the reports are combined, inside predict's
    ``stop_on_signals``; leaving the block must not bring SIGTERM's default back (rank 0 was killed, -15)."""
    code = ("import os, signal, sys; from av2ts_cli.interrupts import StopSignals, ignore_sigterm, stop_on_signals\n"
            "before = signal.getsignal(signal.SIGINT)\n"  # Python's, or SIG_IGN under a shell's background job
            "with stop_on_signals():\n    ignore_sigterm()\n"
            "assert signal.getsignal(signal.SIGINT) is before\n"
            "with StopSignals():\n    ignore_sigterm()\n"
            "os.kill(os.getpid(), signal.SIGTERM); print('still here'); sys.exit(3)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (3, "still here\n"), done.stderr
