"""The videos a command's sources name (files, folders, glob patterns): ``predict`` and ``maskiges`` collect them
here, before any model loads, so "no such file" costs no torch import (stdlib only: `av2ts predict missing.mp4`
answers in the CLI's own start-up time)."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from av2ts_cli.errors import DataError, UsageError, describe_os_error
from av2ts_cli.runs import owned_files

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".flv", ".wmv", ".ts",
                            ".mts", ".m2ts", ".3gp", ".ogv", ".gif"})


def collect_videos(sources: Sequence[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """The videos named by ``sources``: files as given (whatever their suffix), folders' entries with a video
    suffix (subfolders with ``recursive``; an entry that is not a readable file is kept, so it gets reported),
    and glob patterns. Duplicates are dropped, order kept. UsageError for a source that names nothing;
    DataError for a subfolder that cannot be listed (a run must not skip part of its input unsaid)."""
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            entries = sorted(_walk(path) if recursive else path.iterdir())
            videos = [p for p in entries if p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith(".")
                      and not (recursive and p.is_dir()) and not _written_by_av2ts(p)]
            if not videos:
                hint = "" if recursive else " (--recursive searches subfolders)"
                raise UsageError(f"{path}: no videos in this folder{hint}")
            found += videos
        elif path.exists() or path.is_symlink():
            found.append(path)
        elif glob.has_magic(str(source)):
            matches = sorted(Path(p) for p in glob.glob(str(source), recursive=recursive))
            matches = [p for p in matches if not p.is_dir() or p.suffix.lower() in VIDEO_SUFFIXES]
            if not matches:
                raise UsageError(f"{source}: the pattern matches no files")
            found += matches
        else:
            raise UsageError(f"{source}: no such file or folder")
    unique, seen = [], set()
    for path in found:
        key = os.path.realpath(path)  # a symlink to a file already in the batch is the same input
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _written_by_av2ts(path: Path) -> bool:
    """Whether ``path`` is an output of av2ts (its folder's record lists it: an overlay), which a folder source
    does not take as an input (``predict DIR -r`` into DIR/runs would otherwise segment its own overlays)."""
    owned = owned_files(path.parent)
    return owned is not None and path.name in owned


def _walk(folder: Path) -> list[Path]:
    """Every entry under ``folder`` (files, and folders, not followed through symlinks, as ``Path.rglob``), but a
    subfolder that cannot be listed is an error, not skipped: ``rglob`` passes over it in silence."""
    found: list[Path] = []

    def refuse(err: OSError) -> None:
        raise DataError(err.filename or folder, f"cannot list this folder under --recursive: "
                        f"{describe_os_error(err, err.filename or folder).partition(': ')[2]}")

    for top, dirs, names in os.walk(folder, onerror=refuse):
        found += [Path(top, name) for name in (*dirs, *names)]
    return found
