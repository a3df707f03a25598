"""av2ts_cli/media.py against real ffmpeg: probe, frame timing, audio, encode/mux, atomic writes, bad inputs,
and how the binary is found. Clips come from conftest's ``make_clip`` (frames carry their index as bars)."""

from __future__ import annotations

import bisect
import dataclasses
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import INDEX_BITS, dominant_frequency, read_frame_index, vfr_frame_times

from av2ts_cli import media
from av2ts_cli.errors import MediaError

FPS = 25


def shown_index(frame_times: list[float], t: float) -> int:
    """The frame on screen at t given the frames' timestamps: the last one <= t, else the first."""
    return max(bisect.bisect_right(frame_times, t + media.TIME_TOLERANCE) - 1, 0)


def index_frames(count: int, size=(64, 48)) -> list[np.ndarray]:
    """Frames painted like conftest's index clips: bar b white iff bit b of the frame's index is set."""
    width, height = size
    column_bit = np.arange(width) * INDEX_BITS // width
    frames = []
    for k in range(count):
        row = np.where((k >> column_bit) & 1, 255, 0).astype(np.uint8)
        frames.append(np.repeat(np.broadcast_to(row[None, :, None], (height, width, 1)), 3, axis=2).copy())
    return frames


@pytest.fixture
def passes(monkeypatch):
    """Records the (select expression length, seek) of every frame-selection ffmpeg run."""
    calls = []
    original = media._frame_graph

    def spy(path, size, select=None, seek=0.0):
        calls.append((len(select or ""), seek))
        return original(path, size, select, seek)

    monkeypatch.setattr(media, "_frame_graph", spy)
    return calls


