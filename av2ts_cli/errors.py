"""The project's typed errors, and the words for the operating system's.

Every error a user can cause is one of these. The CLI turns them into a single line on stderr (no traceback
unless ``--debug``) and the exit code given by ``exit_code`` (docs/architecture.md, 'Errors and exit codes': 1 runtime
failure, 2 usage).
Messages name the file or thing at fault first, then the cause: ``clip.mp4: no video stream``.

The network (``model/``) stands alone and raises Python's own exceptions instead (``ValueError`` for inputs it
refuses, ``model.ops.build.KernelError`` for a forced kernel that cannot run); the CLI maps them to these lines.
``describe`` gives the one line of any error a user can act on: these, ``OSError`` (the path and the problem in
words, never ``[Errno 28]``) and ``MemoryError``.

Every class here, and every subclass elsewhere, crosses process and thread boundaries intact: it pickles (torchrun,
multiprocessing) by its state, whatever its constructor takes, and torch's DataLoader, which re-raises a worker's
exception as ``type(message=<the worker's traceback text>)``, gets the same class with the same one-line message.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3  # a batch finished, but some inputs failed


def _rebuild(cls: type, args: tuple, state: dict) -> BaseException:
    """An instance of ``cls`` with these ``args`` and attributes, its constructor not called (its signature is
    the subclass's own: (path, reason), (signum, iteration, run), ...)."""
    err = cls.__new__(cls, *args)
    err.args = args
    err.__dict__.update(state)
    return err


def _worker_message(cls: type, text: str) -> str | None:
    """The original one-line message in torch's re-raise text of a DataLoader worker's exception ("Caught X in
    DataLoader worker process N.\\nOriginal Traceback ...\\n<module>.<X>: <message>\\n"), else None."""
    if not text.startswith(f"Caught {cls.__name__} ") or "\nOriginal Traceback" not in text:
        return None
    prefix = f"{cls.__module__}.{cls.__qualname__}: "
    for line in reversed(text.splitlines()):  # the last exception printed is the one raised (notes come after)
        if line.startswith(prefix):
            return line[len(prefix):]
    return None


class _Reraisable(type):
    """The metaclass of ``Av2tsError``: a call with torch's DataLoader re-raise text (``message=text``, or the text
    as the only argument) rebuilds the worker's error from it instead of calling the constructor, which takes
    other arguments (measured before this: every DataError of a worker became ``TypeError: _PathError.__init__()
    got an unexpected keyword argument 'message'``)."""

    def __call__(cls, *args, **kwargs):
        text = kwargs.get("message") if not args and set(kwargs) == {"message"} else (
            args[0] if len(args) == 1 and not kwargs else None)
        if isinstance(text, str):
            message = _worker_message(cls, text)
            if message is not None:
                err = _rebuild(cls, (message,), cls._state_from_message(message))
                if hasattr(err, "add_note"):  # Python 3.11+: --debug shows where in the worker it was raised
                    err.add_note(text)
                return err
        return super().__call__(*args, **kwargs)


class Av2tsError(Exception, metaclass=_Reraisable):
    """Base class: a failure the user can act on, reported in one line."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line

    @property
    def message(self) -> str:
        return self.args[0]

    def __reduce__(self):
        # Exception's own reduce calls cls(*args): ("path: reason",) does not fit (path, reason)
        return _rebuild, (type(self), self.args, dict(self.__dict__))

    @classmethod
    def _state_from_message(cls, message: str) -> dict:
        """The attributes of an instance rebuilt from its message alone (a DataLoader worker's error)."""
        return {}


class _PathError(Av2tsError):
    def __init__(self, path: str | PathLike, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")

    @classmethod
    def _state_from_message(cls, message: str) -> dict:
        path, _, reason = message.partition(": ")  # the message is exact; a path holding ": " splits early
        return {"path": path, "reason": reason}


class MediaError(_PathError):
    """A video or audio file that ffmpeg cannot probe, decode or write."""


class DataError(_PathError):
    """A dataset file or folder that is missing, unreadable or malformed."""


class CheckpointError(_PathError):
    """A checkpoint, converter input or hub file that cannot be resolved or loaded."""


class UsageError(Av2tsError):
    """Options that contradict each other or name something that does not exist."""

    exit_code = EXIT_USAGE


# ------------------------------------------------------------------------------------ the system's errors in words
_ERRNO_WORDS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "already exists",
    errno.ENOTEMPTY: "folder not empty",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files on this system",
    errno.EIO: "input/output error (a failing disk or a lost network mount)",
    errno.EXDEV: "cannot be moved to another file system",
    errno.EBUSY: "in use by another process",
    errno.ETXTBSY: "in use by another process",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EFBIG: "file too large for its file system",
    errno.ENOMEM: "out of memory",
}


def _labelled(path: str, options: Mapping[str, object] | None) -> str:
    """``path``, or ``--out path`` when an option's value is that path."""
    for flag, value in (options or {}).items():
        if isinstance(value, (str, PathLike)) and str(value) and _same_path(value, path):
            return f"{flag} {path}"
    return path


def _same_path(a: str | PathLike, b: str | PathLike) -> bool:
    return os.path.abspath(os.fspath(a)) == os.path.abspath(os.fspath(b))


def _file_in_the_way(path: str) -> str | None:
    """The deepest existing ancestor of ``path`` (or ``path`` itself) that is not a folder, or None."""
    current = Path(path)
    for candidate in (current, *current.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else str(candidate)
    return None


def describe_os_error(err: OSError, path: str | PathLike | None = None, *,
                      options: Mapping[str, object] | None = None) -> str:
    """One line for an OSError: the path (``path``, else the error's file name) and the problem in words, never
    Python's ``[Errno N]`` text: ``out/x/masks/000001.png: no space left on device``; a file where a folder is
    expected: ``--out existing.txt is a file, not a folder``. ``options``: flag -> value of the command's options
    (a path that is an option's value is named with its flag)."""
    target = os.fspath(path) if path is not None else (os.fspath(err.filename) if err.filename is not None else None)
    code = err.errno
    if target is not None and code in (errno.ENOTDIR, errno.EEXIST):
        blocker = _file_in_the_way(target)
        if blocker is not None:
            return f"{_labelled(blocker, options)} is a file, not a folder"
    if target is not None and code == errno.EISDIR:
        return f"{_labelled(target, options)} is a folder, not a file"
    if code == errno.ENOTDIR:
        words = "a part of the path is a file, not a folder"
    elif code in _ERRNO_WORDS:
        words = _ERRNO_WORDS[code]
    elif err.strerror:
        words = err.strerror[:1].lower() + err.strerror[1:]
    else:  # an OSError a library raised with a message of its own and no errno
        text = " ".join(str(err).split())
        words = text.split("] ", 1)[1] if text.startswith("[Errno") and "] " in text else (text or "system error")
    return f"{_labelled(target, options)}: {words}" if target is not None else words


def describe_memory_error(options: Mapping[str, object] | None = None, device: str = "memory") -> str:
    """One line for running out of ``device`` ("memory", "GPU memory"), with the command's options that lower
    the need (``--batch``, ``--window``, ``--size``) when it has them."""
    levers = [flag for flag in ("--batch", "--window", "--size") if flag in (options or {})]
    hint = f": a smaller {' or '.join(levers)} needs less" if levers else ""
    return f"out of {device}{hint}"


def describe(err: BaseException, *, options: Mapping[str, object] | None = None) -> str | None:
    """The one line of an error the user can act on (a project error, an OSError, running out of memory), or
    None for anything else (a bug: the caller says so)."""
    if isinstance(err, Av2tsError):
        return err.message
    if isinstance(err, OSError):
        return describe_os_error(err, options=options)
    if isinstance(err, MemoryError):
        return describe_memory_error(options)
    if type(err).__name__ == "OutOfMemoryError" and type(err).__module__.startswith("torch"):
        return describe_memory_error(options, "GPU memory")
    return None
