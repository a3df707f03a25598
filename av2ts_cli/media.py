"""The only module that runs ffmpeg; one file past 500 lines, as every part shares its ffmpeg runner and conventions.

What it does: probe, decode frames and audio, encode and remux. Sections: binaries, errors, probe, decoding frames,
audio, writing; each uses the one runner (``_command``, ``_run``, ``_reason``) and follows the conventions below.

Binary: ``AV2TS_FFMPEG``, then ``ffmpeg`` on PATH, then imageio-ffmpeg's bundled binary (``find_ffmpeg``). Commands
are built with ffmpeg-python and run with that binary. ``probe`` uses ffprobe when it is on PATH and otherwise parses
the stream dump of ``ffmpeg -i``; both give the same ``Probe``.

Conventions (every function here follows them):
- Time t is in seconds from the video stream's first frame (``Probe.origin``: the file's start_time plus
  ``Probe.video_offset``; the file's start in a file without video), for frames and audio alike: the frame at t
  and audio sample t * rate play together. A video stream that starts after the file does (an edit list, an
  offset) is thus read on its own clock; audio before its first frame is cut, audio starting later is padded.
- "The frame at t" is the frame on screen at t: the last frame whose timestamp is <= t. A frame stamped within
  ``TIME_TOLERANCE`` after t counts as <= t. Before the first frame the first frame is used; after the last frame,
  the last frame.
- Frames are RGB uint8 [H, W, 3] as displayed, like a player shows them: rotation metadata is applied, and
  non-square pixels (a sample aspect ratio other than 1:1, anamorphic video) are made square by scaling the width
  (``Probe.width``/``height`` are that display size). ``size=(w, h)`` resizes to exactly w x h (bilinear, aspect
  ratio not kept, as AVSBench resizes to 224x224).
- Audio is one stream: the one marked default, else the first (``choose_audio``, ``Probe.audio_stream``). Writing
  an overlay keeps every audio stream (``replace_video``).
- Every file written appears atomically. A temp file is created beside the target and renamed when complete; it is
  removed on any failure, KeyboardInterrupt included. Inputs are never overwritten.
- Failures raise ``MediaError(path, reason)`` with a short reason taken from ffmpeg's stderr.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import queue
import re
import select
import shutil
import subprocess
import threading
import wave as wave_module
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import ffmpeg
import numpy as np

from av2ts_cli import files
from av2ts_cli.avsbench import SAMPLE_RATE
from av2ts_cli.errors import MediaError

TIME_TOLERANCE = 1e-5  # seconds: a frame stamped this close after t still counts as shown at t
X264_PRESET = "veryfast"
X264_CRF = 18  # visually lossless for overlays
AAC_BITRATE = "192k"
RESIZE_FLAGS = "bilinear"

# decode_frames_at: frames within this many average frame intervals before each time go through the selection
# (a superset; Python then picks the exact frame). Larger is safer for variable frame rates, costlier to resize.
_SELECT_INTERVALS = 3.0
_SELECT_TERMS_PER_PASS = 256  # keeps ffmpeg's select expression small; more times continue in a new pass
_SEEK_MARGIN = 2.0  # seconds before the needed frame where a follow-up pass starts decoding
_STALL_CHECK_SECONDS = 5.0  # how often a frame pipe that waits for ffmpeg checks that it is not out of step


# ------------------------------------------------------------------------------------------------------- binaries
@functools.cache
def find_ffmpeg() -> str:
    """The ffmpeg binary: ``AV2TS_FFMPEG``, then PATH, then imageio-ffmpeg's bundled binary."""
    env = os.environ.get("AV2TS_FFMPEG")
    if env:
        if not os.path.isfile(env):
            raise MediaError(env, "AV2TS_FFMPEG names no file")
        return env
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg  # local: the fallback binary, imported only when ffmpeg is not on PATH

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as err:  # imageio-ffmpeg raises RuntimeError when it has no binary for this platform
        raise MediaError("ffmpeg", f"not found on PATH and no bundled binary ({err})") from None


@functools.cache
def find_ffprobe() -> str | None:
    """The ffprobe binary from PATH (imageio-ffmpeg bundles none); None means: parse ``ffmpeg -i`` instead."""
    return shutil.which("ffprobe")