def ffmpeg_audio(path, channels: int, sample_rate: int = 16000) -> np.ndarray:
    """Float samples [S, channels] decoded by ffmpeg directly (the reference for decode_audio)."""
    out = subprocess.run([media.find_ffmpeg(), "-v", "error", "-i", str(path), "-map", "0:a:0", "-ac", str(channels),
                          "-ar", str(sample_rate), "-f", "f32le", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(out, np.float32).reshape(-1, channels)


# ---------------------------------------------------------------------------------------------------------- probe
def test_probe_reports_streams(make_clip):
    info = media.probe(make_clip("plain", duration=2.0, size=(64, 48), fps=FPS))
    assert (info.duration, info.fps, info.frame_count) == (2.0, 25.0, 50)
    assert (info.width, info.height, info.rotation) == (64, 48, 0)
    assert info.has_audio and (info.sample_rate, info.channels) == (16000, 1)
    assert (info.video_codec, info.audio_codec) == ("h264", "aac")
    assert info.has_video and info.start_time == 0.0


def test_probe_48k_stereo_and_silent_clips(make_clip):
    stereo = media.probe(make_clip("stereo", sample_rate=48000, channels=2))
    assert (stereo.has_audio, stereo.sample_rate, stereo.channels) == (True, 48000, 2)
    silent = media.probe(make_clip("silent", audio=False))
    assert (silent.has_audio, silent.sample_rate, silent.channels, silent.audio_codec) == (False, 0, 0, "")
    assert silent.frame_count == 50


def test_probe_variable_frame_rate_reports_the_average(make_clip):
    info = media.probe(make_clip("vfr", vfr=True, duration=2.0))
    assert info.frame_count == 50
    assert info.fps == pytest.approx(25, rel=0.02)


def test_probe_ntsc_rate_is_exact(make_clip):
    info = media.probe(make_clip("ntsc", fps=30000 / 1001, duration=1.0))
    assert info.fps == 30000 / 1001 and info.frame_count == 30


def test_probe_one_pixel_clip(make_clip):
    info = media.probe(make_clip("dot", size=(1, 1), duration=1.0))
    assert (info.width, info.height, info.frame_count) == (1, 1, 25)


def test_probe_portrait_phone_clip_reports_display_size(make_clip):
    info = media.probe(make_clip("portrait", size=(1920, 1080), rotation=90, duration=1.0))
    assert (info.width, info.height, info.rotation) == (1080, 1920, 90)


@pytest.mark.parametrize("rotation", [180, 270])
def test_probe_other_rotations(make_clip, rotation):
    info = media.probe(make_clip("turned", rotation=rotation, duration=0.4))
    assert info.rotation == rotation
    assert (info.width, info.height) == ((48, 64) if rotation == 270 else (64, 48))


@pytest.mark.parametrize(("audio_duration", "duration"), [(1.0, 2.0), (3.0, 3.0)])
def test_probe_duration_is_the_longest_stream(make_clip, audio_duration, duration):
    info = media.probe(make_clip("uneven", duration=2.0, audio_duration=audio_duration))
    assert info.duration == pytest.approx(duration, abs=0.03) and info.frame_count == 50


def test_probe_audio_only_file_needs_require_video_false(tmp_path):
    wav = media.write_wav(tmp_path / "tone.wav", np.zeros(8000, np.float32), 16000)
    with pytest.raises(MediaError, match="no video stream"):
        media.probe(wav)
    info = media.probe(wav, require_video=False)
    assert not info.has_video and info.has_audio and info.duration == 0.5 and info.audio_codec == "pcm_s16le"


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="no ffprobe on PATH (the parser is tested everywhere)")
def test_ffprobe_and_ffmpeg_dump_give_the_same_probe(make_clip):
    clips = [make_clip("plain"), make_clip("vfr", vfr=True), make_clip("stereo", sample_rate=48000, channels=2),
             make_clip("turned", rotation=270, duration=0.4), make_clip("ntsc", fps=30000 / 1001, duration=1.0),
             make_clip("silent", audio=False)]
    for clip in clips:
        assert media._probe_with_ffprobe(clip, True) == media._probe_with_ffmpeg(clip, True)


def test_dump_helpers():
    assert [media._channel_count(x) for x in ("mono", "stereo", "5.1(side)", "7.1.4", "3 channels", "quad")] == \
        [1, 2, 6, 12, 3, 4]
    assert media._normalized_fps(29.97) == media._normalized_fps(30000 / 1001) == 30000 / 1001
    assert media._normalized_fps(24.876) == 24.88 and media._normalized_fps(0) == 0.0
    assert [media._clockwise(d) for d in (-90, 90, 180, -180, 270, 0)] == [270, 90, 180, 180, 270, 0]


# --------------------------------------------------------------------------------------------------------- frames
def test_frame_at_t_is_the_frame_shown_at_t(make_clip, passes):
    clip = make_clip("plain")
    stamps = [k / FPS for k in range(50)]
    times = stamps + [s + 0.02 for s in stamps] + [s - 1e-4 for s in stamps[1:]] + [-1.0, 1.999, 2.5, 100.0]
    frames = media.decode_frames_at(clip, times, size=(40, 20))
    assert frames.shape == (len(times), 20, 40, 3) and frames.dtype == np.uint8
    assert [read_frame_index(f) for f in frames] == [shown_index(stamps, t) for t in times]
    assert len(passes) == 1 and passes[0][1] == 0.0  # one sequential pass, no seek


def test_avsbench_sampling_and_shifted_passes(make_clip, passes):
    clip = make_clip("five seconds", duration=5.0)
    times = [k - 1 + 15 / 16 for k in range(1, 6)]
    times += [t + 0.5 for t in times[:-1]]  # predict --fps 2 adds a pass shifted by half a second
    frames = media.decode_frames_at(clip, times, size=(64, 48))
    assert [read_frame_index(f) for f in frames] == [23, 48, 73, 98, 123, 35, 60, 85, 110]
    assert len(passes) == 1


def test_variable_frame_rate_timing(make_clip):
    clip = make_clip("vfr", vfr=True, duration=2.0)
    stamps = vfr_frame_times(50, FPS)
    times = list(np.arange(-0.05, 2.1, 0.007)) + stamps  # dense times plus every frame's own timestamp
    frames = media.decode_frames_at(clip, times, size=(40, 20))
    assert [read_frame_index(f) for f in frames] == [shown_index(stamps, t) for t in times]


def test_gap_in_variable_frame_rate_needs_a_follow_up_pass(make_clip, passes):
    stamps = [k / FPS for k in range(75)] + [6.0 + k / FPS for k in range(50)]  # 3 s of nothing after 2.96 s
    clip = make_clip("gap", frame_times=stamps, audio=False)
    times = [0.5, 4.0, 5.99, 6.0, 7.0]
    frames = media.decode_frames_at(clip, times, size=(40, 20))
    assert [read_frame_index(f) for f in frames] == [12, 74, 74, 75, 100]
    assert len(passes) == 2 and passes[1][1] > 0  # the second pass seeks to a little before frame 74


def test_times_after_the_last_frame_show_the_last_frame(make_clip):
    clip = make_clip("long audio", duration=2.0, audio_duration=5.0)
    frames = media.decode_frames_at(clip, [0.5, 2.5, 4.9], size=(40, 20))
    assert [read_frame_index(f) for f in frames] == [12, 49, 49]


def test_many_times_are_split_into_seeking_passes(make_clip, passes, monkeypatch):
    monkeypatch.setattr(media, "_SELECT_TERMS_PER_PASS", 2)
    clip = make_clip("twelve seconds", duration=12.0, audio=False)
    times = [k + 15 / 16 for k in range(12)]
    frames = media.decode_frames_at(clip, times, size=(40, 20))
    assert [read_frame_index(f) for f in frames] == [round(t * FPS - 0.5) for t in times]
    assert len(passes) == 6 and all(seek > 0 for _, seek in passes[1:])


def test_a_seek_that_lands_late_falls_back_to_decoding_from_the_start(make_clip, passes, monkeypatch):
    monkeypatch.setattr(media, "_SELECT_TERMS_PER_PASS", 2)
    original = media._frame_graph

    def late_seek(path, size, select=None, seek=0.0):  # simulates a container whose index is off by 3 s
        return original(path, size, select, seek + 3.0 if seek > 0 else 0.0)

    monkeypatch.setattr(media, "_frame_graph", late_seek)
    clip = make_clip("twelve seconds", duration=12.0, audio=False)
    times = [k + 15 / 16 for k in range(12)]
    frames = media.decode_frames_at(clip, times, size=(40, 20))
    assert [read_frame_index(f) for f in frames] == [round(t * FPS - 0.5) for t in times]


def test_unsorted_repeated_times_and_independent_arrays(make_clip):
    clip = make_clip("plain")
    times = [1.5, 0.1, 1.5, 0.1, 0.0]
    frames = media.decode_frames_at(clip, times)
    assert [read_frame_index(f) for f in frames] == [37, 2, 37, 2, 0]
    streamed = list(media.iter_frames_at(clip, [0.5, 0.5]))
    assert [t for t, _ in streamed] == [0.5, 0.5]
    streamed[0][1][:] = 0  # a frame shown at two times comes as two arrays
    assert read_frame_index(streamed[1][1]) == 12


def test_no_times_gives_an_empty_batch(make_clip):
    assert media.decode_frames_at(make_clip("plain"), []).shape == (0, 48, 64, 3)
    assert media.decode_frames_at(make_clip("plain"), [], size=(8, 4)).shape == (0, 4, 8, 3)


def test_bad_arguments(make_clip):
    with pytest.raises(ValueError):
        media.decode_frames_at(make_clip("plain"), [0.0], size=(0, 10))
    with pytest.raises(ValueError):
        media.decode_frames_at(make_clip("plain"), [float("nan")])


def test_rotation_is_applied_to_frames(make_clip):
    clip = make_clip("portrait", size=(1920, 1080), rotation=90, duration=1.0)
    frames = media.decode_frames_at(clip, [0.0, 0.5], size=None)
    assert frames.shape == (2, 1920, 1080, 3)  # display orientation: portrait
    assert [read_frame_index(f, rotation=90) for f in frames] == [0, 12]
    assert read_frame_index(frames[1], rotation=0) != 12  # read unturned, the bars make no sense
    small = media.decode_frames_at(clip, [0.5], size=(224, 224))
    assert small.shape == (1, 224, 224, 3) and read_frame_index(small[0], rotation=90) == 12


@pytest.mark.parametrize("rotation", [180, 270])
def test_other_rotations_are_applied(make_clip, rotation):
    clip = make_clip("turned", rotation=rotation, duration=0.4)
    frame = media.decode_frames_at(clip, [0.2])[0]
    assert frame.shape == ((64, 48, 3) if rotation == 270 else (48, 64, 3))
    assert read_frame_index(frame, rotation=rotation) == 5


def test_one_pixel_clip_decodes(make_clip):
    clip = make_clip("dot", size=(1, 1), duration=1.0)
    assert media.decode_frames_at(clip, [0.0, 0.5]).shape == (2, 1, 1, 3)
    assert len(list(media.iter_frames(clip))) == 25


def test_iter_frames_yields_every_frame_with_its_timestamp(make_clip):
    clip = make_clip("vfr", vfr=True, duration=2.0)
    got = [(t, read_frame_index(f)) for t, f in media.iter_frames(clip, size=(40, 20))]
    assert [i for _, i in got] == list(range(50))
    assert [t for t, _ in got] == pytest.approx(vfr_frame_times(50, FPS), abs=1e-4)
    frames = [f for _, f in media.iter_frames(make_clip("plain"))]
    assert len(frames) == media.probe(make_clip("plain")).frame_count and frames[0].shape == (48, 64, 3)
    frames[0][0, 0] = 7  # writable arrays


def test_a_passed_probe_is_used_only_when_its_start_time_is_the_decoders(make_clip, monkeypatch):
    """iter_frames/iter_frames_at take the caller's probe instead of inspecting the file again, but only one the
    ffmpeg binary made (its start time is the one decoding uses); an ffprobe probe is replaced by ffmpeg -i."""
    clip = make_clip("plain")
    info = media.probe(clip, ffprobe=False)
    assert info.tool == "ffmpeg"
    inspected = []
    original = media._inspect

    def counting(path, *args, **kwargs):
        inspected.append((Path(path), kwargs.get("ffprobe", True)))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(media, "_inspect", counting)
    times = [0.0, 0.5, 1.5]
    with_info = [(t, read_frame_index(f)) for t, f in media.iter_frames_at(clip, times, info=info)]
    assert with_info == [(t, read_frame_index(f)) for t, f in media.iter_frames_at(clip, times)]
    assert len(list(media.iter_frames(clip, info=info))) == info.frame_count
    assert inspected == [(clip, False)]  # only the call without info inspected the file
    from_ffprobe = dataclasses.replace(info, tool="ffprobe", start_time=info.start_time + 0.5)
    fresh = media.decoding_probe(clip, from_ffprobe)  # asked ffmpeg again: its own start time
    assert fresh.tool == "ffmpeg" and fresh.start_time == info.start_time and inspected[-1] == (clip, False)
    assert media.decoding_probe(clip, info) is info


def test_stopping_iteration_early_stops_ffmpeg(make_clip, monkeypatch):
    pipes = []
    original = media._FramePipe.__init__

    def spy(self, *args):
        original(self, *args)
        pipes.append(self)

    monkeypatch.setattr(media._FramePipe, "__init__", spy)
    frames = media.iter_frames(make_clip("twelve seconds", duration=12.0, audio=False))
    next(frames)
    frames.close()
    assert pipes and pipes[0].process.poll() is not None


def test_a_frame_pipe_out_of_step_raises_instead_of_hanging(make_clip, monkeypatch):
    monkeypatch.setattr(media, "_STALL_CHECK_SECONDS", 0.2)
    blind_to_frame_3 = media._SHOWINFO_FRAME.pattern.replace(r"n:\s*\d+", r"n:\s*(?!3 )\d+")
    monkeypatch.setattr(media, "_SHOWINFO_FRAME", re.compile(blind_to_frame_3))  # as if a log line got mangled
    with pytest.raises(MediaError, match="lost track"):
        list(media.iter_frames(make_clip("plain"), size=(640, 480)))  # frames larger than the pipe's buffer


# ---------------------------------------------------------------------------------------------------------- audio
@pytest.mark.parametrize(("sample_rate", "channels"), [(16000, 1), (48000, 2)])
def test_decoded_audio_lasts_the_clip(make_clip, sample_rate, channels):
    clip = make_clip("tone", duration=2.0, sample_rate=sample_rate, channels=channels)
    wave = media.decode_audio(clip)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) / 16000 - media.probe(clip).duration) <= 1 / FPS
    assert np.sqrt(np.mean(wave[1600:-1600] ** 2)) == pytest.approx(0.125 / np.sqrt(2), rel=0.02)  # sine at 1/8


