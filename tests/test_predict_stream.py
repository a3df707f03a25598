"""predict_stream.py: the windows fed to the network (frames at the scheduled times, audio, bounded read-ahead)
and the stream of (frame, mask) pairs in presentation order."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from av2ts_cli import media, sampling
from av2ts_cli.config import get_preset
from av2ts_cli.model import build_model
from av2ts_cli.predict import stream as predict_stream
from av2ts_cli.predictor import make_predictor

FPS = 25  # make_clip's default frame rate


def test_windows_carry_the_frames_shown_at_the_scheduled_times(make_clip, read_frame_index):
    clip = make_clip("ten-seconds", duration=10.0, size=(80, 40))
    info = media.probe(clip)
    schedule = sampling.video_schedule(info, fps=2, window=4)
    assert schedule == sampling.make_schedule(10.0, fps=2, window=4, last_time=10.0 - 0.5 / FPS)
    wave = media.decode_audio(clip)
    feeder = predict_stream.WindowFeeder(clip, schedule, 64, wave, predict_stream.Timer(), None, depth=2)
    try:
        windows = list(feeder)
    finally:
        feeder.close()
    assert [(w.group, w.shift) for w, *_ in windows] == [(w.group, w.shift) for w in schedule.windows]
    for window, frames, audio, maskiges in windows:
        assert frames.shape == (4, 64, 64, 3) and audio.shape == (4, 96, 64) and maskiges is None
        for slot in range(4):
            frame = window.frames[min(slot, len(window.frames) - 1)]  # padded slots repeat the last second
            assert read_frame_index(frames[slot]) == math.floor(frame.time * FPS + 1e-6)
        assert torch.allclose(audio, sampling.window_examples(wave, window.audio_start, len(window.frames), 4))
    assert info.duration == pytest.approx(10.0, abs=0.05)


def test_decoding_runs_a_bounded_distance_ahead(make_clip, monkeypatch):
    """The feeder decodes at most a few window groups ahead of the model: frames are never all held."""
    clip = make_clip("bounded", duration=40.0, size=(32, 24), fps=5)
    decoded = []
    original = media.iter_frames_at

    def counting(*args, **kwargs):
        for item in original(*args, **kwargs):
            decoded.append(item[0])
            yield item

    monkeypatch.setattr(media, "iter_frames_at", counting)
    schedule = sampling.make_schedule(40.0, fps=1, window=5, last_time=39.9)
    feeder = predict_stream.WindowFeeder(clip, schedule, 32, np.zeros(0, np.float32), predict_stream.Timer(), None,
                                         depth=2)
    ahead = []
    try:
        for consumed, _ in enumerate(feeder, 1):
            time.sleep(0.05)  # a slow model
            ahead.append(len(decoded) - 5 * consumed)
    finally:
        feeder.close()
    assert len(decoded) == 40 and max(ahead) <= 5 * 4  # queue of 2 windows + one in hand + one being decoded


def test_the_stream_yields_every_frame_once_in_time_order(make_clip):
    """Two passes, a padded tail window and batches that straddle window groups: each sampled frame comes out
    once, in index order, with a mask at the display size."""
    clip = make_clip("stream", duration=7.0, size=(40, 30))
    info = media.probe(clip)
    schedule = sampling.video_schedule(info, fps=2, window=5)
    torch.manual_seed(0)
    cfg = get_preset("av2ts-tiny")
    predictor = make_predictor(build_model(cfg), cfg, ["background", "sounding"], "tiny", "cpu")
    batches = []
    pairs = list(predict_stream.stream_masks(clip, schedule, predictor, media.decode_audio(clip), (40, 30),
                                             batch=3, on_batch=batches.append))
    assert [frame for frame, _ in pairs] == list(schedule.frames)
    assert batches == [3, 1] and len(schedule.windows) == 4
    for _, mask in pairs:
        assert mask.classes.shape == (30, 40) and mask.probability.shape == (30, 40)


def test_maskiges_are_resized_nearest_so_only_palette_colours_remain(tmp_path):
    """A 224 x 224 maskige read at the model's 128 px keeps exactly its own colours (bilinear would blend the two
    regions' colours at the border into a third)."""
    from PIL import Image

    from av2ts_cli.maskiges.render import maskige_rgb

    masks = np.zeros((2, 224, 224), bool)
    masks[0, 50:101, 37:150] = True
    masks[1, 0:160, 0:99] = True
    picture = maskige_rgb(masks, "s4")
    Image.fromarray(picture).save(tmp_path / "000000.png")
    frame = sampling.SampledFrame(index=0, second=0, shift=0, time=0.9375)
    read = predict_stream.maskige_reader(tmp_path, 128)(frame)
    assert read.shape == (128, 128, 3) and read.dtype == np.uint8
    colours = {tuple(c) for c in np.unique(read.reshape(-1, 3), axis=0)}
    assert colours == {tuple(c) for c in np.unique(picture.reshape(-1, 3), axis=0)}
    assert len(colours) == 3  # the background and the two masks' colours, nothing between them