def tool_version(binary: str) -> str:
    """The first line of ``binary -version``, e.g. 'ffmpeg version 5.1.6-0+deb12u1'."""
    out = subprocess.run([binary, "-hide_banner", "-version"], capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


@functools.cache
def check_ffmpeg() -> str:
    """The ffmpeg binary, checked once to answer ``-version`` as ffmpeg: a broken ``AV2TS_FFMPEG`` is one error
    naming it, before any input is read, not a failure blamed on every input of a batch."""
    binary = find_ffmpeg()
    try:
        version = tool_version(binary)
    except (OSError, subprocess.SubprocessError) as err:
        version = err.strerror or type(err).__name__ if isinstance(err, OSError) else type(err).__name__
    if not version.startswith("ffmpeg"):
        where = "AV2TS_FFMPEG" if os.environ.get("AV2TS_FFMPEG") else "the ffmpeg found"
        raise MediaError(binary, f"{where} is not a working ffmpeg (`-version` gave {version!r})")
    return binary


def _command(stream, *global_args: str) -> list[str]:
    """The argv of an ffmpeg-python graph, global options first (ffmpeg ignores trailing options)."""
    args = stream.compile(cmd=find_ffmpeg())
    return [args[0], "-hide_banner", "-nostdin", *global_args, *args[1:]]


def _url(path: str | os.PathLike) -> str:
    """An ffmpeg URL for a local file: 'file:' keeps names with ':' or a leading '-' from being misread."""
    return "file:" + os.path.abspath(path)


# --------------------------------------------------------------------------------------------------------- errors
_GENERIC_LINES = re.compile(
    r"^(Error opening (input|output) files?|Conversion failed|Exiting normally|Error parsing options"
    r"|Nothing was written|.*Task finished with error code|.*Terminating thread with return code"
    r"|.*Error while (filtering|processing the decoded data)|.*Could not open encoder before EOF|At least one output)"
)
_ERROR_WORDS = re.compile(
    r"(?i)error|invalid|not found|failed|cannot|could not|no such|unsupported|unknown|denied|truncat|corrupt"
    r"|matches no streams|not divisible"
)
_KNOWN_REASONS = [
    (re.compile(r"misdetection possible"), "not a video or audio file ffmpeg can recognize"),
    (re.compile(r"moov atom not found"), "truncated or incomplete MP4 (moov atom not found)"),
    (re.compile(r"partial file"), "truncated file (the data ends early)"),
    (re.compile(r"Invalid data found when processing input"), "not a video or audio file ffmpeg can read"),
    (re.compile(r"No such file or directory"), "no such file"),
    (re.compile(r"Is a directory"), "is a directory, not a media file"),
    (re.compile(r"Permission denied"), "permission denied"),
    (re.compile(r"No space left on device"), "no space left on device"),
    (re.compile(r"Unknown encoder '([^']+)'"), "this ffmpeg has no {0} encoder"),
]
_LOG_PREFIX = re.compile(r"^(\[[^\]]*@ ?(0x)?[0-9a-f]+\] ?)+")


def _reason(lines: Iterable[str], returncode: int | None = None) -> str:
    """A short human reason from ffmpeg's stderr: a known cause, else its first specific error line."""
    lines = [line.strip() for line in lines if line.strip()]
    text = "\n".join(lines)
    for pattern, reason in _KNOWN_REASONS:
        match = pattern.search(text)
        if match:
            return reason.format(*match.groups())
    for line in lines:
        clean = _LOG_PREFIX.sub("", line).strip()
        if clean and _ERROR_WORDS.search(clean) and not _GENERIC_LINES.match(clean):
            return clean[:200]
    return f"ffmpeg failed (exit code {returncode})" if returncode else "ffmpeg failed"


def _check_input(path: str | os.PathLike) -> None:
    """Refuse what ffmpeg would only describe vaguely: missing, a folder, empty, unreadable."""
    if not os.path.exists(path):
        raise MediaError(path, "no such file")
    if os.path.isdir(path):
        raise MediaError(path, "is a directory, not a media file")
    if os.path.getsize(path) == 0:
        raise MediaError(path, "empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise MediaError(path, "permission denied")


def _run(args: list[str], path: str | os.PathLike) -> subprocess.CompletedProcess:
    """Run a short ffmpeg command, capturing bytes; a non-zero exit becomes MediaError(path, reason)."""
    result = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True)
    if result.returncode != 0:
        raise MediaError(path, _reason(result.stderr.decode("utf-8", "replace").splitlines(), result.returncode))
    return result


# ---------------------------------------------------------------------------------------------------------- probe
@dataclasses.dataclass(frozen=True)
class Probe:
    """What a media file holds. Sizes are display sizes: rotation applied (a 1920x1080 stream shown rotated is
    1080x1920 here) and non-square pixels made square (a 64x48 stream with sample aspect ratio 2:1 is 128x48).
    The audio fields describe the one audio stream av2ts decodes (``audio_stream``, see ``choose_audio``)."""

    path: str
    duration: float  # seconds, the longest stream, at 10 ms resolution (like ffmpeg's own report)
    fps: float  # average frame rate of the first video stream (variable frame rate: the average)
    frame_count: int  # frames (packets) in the first video stream, counted
    width: int  # display width: stored width scaled by the sample aspect ratio, rotation applied; 0 without video
    height: int
    rotation: int  # clockwise degrees a player turns the stored frames: 0, 90, 180 or 270
    has_audio: bool
    sample_rate: int  # Hz of the decoded audio stream; 0 without audio
    channels: int  # 0 without audio
    video_codec: str  # ffmpeg codec name, e.g. "h264"; "" without video
    audio_codec: str  # "" without audio
    start_time: float = 0.0  # seconds, the file's first timestamp (ffmpeg's start_time, the earliest stream)
    # seconds from the file's start to the first frame of the video stream: that frame is time 0 of this module
    # (``origin``); 0 without video
    video_offset: float = 0.0
    sample_aspect_ratio: str = "1:1"  # the stored pixels' shape "w:h" (anamorphic video: not 1:1); width applies it
    audio_stream: int = -1  # index in the file (ffmpeg's #0:N, ffprobe's index) of the decoded audio stream; -1: none
    audio_streams: int = 0  # audio streams in the file (the overlay keeps them all)
    audio_language: str = ""  # the decoded stream's language tag; "" when it has none (or "und")
    # e.g. "stream 2 (aac, fre), the default of 2 audio streams": which audio was heard, for summaries
    audio_description: str = ""
    # which binary read the file: "ffmpeg" (``ffmpeg -i``, whose start time is the one decoding uses) or "ffprobe";
    # not compared: both describe the same file
    tool: str = dataclasses.field(default="ffmpeg", compare=False)

    @property
    def has_video(self) -> bool:
        return bool(self.video_codec)

    @property
    def origin(self) -> float:
        """The file timestamp (seconds) of time 0: the video stream's first frame (the file's start without video)."""
        return self.start_time + self.video_offset

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def probe(path: str | os.PathLike, require_video: bool = True, *, ffprobe: bool = True) -> Probe:
    """Streams, duration, average fps, frame count, display size, rotation and audio of a media file.

    Uses ffprobe when it is on PATH, else parses ``ffmpeg -i``; the frame count comes from reading the video
    packets (no decoding). A file with no video stream raises MediaError unless ``require_video=False``.
    ``ffprobe=False``: always ask the ffmpeg binary, so the probe's start time and video offset are the ones
    decoding uses and the probe can be passed to ``iter_frames``/``iter_frames_at``/``decode_audio`` as ``info``
    (one inspection per file instead of one per decoder; see ``decoding_probe``).
    """
    return _inspect(path, count_frames=True, require_video=require_video, ffprobe=ffprobe)


def decoding_probe(path: str | os.PathLike, info: Probe | None, *, require_video: bool = True) -> Probe:
    """``info`` if its times are the decoder's (read by the ffmpeg binary), else a fresh ``ffmpeg -i`` of
    ``path``: an ffprobe of another version may disagree on the start time (e.g. Matroska with audio priming), and
    a frame picked against the wrong start time is the wrong frame."""
    if info is not None and info.tool == "ffmpeg":
        return info
    return _inspect(path, require_video=require_video, ffprobe=False)


def _inspect(path: str | os.PathLike, count_frames: bool = False, require_video: bool = True,
             ffprobe: bool = True) -> Probe:
    """``ffprobe=False``: ask the ffmpeg binary itself, whose start time is the one decoding uses (an ffprobe of
    another version may disagree, e.g. on Matroska with audio priming)."""
    _check_input(path)
    use_ffprobe = ffprobe and find_ffprobe() is not None
    info = _probe_with_ffprobe(path, count_frames) if use_ffprobe else _probe_with_ffmpeg(path, count_frames)
    if not info.has_video and not info.has_audio:
        raise MediaError(path, "no video or audio stream")
    if require_video and not info.has_video:
        raise MediaError(path, "no video stream")
    return info


def _probe_with_ffmpeg(path, count_frames: bool) -> Probe:
    """Parse the stream dump that ``ffmpeg -i`` prints, while the first video frame is decoded (its timestamp is
    where the video starts: ``Probe.video_offset``); count the video packets by stream-copying them to null."""
    showinfo, _ = _ffmpeg_dialect(find_ffmpeg())
    first = ffmpeg.input(_url(path))["V:0"].filter("showinfo@first", **showinfo)
    args = _command(ffmpeg.output(first, "-", f="null", **{"frames:v": 1}), "-copyts")
    result = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True)
    lines = result.stderr.decode("utf-8", "replace").replace("\r", "\n").splitlines()
    if not any(line.startswith("Input #0") for line in lines):
        raise MediaError(path, _reason(lines, result.returncode))
    if any("partial file" in line for line in lines):
        raise MediaError(path, _reason(["partial file"]))
    dump = _parse_dump(lines)
    dump["first_frame"] = _first_frame_time(lines)
    frame_count = 0
    if count_frames and dump["video_codec"]:
        source = ffmpeg.input(_url(path))
        args = _command(ffmpeg.output(source["V:0?"], source["a:0?"], "-", f="null", c="copy"))
        result = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True)
        lines = result.stderr.decode("utf-8", "replace").replace("\r", "\n").splitlines()
        if any("partial file" in line for line in lines):
            raise MediaError(path, _reason(["partial file"]))
        frames = [int(m.group(1)) for m in map(re.compile(r"^frame=\s*(\d+)").match, lines) if m]
        frame_count = frames[-1] if frames else 0
    return _make_probe(path, dump, frame_count)


