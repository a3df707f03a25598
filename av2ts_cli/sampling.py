"""AVSBench's sampling applied to any video (docs/data-and-metrics.md, "Alignment"): which frames, which audio, which
windows, and how a window's inputs are assembled.

For every second k of the video, the frame shown at k + 15/16 s, paired with a 0.96 s VGGish log-mel example. T
consecutive seconds form a window, the network's clip; the examples of a window are cut from the audio starting at
the window's first second, exactly as the 5 s AVSBench clips were (so the 0.96 s hop drifts inside a window as it
did in training, never across a whole video). ``fps`` F > 1 adds passes: pass j shifts every frame time and every
audio window by -j/F s, so the frames are 1/F s apart. The last window of a pass is padded like the data was (its
last second repeated, ``avsbench.pad_by_repeating_last``); padded frames give no output. Second k is sampled when at
least half of it exists, and a video shorter than that still gives one.

Time 0 is the video stream's first frame (``media.Probe.origin``), for frames and audio alike: frame k is the one
shown k + 15/16 s into the video's own content, and the audio is cut from ``media.decode_audio``'s samples, whose
sample 0 plays with that first frame. A video stream that starts after the file does (an edit list, a camera that
starts its sound first) is thus sampled from its own first frame, and its audio is taken from the same moments as
its frames, as AVSBench paired second k of video with second k of audio; sound before the picture is not heard.

The schedule is the one source of the processing order: ``Schedule.windows`` (group, then pass),
``Schedule.group_windows`` and ``group_frames`` (what one decoding step covers), ``Schedule.window_inputs`` and
``window_audio`` (a window's T inputs, padded), ``Schedule.real_outputs`` (a window's outputs without the padded
slots) and ``Schedule.audio_interval`` (the audio a frame's example read).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from av2ts_cli import media
from av2ts_cli.avsbench import EXAMPLE_SECONDS, EXAMPLE_SPAN, FRAME_OFFSET, SAMPLE_RATE, pad_by_repeating_last
from av2ts_cli.model.audio import waveform_to_examples

T = TypeVar("T")


@dataclass(frozen=True)
class SampledFrame:
    index: int  # position in time order: the mask file number
    second: int  # k: the second of the video this frame stands for
    shift: int  # j: the pass (times and audio shifted by -j/fps)
    time: float  # seconds: the frame shown at this time is decoded


@dataclass(frozen=True)
class Window:
    """T consecutive seconds of one pass: the network's clip. ``frames`` holds the real ones (fewer than T in a
    padded tail window)."""

    group: int  # w: seconds [w*T, (w+1)*T)
    shift: int
    frames: tuple[SampledFrame, ...]
    audio_start: float  # seconds; example s of the window reads [audio_start + 0.96 s, + 0.975 s]


@dataclass(frozen=True)
class Schedule:
    seconds: int  # N sampled seconds
    fps: int  # F masks per second
    window: int  # T
    frames: tuple[SampledFrame, ...]  # N * F, in index (= time) order
    windows: tuple[Window, ...]  # processing order: group, then pass
    duration: float  # seconds of the video sampled

    @property
    def groups(self) -> int:
        return math.ceil(self.seconds / self.window)

    @property
    def padded_frames(self) -> int:
        """Slots of all windows that repeat the last frame of a tail window (they give no output)."""
        return self.fps * (self.groups * self.window - self.seconds)

    def group_frames(self, group: int) -> tuple[SampledFrame, ...]:
        """The frames of every pass of window group ``group``: a contiguous run of indices."""
        first = group * self.window * self.fps
        last = min(self.seconds, (group + 1) * self.window) * self.fps
        return self.frames[first:last]

    def group_windows(self, group: int) -> tuple[Window, ...]:
        """The windows of window group ``group``, one per pass, in processing order."""
        return self.windows[group * self.fps:(group + 1) * self.fps]

    def completes_group(self, window: Window) -> bool:
        """Whether ``window`` is the last of its group in processing order: after it, every frame of
        ``group_frames(window.group)`` has its output."""
        return window.shift == self.fps - 1

    def window_inputs(self, window: Window, items: Mapping[int, T]) -> list[T]:
        """The T inputs of ``window``: ``items[frame.index]`` of each real frame, the tail padded by repeating the
        last one (AVSBench's padding). ``items`` maps frame indices to decoded frames, maskiges, ..."""
        return pad_by_repeating_last([items[frame.index] for frame in window.frames], self.window)

    def window_audio(self, wave: np.ndarray, window: Window):
        """The log-mel examples [T, 96, 64] of ``window`` (``window_examples``) from ``wave`` (16 kHz mono)."""
        return window_examples(wave, window.audio_start, len(window.frames), self.window)

    def real_outputs(self, window: Window, outputs: Sequence[T]) -> list[tuple[SampledFrame, T]]:
        """(frame, its output) for the real frames of ``window``; ``outputs`` has one item per slot (T), and the
        padded slots of a tail window are dropped."""
        if len(outputs) != self.window:
            raise ValueError(f"a window has {self.window} slots, got {len(outputs)} outputs")
        return list(zip(window.frames, outputs[:len(window.frames)], strict=True))

    def audio_interval(self, frame: SampledFrame) -> tuple[float, float]:
        """Seconds [start, end) of the audio the example paired with ``frame`` read."""
        group, slot = divmod(frame.second, self.window)
        start = _audio_start(group, self.window, frame.shift, self.fps) + slot * EXAMPLE_SECONDS
        return start, start + EXAMPLE_SPAN


def _audio_start(group: int, window: int, shift: int, fps: int) -> float:
    """Where the audio of a window starts: its first second, moved back by its pass's shift."""
    return group * window - shift / fps


def sampled_seconds(duration: float) -> int:
    """Seconds of a video that get a frame: second k when at least half of it exists; at least one."""
    return max(1, math.floor(duration + 0.5))


def make_schedule(duration: float, fps: int, window: int, last_time: float | None = None) -> Schedule:
    """The sampling of a video of ``duration`` seconds (the video stream's): frames at k + 15/16 - j/fps for
    second k and pass j, clamped to [0, ``last_time``] (default: ``duration``; past the end the last frame is
    shown, as AVSBench clamps), grouped into windows of ``window`` seconds."""
    count = sampled_seconds(duration)
    last_time = duration if last_time is None else last_time
    last_time = max(0.0, last_time)
    frames = []
    for second in range(count):
        for shift in reversed(range(fps)):
            t = min(max(second + FRAME_OFFSET - shift / fps, 0.0), last_time)
            frames.append(SampledFrame(len(frames), second, shift, round(t, 6)))
    windows = []
    for group in range(math.ceil(count / window)):
        seconds = range(group * window, min(count, (group + 1) * window))
        for shift in range(fps):
            members = tuple(frames[k * fps + (fps - 1 - shift)] for k in seconds)
            windows.append(Window(group, shift, members, _audio_start(group, window, shift, fps)))
    return Schedule(count, fps, window, tuple(frames), tuple(windows), duration)


def video_schedule(info: media.Probe, fps: int, window: int) -> Schedule:
    """The schedule of a probed video: its video stream's duration (``video_duration``), frame times clamped to
    half a frame interval before its end (so the last time still falls on its last frame)."""
    duration = video_duration(info)
    return make_schedule(duration, fps, window, duration - (0.5 / info.fps if info.fps > 0 else 1e-3))


def video_duration(info: media.Probe) -> float:
    """Seconds of the video stream from its first frame: frames / average rate when both are known (the file's
    duration is the longest stream's, which may be the audio), never more than the file holds after the video's
    start (``Probe.video_offset``)."""
    after_start = max(0.0, info.duration - info.video_offset)
    if info.frame_count and info.fps:
        seconds = info.frame_count / info.fps
        return min(seconds, after_start) if after_start > 0 else seconds
    return after_start


def window_examples(wave: np.ndarray, start: float, count: int, window: int):
    """Log-mel examples [window, 96, 64] of a window: ``count`` examples of the audio from ``start`` s (silence
    before 0 and after the end of ``wave``, 16 kHz mono float32), then the last one repeated up to ``window``."""
    first = round(start * SAMPLE_RATE)
    length = round(count * SAMPLE_RATE)
    segment = np.zeros(length, np.float32)
    low, high = max(first, 0), min(first + length, len(wave))
    if high > low:
        segment[low - first:high - first] = wave[low:high]
    examples = waveform_to_examples(torch.from_numpy(segment), num_examples=count)
    return torch.stack(pad_by_repeating_last(list(examples), window))