def test_a_kernel_built_on_first_use_is_timed_apart_from_the_network(tmp_path, monkeypatch):
    """The first forward pass builds the deformable-attention kernel (10-60 s, once per machine): the closing line's
    ms/window is the network's time alone, the build is its own stage (``kernel_setup_s``) and said once. A fresh
    kernel cache (``AV2TS_CACHE``) makes predict build; the compiler is replaced by a 4 s wait that hands over the
    library the shared cache already holds, so the test is quick and the build's time is known."""
    import json
    from pathlib import Path

    from conftest import invoke_cli

    from av2ts_cli.model.ops import build

    monkeypatch.delenv(build.ENV_VAR, raising=False)
    build.load_kernel("cpp")  # the real build (compiled here only on a machine's first run), loaded in this process
    # the very file loaded (a session's own build folder, maybe): a second file with the same ops would abort
    (library,) = [path for path in torch.ops.loaded_libraries if Path(path).parent.name == build._build_name("cpp")]
    monkeypatch.setenv("AV2TS_CACHE", str(tmp_path / "fresh-cache"))  # no kernel there: predict must build it
    for state in ("_loaded", "_failed", "_setup_seconds"):
        monkeypatch.setattr(build, state, {})
    compile_seconds = 4.0

    def compiler(backend: str, name: str, build_dir: Path) -> None:
        time.sleep(compile_seconds)
        (build_dir / build._MARKER).write_text(json.dumps({"library": str(library)}))  # an absolute path

    monkeypatch.setattr(build, "_build", compiler)
    demo = Path(__file__).resolve().parents[1] / "assets" / "demo.mp4"
    runs = []
    for run in ("first", "second"):
        output = invoke_cli(["predict", str(demo), "--out", str(tmp_path / run), "--format", "json", "--precision",
                             "fp32"]).output  # fp32: no precision measurement in the fresh cache
        summary = json.loads((tmp_path / run / "demo" / "summary.json").read_text())
        runs.append((output, summary["timings"], summary["windows"]))

    (first, timings, windows), (second, again, _) = runs
    assert (tmp_path / "fresh-cache" / "kernels").is_dir()  # built there, through the real build path
    assert first.count("compiled the cpp deformable-attention kernel once: 4 s") == 1, first
    assert "compiled the" not in second and again.get("kernel_setup_s", 0.0) < 1.0  # loaded once per process
    assert compile_seconds <= timings["kernel_setup_s"] < compile_seconds + 2.0
    # the build is not in the network's time: model + build fit in the run (with the build in "model" too,
    # they would exceed it by the build's 4 s)
    assert timings["model_s"] + timings["kernel_setup_s"] <= timings["predict_s"] + 0.05, timings
    assert timings["ms_per_window"] == pytest.approx(1000 * timings["model_s"] / windows, abs=0.5)  # rounding
    assert f"{windows} windows, {timings['ms_per_window']:.0f} ms/window" in first