def _first_frame_time(lines: Sequence[str]) -> float | None:
    """Seconds (file timestamps) of the first frame a showinfo filter reported in ``lines``; None if none came."""
    timebase = None
    for line in lines:
        match = _SHOWINFO_TIMEBASE.search(line)
        if match:
            timebase = Fraction(int(match.group(2)), int(match.group(3)))
            continue
        match = _SHOWINFO_FRAME.search(line)
        if match and match.group(2) != "NOPTS":
            return float(int(match.group(2)) * timebase) if timebase else float(match.group(3))
    return None


def _probe_with_ffprobe(path, count_frames: bool) -> Probe:
    """ffprobe's JSON, reduced to exactly what ``_parse_dump`` reads from ``ffmpeg -i`` (same rounding)."""
    args = [find_ffprobe(), "-v", "warning", "-show_format", "-show_streams", "-of", "json"]
    args += ["-count_packets"] if count_frames else []
    result = subprocess.run([*args, _url(path)], stdin=subprocess.DEVNULL, capture_output=True)
    stderr = result.stderr.decode("utf-8", "replace").splitlines()
    if result.returncode != 0:
        raise MediaError(path, _reason(stderr, result.returncode))
    if any("partial file" in line for line in stderr):
        raise MediaError(path, _reason(["partial file"]))
    data = json.loads(result.stdout or b"{}")
    fmt = data.get("format", {})
    streams = data.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"
                  and not s.get("disposition", {}).get("attached_pic")), None)
    dump = _empty_dump()
    if "duration" in fmt:
        dump["centiseconds"] = (int(Decimal(fmt["duration"]) * 1_000_000) + 5000) // 10000
    if "start_time" in fmt:
        dump["start_time"] = float(fmt["start_time"])
    frame_count = 0
    if video is not None:
        dump.update(video_codec=video.get("codec_name", "none"), coded_width=int(video.get("width", 0)),
                    coded_height=int(video.get("height", 0)),
                    fps=_ratio(video.get("avg_frame_rate")), tbr=_ratio(video.get("r_frame_rate")),
                    sar=_aspect(video.get("sample_aspect_ratio")))
        matrix = [s for s in video.get("side_data_list", []) if "rotation" in s]
        if matrix:
            dump["rotation"] = _clockwise(-float(matrix[0]["rotation"]))
        elif "rotate" in video.get("tags", {}):
            dump["rotation"] = _clockwise(float(video["tags"]["rotate"]))
        if _is_number(video.get("start_time")):
            dump["first_frame"] = float(video["start_time"])
        frame_count = int(video.get("nb_read_packets", 0)) if count_frames else 0
    for stream in streams:
        if stream.get("codec_type") == "audio":
            tags = {key.lower(): value for key, value in stream.get("tags", {}).items()}
            dump["audio"].append(_AudioStream(
                int(stream.get("index", 0)), stream.get("codec_name", "none"), int(stream.get("sample_rate", 0)),
                int(stream.get("channels", 0)), _language(tags.get("language", "")),
                bool(stream.get("disposition", {}).get("default"))))
    return dataclasses.replace(_make_probe(path, dump, frame_count), tool="ffprobe")