def test_stereo_becomes_the_mean_of_its_channels(tmp_path):
    clip = tmp_path / "left right.m4a"
    subprocess.run([media.find_ffmpeg(), "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:"
                    "duration=1", "-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=48000:duration=1",
                    "-filter_complex", "[0:a][1:a]join=inputs=2:channel_layout=stereo", "-c:a", "aac", str(clip)],
                   check=True)
    reference = ffmpeg_audio(clip, channels=2)
    assert np.abs(reference[:, 0] - reference[:, 1]).max() > 0.1  # the channels really differ
    wave = media.decode_audio(clip)
    assert len(wave) == len(reference)
    assert np.abs(wave - reference.mean(axis=1)).max() < 2e-3


def test_late_audio_is_padded_to_the_file_clock(make_clip, tmp_path):
    source = make_clip("tone", duration=2.0, audio_duration=1.0)
    delayed = tmp_path / "delayed.mp4"
    subprocess.run([media.find_ffmpeg(), "-v", "error", "-i", str(source), "-itsoffset", "0.5", "-i", str(source),
                    "-map", "0:v", "-map", "1:a", "-c", "copy", str(delayed)], check=True)
    wave = media.decode_audio(delayed)
    assert len(wave) / 16000 == pytest.approx(1.5, abs=0.05)
    assert np.abs(wave[: int(0.45 * 16000)]).max() < 1e-3 and np.abs(wave[int(0.6 * 16000):]).max() > 0.1


