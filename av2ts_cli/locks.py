"""One run at a time per output, and the sweep of the temps a killed run left (``predict``, ``train``, ``maskiges``).

A lock is the file ``.av2ts.lock`` in the folder it guards (a video's output folder, a training run), held with
``fcntl.flock``: the kernel drops it when the process ends, SIGKILL included, so no lock outlives its run and none
needs breaking by hand. The file holds the holder's pid, for the message a second run gets:
``runs/train/exp: in use by av2ts pid 4242`` (``Busy``). A release unlinks the file while still holding it, so a
finished run leaves no lock file behind (and an empty folder can go); a run that opened the old file meanwhile
finds its name gone after locking it and tries again on the new one (the inode check in ``acquire``).

Temps: ``files`` writes every output under ``.<stem>.<8 hex>.partial<suffix>`` (folders ``.<name>.<8 hex>.partial``
and, while swapping, ``.<name>.<8 hex>.old``); a SIGKILL leaves them. ``sweep_temps`` removes them, and is called
only under the folder's lock: a live run's temps are in folders it holds locked, so a sweep never takes one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from av2ts_cli.errors import Av2tsError
from av2ts_cli.files import PARTIAL_MARK

LOCK_FILE = ".av2ts.lock"
_TEMP = re.compile(r"^\.+(?P<stem>.*?)\.[0-9a-f]{8}" + re.escape(PARTIAL_MARK))  # files.temp_name_for, nested too
_OLD = re.compile(r"^\..+\.[0-9a-f]{8}\.old$")  # files.swap_in_folder's old folder, kept until the swap is done


class Busy(Av2tsError):
    """The folder is locked by another av2ts process: ``PATH: in use by av2ts pid N``."""

    def __init__(self, path: str | os.PathLike, pid: int | None):
        self.path, self.pid = str(path), pid
        self.reason = f"in use by av2ts pid {pid if pid is not None else '(unknown)'}"
        super().__init__(f"{self.path}: {self.reason}")

    @classmethod
    def _state_from_message(cls, message: str) -> dict:
        path, _, rest = message.rpartition(": in use by av2ts pid ")
        return {"path": path, "pid": int(rest) if rest.isdigit() else None, "reason": f"in use by av2ts pid {rest}"}


class FolderLock:
    """A held lock on ``folder`` (``acquire``); ``created``: this run made the folder (so it may remove it empty)."""

    def __init__(self, folder: Path, fd: int, created: bool):
        self.folder, self.path, self.created = folder, folder / LOCK_FILE, created
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, remove_empty_folder: bool = False) -> None:
        """Unlink the lock file (still holding it: see the module docstring), then let go; with
        ``remove_empty_folder``, the folder goes too when nothing else is left in it."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if remove_empty_folder:
            with contextlib.suppress(OSError):  # not empty: kept
                self.folder.rmdir()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> int | None:
    """The pid written in a lock file (None while its holder has not written it yet)."""
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None


def acquire(folder: str | os.PathLike, *, wait: float = 0.0, label: str | os.PathLike | None = None) -> FolderLock:
    """Lock ``folder`` (made if missing) for this process. Busy (``label`` or the folder, and the holder's pid)
    when another process holds it after ``wait`` seconds (0: do not wait)."""
    folder = Path(folder)
    deadline = time.monotonic() + wait
    created = False
    while True:
        try:
            folder.mkdir(parents=True)
            created = True
        except FileExistsError:
            pass
        try:
            fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the holder removed the folder as it finished: make it again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
            pid = _holder(fd)
            os.close(fd)
            if time.monotonic() >= deadline:
                raise Busy(label if label is not None else folder, pid) from None
            time.sleep(0.05)
            continue
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(folder / LOCK_FILE)
            mine = os.fstat(fd)
            same = (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino)
        except FileNotFoundError:
            same = False
        if not same:  # locked a file its holder unlinked as it let go: lock the one there now
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return FolderLock(folder, fd, created)


@contextlib.contextmanager
def held(folder: str | os.PathLike, *, wait: float = 0.0, label: str | os.PathLike | None = None,
         remove_empty_folder: bool = False) -> Iterator[FolderLock]:
    """``acquire`` for a block; the lock is released when it ends (the folder removed if empty and asked)."""
    lock = acquire(folder, wait=wait, label=label)
    try:
        yield lock
    finally:
        lock.release(remove_empty_folder=remove_empty_folder)


def is_temp(name: str, stem: str | None = None) -> bool:
    """Whether ``name`` is a temp of ``files`` (``stem``: only the temps of the file with that stem)."""
    match = _TEMP.match(name)
    if match is not None:
        return stem is None or match.group("stem") == stem
    return stem is None and _OLD.match(name) is not None


def sweep_temps(folder: str | os.PathLike, *, recursive: bool = True, stem: str | None = None,
                folders: bool = True) -> list[Path]:
    """Remove the temps a killed run left in ``folder`` (and its subfolders with ``recursive``; ``stem``: only
    those of the file with that stem, in a folder shared with other outputs; ``folders=False``: files only).
    Call it holding ``folder``'s lock. Returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        is_dir = entry.is_dir(follow_symlinks=False)
        if is_temp(entry.name, stem) and (folders or not is_dir):
            if is_dir:
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            removed.append(Path(entry.path))
        elif is_dir and recursive:
            removed += sweep_temps(entry.path, recursive=True, stem=stem, folders=folders)
    return removed
