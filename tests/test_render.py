"""Overlays: mask times, mask files, colours and contours, the rendered video (frame timing, duration, audio) and
``av2ts overlay``. No model is needed: masks are written by the tests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import dominant_frequency, read_frame_index
from PIL import Image
from typer.testing import CliRunner

from av2ts_cli import cli, media, render
from av2ts_cli.classes import avss_palette
from av2ts_cli.errors import EXIT_USAGE, DataError, MediaError, UsageError

runner = CliRunner()


def _write_masks(folder: Path, masks: list[np.ndarray], times: list[float], palette: bool = False) -> Path:
    """masks/NNNNNN.png plus frames.jsonl beside the folder, as predict writes them."""
    masks_dir = folder / "masks"
    masks_dir.mkdir(parents=True)
    lines = []
    for index, (mask, t) in enumerate(zip(masks, times, strict=True)):
        image = Image.fromarray(mask.astype(np.uint8))
        if palette:
            image = image.convert("P")
            image.putpalette(avss_palette(256).reshape(-1).tolist())
        image.save(masks_dir / f"{index:06d}.png")
        lines.append(json.dumps({"index": index, "time": t, "mask": f"masks/{index:06d}.png"}))
    (folder / "frames.jsonl").write_text("\n".join(lines) + "\n")
    return masks_dir


def _thirds(width: int, height: int) -> list[np.ndarray]:
    """Three 0/255 masks: the left, middle and right third of the frame."""
    out = []
    for k in range(3):
        mask = np.zeros((height, width), np.uint8)
        mask[:, k * width // 3:(k + 1) * width // 3] = 255
        out.append(mask)
    return out


# --------------------------------------------------------------------------------------------------------- masks
def test_nearest_sampled_time():
    track = render.MaskTrack([0.9375, 1.9375, 2.9375], [Path("a"), Path("b"), Path("c")])
    assert [track.nearest(t) for t in (0.0, 1.4375, 1.44, 2.5, 99.0)] == [0, 0, 1, 2, 2]


def test_mask_track_from_frames_jsonl_and_from_names(tmp_path):
    masks_dir = _write_masks(tmp_path / "a", _thirds(9, 3), [2.5, 0.5, 1.5])
    track = render.read_mask_track(masks_dir)
    assert list(track.times) == [0.5, 1.5, 2.5] and [p.name for p in track.paths] == ["000001.png", "000002.png",
                                                                                     "000000.png"]
    (masks_dir / "000002.png").unlink()
    with pytest.raises(DataError, match="000002.png: listed in frames.jsonl but missing"):
        render.read_mask_track(masks_dir)
    named = tmp_path / "b" / "masks"
    named.mkdir(parents=True)
    for k in (3, 2, 1):  # AVSBench-style names, from 1: mask k at second k - 1 + 15/16
        Image.fromarray(np.zeros((3, 3), np.uint8)).save(named / f"clip_{k}.png")
    track = render.read_mask_track(named)
    assert [p.name for p in track.paths] == ["clip_1.png", "clip_2.png", "clip_3.png"]
    assert list(track.times) == [0.9375, 1.9375, 2.9375]
    # by their numbers, never by their order: a gap or an extra picture is refused, naming it
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(named / "clip_10.png")
    with pytest.raises(DataError) as caught:
        render.read_mask_track(named)
    assert str(caught.value) == (f"{named}: masks 4, 5, 6, 7, 8 and 1 more are missing between 1 and 10: every later "
                                 "mask would be shown at the wrong time")
    (named / "clip_10.png").rename(named / "clip_3-again_3.png")
    with pytest.raises(DataError, match=r"two masks for number 3 \(clip_3-again_3.png, clip_3.png\)"):
        render.read_mask_track(named)
    (named / "clip_3-again_3.png").rename(named / "cover.png")
    with pytest.raises(DataError, match=r"1 masks without a number at the end of their name \(cover.png\)"):
        render.read_mask_track(named)
    (named / "cover.png").unlink()
    (tmp_path / "c" / "masks").mkdir(parents=True)
    with pytest.raises(DataError, match="no mask images"):
        render.read_mask_track(tmp_path / "c" / "masks")
    with pytest.raises(DataError, match="no such folder"):
        render.read_mask_track(tmp_path / "nowhere")


def test_mask_kinds(tmp_path):
    Image.fromarray(np.array([[0, 255]], np.uint8)).save(tmp_path / "binary.png")
    values, kind = render.read_mask(tmp_path / "binary.png")
    assert kind == "binary" and values.tolist() == [[0, 1]]
    indexed = Image.fromarray(np.array([[0, 17]], np.uint8)).convert("P")
    indexed.putpalette(avss_palette(256).reshape(-1).tolist())
    indexed.save(tmp_path / "indexed.png")
    assert render.read_mask(tmp_path / "indexed.png")[1] == "avss"
    Image.fromarray(avss_palette()[np.array([[0, 17, 70]])]).save(tmp_path / "colour.png")  # AVSS colour labels
    values, kind = render.read_mask(tmp_path / "colour.png")
    assert kind == "avss" and values.tolist() == [[0, 17, 70]]
    Image.fromarray(np.array([[0, 3, 17]], np.uint8)).save(tmp_path / "ids.png")  # grey class ids
    assert render.read_mask(tmp_path / "ids.png")[1] == "avss"
    (tmp_path / "broken.png").write_bytes(b"\x89PNG nope")
    with pytest.raises(DataError, match="broken.png: unreadable mask image"):
        render.read_mask(tmp_path / "broken.png")


def test_painting_blends_the_region_and_draws_contours(tmp_path):
    frame = np.full((12, 12, 3), 100, np.uint8)
    values = np.zeros((12, 12), np.uint8)
    values[3:9, 3:9] = 1
    Image.fromarray(values * 255).save(tmp_path / "m.png")
    painter = render.MaskPainter(alpha=0.5, contour=False)
    out = painter.paint(frame, *painter.prepare(tmp_path / "m.png", (12, 12)))
    expected = np.round(0.5 * 100 + 0.5 * np.array(render.HIGHLIGHT)).astype(int)
    assert np.abs(out[5, 5].astype(int) - expected).max() <= 1
    assert np.array_equal(out[0, 0], [100, 100, 100]) and np.array_equal(out[2, 5], [100, 100, 100])
    outlined = render.MaskPainter(alpha=0.5, contour=True)
    out = outlined.paint(frame, *outlined.prepare(tmp_path / "m.png", (12, 12)))
    assert np.array_equal(out[3, 5], render.HIGHLIGHT) and np.array_equal(out[8, 8], render.HIGHLIGHT)
    assert np.abs(out[5, 5].astype(int) - expected).max() <= 1  # the inside stays blended
    # masks of another size are resized (nearest) to the frame
    out = painter.paint(np.full((24, 24, 3), 100, np.uint8), *painter.prepare(tmp_path / "m.png", (24, 24)))
    assert np.array_equal(out[0, 0], [100, 100, 100]) and not np.array_equal(out[10, 10], [100, 100, 100])


def test_palettes(tmp_path):
    classes = np.array([[0, 1, 15, 64]], np.uint8)
    Image.fromarray(classes).save(tmp_path / "ids.png")
    avss = render.MaskPainter(alpha=1.0)
    layer, fill, _ = avss.prepare(tmp_path / "ids.png", (4, 1))
    assert layer[0].tolist() == [[0, 0, 0], [128, 0, 0], [192, 128, 128], [32, 0, 0]]  # the AVSBench colours
    assert fill.tolist() == [[False, True, True, True]]
    binary = render.MaskPainter(alpha=1.0, palette="binary")
    layer, _, _ = binary.prepare(tmp_path / "ids.png", (4, 1))
    assert layer[0, 1:].tolist() == [list(render.HIGHLIGHT)] * 3
    Image.fromarray(np.array([[0, 255]], np.uint8)).save(tmp_path / "b.png")
    layer, _, _ = render.MaskPainter(palette="avss").prepare(tmp_path / "b.png", (2, 1))
    assert layer[0, 1].tolist() == [128, 0, 0]  # a binary mask in the AVSS palette: class 1
    for bad in ({"alpha": 1.5}, {"palette": "rainbow"}):
        with pytest.raises(UsageError):
            render.MaskPainter(**bad)


# ------------------------------------------------------------------------------------------------------- overlay
def _assert_same_audio(clip: Path, overlay: Path) -> None:
    """The overlay carries the input's samples. The audio is AAC re-encoded (192 kb/s), so they agree to within
    AAC's error on this 440 Hz tone: correlation > 0.999 and < 0.02 of full scale (tests/test_media.py measures
    the same bounds for media.encode_video)."""
    original, muxed = media.decode_audio(clip), media.decode_audio(overlay)
    n = min(len(original), len(muxed)) - 800
    assert np.corrcoef(original[:n], muxed[:n])[0, 1] > 0.999 and np.abs(original[:n] - muxed[:n]).max() < 0.02


def test_overlay_paints_the_nearest_mask_and_keeps_the_audio(make_clip, tmp_path):
    clip = make_clip("painted", duration=3.0, size=(96, 48), fps=10)
    masks_dir = _write_masks(tmp_path / "pred", _thirds(96, 48), [0.9375, 1.9375, 2.9375])
    out = render.render_overlay(clip, masks_dir, tmp_path / "overlay.mp4", alpha=1.0)
    assert out == {"output": str(tmp_path / "overlay.mp4"), "frames": 30, "fps": 10.0, "duration": 3.0,
                   "audio": True}
    track = render.read_mask_track(masks_dir)
    count = 0
    for t, frame in media.iter_frames(tmp_path / "overlay.mp4"):
        painted = track.nearest(t)
        for third in range(3):
            region = frame[8:40, third * 32 + 4:third * 32 + 28].reshape(-1, 3).astype(int)
            distance = np.abs(region.mean(0) - render.HIGHLIGHT).max()
            assert (distance < 20) == (third == painted), (t, third, distance)
        count += 1
    assert count == 30
    info = media.probe(tmp_path / "overlay.mp4")
    assert info.has_audio and abs(info.duration - 3.0) <= 0.1 + 1e-6
    _assert_same_audio(clip, tmp_path / "overlay.mp4")


def test_overlay_of_a_variable_frame_rate_clip_shows_each_frame_at_its_time(make_clip, vfr_frame_times,
                                                                           read_frame_index, tmp_path):
    clip = make_clip("vfr-overlay", duration=2.0, size=(80, 40), vfr=True)
    masks_dir = _write_masks(tmp_path / "pred", [np.zeros((40, 80), np.uint8)], [0.9375])
    render.render_overlay(clip, masks_dir, tmp_path / "overlay.mp4", alpha=0.0)
    stamps = vfr_frame_times(50, 25)
    frames = list(media.iter_frames(tmp_path / "overlay.mp4"))
    assert len(frames) == 50
    for t, frame in frames:  # constant rate out: tick t shows the input frame on screen at t
        shown = max(k for k, s in enumerate(stamps) if s <= t + 1e-6)
        assert read_frame_index(frame) == shown


@pytest.mark.parametrize("case", ["silent", "longer audio", "portrait"])
def test_overlay_duration_size_and_audio(case, make_clip, read_frame_index, tmp_path):
    arguments = {"silent": {"audio": False}, "longer audio": {"audio_duration": 3.0},
                 "portrait": {"size": (64, 48), "rotation": 90}}[case]
    clip = make_clip(f"overlay-{case}".replace(" ", "-"), duration=2.0, **arguments)
    source = media.probe(clip)
    masks_dir = _write_masks(tmp_path / "pred", [np.full((source.height, source.width), 255, np.uint8)] * 2,
                             [0.9375, 1.9375])
    render.render_overlay(clip, masks_dir, tmp_path / "overlay.mp4", alpha=0.0, contour=True)
    info = media.probe(tmp_path / "overlay.mp4")
    assert abs(info.duration - source.duration) <= 1 / source.fps + 1e-6  # the input's (longest stream) duration
    assert info.has_audio == source.has_audio
    assert (info.width, info.height) == (source.width, source.height)
    if case == "longer audio":  # the video holds its last frame while the audio plays on
        assert source.duration == pytest.approx(3.0, abs=0.05) and info.frame_count == 75
        last = media.decode_frames_at(tmp_path / "overlay.mp4", [2.9])[0]
        assert read_frame_index(last[2:-2, 2:-2]) == 49  # contour pixels on the border left out
        _assert_same_audio(clip, tmp_path / "overlay.mp4")


def test_overlay_refuses_to_overwrite_its_input(make_clip, tmp_path):
    clip = make_clip("precious", duration=1.0)
    masks_dir = _write_masks(tmp_path / "pred", [np.zeros((48, 64), np.uint8)], [0.9375])
    before = clip.read_bytes()
    with pytest.raises(MediaError, match="is also an input"):
        render.render_overlay(clip, masks_dir, clip)
    assert clip.read_bytes() == before
    with pytest.raises(UsageError, match="must be an .mp4"):
        render.render_overlay(clip, masks_dir, tmp_path / "overlay.gif")


# ----------------------------------------------------------------------------------------------------------- CLI
def test_cli_overlay(make_clip, tmp_path):
    clip = make_clip("cli-overlay", duration=2.0)
    masks_dir = _write_masks(tmp_path / "pred", [np.full((48, 64), 255, np.uint8)] * 2, [0.9375, 1.9375])
    result = runner.invoke(cli.app, ["overlay", str(clip), str(masks_dir), "-o", str(tmp_path / "o.mp4"),
                                     "--alpha", "0.3", "--contour", "--palette", "binary"])
    assert result.exit_code == 0, result.output
    assert "Overlay saved to" in result.output and "with the original audio" in result.output
    assert media.probe(tmp_path / "o.mp4").frame_count == 50
    bad = runner.invoke(cli.app, ["overlay", str(clip), str(masks_dir), "-o", str(tmp_path / "p.mp4"), "--alpha",
                                  "2"])
    assert bad.exit_code == EXIT_USAGE
    missing = runner.invoke(cli.app, ["overlay", str(clip), str(tmp_path / "none"), "-o", str(tmp_path / "q.mp4")])
    assert missing.exit_code == 1 and f"{tmp_path / 'none'}: no such folder of masks" in missing.output
    palette = runner.invoke(cli.app, ["overlay", str(clip), str(masks_dir), "-o", str(tmp_path / "r.mp4"),
                                      "--palette", "rainbow"])
    assert palette.exit_code == EXIT_USAGE and "rainbow" in palette.output
    assert not (tmp_path / "p.mp4").exists() and not (tmp_path / "r.mp4").exists()


def test_cli_overlay_replaces_only_its_own_output(make_clip, tmp_path):
    clip = make_clip("cli-overlay", duration=2.0)
    masks_dir = _write_masks(tmp_path / "pred", [np.full((48, 64), 255, np.uint8)] * 2, [0.9375, 1.9375])
    theirs = tmp_path / "theirs.mp4"
    theirs.write_bytes(b"someone else's video")
    refused = runner.invoke(cli.app, ["overlay", str(clip), str(masks_dir), "-o", str(theirs)])
    assert refused.exit_code == EXIT_USAGE
    assert [line for line in refused.output.splitlines() if line.strip()] == [
        f"error: -o {theirs}: the file exists and av2ts did not write it; pass --force to replace it"]
    assert theirs.read_bytes() == b"someone else's video"
    ours = tmp_path / "ours.mp4"
    for _ in range(2):  # written, then replaced: av2ts's record says it wrote it
        result = runner.invoke(cli.app, ["overlay", str(clip), str(masks_dir), "-o", str(ours)])
        assert result.exit_code == 0, result.output
    forced = runner.invoke(cli.app, ["overlay", str(clip), str(masks_dir), "-o", str(theirs), "--force"])
    assert forced.exit_code == 0 and media.probe(theirs).frame_count == 50


# ------------------------------------------------------------------------------------- masks that are not masks
def test_pictures_that_are_no_masks_are_refused_with_the_file_named(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    with pytest.raises(DataError) as caught:
        render.read_mask(tmp_path / "noise.png")
    assert str(caught.value).startswith(f"{tmp_path / 'noise.png'}: not a mask: ")
    assert "% of its pixels have colours of no AVSS class" in str(caught.value)
    grey = np.random.default_rng(1).integers(0, 256, (48, 64), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    with pytest.raises(DataError, match=r"grey.png: not a mask: grey levels up to \d+ .*class ids below 71"):
        render.read_mask(tmp_path / "grey.png")
    # a 0/255 mask written as RGB is still a binary mask (not "colours of no class")
    white = np.zeros((4, 4, 3), np.uint8)
    white[1:3, 1:3] = 255
    Image.fromarray(white).save(tmp_path / "rgb-binary.png")
    values, kind = render.read_mask(tmp_path / "rgb-binary.png")
    assert kind == "binary" and values.sum() == 4


def test_masks_of_another_aspect_ratio_are_refused_the_same_one_scaled(tmp_path):
    Image.fromarray(np.full((224, 224), 255, np.uint8)).save(tmp_path / "square.png")
    painter = render.MaskPainter()
    with pytest.raises(DataError) as caught:
        painter.prepare(tmp_path / "square.png", (64, 48))
    assert str(caught.value) == (f"{tmp_path / 'square.png'}: the mask is 224x224, the video is 64x48 (display "
                                 "size): another aspect ratio, so not a mask of this video")
    Image.fromarray(np.full((24, 32), 255, np.uint8)).save(tmp_path / "half.png")
    _, fill, _ = painter.prepare(tmp_path / "half.png", (64, 48))
    assert fill.shape == (48, 64) and fill.all()


def test_overlay_with_bad_masks_names_the_file_and_leaves_nothing(make_clip, tmp_path):
    clip = make_clip("bad-masks", duration=2.0)
    masks_dir = _write_masks(tmp_path / "pred", [np.full((30, 30), 255, np.uint8)] * 2, [0.9375, 1.9375])
    result = runner.invoke(cli.app, ["overlay", str(clip), str(masks_dir), "-o", str(tmp_path / "o.mp4")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {masks_dir / '000000.png'}: the mask is 30x30, the video is 64x48 (display size): "
                     "another aspect ratio, so not a mask of this video"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred"]  # no overlay, no temp


def test_masks_covering_far_less_than_the_video_are_warned_about(make_clip, tmp_path):
    clip = make_clip("long-for-masks", duration=6.0, size=(32, 24))
    masks_dir = _write_masks(tmp_path / "pred", [np.full((24, 32), 255, np.uint8)], [0.9375])
    result = runner.invoke(cli.app, ["overlay", str(clip), str(masks_dir), "-o", str(tmp_path / "o.mp4")])
    assert result.exit_code == 0, result.output
    warning = " ".join(result.output.split())
    assert (f"warning: {masks_dir}: the masks cover 0.9 s of the 6.0 s video; the last one stays on for the other "
            "5.1 s") in warning
    assert (tmp_path / "o.mp4").is_file()


# ------------------------------------------------------------------------- which audio, which picture, which clock
def _is_highlight(region: np.ndarray) -> bool:
    return np.abs(region.reshape(-1, 3).astype(int).mean(0) - render.HIGHLIGHT).max() < 20


def test_overlay_keeps_every_audio_stream_as_it_is(make_odd_clip, tmp_path):
    """Two audio streams, the second the default: the overlay holds both, copied (the same samples), the default
    mark and the language kept."""
    clip = make_odd_clip("two audio")
    masks_dir = _write_masks(tmp_path / "pred", [np.zeros((48, 64), np.uint8)], [0.9375])
    report = render.render_overlay(clip, masks_dir, tmp_path / "overlay.mp4", alpha=0.5)
    assert report["audio"] and report["frames"] == 50
    info = media.probe(tmp_path / "overlay.mp4")
    assert (info.audio_streams, info.audio_stream, info.audio_language, info.frame_count) == (2, 2, "fre", 50)
    assert np.array_equal(media.decode_audio(tmp_path / "overlay.mp4"), media.decode_audio(clip))
    first = dataclasses.replace(media.probe(tmp_path / "overlay.mp4", ffprobe=False), audio_stream=1)
    wave = media.decode_audio(tmp_path / "overlay.mp4", info=first)  # the other stream is there too
    assert dominant_frequency(wave[1600:-1600]) == pytest.approx(440, abs=5)


def test_overlay_of_a_video_that_starts_late_keeps_picture_masks_and_sound_in_step(make_odd_clip, tmp_path):
    """The picture starts 1 s into the file: the overlay's picture starts there too, each tick shows the frame
    and the mask of its time on the picture's clock, and the sound is the input's, copied."""
    clip = make_odd_clip("late video")
    band = np.zeros((48, 64), np.uint8)
    band[:12] = 255  # the top quarter: the middle row, where the frame index is read, stays unpainted
    masks_dir = _write_masks(tmp_path / "pred", [band, np.zeros_like(band), band], [0.9375, 2.9375, 4.9375])
    report = render.render_overlay(clip, masks_dir, tmp_path / "overlay.mp4", alpha=1.0)
    assert (report["frames"], report["duration"]) == (150, 7.0)
    info = media.probe(tmp_path / "overlay.mp4")
    assert info.video_offset == pytest.approx(1.0, abs=1e-3) and info.frame_count == 150
    assert info.duration == pytest.approx(7.0, abs=0.05)
    times = [0.0, 0.5, 2.5, 4.5, 5.96]
    frames = media.decode_frames_at(tmp_path / "overlay.mp4", times)
    assert [read_frame_index(f) for f in frames] == [0, 12, 62, 112, 149]
    assert [_is_highlight(f[2:10]) for f in frames] == [True, True, False, True, True]
    assert np.array_equal(media.decode_audio(tmp_path / "overlay.mp4"), media.decode_audio(clip))


@pytest.mark.parametrize("kind", ["anamorphic", "anamorphic portrait"])
def test_overlay_of_anamorphic_video_is_at_its_display_size(kind, make_odd_clip, tmp_path):
    """Pixels twice as wide as tall: masks are at the display size (stored 64x48, displayed 128x48), the overlay
    is that size with square pixels, and a mask's left third paints the displayed picture's left third."""
    clip = make_odd_clip(kind)
    source = media.probe(clip)
    width, height = (128, 48) if kind == "anamorphic" else (48, 128)
    assert (source.width, source.height) == (width, height)
    left = np.zeros((height, width), np.uint8)
    left[:, :width // 3] = 255
    masks_dir = _write_masks(tmp_path / "pred", [left], [0.9375])
    render.render_overlay(clip, masks_dir, tmp_path / "overlay.mp4", alpha=1.0)
    info = media.probe(tmp_path / "overlay.mp4")
    assert (info.width, info.height, info.sample_aspect_ratio, info.frame_count) == (width, height, "1:1", 50)
    frame = media.decode_frames_at(tmp_path / "overlay.mp4", [0.5])[0]
    assert _is_highlight(frame[4:-4, 4:width // 3 - 4]) and not _is_highlight(frame[4:-4, width // 3 + 4:-4])
    stored = _write_masks(tmp_path / "stored", [np.zeros((48, 64), np.uint8)], [0.9375])  # the stored size
    with pytest.raises(DataError, match=f"the video is {width}x{height} \\(display size\\)"):
        render.render_overlay(clip, stored, tmp_path / "wrong.mp4")
