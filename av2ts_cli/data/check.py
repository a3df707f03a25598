"""``av2ts data check``: counts per split and every missing, unreadable or mis-sized file of a dataset.

Every problem is listed in one run: each malformed line of the metadata CSV (too few columns, an empty name, a
split other than train/val/test, an unknown AVSS label set) is a problem naming its line, and the videos of the
well-formed lines are still checked. Only a CSV that cannot be read at all (missing, not text, empty) stops it.

Every frame, label and maskige named by the metadata is opened and its structure checked without decoding the
pixels (PIL ``verify``: PNG chunk CRCs, JPEG markers), every WAV header parsed (a file shorter than its header says
is reported). Sizes: the labels (and S4/MS3 maskiges) of a video must match its frames, the frames of a video must
agree, S4/MS3 frames must all have one size (a note when it is not the official 224 x 224), and so must AVSS
maskiges (COMBO's are 224 x 224). Maskiges are checked only
when the subset has a ``pre_SAM_mask`` folder; a WAV may be missing when its log-mel pickle is there (a note).

``layout`` "384" checks what a VCT model reads (``layout.form_384``: its 384 folders where they exist, the standard
files elsewhere): files in a 384 folder must share one size across the dataset (a note when it is not 384 x 384),
and evaluation labels, which VCT scores at their own size (224 x 224 for S4/MS3, the source size for AVSS), must
only agree within their video.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.table import Table

from av2ts_cli.avsbench import EXAMPLE_SECONDS, SAMPLE_RATE
from av2ts_cli.console import console
from av2ts_cli.data.audio import read_wav_info
from av2ts_cli.data.images import image_header
from av2ts_cli.data.layout import (
    AVSS_384,
    FORM_384,
    FORM_STANDARD,
    FORMS,
    FRAMES_384,
    MASKIGES_384,
    METADATA,
    SPLITS,
    Video,
    _avss_video,
    _columns,
    _ms3_video,
    _s4_video,
    form_384,
    maskige_root,
    read_rows,
    resolve_root,
)
from av2ts_cli.errors import DataError, UsageError

OBJECT_FRAME_SIZE = (224, 224)  # S4/MS3 frames as the official preprocessing saved them
AVSS_MASKIGE_SIZE = (224, 224)  # COMBO's maskiges are made on the 224 x 224 processed frames
VCT_SIZE = (384, 384)  # the files of VCT's 384 folders (frames, training labels, maskiges)
FOLDERS_384 = {FRAMES_384, MASKIGES_384, AVSS_384, "gt_masks_384"}


def check_dataset(data: str | os.PathLike, subset: str, workers: int = 8,
                  on_video: Callable[[], None] | None = None, layout: str = FORM_STANDARD) -> dict:
    """{"subset", "root", "layout", "splits": {split: {"videos", "frames", "masks", "wavs", "maskiges"}},
    "problems": [{"path", "problem"}], "notes": [{"path", "note"}], "frame_size": [h, w] of S4/MS3 frames,
    "maskige_size": [h, w] of AVSS maskiges, "size_384": [h, w] of the frames and maskiges in the 384 layout's
    folders}. ``layout``: a name of ``layout.FORMS``."""
    if layout not in FORMS:
        raise UsageError(f"--layout {layout}: choose from {', '.join(FORMS)}")
    root = resolve_root(data, subset)
    with_maskiges = any(maskige_root(root, subset, form).is_dir() for form in {FORM_STANDARD, layout})
    report = {"subset": subset, "root": str(root), "layout": layout, "splits": {}, "problems": [], "notes": [],
              "frame_size": None, "maskige_size": None, "size_384": None}
    per_split, csv_problems = _videos_per_split(root, subset)
    if layout == FORM_384:
        per_split = {split: [form_384(root, video) for video in videos] for split, videos in per_split.items()}
    report["problems"] += csv_problems
    csv_path = str(root / METADATA[subset])
    for split, videos in per_split.items():
        if not videos:
            report["notes"].append({"path": csv_path, "note": f"no videos in split {split!r}"})
    if not any(per_split.values()):
        report["problems"].append({"path": csv_path, "problem": "no videos in any split"})
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for split, videos in per_split.items():
            counts = {"videos": len(videos), "frames": 0, "masks": 0, "wavs": 0, "maskiges": 0}
            for video in videos:
                _check_video(video, with_maskiges, pool, counts, report, layout)
                if on_video is not None:
                    on_video()
            report["splits"][split] = counts
    report["problems"].sort(key=lambda p: p["path"])
    return report


def total_videos(data: str | os.PathLike, subset: str) -> int:
    """How many videos ``check_dataset`` will visit (for a progress bar): those of the well-formed CSV lines."""
    per_split, _ = _videos_per_split(resolve_root(data, subset), subset)
    return sum(len(videos) for videos in per_split.values())


def _numbered_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number in the file, cells stripped) of every non-empty row of a metadata CSV, the header first.
    ``layout.read_rows`` is called first for its one-line errors (missing, unreadable, empty CSV)."""
    read_rows(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        return [(reader.line_num, [cell.strip() for cell in row]) for row in reader if any(c.strip() for c in row)]


def _videos_per_split(root: Path, subset: str) -> tuple[dict[str, list[Video]], list[dict]]:
    """({split: its videos in CSV order, from the well-formed lines}, [a problem per malformed line]): the whole
    CSV is read, so that every bad line is listed at once (``layout.list_videos`` stops at the first)."""
    path = root / METADATA[subset]
    (_, header), *rows = _numbered_rows(path)
    name_at, split_at, group_at = _columns(path, header, [], subset)  # positions only; each row is checked below
    width = max(name_at, split_at, group_at or 0) + 1
    per_split: dict[str, list[Video]] = {split: [] for split in SPLITS}
    problems = []

    def bad(line: int, problem: str) -> None:
        problems.append({"path": str(path), "problem": f"line {line}: {problem}"})

    for line, row in rows:
        if len(row) < width:
            bad(line, f"{len(row)} columns, expected at least {width}")
            continue
        name, split = row[name_at], row[split_at]
        group = row[group_at] if group_at is not None else ""
        if not name:
            bad(line, "empty video name")
        elif split not in SPLITS:
            bad(line, f"unknown split {split!r} (expected {', '.join(SPLITS)})")
        elif subset == "s4":
            per_split[split].append(_s4_video(root, split, name, group))
        elif subset == "ms3":
            per_split[split].append(_ms3_video(root, split, name))
        else:
            try:
                per_split[split].append(_avss_video(root, split, name, group, "auto"))
            except DataError as err:  # an unknown label set
                bad(line, err.reason)
    return per_split, problems


def _in_384_folder(path: Path) -> bool:
    return not FOLDERS_384.isdisjoint(path.parts)


def _header(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """((height, width), None) or (None, problem)."""
    try:
        width, height = image_header(path)
        return (height, width), None
    except DataError as err:
        return None, err.reason


def _check_video(video: Video, with_maskiges: bool, pool: ThreadPoolExecutor, counts: dict, report: dict,
                 layout: str = FORM_STANDARD) -> None:
    def add(path, problem: str) -> None:
        report["problems"].append({"path": str(path), "problem": problem})

    def size_384(path: Path, size: tuple[int, int]) -> None:
        _dataset_wide_size(report, "size_384", "files of the 384 layout", size, path, VCT_SIZE, "VCT's")

    frames = list(pool.map(_header, video.frames))
    masks = {i: pool.submit(_header, path) for i, path in enumerate(video.masks) if path is not None}
    maskiges = list(pool.map(_header, video.maskiges)) if with_maskiges else []

    frame_size = None
    for path, (size, problem) in zip(video.frames, frames, strict=True):
        if problem:
            add(path, problem)
            continue
        counts["frames"] += 1
        if _in_384_folder(path):
            size_384(path, size)
        elif video.subset != "avss":
            _dataset_wide_size(report, "frame_size", "frames", size, path, OBJECT_FRAME_SIZE, "the official")
        elif frame_size is not None and size != frame_size:
            add(path, f"mis-sized: {_wh(size)}, the video's first frame is {_wh(frame_size)}")
        frame_size = frame_size or size

    own_size = layout == FORM_384 and video.split != "train"  # VCT scores evaluation labels at their own size
    label_size = None
    for i, future in masks.items():
        size, problem = future.result()
        path = video.masks[i]
        if problem:
            add(path, problem)
            continue
        counts["masks"] += 1
        if own_size:
            if label_size is not None and size != label_size:
                add(path, f"mis-sized: {_wh(size)}, the video's first label is {_wh(label_size)}")
            label_size = label_size or size
        elif frame_size is not None and size != frame_size:
            add(path, f"mis-sized: {_wh(size)}, its frame is {_wh(frame_size)}")

    for path, (size, problem) in zip(video.maskiges, maskiges, strict=False):
        if problem:
            add(path, problem)
            continue
        counts["maskiges"] += 1
        if _in_384_folder(path):
            size_384(path, size)
        elif video.subset == "avss" and path.parent.name != "frames":  # COMBO's, of the processed 224 px frames
            _dataset_wide_size(report, "maskige_size", "maskiges", size, path, AVSS_MASKIGE_SIZE, "COMBO's")
        elif frame_size is not None and size != frame_size:
            add(path, f"mis-sized: {_wh(size)}, its frame is {_wh(frame_size)}")

    try:
        info = read_wav_info(video.wav)
    except DataError as err:
        if not video.wav.exists():
            if video.log_mel.is_file():
                report["notes"].append({"path": str(video.wav), "note": "missing; its log-mel pickle is used"})
            else:
                add(video.wav, "missing audio file (no WAV, no log-mel pickle)")
        else:
            add(video.wav, err.reason)
        return
    counts["wavs"] += 1
    if info.sample_rate != SAMPLE_RATE:
        report["notes"].append({"path": str(video.wav),
                                "note": f"{info.sample_rate} Hz, resampled to {SAMPLE_RATE // 1000} kHz"})
    seconds = info.frames / info.sample_rate
    if seconds < EXAMPLE_SECONDS * video.num_frames:
        report["notes"].append({"path": str(video.wav), "note": f"{seconds:.2f} s of audio for {video.num_frames} "
                                                                 "frames: the last log-mel example is repeated"})


def _dataset_wide_size(report: dict, key: str, what: str, size: tuple[int, int], path: Path,
                       usual: tuple[int, int], whose: str) -> None:
    """Files that must share one size across the dataset: the first one seen sets it (a note when it is not the
    usual size), any other size is a problem."""
    if report[key] is None:
        report[key] = size
        if size != usual:
            report["notes"].append({"path": str(path), "note": f"{what} are {_wh(size)}, {whose} {_wh(usual)}"})
    if size != report[key]:
        report["problems"].append({"path": str(path), "problem": f"mis-sized: {_wh(size)}, the dataset's {what} "
                                                                 f"are {_wh(report[key])}"})


def _wh(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]}"


def print_report(report: dict, limit: int = 40) -> None:
    layout = " (VCT's 384 layout)" if report.get("layout") == FORM_384 else ""
    table = Table(title=f"{report['subset'].upper()} at {report['root']}{layout}", title_justify="left")
    for column in ("split", "videos", "frames", "masks", "wavs", "maskiges"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, counts in report["splits"].items():
        table.add_row(split, *(str(counts[k]) for k in ("videos", "frames", "masks", "wavs", "maskiges")))
    console.print(table)
    problems = report["problems"]
    if problems:
        listing = Table(title=f"{len(problems)} problem(s)", title_justify="left", title_style="red")
        listing.add_column("file", overflow="fold")
        listing.add_column("problem", overflow="fold")
        for item in problems[:limit]:
            listing.add_row(item["path"], item["problem"])
        if len(problems) > limit:
            listing.add_row(f"... and {len(problems) - limit} more (--json lists all)", "")
        console.print(listing)
    else:
        console.print("[green]no problems found[/green]")
    if report["notes"]:
        console.print(f"{len(report['notes'])} note(s), e.g. {report['notes'][0]['path']}: "
                      f"{report['notes'][0]['note']}")
