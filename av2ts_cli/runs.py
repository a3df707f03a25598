"""What ``train``, ``eval``, ``predict`` and ``maskiges`` share about their run folders: numbered run folders
(``runs/<command>/exp``, ``exp2``, ...), the names of the files a video's folder holds, its summary, and the folder
name each input gets. (JSON is written atomically by ``files.write_json``; the device and precision choices are
``processes.py``'s.)"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from av2ts_cli.errors import UsageError
from av2ts_cli.files import write_json
from av2ts_cli.locks import LOCK_FILE, is_temp

# the files of a video's output folder (predict) and of a run folder
SUMMARY_FILE = "summary.json"  # written last: its presence marks the video done
FRAMES_FILE = "frames.jsonl"  # one line per mask: time, sounding area, classes (render reads the times back)
COCO_FILE = "masks.coco.json"
MASKS_DIR = "masks"
DEFAULT_OVERLAY = "overlay.mp4"
FAILURES_FILE = "failures.json"  # in the run folder: the inputs of a batch that failed
MASKIGES_RECORD = "maskiges.json"  # beside a video's maskiges: what made them, for which video and times
PREVIEW_FILE = "preview.jpg"  # a contact sheet of up to 16 sampled frames with their masks (plots.PreviewSheet)
FORMATS = ("png", "json", "rle", "preview")  # predict --format: masks/*.png, frames.jsonl, masks.coco.json, preview
LOG_FILE = "log.csv"  # a training run's log (training.log); its curves: RESULTS_FILE (plots.write_results)
RESULTS_FILE = "results.png"
METRICS_PICTURE = "metrics.png"  # beside an evaluation's metrics.json (plots.draw_metrics)


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
        stem = safe_folder_name(video.stem or video.name)
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


# ----------------------------------------------------------------------------------- what av2ts may touch
OWNED_FILE = ".av2ts-owned.json"  # in a folder av2ts made or was allowed into: the files it wrote there
# A folder name's bytes: NAME_MAX (255 on Linux file systems) less what files.py adds around a name for its temps
# (".<name>.<8 hex>.partial" or ".old": 18 bytes), less room for "-<number>" when two inputs share a stem.
NAME_LIMIT_BYTES = 200
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\\ud800-\udfff]")  # surrogates: bytes of a name that is no UTF-8


def safe_folder_name(stem: str) -> str:
    """A folder name made from an input's stem that stays inside the folder it is made in: control characters,
    separators and the undecodable bytes of a name that is not UTF-8 become "_", a leading dot (hidden, ".",
    "..") becomes "_", an empty name becomes "video", and a name too long for the file system with av2ts's temp
    suffixes is cut (at a character boundary) and tagged with a hash of the whole stem, so two long names stay
    apart."""
    name = _UNSAFE.sub("_", stem)
    if name.startswith("."):
        name = "_" + name[1:]
    name = name or "video"
    if name.strip(". ") == "":  # "_." and the like: nothing left that names anything
        name = "video"
    if len(name.encode("utf-8")) > NAME_LIMIT_BYTES:
        tag = hashlib.sha256(stem.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        cut = name.encode("utf-8")[:NAME_LIMIT_BYTES - 9].decode("utf-8", "ignore")
        name = f"{cut}-{tag}"
    return name


def owned_files(folder: Path) -> list[str] | None:
    """The files (relative paths) av2ts wrote in ``folder``, None when av2ts did not make the folder nor was
    allowed into it. A folder an older av2ts made (a summary with its version, no record) is recognised by its
    summary: its files, its overlay and its numbered masks."""
    try:
        record = json.loads((folder / OWNED_FILE).read_text(encoding="utf-8"))
        return [str(name) for name in record.get("files", [])]
    except (OSError, ValueError, AttributeError):
        pass
    numbered = sorted(p.name for p in folder.glob("[0-9]" * 6 + ".png"))
    try:  # maskiges an older av2ts made
        if str(json.loads((folder / MASKIGES_RECORD).read_text(encoding="utf-8")).get("made_by", "")).startswith(
                "av2ts"):
            return [MASKIGES_RECORD, *numbered]
    except (OSError, ValueError, AttributeError):
        pass
    summary = read_summary(folder)
    if not isinstance(summary, dict) or "av2ts_version" not in summary:
        return None
    names = [SUMMARY_FILE, *summary.get("files", [])]
    if summary.get("overlay") and Path(summary["overlay"]).parent == folder:
        names.append(Path(summary["overlay"]).name)
    names += [f"{MASKS_DIR}/{p.name}" for p in sorted((folder / MASKS_DIR).glob("[0-9]" * 6 + ".png"))]
    return names


def foreign_entries(folder: Path) -> list[str]:
    """The entries of ``folder`` besides av2ts's lock and temps."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.name != LOCK_FILE and not is_temp(e.name))
    except FileNotFoundError:
        return []


_FORCE_HINT = "pass --force to write into it (av2ts replaces only the files it writes)"


def claim_folder(folder: Path, force: bool = False, hint: str = _FORCE_HINT) -> list[str]:
    """Make sure av2ts may write into ``folder`` (made if missing) and return the files it wrote there before: a
    folder it made (its record, or an older av2ts's summary), an empty one, or with ``force`` any folder (whose
    files av2ts then still never removes). Anything else is a UsageError naming the folder, with ``hint``."""
    folder.mkdir(parents=True, exist_ok=True)
    owned = owned_files(folder)
    if owned is None:
        foreign = foreign_entries(folder)
        if foreign and not force:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise UsageError(f"{folder}: a folder av2ts did not make (it holds {shown}); {hint}")
        owned = []
    record_owned(folder, owned)
    return owned


def record_owned(folder: Path, names: Iterable[str]) -> None:
    """Add ``names`` (relative paths) to the record of what av2ts wrote in ``folder``: before writing them, so
    that a run killed half-way leaves files the next run may remove."""
    current = owned_files(folder) or []
    merged = list(dict.fromkeys([*current, *names]))
    write_json(folder / OWNED_FILE, {"made_by": "av2ts", "files": merged})


def remove_owned(folder: Path, names: Iterable[str] | None = None) -> list[str]:
    """Remove the files of ``names`` (all of the record when None) that av2ts's record says it wrote in
    ``folder``; a name not in the record is left alone. The summary goes first (the folder stops counting as
    done at once); a record left empty is removed too. Returns what was removed."""
    owned = owned_files(folder) or []
    wanted = set(owned if names is None else names) & set(owned)
    order = sorted(wanted, key=lambda name: name != SUMMARY_FILE)
    removed = []
    for name in order:
        path = folder / name
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            path.unlink()
            removed.append(name)
    record = [name for name in owned if name not in wanted]
    if record:
        write_json(folder / OWNED_FILE, {"made_by": "av2ts", "files": record})
    else:  # nothing of av2ts's left: no record either, so a folder av2ts made and emptied can go
        (folder / OWNED_FILE).unlink(missing_ok=True)
    return removed
