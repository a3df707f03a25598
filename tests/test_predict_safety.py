"""av2ts predict never touches what it did not write, never leaves its output folder and never answers the wrong
question in silence (issue 20's classes in predict): each test asserts the file system afterwards (a listing with
hashes of what av2ts must not touch), the exact line and the exit code."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import invoke_cli, one_line

from av2ts_cli import media
from av2ts_cli.config import get_preset
from av2ts_cli.errors import CheckpointError
from av2ts_cli.model import build_model
from av2ts_cli.runs import MASKIGES_RECORD, OWNED_FILE
from av2ts_cli.sources import collect_videos
from av2ts_cli.weights import checkpoint, resolve


def _save(folder: Path, seed: int = 0, **preset) -> Path:
    torch.manual_seed(seed)
    cfg = get_preset("av2ts-tiny", **preset)
    checkpoint.save_checkpoint(build_model(cfg), cfg, folder)
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def clip(make_clip) -> Path:
    return make_clip("safe", duration=1.0, size=(32, 24))


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the sha256 of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _last_line(output: str) -> str:
    """The error line of a failure met while a video was being done (the progress display's lines come first)."""
    return [line for line in output.splitlines() if line.strip()][-1]


def _predict(clip: Path, model: Path, out: Path, *extra: str, expect: int = 0):
    return invoke_cli(["predict", str(clip), "--model", str(model), "--out", str(out), "--device", "cpu", *extra],
                      expect=expect)


# ------------------------------------------------------------------------------------------------ ownership
def test_a_video_folder_av2ts_did_not_make_is_refused_and_left_untouched(clip, model, tmp_path):
    out = tmp_path / "out"
    folder = out / "safe"
    (folder / "masks").mkdir(parents=True)
    (folder / "masks" / "000000.png").write_bytes(b"the user's own mask")
    (folder / "frames.jsonl").write_text("the user's notes\n")
    before = _tree(out)
    result = _predict(clip, model, out, expect=2)
    assert one_line(result.output) == (f"error: {folder}: a folder av2ts did not make (it holds frames.jsonl, masks); "
                                       "pass --force to write into it (av2ts replaces only the files it writes)")
    assert _tree(out) == before


def test_a_rerun_removes_only_what_av2ts_wrote(clip, model, tmp_path):
    out = tmp_path / "out"
    _predict(clip, model, out)
    folder = out / "safe"
    (folder / "masks" / "mine.png").write_bytes(b"kept")
    (folder / "notes.txt").write_text("kept")
    theirs = {name: digest for name, digest in _tree(folder).items() if name in ("masks/mine.png", "notes.txt")}
    _predict(clip, model, out, "--force", "--format", "json")  # no PNGs this time: the old ones go, not theirs
    after = _tree(folder)
    assert {name: after[name] for name in theirs} == theirs
    assert not (folder / "masks" / "000000.png").exists() and (folder / "frames.jsonl").is_file()
    assert "masks/000000.png" not in json.loads((folder / OWNED_FILE).read_text())["files"]


# ------------------------------------------------------------------------------------------------ containment
def test_a_video_named_dot_stays_inside_out_and_the_mapping_is_recorded(clip, model, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    dot = inputs / "..mp4"  # its stem is "."
    shutil.copy(clip, dot)
    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    (tmp_path / "work" / "keep.txt").write_text("beside --out")
    outside = _tree(tmp_path / "work")
    invoke_cli(["predict", str(dot), "--model", str(model), "--out", str(out), "--device", "cpu"])
    assert sorted(os.listdir(out)) == ["_"]
    summary = json.loads((out / "_" / "summary.json").read_text())
    assert summary["folder_name"] == "_" and summary["input"] == str(dot.resolve())
    assert {k: v for k, v in _tree(tmp_path / "work").items() if not k.startswith("out/")} == outside


# ------------------------------------------------------------------------------------------- identity of results
def test_a_retrained_model_at_the_same_path_redoes_the_video(clip, tmp_path):
    model = _save(tmp_path / "best", seed=0)
    out = tmp_path / "out"
    _predict(clip, model, out)
    first = json.loads((out / "safe" / "summary.json").read_text())["settings"]["weights_sha256"]
    skipped = _predict(clip, model, out)
    assert "already done" in skipped.output
    _save(tmp_path / "best", seed=1)  # retrained: same path, other weights
    again = _predict(clip, model, out)
    assert "already done" not in again.output
    second = json.loads((out / "safe" / "summary.json").read_text())["settings"]["weights_sha256"]
    assert first != second and second == checkpoint.weights_sha256(model / "model.safetensors")


def test_the_weights_hash_is_cached_by_the_file_version(tmp_path, monkeypatch):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x" * 100)
    digest = checkpoint.weights_sha256(weights)
    assert digest == hashlib.sha256(b"x" * 100).hexdigest()
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    assert checkpoint.weights_sha256(weights) == digest and str(weights.resolve()) not in opened  # from the cache
    weights.write_bytes(b"y" * 100)
    assert checkpoint.weights_sha256(weights) == hashlib.sha256(b"y" * 100).hexdigest()


# ------------------------------------------------------------------------------------------------ before work
def test_an_overlay_of_another_container_is_refused_before_the_model_loads(clip, model, tmp_path, monkeypatch):
    monkeypatch.setattr(resolve, "resolve_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    result = _predict(clip, model, out, "--overlay", str(tmp_path / "x.webm"), expect=2)
    assert one_line(result.output) == f"error: {tmp_path / 'x.webm'}: the overlay must be an .mp4, .mov or .mkv file"
    assert not out.exists()
    long = tmp_path / ("o" * 250 + ".mp4")
    result = _predict(clip, model, out, "--overlay", str(long), expect=2)
    assert "the overlay's name is too long for the file system (254 bytes, at most 237)" in one_line(result.output)
    assert not out.exists()


def test_a_broken_ffmpeg_is_one_error_before_any_input(clip, model, tmp_path, monkeypatch):
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\necho 'not ffmpeg'\n")
    fake.chmod(0o755)
    second = tmp_path / "second.mp4"
    shutil.copy(clip, second)
    monkeypatch.setenv("AV2TS_FFMPEG", str(fake))
    media.find_ffmpeg.cache_clear()
    media.check_ffmpeg.cache_clear()
    try:
        result = invoke_cli(["predict", str(clip), str(second), "--model", str(model), "--out", str(tmp_path / "out"),
                             "--device", "cpu"], expect=1)
    finally:
        media.find_ffmpeg.cache_clear()
        media.check_ffmpeg.cache_clear()
    assert one_line(result.output) == (f"error: {fake}: AV2TS_FFMPEG is not a working ffmpeg (`-version` gave "
                                       "'not ffmpeg')")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ pairing
def test_maskiges_made_at_another_fps_are_refused_naming_both(clip, tmp_path):
    siam = _save(tmp_path / "siam", siam=True)
    maskiges = tmp_path / "maskiges" / "safe"
    maskiges.mkdir(parents=True)
    record = {"made_by": "av2ts maskiges", "input": str(clip.resolve()), "fps": 2, "times": [0.4375, 0.9375]}
    (maskiges / MASKIGES_RECORD).write_text(json.dumps(record))
    result = _predict(clip, siam, tmp_path / "out", "--maskiges", str(tmp_path / "maskiges"), expect=2)
    assert _last_line(result.output) == (f"error: --maskiges {maskiges}: made for 2 frames at --fps 2, but {clip} "
                                         "is sampled at 1 other times (this run's --fps); make them with the same "
                                         "--fps")
    (maskiges / MASKIGES_RECORD).write_text(json.dumps({**record, "input": "/elsewhere/other.mp4"}))
    result = _predict(clip, siam, tmp_path / "out", "--maskiges", str(tmp_path / "maskiges"), expect=2)
    assert _last_line(result.output) == (f"error: --maskiges {maskiges}: made for /elsewhere/other.mp4, not for "
                                       f"{clip} (maskiges.json there says so); give the folder of this video's "
                                       "maskiges")


# ------------------------------------------------------------------------------------------------ sources
def test_a_folder_source_skips_av2ts_outputs_and_symlinked_duplicates(clip, model, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(clip, inputs / "talk.mp4")
    (inputs / "again.mp4").symlink_to(inputs / "talk.mp4")
    assert [p.name for p in collect_videos([inputs])] == ["again.mp4"]  # one input, whichever name sorts first
    invoke_cli(["predict", str(inputs / "talk.mp4"), "--model", str(model), "--out", str(inputs / "runs"),
                "--device", "cpu", "--overlay"])
    invoke_cli(["predict", str(inputs / "talk.mp4"), "--model", str(model), "--out", str(inputs / "runs2"),
                "--device", "cpu", "--overlay", str(inputs / "overlays")])
    assert (inputs / "runs" / "talk" / "overlay.mp4").is_file() and (inputs / "overlays" / "talk.mp4").is_file()
    assert [p.name for p in collect_videos([inputs], recursive=True)] == ["again.mp4"]  # not its own overlays


def test_an_overlay_that_would_replace_its_input_is_refused(clip, model, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(clip, inputs / "talk.mp4")
    before = _tree(inputs)
    result = invoke_cli(["predict", str(inputs / "talk.mp4"), "--model", str(model), "--out", str(tmp_path / "out"),
                         "--device", "cpu", "--overlay", str(inputs), "--force"], expect=2)
    assert one_line(result.output) == (f"error: --overlay {inputs / 'talk.mp4'}: is the input video itself; "
                                       "overlays never replace their inputs")
    assert _tree(inputs) == before


def test_names_with_control_characters_are_printed_escaped(make_clip, model, tmp_path):
    forged = tmp_path / "a\nerror: forged.mp4"
    shutil.copy(make_clip("plain", duration=1.0, size=(32, 24)), forged)
    result = _predict(forged, model, tmp_path / "out")
    assert not any(line.startswith("error: forged") for line in result.output.splitlines())
    assert "a\\nerror: forged.mp4:" in result.output


def test_a_run_folder_given_as_model_points_to_best_and_last(model, tmp_path):
    run = tmp_path / "runs" / "exp"
    shutil.copytree(model, run / "best")
    with pytest.raises(CheckpointError) as caught:
        resolve.resolve_model(str(run))
    assert caught.value.message == (f"{run}: no model.safetensors in this folder (a training run: pass {run / 'best'})")


def test_json_output_carries_the_error(tmp_path):
    result = invoke_cli(["convert", str(tmp_path / "missing.pth"), "--kind", "reference", "--out",
                         str(tmp_path / "x"), "--json"], expect=1)
    document = json.loads(result.stdout)
    assert document == {"error": f"{tmp_path / 'missing.pth'}: no such file", "exit_code": 1}


def test_an_unknown_device_names_the_choices(clip, model, tmp_path):
    result = _predict(clip, model, tmp_path / "out", "--device", "tpu", expect=2)
    assert one_line(result.output) == ("error: --device tpu: not a device av2ts runs on; choose auto, cpu, cuda or "
                                       "cuda:N")
    assert not (tmp_path / "out").exists()