def _is_number(text) -> bool:
    try:
        return math.isfinite(float(text))
    except (TypeError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class _AudioStream:
    index: int  # in the file
    codec: str
    sample_rate: int
    channels: int
    language: str  # "" when none
    default: bool  # marked default (ffprobe's disposition.default, "(default)" in ffmpeg's dump)


def choose_audio(streams: Sequence) -> tuple[int, str]:
    """(position in ``streams``, why) of the audio stream av2ts decodes: the one marked default; the first when
    none is; the first of those marked when several are (a player's choice). ``streams``: objects with
    ``default``, in file order."""
    marked = [i for i, stream in enumerate(streams) if stream.default]
    count = len(streams)
    if len(marked) == 1:
        return marked[0], f"the default of {count} audio streams"
    if not marked:
        return 0, f"the first of {count} audio streams (none marked default)"
    return marked[0], f"the first of {len(marked)} audio streams marked default ({count} in all)"


def _empty_dump() -> dict:
    return {"centiseconds": None, "start_time": 0.0, "video_codec": "", "coded_width": 0, "coded_height": 0,
            "fps": 0.0, "tbr": 0.0, "rotation": 0, "sar": (1, 1), "first_frame": None, "audio": []}


_DURATION = re.compile(r"^\s*Duration: (?:(\d+):(\d\d):(\d\d)\.(\d\d)|N/A)(?:, start: (-?[\d.]+))?")
_STREAM = re.compile(r"^\s*Stream #0:(\d+)(\S*): (Video|Audio): (\w+)(.*)$")
_SIZE = re.compile(r", (\d+)x(\d+)(?=[ ,]|$)")
_SAR = re.compile(r"SAR (\d+):(\d+) DAR")
_RATE = r"([\d.]+)(k?) {}"
_DISPLAY_MATRIX = re.compile(r"(?i)display ?matrix: rotation of (-?[\d.]+) degrees")
_ROTATE_TAG = re.compile(r"^\s*rotate\s*: (-?[\d.]+)")
_CHANNEL_LAYOUTS = {"mono": 1, "stereo": 2, "downmix": 2, "binaural": 2, "quad": 4, "hexagonal": 6, "octagonal": 8,
                    "cube": 8, "hexadecagonal": 16}


def _parse_dump(lines: Sequence[str]) -> dict:
    """Read input #0's stream dump (first video stream that is not cover art, every audio stream)."""
    dump = _empty_dump()
    section = None  # "video" while inside the first video stream, else None
    for line in lines:
        if line.startswith(("Output #", "Stream mapping:")) or (line.startswith("Input #") and
                                                                not line.startswith("Input #0")):
            break
        match = _DURATION.match(line)
        if match:
            if match.group(1) is not None:
                h, m, s, cs = (int(g) for g in match.groups()[:4])
                dump["centiseconds"] = ((h * 60 + m) * 60 + s) * 100 + cs
            if match.group(5):
                dump["start_time"] = float(match.group(5))
            continue
        match = _STREAM.match(line)
        if match:
            index, ids, kind, codec, rest = match.groups()
            section = None
            if kind == "Video" and not dump["video_codec"] and "(attached pic)" not in rest:
                section = "video"
                size = _SIZE.search(rest)
                dump.update(video_codec=codec, fps=_dump_rate(rest, "fps"), tbr=_dump_rate(rest, "tbr"))
                if size:
                    dump.update(coded_width=int(size.group(1)), coded_height=int(size.group(2)))
                sars = _SAR.findall(rest)  # the codec's, then the container's when it differs (which wins)
                if sars:
                    dump["sar"] = _aspect(":".join(sars[-1]))
            elif kind == "Audio":
                rate = re.search(r"(\d+) Hz", rest)
                layout = re.search(r"Hz, ([^,]+)", rest)
                language = re.search(r"\((\w+)\)", ids)
                dump["audio"].append(_AudioStream(
                    int(index), codec, int(rate.group(1)) if rate else 0,
                    _channel_count(layout.group(1)) if layout else 0, _language(language.group(1) if language else ""),
                    "(default)" in rest))
            continue
        if section == "video":
            match = _DISPLAY_MATRIX.search(line)
            if match:  # the display matrix wins over the legacy tag, as in ffprobe
                dump["rotation"] = _clockwise(-float(match.group(1)))
                section = "video-rotated"
            match = _ROTATE_TAG.match(line)
            if match and section == "video":
                dump["rotation"] = _clockwise(float(match.group(1)))
    return dump


def _language(tag: str) -> str:
    """A language tag as reported: "" for none and for "und" (undetermined, what MP4 writes without one)."""
    tag = tag.strip()
    return "" if tag.lower() == "und" else tag


def _aspect(text: str | None) -> tuple[int, int]:
    """A sample aspect ratio "w:h" reduced; unknown ("0:1", "N/A", missing) is square, 1:1."""
    try:
        width, height = (int(part) for part in (text or "").split(":"))
    except ValueError:
        return 1, 1
    if width <= 0 or height <= 0:
        return 1, 1
    ratio = Fraction(width, height)
    return ratio.numerator, ratio.denominator


def _dump_rate(text: str, unit: str) -> float:
    match = re.search(_RATE.format(unit), text)
    if not match:
        return 0.0
    return float(match.group(1)) * (1000 if match.group(2) else 1)


def _channel_count(layout: str) -> int:
    """Channels of an ffmpeg layout name: 'stereo' 2, '5.1(side)' 6, '7.1.4' 12, '3 channels' 3."""
    layout = layout.strip()
    match = re.match(r"(\d+) channels", layout)
    if match:
        return int(match.group(1))
    name = layout.split("(")[0]
    if name in _CHANNEL_LAYOUTS:
        return _CHANNEL_LAYOUTS[name]
    if re.fullmatch(r"\d+(\.\d+)+", name):
        return sum(int(part) for part in name.split("."))
    return 0


def _ratio(text: str | None) -> float:
    """ffprobe's '30000/1001' as a float; '0/0' or missing is 0."""
    try:
        value = Fraction(text or "0")
    except (ValueError, ZeroDivisionError):
        return 0.0
    return float(value)


def _clockwise(degrees: float) -> int:
    """A rotation in degrees (clockwise) snapped to 0, 90, 180 or 270."""
    return int(round(degrees / 90.0)) * 90 % 360


def _normalized_fps(value: float) -> float:
    """The frame rate as ffmpeg reports it (2 decimals), with NTSC rates restored exactly (29.97 -> 30000/1001)."""
    if value <= 0 or not math.isfinite(value):
        return 0.0
    hundredths = round(value * 100)
    if hundredths == 0:
        return round(value, 4)
    rounded = hundredths / 100
    nominal = round(rounded * 1.001)
    if nominal in (24, 30, 48, 60, 120, 240) and round(nominal / 1.001 * 100) == hundredths:
        return nominal * 1000 / 1001
    return rounded


def _make_probe(path, dump: dict, frame_count: int) -> Probe:
    fps = _normalized_fps(dump["fps"]) or _normalized_fps(dump["tbr"])
    centiseconds = dump["centiseconds"]
    duration = centiseconds / 100 if centiseconds is not None else 0.0
    if not fps and frame_count and duration:
        fps = _normalized_fps(frame_count / duration)
    if centiseconds is None and frame_count and fps:
        duration = round(frame_count / fps, 2)
    (sar_w, sar_h), rotation = dump["sar"], dump["rotation"]
    width = (2 * dump["coded_width"] * sar_w + sar_h) // (2 * sar_h)  # rounded to the nearest pixel
    height = dump["coded_height"]
    if rotation in (90, 270):
        width, height = height, width
    offset = 0.0
    if dump["video_codec"] and dump["first_frame"] is not None:
        offset = round(dump["first_frame"] - dump["start_time"], 6) + 0.0  # + 0.0: no -0.0
    audio = {}
    if dump["audio"]:
        position, why = choose_audio(dump["audio"])
        chosen = dump["audio"][position]
        named = ", ".join(part for part in (chosen.codec, chosen.language) if part)
        description = f"stream {chosen.index} ({named})" + (f", {why}" if len(dump["audio"]) > 1 else "")
        audio = dict(has_audio=True, sample_rate=chosen.sample_rate, channels=chosen.channels,
                     audio_codec=chosen.codec, audio_stream=chosen.index, audio_streams=len(dump["audio"]),
                     audio_language=chosen.language, audio_description=description)
    else:
        audio = dict(has_audio=False, sample_rate=0, channels=0, audio_codec="")
    return Probe(path=str(path), duration=duration, fps=fps, frame_count=frame_count, width=width, height=height,
                 rotation=rotation, video_codec=dump["video_codec"], start_time=dump["start_time"],
                 video_offset=offset, sample_aspect_ratio=f"{sar_w}:{sar_h}", **audio)


# ---------------------------------------------------------------------------------------------- decoding frames
# showinfo prints "n: pts: pts_time: ... s:WxH ... type:X " in one log call, so that part of a line is never split;
# another thread's message may be appended to it before showinfo's newline (kept by _is_news).
_SHOWINFO_FRAME = re.compile(
    r"\[(showinfo@\w+) @ [^\]]*\] n:\s*\d+ pts:\s*(-?\d+|NOPTS)\s+pts_time:(\S+) .*? s:(\d+)x(\d+)")
_SHOWINFO_TIMEBASE = re.compile(r"\[(showinfo@\w+) @ [^\]]*\] config in time_base: (\d+)/(\d+)")


class _FramePipe:
    """A running ffmpeg that writes rgb24 frames to stdout and describes each one with showinfo on stderr.

    A thread turns stderr into events ("frame", showinfo instance, pts | None, seconds | None, width, height),
    then None at the end. Seconds are the stored timestamp: pts times the time base showinfo reports when it is
    configured (ffmpeg too old to report it: showinfo's rounded pts_time). ffmpeg logs a frame before it writes
    the frame's bytes, so a consumer that reads one frame per event of the output showinfo never blocks. Other
    stderr lines are kept (the last 200) for error messages. As a context manager, leaving early kills ffmpeg.
    """

    def __init__(self, args: list[str], path: str | os.PathLike):
        self.path = path
        self.events: queue.Queue = queue.Queue()
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, bufsize=0)  # unbuffered: select() sees all data
        self.reader = threading.Thread(target=self._read_stderr, daemon=True)
        self.reader.start()

    def _read_stderr(self) -> None:
        timebases: dict[str, Fraction] = {}
        for raw in iter(self.process.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if not line.startswith("[showinfo@") or _is_news(line):
                self.log.append(line)
            match = _SHOWINFO_FRAME.search(line)
            if match:
                name, pts_text, pts_time, width, height = match.groups()
                pts = None if pts_text == "NOPTS" else int(pts_text)
                if pts is None:
                    seconds = None
                elif name in timebases:
                    seconds = float(pts * timebases[name])
                else:
                    seconds = float(pts_time)
                self.events.put(("frame", name, pts, seconds, int(width), int(height)))
                continue
            match = _SHOWINFO_TIMEBASE.search(line)
            if match:
                timebases[match.group(1)] = Fraction(int(match.group(2)), int(match.group(3)))
        self.events.put(None)

    def __iter__(self) -> Iterator[tuple]:
        while True:
            try:
                event = self.events.get(timeout=_STALL_CHECK_SECONDS)
            except queue.Empty:
                # frame bytes waiting with no log line for them: the two streams disagree and ffmpeg would block
                if select.select([self.process.stdout], [], [], 0)[0]:
                    raise MediaError(self.path, "lost track of ffmpeg's frames (unexpected log output)") from None
                continue
            if event is None:
                return
            yield event

    def read_frame(self, width: int, height: int) -> np.ndarray:
        """The next frame's bytes from stdout as a writable [height, width, 3] uint8 array."""
        buffer = bytearray(width * height * 3)
        view, filled = memoryview(buffer), 0
        while filled < len(buffer):
            got = self.process.stdout.readinto(view[filled:])
            if not got:
                self.finish()  # raises ffmpeg's own reason if it failed
                raise MediaError(self.path, "ffmpeg stopped in the middle of a frame")
            filled += got
        return np.frombuffer(buffer, np.uint8).reshape(height, width, 3)

    def finish(self) -> None:
        """Wait for a normal end; MediaError if ffmpeg failed or the file ended early (truncated)."""
        returncode = self.process.wait()
        self.reader.join()
        if returncode != 0 or any("partial file" in line for line in self.log):
            raise MediaError(self.path, _reason(self.log, returncode))

    def __enter__(self) -> _FramePipe:
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.reader.join()
        self.process.stdout.close()
        self.process.stderr.close()


def _is_news(showinfo_line: str) -> bool:
    """Whether a showinfo line also carries another component's message (an error, a truncated file)."""
    return "rror" in showinfo_line or "partial file" in showinfo_line


def _frame_graph(path, size: tuple[int, int] | None, select: str | None = None, seek: float = 0.0):
    """ffmpeg args: first video stream (rotation applied by ffmpeg) -> [showinfo@all -> select] -> resize ->
    showinfo@out -> rgb24 on stdout. Timestamps are kept as stored (-copyts), every frame passes (passthrough)."""
    input_options = {"ss": f"{seek:.6f}", "noaccurate_seek": None} if seek > 0 else {}
    showinfo, passthrough = _ffmpeg_dialect(find_ffmpeg())
    stream = ffmpeg.input(_url(path), **input_options)["V:0"]
    if select is not None:
        stream = stream.filter("showinfo@all", **showinfo).filter("select", select)
    if size is not None:
        stream = stream.filter("scale", int(size[0]), int(size[1]), flags=RESIZE_FLAGS)
    stream = stream.filter("showinfo@out", **showinfo)
    output = ffmpeg.output(stream, "pipe:", f="rawvideo", pix_fmt="rgb24", **passthrough)
    return _command(output, "-copyts", "-loglevel", "info", "-nostats")


@functools.cache
def _ffmpeg_dialect(binary: str) -> tuple[dict, dict]:
    """Options that depend on the ffmpeg version: showinfo's ``checksum`` switch (skip hashing every decoded
    frame) where it exists, and ``-fps_mode`` (ffmpeg >= 5.1) or the older ``-vsync``."""
    help_text = subprocess.run([binary, "-hide_banner", "-h", "filter=showinfo"], capture_output=True,
                               text=True).stdout
    showinfo = {"checksum": 0} if "checksum" in help_text else {}
    match = re.search(r"version n?(\d+)\.(\d+)", tool_version(binary))
    old = match is not None and (int(match.group(1)), int(match.group(2))) < (5, 1)
    return showinfo, {"vsync": "passthrough"} if old else {"fps_mode": "passthrough"}


def _check_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise ValueError(f"size must be (width, height) >= 1, got {size!r}")
    return width, height


def _display_size(info: Probe) -> tuple[int, int] | None:
    """The size frames are scaled to when no size is asked for: the display size of anamorphic video (its pixels
    made square, as a player shows it); None (as decoded) when the pixels are square already."""
    return (info.width, info.height) if info.sample_aspect_ratio != "1:1" and info.width and info.height else None


def iter_frames(path: str | os.PathLike, size: tuple[int, int] | None = None, *,
                info: Probe | None = None) -> Iterator[tuple[float, np.ndarray]]:
    """Every frame of the first video stream in display order: (time in seconds, RGB uint8 [H, W, 3]).

    One ffmpeg process streams through a pipe, so memory stays bounded whatever the length. Stopping the
    iteration early (break, close) stops ffmpeg. ``info``: the caller's probe of ``path`` (``decoding_probe``
    says when it is used as it is).
    """
    size = _check_size(size)
    info = decoding_probe(path, info)
    size = size or _display_size(info)
    last = None
    with _FramePipe(_frame_graph(path, size), path) as pipe:
        for _, _, _, seconds, width, height in pipe:
            frame = pipe.read_frame(width, height)
            if seconds is None:  # a frame without a timestamp: one average interval after the previous one
                time = 0.0 if last is None else last + 1.0 / (info.fps or 25.0)
            else:
                time = seconds - info.origin
            last = time
            yield time, frame
        pipe.finish()


def decode_frames_at(path: str | os.PathLike, times: Sequence[float],
                     size: tuple[int, int] | None = None, *, info: Probe | None = None) -> np.ndarray:
    """The frames shown at ``times`` (any order, repeats allowed): uint8 [N, H, W, 3] RGB, row i for times[i].

    One sequential decoding pass (not one seek per time); see ``iter_frames_at``. Holds all N frames: for long
    videos iterate ``iter_frames_at`` instead. ``info``: the caller's probe of ``path`` (see ``decoding_probe``).
    """
    size = _check_size(size)
    order = sorted(range(len(times)), key=lambda i: float(times[i]))
    frames = None
    for row, (_, frame) in zip(order, iter_frames_at(path, times, size, info=info), strict=True):
        if frames is None:
            frames = np.empty((len(times), *frame.shape), np.uint8)
        frames[row] = frame
    if frames is None:
        if size is None:
            info = info or _inspect(path)
            size = (info.width, info.height)
        frames = np.empty((0, size[1], size[0], 3), np.uint8)
    return frames


def iter_frames_at(path: str | os.PathLike, times: Sequence[float], size: tuple[int, int] | None = None, *,
                   info: Probe | None = None) -> Iterator[tuple[float, np.ndarray]]:
    """(t, frame shown at t) for each t of ``times`` in ascending order; sequential decoding, bounded memory.

    How the frame is chosen: ffmpeg's select filter lets through only the frames stamped within
    ``_SELECT_INTERVALS`` average frame intervals before each t (a superset that is cheap to resize). A showinfo
    filter placed before the selection reports the timestamp of every decoded frame. Together they tell Python,
    for each t, the last frame stamped <= t and whether it came through. If it did not (a gap in a
    variable-frame-rate video, or t after the last frame), a follow-up pass seeks to a little before that frame
    and selects it by its exact timestamp. A long list of times is split into several passes, each starting
    where the previous one stopped. A frame shown at several times is yielded once, then as copies. A truncated
    file serves the times before its data ends and raises MediaError for a time past that. ``info``: the caller's
    probe of ``path`` (``decoding_probe`` says when it is used as it is).
    """
    size = _check_size(size)
    targets = sorted(float(t) for t in times)
    if not targets:
        return
    if not all(math.isfinite(t) for t in targets):
        raise ValueError("times must be finite numbers")
    info = decoding_probe(path, info)
    yield from _FrameSelector(path, info, size or _display_size(info), targets).frames()


@dataclasses.dataclass
class _PassOutcome:
    kind: str  # "continue": times left for a new pass; "needs-frame": this pts was not selected; "seek-missed"
    pts: int | None = None
    time: float = 0.0


def _select_expression(targets: Sequence[float], origin: float, window: float, forced: int | None,
                       max_windows: int) -> tuple[str, int]:
    """ffmpeg select terms and how many of ``targets`` they cover: the pass's first frame, a forced timestamp,
    and windows [t - window, t] (merged when they overlap, at most ``max_windows``) on the stored time axis."""
    margin = 1e-3  # select compares floats; a window only has to contain the frames, so it errs wide
    windows: list[list[float]] = []
    covered = 0
    for t in targets:
        low, high = t + origin - window - margin, t + origin + margin
        if windows and low <= windows[-1][1]:
            windows[-1][1] = high
        elif len(windows) == max_windows:
            break
        else:
            windows.append([low, high])
        covered += 1
    terms = ["eq(n,0)"] + ([f"eq(pts,{forced})"] if forced is not None else [])
    terms += [f"between(t,{low:.6f},{high:.6f})" for low, high in windows]
    return sum_expression(terms), covered


def sum_expression(terms: Sequence[str], group: int = 50) -> str:
    """The sum of ffmpeg expressions, parenthesised in groups: ffmpeg's parser gives up on a flat sum of about
    100 terms ("Cannot allocate memory")."""
    terms = list(terms)
    while len(terms) > group:
        terms = ["(" + "+".join(terms[i:i + group]) + ")" for i in range(0, len(terms), group)]
    return "+".join(terms)


class _FrameSelector:
    """Yields the frame shown at each of the sorted ``targets``, over one or more sequential passes."""

    def __init__(self, path, info: Probe, size: tuple[int, int] | None, targets: list[float]):
        self.path, self.info, self.size, self.targets = path, info, size, targets
        self.window = _SELECT_INTERVALS / info.fps if info.fps > 0 else 0.5
        self.next = 0  # index of the first target not yet yielded
        self.last_given: int | None = None  # pts of the frame yielded last (a repeat is yielded as a copy)

    def frames(self) -> Iterator[tuple[float, np.ndarray]]:
        seek, forced, can_seek = 0.0, None, True
        while self.next < len(self.targets):
            before = self.next
            outcome = yield from self._pass(seek, forced)
            if self.next >= len(self.targets):
                return
            if outcome.kind == "seek-missed":  # this container seeks inexactly: decode from the start instead
                can_seek, seek = False, 0.0
                continue
            if outcome.kind == "needs-frame":
                if self.next == before and forced == outcome.pts:
                    raise MediaError(self.path, f"cannot decode the frame shown at {self.targets[self.next]:.3f} s")
                forced, start = outcome.pts, outcome.time - _SEEK_MARGIN
            else:
                forced, start = None, self.targets[self.next] - self.window - _SEEK_MARGIN
            seek = max(0.0, start) if can_seek else 0.0

    def _pass(self, seek: float, forced: int | None):
        """One ffmpeg run from ``seek``: yields (t, frame) as targets resolve; returns a _PassOutcome."""
        expression, count = _select_expression(self.targets[self.next:], self.info.origin, self.window,
                                               forced, _SELECT_TERMS_PER_PASS)
        end = self.next + count  # targets [self.next, end) belong to this pass
        pending = self.next  # first target whose frame is not known yet
        candidate: tuple[int, float] | None = None  # (pts, time) of the last decoded frame stamped <= the target
        resolved: collections.deque[tuple[int, int, float]] = collections.deque()  # (target, frame pts, time)
        selected: dict[int, np.ndarray] = {}  # pts -> frame that came through the selection, in time order
        last_selected: float | None = None
        first = True
        file_seek = seek + self.info.video_offset if seek > 0 else 0.0  # -ss counts from the file's start
        with _FramePipe(_frame_graph(self.path, self.size, expression, max(0.0, file_seek)), self.path) as pipe:
            for _, name, pts, seconds, width, height in pipe:
                if pts is None:
                    raise MediaError(self.path, "video frames without timestamps; cannot pick frames by time")
                if name == "showinfo@out":
                    selected[pts] = pipe.read_frame(width, height)
                    last_selected = pts
                else:  # showinfo@all: a decoded frame, selected or not
                    time = seconds - self.info.origin
                    if first and seek > 0 and time > seek + TIME_TOLERANCE:
                        return _PassOutcome("seek-missed")
                    first = False
                    while pending < end and time > self.targets[pending] + TIME_TOLERANCE:
                        resolved.append((pending, *(candidate or (pts, time))))
                        pending += 1
                    if pending < end:
                        candidate = (pts, time)
                outcome = yield from self._release(resolved, selected, last_selected)
                if outcome is not None:
                    return outcome
                if self.next >= end:
                    return _PassOutcome("continue")
            pipe.finish()
        if candidate is None:
            raise MediaError(self.path, "no decodable video frames")
        while pending < end:  # times at or after the last frame: the last frame is shown
            resolved.append((pending, *candidate))
            pending += 1
        outcome = yield from self._release(resolved, selected, math.inf)
        return outcome or _PassOutcome("continue")

    def _release(self, resolved, selected, last_selected):
        """Yield the resolved targets whose frame came through; a frame that can no longer come -> needs-frame."""
        while resolved:
            index, pts, time = resolved[0]
            frame = selected.get(pts)
            if frame is None:
                if last_selected is not None and last_selected > pts:  # selected frames arrive in time order
                    return _PassOutcome("needs-frame", pts, time)
                return None
            resolved.popleft()
            for older in [p for p in selected if p < pts]:
                del selected[older]
            yield self.targets[index], (frame.copy() if pts == self.last_given else frame)
            self.last_given = pts
            self.next = index + 1
        return None


# ---------------------------------------------------------------------------------------------------------- audio
def decode_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, *, info: Probe | None = None) -> np.ndarray:
    """The audio stream ``Probe.audio_stream`` (the default one, see ``choose_audio``) as mono float32 [S] in
    [-1, 1] at ``sample_rate``.

    Stereo becomes the mean of its two channels (what VGGish does with AVSBench's WAVs); other layouts use
    ffmpeg's normalized downmix. Samples pass through 16-bit PCM, like AVSBench's WAV files. Sample 0 is at time 0,
    the video's first frame (``Probe.origin``; the file's start without video), so sample n plays with the frame
    at n / ``sample_rate`` s: audio that starts later is padded with silence, audio before the picture is cut.
    A file without audio raises MediaError "no audio stream" (check ``probe(path).has_audio`` first to substitute
    silence instead). ``info``: the caller's probe of ``path`` (``decoding_probe`` says when it is used as it is).
    """
    _check_input(path)
    info = decoding_probe(path, info, require_video=False)
    if not info.has_audio:
        raise MediaError(path, "no audio stream")
    source = ffmpeg.input(_url(path))
    # stored timestamps (-copyts) moved so that the origin is 0; aresample pads or drops up to it
    shift = f"PTS-({info.origin:.9f})/TB"
    audio = source[str(info.audio_stream)].filter("asetpts", shift).filter("aresample", first_pts=0)
    output = ffmpeg.output(audio, "pipe:", f="s16le", acodec="pcm_s16le", ac=1, ar=int(sample_rate))
    args = _command(output, "-copyts", "-loglevel", "warning")
    result = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True)
    lines = result.stderr.decode("utf-8", "replace").splitlines()
    if result.returncode != 0 or any("partial file" in line for line in lines):
        raise MediaError(path, _reason(lines, result.returncode))
    return np.frombuffer(result.stdout, np.int16).astype(np.float32) / 32768.0