def test_a_file_without_audio_raises(make_clip):
    clip = make_clip("silent", audio=False)
    with pytest.raises(MediaError, match="no audio stream") as caught:
        media.decode_audio(clip)
    assert caught.value.path == str(clip)


def test_write_wav_round_trip(tmp_path):
    wave = (0.5 * np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000)).astype(np.float32)
    path = media.write_wav(tmp_path / "mono.wav", wave, 16000)
    assert np.abs(media.decode_audio(path) - wave).max() < 1e-4
    stereo = media.write_wav(tmp_path / "stereo.wav", np.stack([wave, -wave], axis=1), 16000)
    info = media.probe(stereo, require_video=False)
    assert (info.channels, info.sample_rate) == (2, 16000)
    assert np.abs(ffmpeg_audio(stereo, 2)[:, 1] + wave).max() < 1e-4
    integers = media.write_wav(tmp_path / "int.wav", (wave * 32767).astype(np.int16), 16000)
    assert np.abs(media.decode_audio(integers) - wave).max() < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int.wav", "mono.wav", "stereo.wav"]
    with pytest.raises(MediaError, match="int16"):
        media.write_wav(tmp_path / "bad.wav", np.zeros(10, np.int32), 16000)


# --------------------------------------------------------------------------------------------- encode and remux
def test_encode_round_trip_keeps_every_frame_at_its_time(tmp_path):
    out = media.encode_video(index_frames(30), tmp_path / "out.mp4", FPS)
    info = media.probe(out)
    assert (info.frame_count, info.fps, info.width, info.height, info.has_audio) == (30, 25.0, 64, 48, False)
    assert (info.video_codec, media.probe(out).duration) == ("h264", 1.2)
    times = [k / FPS for k in range(30)]
    assert [read_frame_index(f) for f in media.decode_frames_at(out, times)] == list(range(30))
    with open(out, "rb") as handle:  # +faststart: the index (moov) comes before the data (mdat)
        head = handle.read(4096)
    assert head.find(b"moov") != -1 and (head.find(b"mdat") == -1 or head.find(b"moov") < head.find(b"mdat"))


def test_encode_odd_sizes_and_ntsc_rate(tmp_path):
    odd = media.encode_video([np.full((5, 7, 3), 200, np.uint8)] * 3, tmp_path / "odd.mp4", 30000 / 1001)
    info = media.probe(odd)
    assert (info.width, info.height, info.fps, info.frame_count) == (8, 6, 30000 / 1001, 3)
    assert np.abs(media.decode_frames_at(odd, [0.0])[0].astype(int) - 200).max() < 8  # the pad repeats the edge
    assert (media.probe(media.encode_video([np.zeros((1, 1, 3), np.uint8)], tmp_path / "dot.mp4", 25)).width) == 2


