"""The project's typed errors.

Every error a user can cause is one of these. The CLI turns them into a single line on stderr (no traceback
unless ``--debug``) and the exit code given by ``exit_code`` (design.md section 3: 1 runtime failure, 2 usage).
Messages name the file or thing at fault first, then the cause: ``clip.mp4: no video stream``.

The network (``model/``) stands alone and raises Python's own exceptions instead (``ValueError`` for inputs it
refuses, ``model.ops.build.KernelError`` for a forced kernel that cannot run); the CLI maps them to these lines.
"""

from __future__ import annotations

from os import PathLike

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3  # a batch finished, but some inputs failed


class Av2tsError(Exception):
    """Base class: a failure the user can act on, reported in one line."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line

    @property
    def message(self) -> str:
        return self.args[0]


class _PathError(Av2tsError):
    def __init__(self, path: str | PathLike, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")


class MediaError(_PathError):
    """A video or audio file that ffmpeg cannot probe, decode or write."""


class DataError(_PathError):
    """A dataset file or folder that is missing, unreadable or malformed."""


class CheckpointError(_PathError):
    """A checkpoint, converter input or hub file that cannot be resolved or loaded."""


class UsageError(Av2tsError):
    """Options that contradict each other or name something that does not exist."""

    exit_code = EXIT_USAGE