# -------------------------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def _atomic_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """A temp path beside ``out`` (same suffix, so ffmpeg picks the same muxer) that replaces ``out`` on success
    and is removed on any failure, KeyboardInterrupt included."""
    out = Path(out)
    if out.is_dir():
        raise MediaError(out, "is a directory")
    for source in inputs:
        if source is not None and out.exists() and os.path.samefile(out, source):
            raise MediaError(out, "is also an input; refusing to overwrite it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MediaError(out, f"cannot create the folder ({err.strerror})") from None
    with files.atomic_path(out) as temp:
        yield temp


def _muxer(out: Path) -> str:
    return {".mov": "mov", ".mkv": "matroska", ".webm": "webm"}.get(out.suffix.lower(), "mp4")


def _rate(fps: float) -> str:
    """A frame rate as the exact fraction ffmpeg should use (29.97002997 -> 30000/1001)."""
    value = Fraction(fps).limit_denominator(100_000)
    if value <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    return f"{value.numerator}/{value.denominator}"


def _encoder_output(streams: list, target: Path, **options):
    """H.264 yuv420p (plus AAC when an audio stream is given) with the index up front (+faststart)."""
    video_options = {} if options.get("vcodec") == "copy" else {
        "vcodec": "libx264", "pix_fmt": "yuv420p", "preset": X264_PRESET, "crf": X264_CRF}
    audio_options = {"acodec": "aac", "audio_bitrate": AAC_BITRATE, "shortest": None} if len(streams) > 1 else {}
    muxer = _muxer(target)
    flags = {"movflags": "+faststart"} if muxer in ("mp4", "mov") else {}
    return ffmpeg.output(*streams, _url(target), f=muxer, **{**video_options, **audio_options, **flags, **options})


def _padded_audio(source: str | os.PathLike, stream: int | None = None):
    """The audio stream ``stream`` (file index; None: the first) of ``source``, padded with silence forever; with
    -shortest the output then ends with the video whether the audio is shorter (silence) or longer (cut)."""
    return ffmpeg.input(_url(source))["a:0" if stream is None else str(stream)].filter("apad")


def encode_video(frames: Iterable[np.ndarray], out: str | os.PathLike, fps: float,
                 audio_from: str | os.PathLike | None = None, *, preset: str = X264_PRESET,
                 crf: int = X264_CRF, audio_info: Probe | None = None, all_audio: bool = False) -> Path:
    """Encode RGB uint8 frames [H, W, 3] (all the same size) to H.264 yuv420p MP4 with +faststart, atomically.
    ``preset``/``crf``: x264's speed/quality trade-off (1080p at "veryfast" runs below real time on 2 cores;
    "ultrafast" is several times faster, with larger files).

    ``audio_from``: a file whose audio stream (``Probe.audio_stream``) is muxed in (AAC); the output lasts as long
    as the video: shorter audio ends in silence, longer audio is cut, a file without audio gives a silent video.
    Odd widths or heights get one extra column/row repeating the edge (yuv420p needs even sizes). Frames are
    streamed to ffmpeg, never held. If ``frames`` raises, no output is left behind and the exception propagates.
    ``audio_info``: the caller's probe of ``audio_from`` (then it is not probed again).
    ``all_audio``: instead, the frames replace ``audio_from``'s picture (``replace_video``): every audio stream of
    ``audio_from`` is kept as it is, and the frames start where its video starts (what an overlay needs).
    """
    out = Path(out)
    rate = _rate(fps)
    has_audio = False
    if audio_from is not None:
        audio_info = audio_info or probe(audio_from, require_video=False)
        has_audio = audio_info.has_audio
    if has_audio:  # muxed afterwards: with frames arriving slowly, ffmpeg reads the audio ahead past -shortest
        silent = files.temp_name_for(out)  # a .partial name: a run killed meanwhile leaves a recognisable temp
        try:
            encode_video(frames, silent, fps, preset=preset, crf=crf)
            if all_audio:
                return replace_video(silent, audio_from, out, source_info=audio_info)
            return mux_audio(silent, audio_from, out, audio_info=audio_info)
        finally:
            silent.unlink(missing_ok=True)
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise MediaError(out, "no frames to encode")
    shape = _checked_frame(out, first, 0, None).shape
    height, width = shape[:2]
    with _atomic_output(out, [audio_from]) as temp:
        video = ffmpeg.input("pipe:", f="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=rate)["v"]
        if width % 2 or height % 2:
            video = video.filter("pad", width + width % 2, height + height % 2).filter(
                "fillborders", right=width % 2, bottom=height % 2, mode="smear")
        args = _command(_encoder_output([video], temp, preset=preset, crf=crf), "-y", "-loglevel", "error")
        process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        errors = _StderrCollector(process)
        try:
            for index, frame in enumerate(itertools.chain([first], frames)):
                process.stdin.write(np.ascontiguousarray(_checked_frame(out, frame, index, shape)).data)
            process.stdin.close()
        except BrokenPipeError:  # ffmpeg died: its stderr says why
            with contextlib.suppress(OSError):
                process.stdin.close()
        except BaseException:
            process.kill()
            process.wait()
            errors.join()
            raise
        returncode = process.wait()
        errors.join()
        if returncode != 0:
            raise MediaError(out, _reason(errors.lines, returncode))
    return out


def _checked_frame(out, frame, index: int, expected: tuple | None) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise MediaError(out, f"frame {index} is {frame.dtype} {tuple(frame.shape)}, expected uint8 [H, W, 3] RGB")
    if expected is not None and frame.shape != expected:
        raise MediaError(out, f"frame {index} is {tuple(frame.shape)}, the first frame was {expected}")
    return frame


class _StderrCollector:
    """Reads a process's stderr in a thread (so it never blocks on a full pipe) and keeps the lines."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for raw in iter(self.process.stderr.readline, b""):
            if len(self.lines) < 500:
                self.lines.append(raw.decode("utf-8", "replace").rstrip())

    def join(self) -> None:
        self.thread.join()
        self.process.stderr.close()


