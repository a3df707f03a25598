"""AVSBench's sampling for any video: seconds sampled, frame times of shifted passes, windows, the assembly of a
window's inputs (tail padding) and outputs (padded slots dropped), audio examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import dominant_frequency, read_frame_index

from av2ts_cli import media, sampling
from av2ts_cli.avsbench import EXAMPLE_SECONDS, EXAMPLE_SPAN, FRAME_OFFSET
from av2ts_cli.model.audio import waveform_to_examples


@pytest.mark.parametrize(("duration", "seconds"), [(10.0, 10), (10.04, 10), (10.49, 10), (10.5, 11), (0.04, 1),
                                                   (0.6, 1), (1.5, 2), (120.0, 120)])
def test_a_second_is_sampled_when_half_of_it_exists(duration, seconds):
    assert sampling.sampled_seconds(duration) == seconds


def test_schedule_follows_avsbench_with_shifted_passes():
    schedule = sampling.make_schedule(7.0, fps=2, window=5, last_time=6.98)
    assert (schedule.seconds, schedule.groups, len(schedule.frames), len(schedule.windows)) == (7, 2, 14, 4)
    times = [f.time for f in schedule.frames]
    assert times == sorted(times) and [f.index for f in schedule.frames] == list(range(14))
    assert times[:4] == [0.4375, 0.9375, 1.4375, 1.9375] and times[-1] == 6.9375
    assert [(f.second, f.shift) for f in schedule.frames[:3]] == [(0, 1), (0, 0), (1, 1)]
    # processing order: group, then pass; pass j starts its audio j/fps earlier
    assert [(w.group, w.shift, w.audio_start) for w in schedule.windows] == [(0, 0, 0.0), (0, 1, -0.5), (1, 0, 5.0),
                                                                            (1, 1, 4.5)]
    assert [f.second for f in schedule.windows[1].frames] == [0, 1, 2, 3, 4]
    assert [f.time for f in schedule.windows[2].frames] == [5.9375, 6.9375]  # tail: 2 real frames, 3 padded
    assert [f.index for f in schedule.group_frames(1)] == list(range(10, 14))
    for window in schedule.windows:  # example s of a window reads the second its frame stands for
        for slot, frame in enumerate(window.frames):
            assert frame.time - (window.audio_start + slot) == pytest.approx(FRAME_OFFSET, abs=1e-9)


def test_schedule_clamps_times_into_the_video():
    schedule = sampling.make_schedule(0.3, fps=1, window=5, last_time=0.28)
    assert [f.time for f in schedule.frames] == [0.28]  # shorter than a second: still one frame, the last one
    dense = sampling.make_schedule(2.0, fps=20, window=5, last_time=1.98)
    assert len(dense.frames) == 40 and min(f.time for f in dense.frames) == 0.0
    times = [f.time for f in dense.frames]
    assert times == sorted(times)


def test_window_examples_cut_the_audio_like_a_five_second_clip():
    rng = np.random.default_rng(0)
    wave = (rng.standard_normal(16000 * 12) * 0.1).astype(np.float32)
    examples = sampling.window_examples(wave, 5.0, 5, 5)
    expected = waveform_to_examples(torch.from_numpy(wave[5 * 16000:10 * 16000].copy()), num_examples=5)
    assert torch.allclose(examples, expected)
    # a tail window: 2 real seconds, padded by repeating the last example
    tail = sampling.window_examples(wave, 10.0, 2, 5)
    assert torch.equal(tail[2], tail[1]) and torch.equal(tail[4], tail[1])
    assert torch.allclose(tail[:2], waveform_to_examples(torch.from_numpy(wave[10 * 16000:].copy()), 2))
    # before 0 and after the end: silence
    silence = waveform_to_examples(torch.zeros(16000), num_examples=1)[0]
    early = sampling.window_examples(wave, -1.0, 2, 2)
    assert torch.allclose(early[0], silence)
    late = sampling.window_examples(wave, 20.0, 1, 1)
    assert torch.allclose(late[0], silence)


def test_windows_are_assembled_and_unpadded_by_the_schedule():
    schedule = sampling.make_schedule(7.0, fps=2, window=5, last_time=6.98)
    assert schedule.padded_frames == 2 * (2 * 5 - 7) and schedule.duration == 7.0
    assert schedule.group_windows(1) == schedule.windows[2:4]
    assert [schedule.completes_group(w) for w in schedule.windows] == [False, True, False, True]
    tail = schedule.windows[2]  # seconds 5 and 6 of pass 0
    names = {f.index: f"frame {f.index}" for f in schedule.frames}
    assert schedule.window_inputs(tail, names) == ["frame 11", "frame 13", "frame 13", "frame 13", "frame 13"]
    outputs = ["a", "b", "padded", "padded", "padded"]
    assert schedule.real_outputs(tail, outputs) == [(tail.frames[0], "a"), (tail.frames[1], "b")]
    with pytest.raises(ValueError, match="5 slots"):
        schedule.real_outputs(tail, outputs[:2])
    wave = np.zeros(16000 * 7, np.float32)
    assert torch.equal(schedule.window_audio(wave, tail), sampling.window_examples(wave, 5.0, 2, 5))
    for window in schedule.windows:  # the audio interval of a frame is its slot's example in its window
        for slot, frame in enumerate(window.frames):
            start = window.audio_start + slot * EXAMPLE_SECONDS
            assert schedule.audio_interval(frame) == pytest.approx((start, start + EXAMPLE_SPAN))


def test_a_video_that_starts_late_is_sampled_on_its_own_clock_with_the_sound_of_the_same_moments(make_odd_clip):
    """The picture starts 1 s after the file (an 880 Hz lead-in plays before it, 440 Hz with it): frame k is the
    one k + 15/16 s into the picture, and each frame's example reads the sound that plays with the picture."""
    clip = make_odd_clip("late video")
    info = media.probe(clip, ffprobe=False)
    assert sampling.video_duration(info) == 6.0  # the picture's 150 frames, not the file's 7 s
    schedule = sampling.video_schedule(info, fps=1, window=5)
    assert schedule.seconds == 6 and [f.time for f in schedule.frames] == [k + FRAME_OFFSET for k in range(6)]
    frames = media.decode_frames_at(clip, [f.time for f in schedule.frames], size=(40, 20), info=info)
    assert [read_frame_index(f) for f in frames] == [23, 48, 73, 98, 123, 148]
    wave = media.decode_audio(clip, info=info)
    for frame in schedule.frames:
        start, end = schedule.audio_interval(frame)
        segment = wave[max(0, round(start * 16000)):round(end * 16000)]
        assert len(segment) >= 0.9 * 16000 and dominant_frequency(segment) == pytest.approx(440, abs=5), frame
    assert np.sqrt(np.mean(wave[800:16000] ** 2)) > 0.15  # second 0 of the picture has its sound, not silence
