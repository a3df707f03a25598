"""Overlays: every frame of a video with the mask of the nearest sampled time painted on it, the original audio
muxed back in (``av2ts overlay`` and ``av2ts predict --overlay``).

Colours: semantic (AVSS) masks use the AVSBench palette (``avss_palette``: the PASCAL-VOC bit-interleave rule),
binary masks one highlight colour. Frames are streamed from ``media.iter_frames`` into ``media.encode_video``
(H.264, written atomically); nothing is held but the current frame and the current mask.

The overlay is the input with its picture painted: frames and masks at the display size (rotation applied,
non-square pixels made square), on the video's clock (time 0 is its first frame, as in predict's sampling), and
every audio stream of the input kept as it is (``media.replace_video``: copied, dispositions and languages kept),
the picture starting where the input's does.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from av2ts_cli import locks, media
from av2ts_cli.avsbench import frame_time
from av2ts_cli.classes import AVSS_NUM_CLASSES, avss_palette
from av2ts_cli.console import warn
from av2ts_cli.data.images import rgb_to_index
from av2ts_cli.errors import DataError, MediaError, UsageError
from av2ts_cli.runs import FRAMES_FILE, owned_files, record_owned

HIGHLIGHT = (255, 96, 0)  # binary masks: a saturated orange stands out on most scenes
PALETTES = ("auto", "binary", "avss")
_TIME_TOLERANCE = 1e-5


# ------------------------------------------------------------------------------------------------------- masks
@dataclass(frozen=True)
class MaskTrack:
    """Sampled times (ascending) and the mask file of each."""

    times: Sequence[float]
    paths: Sequence[Path]

    def nearest(self, t: float) -> int:
        """Index of the sampled time nearest to ``t`` (the earlier one on a tie)."""
        right = bisect.bisect_left(self.times, t)
        if right == 0:
            return 0
        if right == len(self.times):
            return right - 1
        return right - 1 if t - self.times[right - 1] <= self.times[right] - t else right


def read_mask_track(masks_dir: str | os.PathLike) -> MaskTrack:
    """The masks of ``masks_dir`` and their times: from ``frames.jsonl`` beside the folder (what predict writes),
    else from the numbers in the file names, one mask per second at k + 15/16 s (AVSBench's sampling)."""
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise DataError(masks_dir, "no such folder of masks")
    index = masks_dir.parent / FRAMES_FILE
    if index.is_file():
        times, paths = [], []
        for number, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                time, name = float(record["time"]), Path(record["mask"]).name
            except (ValueError, KeyError, TypeError):
                raise DataError(index, f"line {number} has no time and mask file") from None
            times.append(time)
            paths.append(masks_dir / name)
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DataError(missing[0], f"listed in {index.name} but missing ({len(missing)} masks missing)")
        order = sorted(range(len(times)), key=lambda i: times[i])
        track = MaskTrack([times[i] for i in order], [paths[i] for i in order])
    else:
        files = [p for p in masks_dir.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")]
        track = _numbered_track(masks_dir, files)
        warn(f"{masks_dir}: no {FRAMES_FILE} beside it; mask number k is taken at second k + 15/16 (numbers from 0, "
             "or from 1 as AVSBench names its masks)")
    if not track.paths:
        raise DataError(masks_dir, "no mask images (*.png)")
    return track


def _trailing_number(path: Path) -> int:
    match = re.search(r"(\d+)$", path.stem)
    return int(match.group(1)) if match else -1


def _numbered_track(masks_dir: Path, files: list[Path]) -> MaskTrack:
    """Masks paired with times by the number that ends each name (000003.png, clip_4.png): number k (counted from
    the first, 0 or 1) is shown at k + 15/16 s. A name without a number, two masks with one number, or a number
    missing between the first and the last is a DataError naming them: pairing by order would shift every later
    mask in time."""
    numbers: dict[int, list[Path]] = {}
    unnumbered = []
    for path in files:
        number = _trailing_number(path)
        if number < 0:
            unnumbered.append(path.name)
        else:
            numbers.setdefault(number, []).append(path)
    if unnumbered:
        raise DataError(masks_dir, f"{len(unnumbered)} masks without a number at the end of their name "
                                   f"({', '.join(sorted(unnumbered)[:3])}) and no {FRAMES_FILE} to give their times")
    twice = sorted(number for number, paths in numbers.items() if len(paths) > 1)
    if twice:
        names = ", ".join(p.name for p in sorted(numbers[twice[0]]))
        raise DataError(masks_dir, f"two masks for number {twice[0]} ({names}): which is shown when is unknown")
    if not numbers:
        return MaskTrack([], [])
    first, last = min(numbers), max(numbers)
    if first not in (0, 1):
        raise DataError(masks_dir, f"the masks are numbered from {first}; without {FRAMES_FILE}, numbers start at 0 "
                                   "(predict) or 1 (AVSBench)")
    gaps = [k for k in range(first, last + 1) if k not in numbers]
    if gaps:
        shown = ", ".join(str(k) for k in gaps[:5]) + (f" and {len(gaps) - 5} more" if len(gaps) > 5 else "")
        raise DataError(masks_dir, f"masks {shown} are missing between {first} and {last}: every later mask would be "
                                   "shown at the wrong time")
    return MaskTrack([frame_time(k - first) for k in range(first, last + 1)],
                     [numbers[k][0] for k in range(first, last + 1)])


def read_mask(path: Path) -> tuple[np.ndarray, str]:
    """A mask image -> (uint8 [H, W] values, kind): "avss" for class ids (indexed PNG, colour labels matched
    against the AVSS palette, grey class indices), "binary" for 0/255 or 0/1 masks (values become 0/1).
    DataError for a picture that is no mask: colours of no AVSS class, grey levels that are no class id."""
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode == "P":
                values = np.asarray(image)
            elif mode in ("RGB", "RGBA"):
                rgb = np.asarray(image.convert("RGB"))
                if (rgb == rgb[..., :1]).all():  # grey stored as RGB (a 0/255 mask saved by an RGB writer)
                    values = rgb[..., 0]
                    mode = "L"
                else:
                    return _palette_indices(path, rgb), "avss"
            else:
                values = np.asarray(image if mode in ("L", "1") else image.convert("L")).astype(np.uint8)
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(path, f"unreadable mask image: {err}") from None
    present = set(np.unique(values).tolist())
    if mode != "P" and present <= {0, 1, 255}:
        return (values > 0).astype(np.uint8), "binary"
    strays = sorted(present - _CLASS_VALUES)
    if strays:
        raise DataError(path, f"not a mask: {'indices' if mode == 'P' else 'grey levels'} up to {strays[-1]} "
                        f"({len(strays)} values that are no class id; masks hold 0/255 or class ids below "
                        f"{AVSS_NUM_CLASSES})")
    return values, "avss"


# class ids of the AVSS classes, and 255 (AVSBench's "ignore")
_CLASS_VALUES = frozenset(range(AVSS_NUM_CLASSES)) | {255}
# an RGB mask may have a few colours outside the palette (a resized or antialiased border); more than this share
# of the pixels, and it is a picture, not a mask (RGB noise: 100 % off the palette)
_OFF_PALETTE_SHARE = 0.01


def _palette_indices(path: Path, rgb: np.ndarray) -> np.ndarray:
    """Colour labels uint8 [H, W, 3] -> class ids [H, W]; DataError when too many colours name no class."""
    palette = avss_palette()
    values = rgb_to_index(rgb, palette)
    off = (palette[values] != rgb).any(axis=-1).mean()
    if off > _OFF_PALETTE_SHARE:
        raise DataError(path, f"not a mask: {100 * off:.0f}% of its pixels have colours of no AVSS class (a picture, "
                        "not a colour label?)")
    return values


class MaskPainter:
    """Paints masks on frames: ``alpha`` blend of the mask colour over the region, optional opaque contour."""

    def __init__(self, alpha: float = 0.5, contour: bool = False, palette: str = "auto"):
        if not 0.0 <= alpha <= 1.0:
            raise UsageError(f"--alpha {alpha} must be between 0 and 1")
        if palette not in PALETTES:
            raise UsageError(f"--palette {palette!r}: choose from {', '.join(PALETTES)}")
        self.alpha, self.contour, self.palette = alpha, contour, palette
        self.colours = avss_palette(256)
        self._cached: tuple | None = None  # ((path, size), layer, fill, edge) of the last mask

    def colour_table(self, kind: str) -> np.ndarray:
        """[256, 3] uint8: the colour of each mask value."""
        if (self.palette if self.palette != "auto" else kind) == "binary":
            table = np.zeros((256, 3), np.uint8)
            table[1:] = HIGHLIGHT
            return table
        return self.colours

    def prepare(self, path: Path, size: tuple[int, int]):
        """(layer [H, W, 3] colours, fill bool [H, W], edge bool [H, W] or None) of the mask file ``path`` at
        ``size`` (W, H); the last one is cached (masks change only at the sampled times)."""
        if self._cached is not None and self._cached[0] == (path, size):
            return self._cached[1:]
        values, kind = read_mask(path)
        if values.shape[::-1] != tuple(size):
            check_mask_size(path, values.shape[::-1], size)
            values = cv2.resize(values, size, interpolation=cv2.INTER_NEAREST)
        layer = self.colour_table(kind)[values]
        fill = values > 0
        edge = None
        if self.contour:
            edge = _edges(values, thickness=max(1, round(min(size) / 240)))
        self._cached = ((path, size), layer, fill, edge)
        return layer, fill, edge

    def paint(self, frame: np.ndarray, layer: np.ndarray, fill: np.ndarray, edge: np.ndarray | None) -> np.ndarray:
        """frame uint8 [H, W, 3] -> a new frame with the mask painted."""
        blended = cv2.addWeighted(frame, 1.0 - self.alpha, layer, self.alpha, 0.0)
        out = frame.copy()
        np.copyto(out, blended, where=fill[..., None])
        if edge is not None:
            np.copyto(out, layer, where=edge[..., None])
        return out


def check_mask_size(path: Path, mask_size: tuple[int, int], size: tuple[int, int]) -> None:
    """A mask of another size than the frames is scaled to them when it has their aspect ratio (a mask made at a
    smaller size); of another aspect ratio it is the mask of another video (or of the stored, unrotated frames),
    and stretching it would paint the wrong places: DataError naming both sizes."""
    (mw, mh), (w, h) = mask_size, size
    if abs(mw * h - mh * w) > 0.02 * w * mh:  # aspect ratios 2 % apart: more than rounding of a scaled mask
        raise DataError(path, f"the mask is {mw}x{mh}, the video is {w}x{h} (display size): another aspect ratio, "
                        "so not a mask of this video")


def check_coverage(track: MaskTrack, duration: float, where: str | os.PathLike) -> None:
    """A warning when the masks end well before the video: its last mask would stay on for the rest."""
    if not track.times or duration <= 0:
        return
    last = track.times[-1]
    # predict's last mask of N sampled seconds is at N - 1/16 s, within a second of the end
    if duration - last > max(_COVERAGE_SLACK, 0.25 * duration):
        warn(f"{where}: the masks cover {last:.1f} s of the {duration:.1f} s video; the last one stays on for the "
             f"other {duration - last:.1f} s (masks of another or a cut version of this video?)")


_COVERAGE_SLACK = 2.0  # seconds


def _edges(values: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of a region (value > 0) that touch a different value (4-neighbourhood), grown to ``thickness``."""
    boundary = np.zeros(values.shape, bool)
    boundary[:, 1:] |= values[:, 1:] != values[:, :-1]
    boundary[:, :-1] |= values[:, 1:] != values[:, :-1]
    boundary[1:] |= values[1:] != values[:-1]
    boundary[:-1] |= values[1:] != values[:-1]
    boundary &= values > 0
    if thickness > 1:
        kernel = np.ones((thickness, thickness), np.uint8)
        boundary = cv2.dilate(boundary.astype(np.uint8), kernel).astype(bool) & (values > 0)
    return boundary


# ---------------------------------------------------------------------------------------------------- overlay
def overlay_frames(video: str | os.PathLike, track: MaskTrack, painter: MaskPainter, info: media.Probe,
                   fps: float) -> Iterator[np.ndarray]:
    """The overlay's frames at a constant ``fps`` from the video's first frame to the end of the file: tick i
    shows the video frame on screen at i / fps (video time, ``media.Probe.origin``; the last one held while longer
    audio plays on) with the mask of the nearest sampled time, at the display size. ``info``: the probe of
    ``video``; passed on to the decoder (``media.decoding_probe``)."""
    size = (info.width, info.height)
    count = _tick_count(info, fps)
    frames = media.iter_frames(video, info=info)
    try:
        shown = next(frames, None)
        if shown is None:
            raise MediaError(video, "no decodable video frames")
        upcoming = next(frames, None)
        for tick in range(count):
            t = tick / fps
            while upcoming is not None and upcoming[0] <= t + _TIME_TOLERANCE:
                shown, upcoming = upcoming, next(frames, None)
            layer, fill, edge = painter.prepare(track.paths[track.nearest(t)], size)
            yield painter.paint(shown[1], layer, fill, edge)
    finally:
        frames.close()


OVERLAY_SUFFIXES = (".mp4", ".mov", ".mkv")  # containers that take H.264 and AAC as media.encode_video writes them
_NAME_MAX = 255  # bytes of one file name on Linux file systems
_TEMP_EXTRA = 18  # what files.temp_name_for adds around a name while it is written (".<stem>.<8 hex>.partial")


def check_overlay_path(out: Path) -> None:
    """A UsageError naming ``out`` when no overlay can be written there: another container than
    ``OVERLAY_SUFFIXES``, or a name too long for the file system once the temp's suffix is added. Called before
    any work (predict checks every video's overlay before the model loads)."""
    if out.suffix.lower() not in OVERLAY_SUFFIXES:
        raise UsageError(f"{out}: the overlay must be an .mp4, .mov or .mkv file")
    if len(out.name.encode("utf-8", "surrogateescape")) + _TEMP_EXTRA > _NAME_MAX:
        raise UsageError(f"{out.name[:40]}...: the overlay's name is too long for the file system "
                         f"({len(out.name.encode('utf-8', 'surrogateescape'))} bytes, at most "
                         f"{_NAME_MAX - _TEMP_EXTRA}); give a shorter --overlay")


def render_overlay(video: str | os.PathLike, masks: str | os.PathLike | MaskTrack, out: str | os.PathLike,
                   alpha: float = 0.5, contour: bool = False, palette: str = "auto",
                   info: media.Probe | None = None) -> dict:
    """Write ``out``: ``video`` with its masks painted on (see ``overlay_frames``) and every audio stream of it,
    copied (``media.replace_video``).

    ``masks``: a masks folder (times from ``frames.jsonl`` beside it or from the file names) or a MaskTrack.
    ``info``: ``media.probe(video, ffprobe=False)`` when the caller has it already (predict does): the frames, the
    audio check and the mux then use it, and the video is inspected once. Without it the video is probed here, by
    the ffmpeg binary (its start time is the decoder's, so the decoder can take the same probe).
    Returns {"output", "frames", "fps", "duration" (the output's, from the file's start), "audio"}."""
    video, out = Path(video), Path(out)
    painter = MaskPainter(alpha, contour, palette)
    track = masks if isinstance(masks, MaskTrack) else read_mask_track(masks)
    info = info if info is not None else media.probe(video, ffprobe=False)
    check_overlay_path(out)
    fps = info.fps if info.fps > 0 and math.isfinite(info.fps) else 25.0
    check_coverage(track, _video_span(info), track.paths[0].parent if track.paths else masks)
    painter.prepare(track.paths[0], (info.width, info.height))  # a picture that is no mask: refused before encoding
    frames = overlay_frames(video, track, painter, info, fps)
    media.encode_video(frames, out, fps, audio_from=video if info.has_audio else None, audio_info=info,
                       all_audio=True)
    count = _tick_count(info, fps)
    return {"output": str(out), "frames": count, "fps": fps, "duration": info.video_offset + count / fps,
            "audio": info.has_audio}


def _video_span(info: media.Probe) -> float:
    """Seconds from the video's first frame to the end of the file (the overlay's picture lasts that long)."""
    return max(0.0, info.duration - info.video_offset)


def _tick_count(info: media.Probe, fps: float) -> int:
    return max(1, round(_video_span(info) * fps))


def overlay_command(video: str | os.PathLike, masks: str | os.PathLike, out: str | os.PathLike, force: bool = False,
                    **style) -> dict:
    """``av2ts overlay VIDEO MASKS -o OUT``: ``render_overlay`` with the rules of every output of av2ts, checked
    before any work: an existing ``OUT`` is replaced only if av2ts wrote it (its folder's record) or with ``force``
    (never the input itself: ``media``'s outputs refuse that), and once written it is recorded as av2ts's."""
    video, out = Path(video), Path(out)
    check_overlay_path(out)
    if out.exists() and not force and out.name not in (owned_files(out.parent) or []):
        raise UsageError(f"-o {out}: the file exists and av2ts did not write it; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with locks.held(out.parent, label=out.parent):  # one overlay at a time into a folder: its temps are its own
        locks.sweep_temps(out.parent, recursive=False, stem=out.stem)  # what a killed overlay of this name left
        report = render_overlay(video, masks, out, **style)  # written whole or not at all (media's atomic output)
        record_owned(out.parent, [out.name])
    return report