def mux_audio(video: str | os.PathLike, audio_source: str | os.PathLike, out: str | os.PathLike, *,
              audio_info: Probe | None = None) -> Path:
    """``video``'s first video stream (copied, not re-encoded) with ``audio_source``'s audio stream
    (``Probe.audio_stream``, the default one) in AAC, atomically. The output lasts as long as the video (see
    ``encode_video``); no audio in the source gives the video alone. ``audio_info``: the caller's probe of
    ``audio_source`` (then it is not probed again)."""
    out = Path(out)
    probe(video)  # reads every packet: a truncated input is named here, not blamed on ``out``
    source_info = audio_info or probe(audio_source, require_video=False)
    with _atomic_output(out, [video, audio_source]) as temp:
        streams = [ffmpeg.input(_url(video))["V:0"]]
        if source_info.has_audio:
            streams.append(_padded_audio(audio_source, source_info.audio_stream))
        _run(_command(_encoder_output(streams, temp, vcodec="copy"), "-y", "-loglevel", "error"), out)
    return out


def replace_video(video: str | os.PathLike, source: str | os.PathLike, out: str | os.PathLike, *,
                  source_info: Probe | None = None) -> Path:
    """``source`` with its picture replaced by ``video``'s first video stream (copied, not re-encoded), atomically.

    Every audio stream of ``source`` is kept as it is: copied with its codec, language and default mark, in its
    order, on ``source``'s clock; a stream whose codec the output container cannot hold is encoded to AAC, the
    others stay copies. ``video`` starts where ``source``'s video starts (``Probe.video_offset``), so picture and
    sound stay as in ``source``. The output lasts as long as its longest stream. ``source_info``: the caller's
    probe of ``source`` (used as ``decoding_probe`` says)."""
    out = Path(out)
    probe(video)  # reads every packet: a truncated input is named here, not blamed on ``out``
    info = decoding_probe(source, source_info, require_video=False)  # the remuxing binary's view of the offset
    offset = {"itsoffset": f"{info.video_offset:.6f}"} if info.video_offset else {}
    with _atomic_output(out, [video, source]) as temp:
        def remux(audio_options: dict) -> subprocess.CompletedProcess:
            streams = [ffmpeg.input(_url(video), **offset)["V:0"]]
            if info.has_audio:
                streams.append(ffmpeg.input(_url(source))["a"])
            muxer = _muxer(temp)
            flags = {"movflags": "+faststart"} if muxer in ("mp4", "mov") else {}
            output = ffmpeg.output(*streams, _url(temp), f=muxer, c="copy", **flags, **audio_options)
            return subprocess.run(_command(output, "-y", "-loglevel", "error"), stdin=subprocess.DEVNULL,
                                  capture_output=True)

        if remux({}).returncode != 0:  # a codec the container refuses: find which, and encode only those
            refused = [k for k in range(info.audio_streams) if not _container_holds(source, k, temp)]
            options = {}
            for k in refused:
                options.update({f"c:a:{k}": "aac", f"b:a:{k}": AAC_BITRATE})
            result = remux(options)
            if result.returncode != 0:
                raise MediaError(out, _reason(result.stderr.decode("utf-8", "replace").splitlines(),
                                              result.returncode))
    return out


