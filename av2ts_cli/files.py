"""Atomic writes: the one way av2ts writes a file or a folder that someone may read while it is being written.

Every output (masks, JSON, checkpoints, caches, datasets) is first written under a temp name in the same folder
(``.<name>.<random>.partial<suffix>``: the same file system, so the final ``os.replace`` is atomic) and renamed
into place only when it is complete. A failure or an interrupt removes the temp; a reader sees the old file or the
whole new one, never half of one. ``PARTIAL_MARK`` is how a later run recognises temps that a SIGKILL left.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

PARTIAL_MARK = ".partial"


def temp_name_for(path: Path) -> Path:
    """A fresh temp path beside ``path`` (hidden, random, marked ``.partial``, same suffix for format guessing)."""
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}{PARTIAL_MARK}{path.suffix}")


def fsync_file(path: Path) -> None:
    """Flush ``path``'s bytes to the disk (before a rename that must survive a power cut)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temp path for the caller to write (by any means: PIL, ffmpeg, safetensors); on success it becomes
    ``path``, on any exception it is removed. ``durable`` fsyncs before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_name_for(path)
    try:
        yield temp
        if durable:
            fsync_file(temp)
        os.replace(temp, path)
    except OSError as err:
        # a full disk fails a buffered write with no file name: name the one meant (only for errno errors: a
        # message-only OSError, e.g. PIL's "cannot write mode RGBA as JPEG", would lose its text)
        if err.filename is None and err.errno is not None:
            err.filename = str(path)
        raise
    finally:
        temp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", durable: bool = False, **kwargs) -> Iterator[IO]:
    """``open`` for writing whose file appears at ``path`` only when the block ends without an exception."""
    if "w" not in mode:
        raise ValueError(f"atomic_open writes a new file; mode {mode!r} has no 'w'")
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path, durable=durable) as temp, open(temp, mode, **kwargs) as f:
        yield f


def write_text(path: str | os.PathLike, text: str, durable: bool = False) -> Path:
    with atomic_open(path, "w", durable=durable) as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes, durable: bool = False) -> Path:
    with atomic_open(path, "wb", durable=durable) as f:
        f.write(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj, durable: bool = False) -> Path:
    """JSON (indented, one trailing newline) written atomically."""
    return write_text(path, json.dumps(obj, indent=2) + "\n", durable=durable)


def swap_in_folder(new: Path, folder: Path, carry_over_except: frozenset[str] | None = None) -> None:
    """Make the complete folder ``new`` become ``folder``.

    The old ``folder`` is renamed away first and deleted only after the swap, and put back if the swap fails, so
    ``folder`` is always the old or the new one. With ``carry_over_except``, the entries of the old folder whose
    names are not in it (files that are not part of what ``new`` replaces, e.g. a run's log beside its
    checkpoint) are copied into ``new`` first.
    """
    if not folder.exists():
        os.replace(new, folder)
        return
    if carry_over_except is not None:
        for extra in folder.iterdir():
            if extra.name in carry_over_except or (new / extra.name).exists():
                continue
            if extra.is_dir():
                shutil.copytree(extra, new / extra.name, symlinks=True)
            else:
                shutil.copy2(extra, new / extra.name, follow_symlinks=False)
    old = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.old")
    os.replace(folder, old)
    try:
        os.replace(new, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike, carry_over_except: frozenset[str] | None = None) -> Iterator[Path]:
    """Yield an empty temp folder beside ``folder``; when the block succeeds it is swapped in for ``folder``
    (``swap_in_folder``), when it fails it is removed and ``folder`` is untouched."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}{PARTIAL_MARK}")
    temp.mkdir()
    try:
        yield temp
        swap_in_folder(temp, folder, carry_over_except=carry_over_except)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
