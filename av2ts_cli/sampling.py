"""AVSBench's sampling applied to any video (data-and-metrics.md section 4): which frames, which audio, which
windows.

For every second k of the video, the frame shown at k + 15/16 s, paired with a 0.96 s VGGish log-mel example. T
consecutive seconds form a window, the network's clip; the examples of a window are cut from the audio starting at
the window's first second, exactly as the 5 s AVSBench clips were (so the 0.96 s hop drifts inside a window as it
did in training, never across a whole video). ``fps`` F > 1 adds passes: pass j shifts every frame time and every
audio window by -j/F s, so the frames are 1/F s apart. The last window of a pass is padded like the data was (its
last second repeated); padded frames give no output. Second k is sampled when at least half of it exists, and a
video shorter than that still gives one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from av2ts_cli import media

FRAME_OFFSET = 15 / 16  # AVSBench keeps the 16th of 16 frames in each second
EXAMPLE_SECONDS = 0.96  # one VGGish log-mel example
EXAMPLE_SPAN = 0.975  # seconds of audio an example reads (96 hops of 10 ms plus a 25 ms window)


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

    @property
    def groups(self) -> int:
        return math.ceil(self.seconds / self.window)

    def group_frames(self, group: int) -> tuple[SampledFrame, ...]:
        """The frames of every pass of window group ``group``: a contiguous run of indices."""
        first = group * self.window * self.fps
        last = min(self.seconds, (group + 1) * self.window) * self.fps
        return self.frames[first:last]


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
            windows.append(Window(group, shift, members, group * window - shift / fps))
    return Schedule(count, fps, window, tuple(frames), tuple(windows))


def video_duration(info: media.Probe) -> float:
    """Seconds of the video stream: frames / average rate when both are known (the file's duration is the longest
    stream's, which may be the audio), never more than the file's duration."""
    if info.frame_count and info.fps:
        seconds = info.frame_count / info.fps
        return min(seconds, info.duration) if info.duration > 0 else seconds
    return info.duration


def window_examples(wave: np.ndarray, start: float, count: int, window: int):
    """Log-mel examples [window, 96, 64] of a window: ``count`` examples of the audio from ``start`` s (silence
    before 0 and after the end of ``wave``, 16 kHz mono float32), then the last one repeated up to ``window``."""
    import torch

    from av2ts_cli.model.audio import SAMPLE_RATE, waveform_to_examples

    first = round(start * SAMPLE_RATE)
    length = round(count * SAMPLE_RATE)
    segment = np.zeros(length, np.float32)
    low, high = max(first, 0), min(first + length, len(wave))
    if high > low:
        segment[low - first:high - first] = wave[low:high]
    examples = waveform_to_examples(torch.from_numpy(segment), num_examples=count)
    if count < window:
        examples = torch.cat([examples, examples[-1:].expand(window - count, -1, -1)])
    return examples