def _container_holds(source: str | os.PathLike, audio: int, target: Path) -> bool:
    """Whether ``target``'s container takes audio stream ``audio`` (a:N) of ``source`` as a copy: an empty
    output of it written to ``target`` (a temp path, overwritten later)."""
    output = ffmpeg.output(ffmpeg.input(_url(source))[f"a:{audio}"], _url(target), f=_muxer(target), c="copy", t=0)
    return subprocess.run(_command(output, "-y", "-loglevel", "error"), stdin=subprocess.DEVNULL,
                          capture_output=True).returncode == 0


def synthesize_clip(out: str | os.PathLike, duration: float, size: tuple[int, int] = (1920, 1080), fps: float = 25,
                    audio: bool = True, preset: str = "ultrafast") -> Path:
    """A synthetic clip: ffmpeg's moving testsrc2 pattern (H.264 yuv420p MP4) plus, with ``audio``, a 440 Hz sine
    (AAC, 48 kHz). At 1080p and the default preset it is about 13 Mb/s, a phone video's bitrate. For benchmarks
    and demos."""
    out = Path(out)
    width, height = _check_size(size)
    with _atomic_output(out) as temp:
        streams = [ffmpeg.input(f"testsrc2=size={width}x{height}:rate={_rate(fps)}:duration={duration}",
                                f="lavfi")["v"]]
        if audio:
            streams.append(ffmpeg.input(f"sine=frequency=440:sample_rate=48000:duration={duration}", f="lavfi")["a"])
        _run(_command(_encoder_output(streams, temp, preset=preset, shortest=None), "-y", "-loglevel", "error"),
             out)
    return out


