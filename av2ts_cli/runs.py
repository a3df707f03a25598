"""What ``train``, ``eval``, ``predict`` and ``maskiges`` share about their run folders: numbered run folders
(``runs/<command>/exp``, ``exp2``, ...), the names of the files a video's folder holds, its summary, and the folder
name each input gets. (JSON is written atomically by ``files.write_json``; the device and precision choices are
``processes.py``'s.)"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

# the files of a video's output folder (predict) and of a run folder
SUMMARY_FILE = "summary.json"  # written last: its presence marks the video done
FRAMES_FILE = "frames.jsonl"  # one line per mask: time, sounding area, classes (render reads the times back)
COCO_FILE = "masks.coco.json"
MASKS_DIR = "masks"
DEFAULT_OVERLAY = "overlay.mp4"
FAILURES_FILE = "failures.json"  # in the run folder: the inputs of a batch that failed
FORMATS = ("png", "json", "rle")  # predict --format: masks/*.png, frames.jsonl, masks.coco.json


def numbered_run_folder(base: str | os.PathLike, name: str = "exp") -> Path:
    """A new folder ``base/name``, ``base/name2``, ... (the first that does not exist), created."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    index = 1
    while True:
        folder = base / (name if index == 1 else f"{name}{index}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            index += 1


def input_identity(video: Path) -> dict:
    """What identifies an input file: where it is, its size and modification time."""
    stat = video.stat()
    return {"input": str(video.resolve()), "input_bytes": stat.st_size, "input_mtime_ns": stat.st_mtime_ns}


def read_summary(folder: Path) -> dict | None:
    """The ``summary.json`` of a video's folder, None when there is none or it cannot be read."""
    try:
        return json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def folder_names(videos: Sequence[Path], run_dir: Path) -> list[str]:
    """One output folder name per video: its stem, then stem-2, stem-3, ... when the stem is already used in this
    run or a folder of that name holds another input's outputs."""
    names, used = [], set()
    for video in videos:
        stem = video.stem or video.name
        candidate, number = stem, 2
        while True:
            summary = read_summary(run_dir / candidate)
            other = summary is not None and summary.get("input") != str(video.resolve())
            if candidate not in used and not other:
                break
            candidate, number = f"{stem}-{number}", number + 1
        used.add(candidate)
        names.append(candidate)
    return names
