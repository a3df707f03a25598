"""A batch of videos, each into its own folder under that folder's lock: ``predict`` and ``maskiges`` on videos.

``VideoBatch.do(video, folder, work)`` locks the folder (``locks``), sweeps what a killed run left there, runs
``work(video, folder)`` and releases the lock (the folder goes when it is left empty). A folder another run holds
is left to it: one line ``x.mp4: in use by av2ts pid N``, recorded under ``busy``, not a failure. A failure of one
video (an av2ts error or an OSError) is one line ``failed: <reason>``, recorded under ``failures`` and the batch
goes on; with ``collects=False`` (a single video) it propagates instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from av2ts_cli import locks
from av2ts_cli.console import failed, info, show_traceback
from av2ts_cli.errors import Av2tsError, describe_os_error

Result = TypeVar("Result")


def failure_reason(err: Av2tsError | OSError, video: Path) -> str:
    """The one line that says why ``video`` failed (an OSError without a file name is blamed on the video)."""
    if isinstance(err, Av2tsError):
        return err.message
    return describe_os_error(err, None if err.filename else video)


class VideoBatch:
    """What a batch did besides its results: ``failures`` ({"input", "error"}) and ``busy`` ({"input", "pid"})."""

    def __init__(self, collects: bool = True):
        self.collects = collects
        self.failures: list[dict] = []
        self.busy: list[dict] = []

    def do(self, video: Path, folder: Path, work: Callable[[Path, Path], Result]) -> Result | None:
        """``work(video, folder)`` under ``folder``'s lock, its temps swept first; None when the folder was busy or
        the video failed (recorded and said)."""
        try:
            lock = locks.acquire(folder, label=video)
        except locks.Busy as busy:
            self.busy.append({"input": str(video), "pid": busy.pid})
            info(busy.message)
            return None
        try:
            locks.sweep_temps(folder)  # under the lock: never a live run's temp
            return work(video, folder)
        except (Av2tsError, OSError) as err:
            if not self.collects:
                raise
            show_traceback(err)  # --debug: the traceback of a failure the batch goes on from
            reason = failure_reason(err, video)
            self.failures.append({"input": str(video), "error": reason})
            failed(reason)
            return None
        finally:
            lock.release(remove_empty_folder=True)  # a video that failed before its first output: no folder
