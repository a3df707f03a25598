"""The videos a command's sources name (files, folders, glob patterns): ``predict`` and ``maskiges`` collect them
here, before any model loads, so "no such file" costs no torch import (stdlib only: `av2ts predict missing.mp4`
answers in the CLI's own start-up time)."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from av2ts_cli.errors import UsageError

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".flv", ".wmv", ".ts",
                            ".mts", ".m2ts", ".3gp", ".ogv", ".gif"})


def collect_videos(sources: Sequence[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """The videos named by ``sources``: files as given (whatever their suffix), folders' entries with a video
    suffix (subfolders with ``recursive``; an entry that is not a readable file is kept, so it gets reported),
    and glob patterns. Duplicates are dropped, order kept. UsageError for a source that names nothing."""
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            entries = sorted(path.rglob("*") if recursive else path.iterdir())
            videos = [p for p in entries if p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith(".")
                      and not (recursive and p.is_dir())]
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
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique
