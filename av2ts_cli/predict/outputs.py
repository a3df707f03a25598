"""Where ``av2ts predict`` puts its outputs and how it writes them: the consumers of the mask stream.

``MaskOutputs`` takes the (sampled frame, mask) pairs of ``predict.stream_masks`` in presentation order and writes
each one as it comes: ``masks/NNNNNN.png``, a line of ``frames.jsonl``, the annotations of ``masks.coco.json``
(both files atomically: they appear complete or not at all) and the cells of ``preview.jpg`` (``plots.PreviewSheet``,
whose frames come from the decoder through ``keep_frame``); its ``track()`` is what the overlay paints. The rest
decides the folders: one per video, what counts as finished (``summary.json`` with the same settings and input),
where an overlay goes and when an existing file may be replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from av2ts_cli import __version__
from av2ts_cli.errors import UsageError
from av2ts_cli.files import atomic_open
from av2ts_cli.plots import PreviewSheet
from av2ts_cli.predict.masks import CocoWriter, FrameMask, class_records, write_mask_png
from av2ts_cli.render import MaskPainter, MaskTrack
from av2ts_cli.runs import (
    COCO_FILE,
    DEFAULT_OVERLAY,
    FRAMES_FILE,
    MASKS_DIR,
    PREVIEW_FILE,
    SUMMARY_FILE,
    input_identity,
    owned_files,
    read_summary,
    remove_owned,
)
from av2ts_cli.sampling import SampledFrame, Schedule
from av2ts_cli.sources import VIDEO_SUFFIXES


def mask_name(frame: SampledFrame) -> str:
    """The PNG of a sampled frame, relative to the video's folder."""
    return f"{MASKS_DIR}/{frame.index:06d}.png"


class MaskOutputs:
    """The per-frame writers of one video (``formats`` of ``FORMATS``): ``with MaskOutputs(...) as outputs:
    outputs.add(frame, mask)`` for every frame of ``schedule`` in index order. Leaving the block without an
    exception commits ``frames.jsonl`` and ``masks.coco.json``; an exception removes their temps (PNGs written so
    far stay: each is complete, and ``summary.json`` is absent, so the video does not count as done)."""

    def __init__(self, folder: Path, schedule: Schedule, class_names: Sequence[str], binary: bool,
                 display: tuple[int, int], formats: Sequence[str]):
        self.folder, self.schedule, self.class_names, self.binary = folder, schedule, list(class_names), binary
        self.display, self.formats = display, tuple(formats)
        self.sounding_frames = 0
        self._written: list[SampledFrame] = []
        self._stack = contextlib.ExitStack()  # the open files, replaced in __enter__
        self._lines = None
        self._coco: CocoWriter | None = None
        self.preview = None
        if "preview" in self.formats:  # the overlay's colours: the sheet looks like the overlay's frames
            colours = MaskPainter().colour_table("binary" if binary else "avss")
            self.preview = PreviewSheet(len(schedule.frames), display, colours, self.class_names, folder.name)

    def keep_frame(self, index: int, picture) -> None:
        """A decoded frame (uint8 [S, S, 3], the model's input) for the preview; called from the decoding thread
        (``stream.stream_masks``'s ``on_frame``)."""
        if self.preview is not None:
            self.preview.keep(index, picture)

    def __enter__(self) -> MaskOutputs:
        with contextlib.ExitStack() as stack:
            if "png" in self.formats:
                (self.folder / MASKS_DIR).mkdir(parents=True, exist_ok=True)
            if "json" in self.formats:
                self._lines = stack.enter_context(atomic_open(self.folder / FRAMES_FILE))
            if "rle" in self.formats:
                width, height = self.display
                images = [{"id": f.index, "file_name": mask_name(f), "width": width, "height": height,
                           "time": f.time} for f in self.schedule.frames]
                self._coco = stack.enter_context(CocoWriter(self.folder / COCO_FILE, self.class_names, images,
                                                            {"description": "av2ts predict", "version": __version__}))
            self._stack = stack.pop_all()  # opened: closed by __exit__
        return self

    def add(self, frame: SampledFrame, mask: FrameMask) -> None:
        """Write the outputs of one frame (``mask`` at display size), the next in index order."""
        expected = len(self._written)
        if frame.index != expected:
            raise ValueError(f"mask {frame.index} given where mask {expected} comes next")
        if "png" in self.formats:
            write_mask_png(self.folder / mask_name(frame), mask, self.binary)
        records = class_records(mask, self.class_names, rle=self._coco is not None)
        self.sounding_frames += bool(records)
        if self._lines is not None:
            audio = self.schedule.audio_interval(frame)
            line = {"index": frame.index, "time": frame.time, "second": frame.second, "pass": frame.shift,
                    "window": frame.second // self.schedule.window, "audio": [round(t, 4) for t in audio],
                    "sounding": bool(records), "sounding_area": round(sum(r["area"] for r in records), 6),
                    "classes": [{k: v for k, v in r.items() if k != "segmentation"} for r in records]}
            if "png" in self.formats:
                line["mask"] = mask_name(frame)
            self._lines.write(json.dumps(line) + "\n")
        if self._coco is not None:
            for record in records:
                self._coco.add(frame.index, record)
        if self.preview is not None:
            self.preview.add(frame.index, frame.time, mask.classes)
        self._written.append(frame)

    def __exit__(self, *exc) -> bool:
        if exc[0] is None:
            try:
                if len(self._written) != len(self.schedule.frames):
                    missing = len(self.schedule.frames) - len(self._written)
                    raise RuntimeError(f"{missing} of {len(self.schedule.frames)} masks were never given")
                if self.preview is not None:  # atomic, as the files the block commits
                    self.preview.write(self.folder / PREVIEW_FILE)
            except BaseException as error:
                self._stack.__exit__(type(error), error, None)
                raise
        return self._stack.__exit__(*exc)

    @property
    def files(self) -> list[str]:
        """The whole-video files written (the masks folder aside)."""
        return [name for fmt, name in (("json", FRAMES_FILE), ("rle", COCO_FILE), ("preview", PREVIEW_FILE))
                if fmt in self.formats]

    def track(self) -> MaskTrack:
        """The written PNG masks and their times, in time order: what the overlay paints."""
        return MaskTrack([f.time for f in self._written], [self.folder / mask_name(f) for f in self._written])


# ------------------------------------------------------------------------------------------------ video folders
def is_complete(folder: Path, video: Path, settings: dict) -> bool:
    """Whether ``folder`` holds the finished outputs of ``video`` made with ``settings``."""
    summary = read_summary(folder)
    if not summary or not summary.get("complete"):
        return False
    try:
        identity = input_identity(video)
    except OSError:
        return False
    if any(summary.get(key) != value for key, value in identity.items()) or summary.get("settings") != settings:
        return False
    return all((folder / name).exists() for name in summary.get("files", [])) and (
        settings["overlay"] is None or Path(settings["overlay"]).is_file())


def output_names(schedule: Schedule, formats: Sequence[str], overlay: Path | None, folder: Path) -> list[str]:
    """Every file (relative to ``folder``) a video's run writes there: recorded before it writes them (see
    ``runs.record_owned``), so that a later run may remove exactly these and nothing else."""
    names = [SUMMARY_FILE]
    if "png" in formats:
        names += [mask_name(frame) for frame in schedule.frames]
    names += [name for fmt, name in (("json", FRAMES_FILE), ("rle", COCO_FILE), ("preview", PREVIEW_FILE))
              if fmt in formats]
    if overlay is not None and overlay.parent == folder:
        names.append(overlay.name)
    return names


def clear_outputs(folder: Path) -> None:
    """Remove what an earlier run wrote here (its record: the summary first, so the folder stops counting as done
    at once); files av2ts did not write stay, and so do the cached maskiges (their own folder and record)."""
    remove_owned(folder)


def discard_unfinished(folder: Path) -> None:
    """After a failed or interrupted video: its unfinished outputs go (``clear_outputs``), and the masks folder
    when empty; what is worth keeping (cached maskiges) stays."""
    clear_outputs(folder)
    with contextlib.suppress(OSError):  # not empty or not there: kept or nothing to do
        (folder / MASKS_DIR).rmdir()


def overlay_path(option: str | None, folder: Path, name: str, batch: bool) -> Path | None:
    """Where ``--overlay`` puts a video's overlay: nowhere (None), ``folder/overlay.mp4`` (""), the file given, or
    ``<folder given>/<name>.mp4``."""
    if option is None:
        return None
    if option == "":
        return folder / DEFAULT_OVERLAY
    path = Path(option)
    if path.suffix.lower() in VIDEO_SUFFIXES and not path.is_dir():
        if batch:
            raise UsageError(f"--overlay {option}: several videos need a folder for their overlays")
        return path
    return path / f"{name}.mp4"


def check_overlay_target(overlay: Path | None, folder: Path, option: str | None, force: bool,
                         video: Path | None = None) -> None:
    """An existing file at ``--overlay PATH`` (or in ``--overlay DIR``) is replaced only if av2ts wrote it (its
    folder's record, or this video's earlier summary), or with ``--force``: ``predict a.mp4 --overlay b.mp4`` must
    not destroy b.mp4 if it was meant as a second input."""
    if overlay is not None and video is not None and overlay.exists() and overlay.resolve() == video.resolve():
        raise UsageError(f"--overlay {overlay}: is the input video itself; overlays never replace their inputs")
    if overlay is None or force or not overlay.exists() or option == "":
        return
    previous = read_summary(folder) or {}
    if previous.get("overlay") != str(overlay) and overlay.name not in (owned_files(overlay.parent) or []):
        raise UsageError(f"--overlay {overlay}: the file exists and no earlier run wrote it; pass --force to "
                         "replace it (to predict it as well, give --overlay after the sources or as --overlay=PATH)")


def is_video_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES
