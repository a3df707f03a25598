"""The one rich console and progress display of av2ts (stderr, so stdout stays clean for ``--json``).

The network (``model/``) cannot import this module (it stands alone: torch, timm, numpy, scipy, the standard
library and ``config``), so it reports through ``warnings`` and ``logging``; ``show_library_messages`` turns those
into this console's lines once the CLI runs a command.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, highlight=False)
# `av2ts --debug`: tracebacks are shown, also for the failures a batch records and goes on; "json_printed": this
# command's one JSON document is out (an error after it adds none: stdout holds one document)
state = {"debug": False, "json_printed": False}


def show_traceback(err: BaseException) -> None:
    """With ``--debug``, print ``err``'s traceback (for a failure that a batch records and goes on from; a
    failure that ends the command is re-raised by the CLI instead)."""
    if state["debug"]:
        import traceback  # local: only with --debug

        console.print("".join(traceback.format_exception(type(err), err, err.__traceback__)).rstrip(),
                      markup=False, highlight=False, soft_wrap=True)


def make_progress(transient: bool = False) -> Progress:
    """A Progress with av2ts's columns: "description  [bar]  k/K  elapsed  remaining"."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)} | {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``): a file name holding a newline or a
    terminal escape cannot forge a line of av2ts's output or take over the terminal."""
    return text.translate(_CONTROL)


def warn(message: str) -> None:
    """``warning: message``; the message is plain text (a file named ``[red]x.mp4`` prints as it is named)."""
    console.print(f"[yellow]warning:[/yellow] {escape(printable(message))}", soft_wrap=True)


def info(message: str) -> None:
    """A plain line on stderr (never read as markup, never wrapped: file names are long)."""
    console.print(printable(message), markup=False, soft_wrap=True)


def failed(reason: str) -> None:
    """``failed: reason``: one input of a batch that failed while the batch goes on."""
    console.print(f"[red]failed:[/red] {escape(printable(reason))}", soft_wrap=True)


def error_line(message: str) -> None:
    """``error: message``: the one line of a command that failed."""
    console.print(f"[red]error:[/red] {escape(printable(message))}", soft_wrap=True)


def print_json(obj) -> None:
    """THE ``--json`` output: one JSON document on stdout (everything else goes to stderr)."""
    import json  # local: only --json needs it
    import sys  # local: as above

    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    state["json_printed"] = True


_PACKAGE = str(Path(__file__).resolve().parent)  # a warning whose frame is in this folder is av2ts's own


def _is_ours(filename: str) -> bool:
    try:
        return str(Path(filename).resolve()).startswith(_PACKAGE)
    except (OSError, ValueError):
        return False


def show_library_messages() -> None:
    """Show av2ts's ``warnings`` as one ``warning: ...`` line each and the INFO and WARNING records of the
    ``av2ts_cli`` loggers as plain and ``warning:`` lines, on this console. Other packages' warnings keep Python's
    display. Safe to call again (nothing is installed twice)."""
    import logging  # local: 15 ms, a tenth of `av2ts --help`; needed only once a command runs

    class ConsoleHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                message = record.getMessage()
            except Exception:  # a bad format string in a log call: logging's own report, never a crash
                self.handleError(record)
                return
            if record.levelno >= logging.WARNING:
                warn(message)
            else:
                info(message)

    logger = logging.getLogger("av2ts_cli")
    if not any(type(h).__name__ == "ConsoleHandler" for h in logger.handlers):
        logger.addHandler(ConsoleHandler(logging.INFO))
        logger.setLevel(logging.INFO)
    if getattr(warnings.showwarning, "av2ts_display", False):
        return
    python_display = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if _is_ours(filename):
            warn(str(message))
        else:
            python_display(message, category, filename, lineno, file, line)

    showwarning.av2ts_display = True
    warnings.showwarning = showwarning