def decode_discard(path: str | os.PathLike) -> None:
    """Decode the first video stream and throw the frames away: the decoder's own cost (the benchmarks' baseline)."""
    _check_input(path)
    _run(_command(ffmpeg.output(ffmpeg.input(_url(path))["V:0"], "-", f="null"), "-loglevel", "error"), path)


def write_wav(path: str | os.PathLike, wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write 16-bit PCM WAV atomically. ``wave``: float [S] or [S, C] in [-1, 1] (clipped), or int16."""
    path = Path(path)
    samples = np.asarray(wave)
    if samples.ndim == 1:
        samples = samples[:, None]
    if samples.ndim != 2 or samples.shape[1] < 1:
        raise MediaError(path, f"wave must be [samples] or [samples, channels], got shape {np.shape(wave)}")
    if samples.dtype != np.int16:
        if not np.issubdtype(samples.dtype, np.floating):
            raise MediaError(path, f"wave must be float in [-1, 1] or int16, got {samples.dtype}")
        samples = np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)
    with _atomic_output(path) as temp:
        with wave_module.open(str(temp), "wb") as writer:
            writer.setnchannels(samples.shape[1])
            writer.setsampwidth(2)
            writer.setframerate(int(sample_rate))
            writer.writeframes(np.ascontiguousarray(samples, dtype="<i2").tobytes())
    return path