def test_encode_with_audio_of_the_same_length_keeps_its_samples(make_clip, tmp_path):
    source = make_clip("stereo", sample_rate=48000, channels=2)  # 2 s
    out = media.encode_video(index_frames(50), tmp_path / "with audio.mp4", FPS, audio_from=source)
    info = media.probe(out)
    assert (info.frame_count, info.has_audio, info.sample_rate, info.channels) == (50, True, 48000, 2)
    original, muxed = media.decode_audio(source), media.decode_audio(out)
    assert abs(len(muxed) - len(original)) <= 16000 / FPS
    n = min(len(original), len(muxed))
    assert np.corrcoef(original[:n], muxed[:n])[0, 1] > 0.999 and np.abs(original[:n] - muxed[:n]).max() < 0.02


def test_encode_with_longer_audio_and_slow_frames_lasts_as_long_as_the_video(make_clip, tmp_path):
    """Frames that arrive slower than ffmpeg reads audio (a renderer, a model) must not let the audio run on."""
    source = make_clip("long audio", duration=3.0)

    def slow_frames():
        for frame in index_frames(25):  # 1 s of video
            time.sleep(0.02)
            yield frame

    out = media.encode_video(slow_frames(), tmp_path / "slow.mp4", FPS, audio_from=source)
    info = media.probe(out)
    assert info.frame_count == 25 and info.duration == pytest.approx(1.0, abs=0.05)
    assert abs(len(media.decode_audio(out)) / 16000 - 1.0) <= 1 / FPS + 1024 / 16000


@pytest.mark.parametrize("audio_duration", [1.0, 3.0])
def test_mux_audio_never_changes_the_video_length(make_clip, tmp_path, audio_duration):
    video = make_clip("silent", audio=False)  # 2 s, 50 frames
    source = make_clip("uneven", duration=2.0, audio_duration=audio_duration)
    out = media.mux_audio(video, source, tmp_path / "muxed.mp4")
    info = media.probe(out)
    assert info.frame_count == 50 and info.duration == pytest.approx(2.0, abs=0.03)
    muxed, original = media.decode_audio(out), media.decode_audio(source)
    assert abs(len(muxed) / 16000 - 2.0) <= 1 / FPS + 1024 / 16000  # within a video frame plus an AAC frame
    n = int(min(audio_duration, 2.0) * 16000) - 800
    assert np.corrcoef(original[:n], muxed[:n])[0, 1] > 0.999
    if audio_duration < 2.0:  # after the source ends: silence, not a shorter video
        assert np.abs(muxed[int(1.1 * 16000):]).max() < 1e-3
    frames_in, frames_out = (media.decode_frames_at(p, [0.0, 1.0, 1.96]) for p in (video, out))
    assert np.array_equal(frames_in, frames_out)  # the video stream is copied, not re-encoded


def test_mux_from_a_source_without_audio_gives_the_video_alone(make_clip, tmp_path):
    out = media.mux_audio(make_clip("silent", audio=False), make_clip("silent", audio=False), tmp_path / "m.mp4")
    info = media.probe(out)
    assert not info.has_audio and info.frame_count == 50


class Boom(Exception):
    pass


def failing_frames(error: BaseException):
    yield from index_frames(10)
    raise error


@pytest.mark.parametrize("error", [Boom("frames failed"), KeyboardInterrupt()])
def test_an_interrupted_write_leaves_nothing_behind(tmp_path, make_clip, error):
    with pytest.raises(type(error)):
        media.encode_video(failing_frames(error), tmp_path / "out.mp4", FPS, audio_from=make_clip("plain"))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous")
    frames = index_frames(3) + [np.zeros((10, 10, 3), np.uint8)]
    with pytest.raises(MediaError, match="frame 3") as caught:
        media.encode_video(frames, out, FPS)
    assert caught.value.path == str(out)
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_a_bad_audio_source_is_named_and_nothing_is_written(tmp_path, bad_videos):
    with pytest.raises(MediaError) as caught:
        media.encode_video(index_frames(3), tmp_path / "out.mp4", FPS, audio_from=bad_videos["text"])
    assert caught.value.path == str(bad_videos["text"])
    assert list(tmp_path.iterdir()) == []


def test_ffmpeg_failing_while_writing_is_reported_and_leaves_nothing(tmp_path):
    out = tmp_path / "clip.webm"  # the WebM muxer refuses H.264: ffmpeg fails after the first frames arrive
    with pytest.raises(MediaError) as caught:
        media.encode_video(index_frames(30), out, FPS)
    assert caught.value.path == str(out) and "\n" not in caught.value.reason and len(caught.value.reason) < 200
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_an_input(make_clip):
    clip = make_clip("plain")
    with pytest.raises(MediaError, match="input"):
        media.mux_audio(clip, clip, clip)


# ------------------------------------------------------------------------------------------------------ bad input
BAD_REASONS = {"empty": "empty file", "truncated": "truncated", "truncated_faststart": "truncated",
               "text": "not a video", "directory": "directory"}


@pytest.mark.parametrize("kind", sorted(BAD_REASONS))
@pytest.mark.parametrize("call", ["probe", "decode_audio", "decode_frames_at", "iter_frames", "mux_audio"])
def test_bad_inputs_raise_a_one_line_media_error_naming_the_file(bad_videos, make_clip, tmp_path, kind, call):
    path = bad_videos[kind]
    actions = {
        "probe": lambda: media.probe(path),
        "decode_audio": lambda: media.decode_audio(path),
        # (a truncated file serves the times before its data ends; 1.9 s is past it)
        "decode_frames_at": lambda: media.decode_frames_at(path, [0.5, 1.9], size=(32, 32)),
        "iter_frames": lambda: list(media.iter_frames(path)),
        "mux_audio": lambda: media.mux_audio(path, make_clip("plain"), tmp_path / "out.mp4"),
    }
    with pytest.raises(MediaError) as caught:
        actions[call]()
    error = caught.value
    assert error.path == str(path) and BAD_REASONS[kind] in error.reason
    assert "\n" not in error.message and len(error.reason) < 120
    assert not (tmp_path / "out.mp4").exists()


def test_missing_file(tmp_path):
    with pytest.raises(MediaError, match="no such file"):
        media.probe(tmp_path / "nope.mp4")


def test_names_with_spaces_and_non_ascii_letters_work(make_clip, tmp_path):
    clip = make_clip("Ünïcödé clip — 音声 テスト")
    assert media.probe(clip).frame_count == 50
    assert read_frame_index(media.decode_frames_at(clip, [1.0])[0]) == 25
    assert len(media.decode_audio(clip)) == pytest.approx(32000, abs=16000 / FPS)
    folder = tmp_path / "dossier élève" / "sous dossier"
    out = media.encode_video(index_frames(5), folder / "sortie vidéo.mp4", FPS, audio_from=clip)
    assert media.probe(out).frame_count == 5
    assert media.probe(media.write_wav(folder / "son été.wav", np.zeros(160), 16000), require_video=False).has_audio


def test_reason_is_short_and_specific():
    stderr = ["[in#0 @ 0x55e8] Error opening input: Invalid data found when processing input",
              "Error opening input file x.mp4.", "Error opening input files: Invalid data found when processing input"]
    assert media._reason(stderr, 1) == "not a video or audio file ffmpeg can read"
    stderr = ["[libx264 @ 0x55a4] width not divisible by 2 (1x1)", "Conversion failed!"]
    assert media._reason(stderr, 1) == "width not divisible by 2 (1x1)"
    assert media._reason(["Conversion failed!"], 187) == "ffmpeg failed (exit code 187)"


# ------------------------------------------------------------------------------------------------------ binaries
@pytest.fixture
def fresh_binaries(monkeypatch):
    """No AV2TS_FFMPEG / IMAGEIO_FFMPEG_EXE, and the binary caches emptied before and after the test."""
    monkeypatch.delenv("AV2TS_FFMPEG", raising=False)
    monkeypatch.delenv("IMAGEIO_FFMPEG_EXE", raising=False)
    media.find_ffmpeg.cache_clear()
    media.find_ffprobe.cache_clear()
    yield monkeypatch
    media.find_ffmpeg.cache_clear()
    media.find_ffprobe.cache_clear()


def logging_wrapper(folder: Path, name: str, real: str) -> tuple[Path, Path]:
    """An executable ``folder/name`` that logs its arguments then runs the real ffmpeg."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{name}.log"
    script = folder / name
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexec "{real}" "$@"\n')
    script.chmod(0o755)
    return script, log


def test_bundled_binary_is_used_without_ffmpeg_on_path(make_clip, fresh_binaries, tmp_path):
    import imageio_ffmpeg

    clip = make_clip("plain")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    fresh_binaries.setenv("PATH", str(empty))
    assert shutil.which("ffmpeg") is None and media.find_ffprobe() is None
    binary = media.find_ffmpeg()
    assert Path(binary).resolve().is_relative_to(Path(imageio_ffmpeg.__file__).parent.resolve())
    assert media.probe(clip).frame_count == 50  # and it works, with the dump parser since there is no ffprobe


def test_ffmpeg_on_path_wins_over_the_bundled_one(make_clip, fresh_binaries, tmp_path):
    clip = make_clip("plain")
    real = media.find_ffmpeg()
    media.find_ffmpeg.cache_clear()
    script, log = logging_wrapper(tmp_path / "bin", "ffmpeg", real)
    fresh_binaries.setenv("PATH", str(script.parent))
    assert media.find_ffmpeg() == str(script)
    assert media.probe(clip).frame_count == 50
    assert str(clip) in log.read_text()


def test_av2ts_ffmpeg_wins_over_path(make_clip, fresh_binaries, tmp_path):
    clip = make_clip("plain")
    real = media.find_ffmpeg()
    media.find_ffmpeg.cache_clear()
    on_path, path_log = logging_wrapper(tmp_path / "bin", "ffmpeg", real)
    chosen, chosen_log = logging_wrapper(tmp_path / "chosen", "my-ffmpeg", real)
    fresh_binaries.setenv("PATH", str(on_path.parent))
    fresh_binaries.setenv("AV2TS_FFMPEG", str(chosen))
    assert media.find_ffmpeg() == str(chosen)
    media.decode_frames_at(clip, [0.5])
    assert chosen_log.exists() and not path_log.exists()


def test_av2ts_ffmpeg_naming_no_file_is_a_media_error(fresh_binaries, tmp_path):
    fresh_binaries.setenv("AV2TS_FFMPEG", str(tmp_path / "missing-ffmpeg"))
    with pytest.raises(MediaError, match="AV2TS_FFMPEG"):
        media.find_ffmpeg()


def test_older_ffmpeg_gets_vsync_and_no_showinfo_checksum_switch(tmp_path):
    fake = tmp_path / "ffmpeg"  # answers like Ubuntu 22.04's ffmpeg 4.4 (no -fps_mode, no showinfo checksum)
    fake.write_text('#!/bin/sh\ncase "$*" in\n  *-version*) echo "ffmpeg version 4.4.2-0ubuntu0.22.04.1 Copyright";;\n'
                    '  *) echo "Filter showinfo"; echo "  Show textual information for each video frame.";;\nesac\n')
    fake.chmod(0o755)
    assert media._ffmpeg_dialect(str(fake)) == ({}, {"vsync": "passthrough"})


# ------------------------------------------------------------------------- which audio, which picture, which clock
def test_the_default_audio_stream_is_probed_and_decoded(make_odd_clip):
    """Two audio streams, the second marked default: that one is described and decoded, not the first."""
    clip = make_odd_clip("two audio")
    info = media.probe(clip)
    assert (info.audio_stream, info.audio_streams, info.audio_language) == (2, 2, "fre")
    assert info.audio_description == "stream 2 (aac, fre), the default of 2 audio streams"
    assert info.to_dict()["audio_stream"] == 2  # recorded in predict's summary with the rest of the probe
    for wave in (media.decode_audio(clip), media.decode_audio(clip, info=media.probe(clip, ffprobe=False))):
        middle = wave[1600:-1600]
        assert dominant_frequency(middle) == pytest.approx(1000, abs=5)  # stream 2's tone, not stream 1's 440 Hz
        assert np.sqrt(np.mean(middle ** 2)) == pytest.approx(0.25 / np.sqrt(2), rel=0.03)
    one = make_odd_clip("anamorphic")  # one audio stream
    single = media.probe(one)
    assert (single.audio_stream, single.audio_streams, single.audio_description) == (1, 1, "stream 1 (aac)")
    assert dominant_frequency(media.decode_audio(one)[1600:-1600]) == pytest.approx(440, abs=5)


def test_which_audio_stream_is_chosen():
    stream = dataclasses.make_dataclass("Stream", ["default"])
    assert media.choose_audio([stream(False), stream(True)]) == (1, "the default of 2 audio streams")
    assert media.choose_audio([stream(False), stream(False), stream(False)]) == (
        0, "the first of 3 audio streams (none marked default)")
    assert media.choose_audio([stream(False), stream(True), stream(True)]) == (
        1, "the first of 2 audio streams marked default (3 in all)")
    assert media.choose_audio([stream(True)]) == (0, "the default of 1 audio streams")


def test_a_video_that_starts_late_is_read_on_its_own_clock(make_odd_clip, passes, monkeypatch):
    """The picture starts 1 s after the file: time 0 is its first frame, for frames (sequential passes and seeking
    ones) and audio alike; the sound before the picture is cut."""
    clip = make_odd_clip("late video")
    info = media.probe(clip)
    assert (info.start_time, info.video_offset, info.origin, info.duration, info.frame_count) == (0.0, 1.0, 1.0,
                                                                                                 7.0, 150)
    times = [0.0, 0.5, 0.9375, 2.9375, 5.9375, 6.5]
    frames = media.decode_frames_at(clip, times, size=(40, 20))
    assert [read_frame_index(f) for f in frames] == [0, 12, 23, 73, 148, 149]
    monkeypatch.setattr(media, "_SELECT_TERMS_PER_PASS", 1)  # one time per pass: the later passes seek
    seeking = media.decode_frames_at(clip, times, size=(40, 20))
    assert [read_frame_index(f) for f in seeking] == [0, 12, 23, 73, 148, 149]
    assert any(seek > 0 for _, seek in passes)
    streamed = list(media.iter_frames(clip, size=(40, 20)))
    assert streamed[0][0] == pytest.approx(0.0, abs=1e-6) and read_frame_index(streamed[0][1]) == 0
    assert streamed[-1][0] == pytest.approx(149 / FPS, abs=1e-6) and len(streamed) == 150
    wave = media.decode_audio(clip)
    assert len(wave) / 16000 == pytest.approx(6.0, abs=0.05)  # 7 s of audio less the second before the picture
    assert dominant_frequency(wave[:8000]) == pytest.approx(440, abs=5)  # the tone that plays with the picture
    assert np.sqrt(np.mean(wave[800:8000] ** 2)) > 0.15  # no silence, no 880 Hz lead-in: the picture's sound


def test_anamorphic_video_is_read_at_its_display_size(make_odd_clip):
    """Pixels twice as wide as tall (SAR 2:1): probe, frames and the empty batch are at the display size."""
    clip = make_odd_clip("anamorphic")
    info = media.probe(clip)
    assert (info.width, info.height, info.sample_aspect_ratio) == (128, 48, "2:1")
    frames = media.decode_frames_at(clip, [0.0, 0.5])
    assert frames.shape == (2, 48, 128, 3) and [read_frame_index(f) for f in frames] == [0, 12]
    streamed = next(media.iter_frames(clip))[1]
    assert streamed.shape == (48, 128, 3)
    assert media.decode_frames_at(clip, []).shape == (0, 48, 128, 3)
    assert media.decode_frames_at(clip, [0.5], size=(224, 224)).shape == (1, 224, 224, 3)  # an asked size wins
    portrait = make_odd_clip("anamorphic portrait")  # rotation and SAR together: widened, then turned
    info = media.probe(portrait)
    assert (info.width, info.height, info.rotation) == (48, 128, 90)
    frame = media.decode_frames_at(portrait, [0.5])[0]
    assert frame.shape == (128, 48, 3) and read_frame_index(frame, rotation=90) == 12


def test_the_dump_parser_reads_dispositions_languages_and_aspect_ratios():
    lines = ["Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'x.mp4':",
             "  Duration: 00:00:04.00, start: 0.000000, bitrate: 49 kb/s",
             "  Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(progressive), 64x48 "
             "[SAR 1:1 DAR 4:3], 10 kb/s, 25 fps, 25 tbr, 12800 tbn, SAR 3:2 DAR 2:1 (default)",
             "  Stream #0:1(eng): Audio: aac (LC) (mp4a / 0x6134706D), 48000 Hz, stereo, fltp, 34 kb/s",
             "  Stream #0:2[0x3](und): Audio: ac3, 44100 Hz, 5.1(side), fltp, 384 kb/s (default)"]
    dump = media._parse_dump(lines)
    assert dump["sar"] == (3, 2)  # the container's aspect ratio, shown after the codec's, wins (as in ffmpeg)
    assert [(a.index, a.codec, a.sample_rate, a.channels, a.language, a.default) for a in dump["audio"]] == [
        (1, "aac", 48000, 2, "eng", False), (2, "ac3", 44100, 6, "", True)]
    info = media._make_probe("x.mp4", dump, 100)
    assert (info.width, info.height, info.audio_stream, info.audio_codec, info.channels) == (96, 48, 2, "ac3", 6)
    assert [media._aspect(text) for text in ("0:1", "N/A", None, "16:12", "1:1")] == [(1, 1)] * 3 + [(4, 3), (1, 1)]


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="no ffprobe on PATH (the parser is tested everywhere)")
def test_ffprobe_and_ffmpeg_dump_agree_on_streams_offsets_and_aspect_ratios(make_odd_clip):
    for kind in ("two audio", "late video", "anamorphic", "anamorphic portrait"):
        clip = make_odd_clip(kind)
        assert media._probe_with_ffprobe(clip, True) == media._probe_with_ffmpeg(clip, True), kind
    # MKV with AAC priming: versions disagree on where the file starts (ffprobe 8: -0.064 s, ffmpeg 9: 0), but
    # not on where its picture starts, time 0
    by_ffprobe, by_ffmpeg = (read(make_odd_clip("refused audio"), True)
                             for read in (media._probe_with_ffprobe, media._probe_with_ffmpeg))
    assert by_ffprobe.origin == pytest.approx(by_ffmpeg.origin, abs=1e-6)
    assert dataclasses.replace(by_ffprobe, start_time=0.0, video_offset=0.0) == dataclasses.replace(
        by_ffmpeg, start_time=0.0, video_offset=0.0)


def audio_codecs(path) -> list[str]:
    """The codec of every audio stream of ``path``, in order (from ffmpeg's dump)."""
    result = subprocess.run([media.find_ffmpeg(), "-hide_banner", "-i", str(path)], capture_output=True, text=True)
    return [stream.codec for stream in media._parse_dump(result.stderr.splitlines())["audio"]]


def test_replace_video_keeps_every_audio_stream_as_it_is(make_odd_clip, tmp_path):
    """The picture replaced, every audio stream copied (same packets, so the same samples; same default mark and
    language); a codec the container refuses (WMA in MP4) is encoded to AAC, the others stay copies."""
    clip = make_odd_clip("two audio")
    picture = media.encode_video(index_frames(50), tmp_path / "picture.mp4", FPS)
    out = media.replace_video(picture, clip, tmp_path / "replaced.mp4")
    info, source = media.probe(out), media.probe(clip)
    assert (info.audio_streams, info.audio_stream, info.audio_language, info.frame_count) == (2, 2, "fre", 50)
    assert np.array_equal(media.decode_audio(out), media.decode_audio(clip))  # copied, not re-encoded
    assert audio_codecs(out) == ["aac", "aac"] and info.duration == source.duration
    refused = make_odd_clip("refused audio")
    assert audio_codecs(refused) == ["aac", "wmav2"]
    out = media.replace_video(picture, refused, tmp_path / "refused.mp4")
    assert audio_codecs(out) == ["aac", "aac"] and media.probe(out).audio_streams == 2
    copied, original = media.decode_audio(out), media.decode_audio(refused)
    n = min(len(copied), len(original))  # (MKV keeps the encoder's last padded frame, MP4 trims it)
    assert n >= 31000 and np.array_equal(copied[:n], original[:n])  # the AAC one stayed a copy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["picture.mp4", "refused.mp4", "replaced.mp4"]
