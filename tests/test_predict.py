"""av2ts predict: options, sources, outputs on real clips with the tiny model, one probe per video, skip/resume,
kills, batches with bad files, the CLI in-process (CliRunner) and as a real subprocess. (The stream of masks:
tests/test_predict_stream.py; output folders and writers: tests/test_predict_outputs.py.)"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import wait_until
from PIL import Image
from typer.testing import CliRunner

from av2ts_cli import cli, media, predict, processes
from av2ts_cli.config import get_preset
from av2ts_cli.errors import EXIT_PARTIAL, EXIT_USAGE, MediaError, UsageError
from av2ts_cli.model import build_model
from av2ts_cli.predict import options, outputs
from av2ts_cli.predict import runner as predict_runner
from av2ts_cli.predict import video as one_video
from av2ts_cli.predictor import load_predictor, make_predictor
from av2ts_cli.runs import OWNED_FILE
from av2ts_cli.sources import collect_videos
from av2ts_cli.weights import checkpoint, registry

runner = CliRunner()


# ------------------------------------------------------------------------------------------------------ fixtures
def _save_tiny(folder: Path, **preset) -> Path:
    torch.manual_seed(0)
    cfg = get_preset("av2ts-tiny", **preset)
    checkpoint.save_checkpoint(build_model(cfg), cfg, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised av2ts-tiny S4 checkpoint (shapes, counts and formats do not need training)."""
    return _save_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_predictor(tiny_checkpoint):
    return load_predictor(str(tiny_checkpoint), device="cpu")


def _options(out: Path, **overrides) -> predict.PredictOptions:
    return predict.PredictOptions(out=out, progress=False, **overrides)


def _av2ts() -> list[str]:
    script = Path(sys.executable).with_name("av2ts")
    return [str(script)] if script.exists() else [sys.executable, "-m", "av2ts_cli"]


def _masks(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / "masks").iterdir() if not p.name.startswith("."))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_options_are_checked():
    assert options.parse_formats("rle, PNG") == ("png", "rle")
    for text in ("", "png,gif"):
        with pytest.raises(UsageError):
            options.parse_formats(text)
    for bad in ({"fps": 0}, {"batch": 0}, {"window": 0}, {"threshold": 1.5}, {"formats": ()}):
        with pytest.raises(UsageError):
            predict.PredictOptions(**bad).check()


# ------------------------------------------------------------------------------------------------------- sources
def test_sources_files_folders_globs(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for name in ("a.mp4", "b.MOV", "notes.txt", ".hidden.mp4", "sub/c.mkv"):
        (tmp_path / name).write_bytes(b"x")
    names = lambda paths: [p.relative_to(tmp_path).as_posix() for p in paths]  # noqa: E731
    assert names(collect_videos([tmp_path])) == ["a.mp4", "b.MOV"]
    assert names(collect_videos([tmp_path], recursive=True)) == ["a.mp4", "b.MOV", "sub/c.mkv"]
    assert names(collect_videos([str(tmp_path / "*.mp4"), tmp_path / "a.mp4"])) == ["a.mp4"]
    assert names(collect_videos([tmp_path / "notes.txt"])) == ["notes.txt"]  # named: taken as given
    assert names(collect_videos([str(tmp_path / "**" / "*.mkv")], recursive=True)) == ["sub/c.mkv"]
    for source, message in ((tmp_path / "missing.mp4", "no such file"), (str(tmp_path / "*.avi"), "matches no"),
                            (tmp_path / "sub" / "deeper", "no videos in this folder (--recursive")):
        with pytest.raises(UsageError, match=message.replace("(", r"\(")):
            collect_videos([source])



# --------------------------------------------------------------------------------------------- outputs on clips
CLIPS = {  # name: (make_clip arguments, sampled seconds, --fps)
    "sound": ({"duration": 3.0}, 3, 3),
    "silent": ({"duration": 2.0, "audio": False}, 2, 1),
    "dot": ({"duration": 1.0, "size": (1, 1)}, 1, 1),
    "portrait": ({"duration": 2.0, "size": (64, 48), "rotation": 90}, 2, 1),
    "vfr": ({"duration": 3.0, "vfr": True}, 3, 2),
    "short audio": ({"duration": 3.0, "audio_duration": 1.5}, 3, 1),
    "long audio": ({"duration": 2.0, "audio_duration": 3.5}, 2, 1),
    "stereo 48k": ({"duration": 2.0, "sample_rate": 48000, "channels": 2}, 2, 1),
}


@pytest.mark.parametrize("case", list(CLIPS))
def test_outputs_for_every_kind_of_clip(case, make_clip, tiny_predictor, tmp_path):
    arguments, seconds, fps = CLIPS[case]
    clip = make_clip(case.replace(" ", "-"), **arguments)
    info = media.probe(clip)
    report = predict.run([clip], _options(tmp_path / "run", fps=fps, overlay=""), predictor=tiny_predictor)
    (result,) = report.videos
    folder = Path(result.folder)
    masks = _masks(folder)
    assert len(masks) == seconds * fps == result.frames
    assert [p.name for p in masks] == [f"{i:06d}.png" for i in range(seconds * fps)]
    for path in masks:
        with Image.open(path) as image:
            assert image.size == (info.width, info.height) and image.mode == "L"
            assert set(np.unique(np.asarray(image))) <= {0, 255}
    if case == "portrait":
        assert (info.width, info.height) == (48, 64)
    lines = _lines(folder / "frames.jsonl")
    assert [line["mask"] for line in lines] == [f"masks/{p.name}" for p in masks]
    times = [line["time"] for line in lines]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= info.duration
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["complete"] and summary["sampling"]["frames"] == seconds * fps
    assert summary["windows"] == fps * math.ceil(seconds / 5)
    assert set(summary["timings"]) >= {"decode_s", "audio_s", "model_s", "writing_s", "overlay_s", "total_s"}
    assert summary["peak_memory"]["rss_mb"] > 0
    assert ("no audio stream: the model heard silence" in summary["warnings"]) == (not info.has_audio)
    assert any("audio ends" in w for w in summary["warnings"]) == (case == "short audio")
    coco = json.loads((folder / "masks.coco.json").read_text())
    assert len(coco["images"]) == seconds * fps
    _check_overlay(clip, folder / "overlay.mp4")


def _check_overlay(clip: Path, overlay: Path) -> None:
    source, out = media.probe(clip), media.probe(overlay)
    assert abs(out.duration - source.duration) <= 1 / source.fps + 1e-6
    assert out.has_audio == source.has_audio
    if not source.has_audio:
        return
    # every audio stream is copied as it is (media.replace_video): the same samples, as long as the input's (audio
    # shorter than the video stays so)
    original, muxed = media.decode_audio(clip), media.decode_audio(overlay)
    assert abs(len(muxed) - len(original)) <= 1024
    n = min(len(original), len(muxed))
    assert np.corrcoef(original[:n], muxed[:n])[0, 1] > 0.999 and np.abs(original[:n] - muxed[:n]).max() < 0.02


def test_semantic_model_writes_palette_pngs(make_clip, tmp_path):
    checkpoint = _save_tiny(tmp_path / "avss-model", subset="avss")
    clip = make_clip("avss", duration=1.0, size=(40, 30))
    report = predict.run([clip], _options(tmp_path / "run", model=str(checkpoint)))
    folder = Path(report.videos[0].folder)
    (mask,) = _masks(folder)
    with Image.open(mask) as image:
        assert image.mode == "P" and image.size == (40, 30)
        assert int(np.asarray(image).max()) < 71
        assert image.getpalette()[3:6] == [128, 0, 0]  # class 1 (accordion) in the AVSS palette
    (line,) = _lines(folder / "frames.jsonl")
    assert all(c["name"] != "background" and 0 < c["area"] <= 1 for c in line["classes"])


def test_siam_models_read_maskiges_from_a_folder(make_clip, tmp_path):
    """--maskiges DIR (without it, a Siam model makes its own: tests/test_predict_maskiges.py)."""
    checkpoint = _save_tiny(tmp_path / "siam-model", siam=True)
    clip = make_clip("siam", duration=2.0, size=(40, 30))
    with pytest.raises(UsageError, match="--maskiges .*missing: no such folder"):
        predict.run([clip], _options(tmp_path / "run", model=str(checkpoint), maskiges=tmp_path / "missing"))
    maskiges = tmp_path / "maskiges" / "siam"
    maskiges.mkdir(parents=True)
    Image.new("RGB", (50, 50), (200, 10, 10)).save(maskiges / "000000.png")
    with pytest.raises(Exception, match="000001.png: missing maskige for mask 1"):
        predict.run([clip], _options(tmp_path / "run", model=str(checkpoint), maskiges=maskiges.parent))
    Image.new("RGB", (128, 128), (10, 10, 200)).save(maskiges / "000001.jpg")
    report = predict.run([clip], _options(tmp_path / "run", model=str(checkpoint), maskiges=maskiges.parent))
    assert report.videos[0].frames == 2 and len(_masks(Path(report.videos[0].folder))) == 2


def test_require_audio_and_formats(make_clip, tiny_predictor, tmp_path):
    silent = make_clip("silent", duration=2.0, audio=False)
    with pytest.raises(MediaError, match="no audio stream"):
        predict.run([silent], _options(tmp_path / "a", require_audio=True), predictor=tiny_predictor)
    report = predict.run([silent], _options(tmp_path / "b", formats=("rle",)), predictor=tiny_predictor)
    folder = Path(report.videos[0].folder)
    assert sorted(p.name for p in folder.iterdir()) == [OWNED_FILE, "masks.coco.json", "summary.json"]
    with pytest.raises(UsageError, match="--overlay paints the PNG masks"):
        predict.run([silent], _options(tmp_path / "c", formats=("json",), overlay=""), predictor=tiny_predictor)


def test_a_rerun_skips_finished_videos(make_clip, tiny_predictor, tmp_path):
    clip = make_clip("rerun", duration=2.0)
    options = _options(tmp_path / "run")
    first = predict.run([clip], options, predictor=tiny_predictor).videos[0]
    summary = Path(first.folder) / "summary.json"
    stamp = summary.stat().st_mtime_ns
    again = predict.run([clip], options, predictor=tiny_predictor).videos[0]
    assert again.skipped and summary.stat().st_mtime_ns == stamp
    forced = predict.run([clip], _options(tmp_path / "run", force=True), predictor=tiny_predictor).videos[0]
    assert not forced.skipped and summary.stat().st_mtime_ns != stamp
    denser = predict.run([clip], _options(tmp_path / "run", fps=2), predictor=tiny_predictor).videos[0]
    assert not denser.skipped and len(_masks(Path(denser.folder))) == 4  # other settings: redone, old masks gone
    (Path(denser.folder) / "frames.jsonl").unlink()  # an output missing: not done
    assert not predict.run([clip], _options(tmp_path / "run", fps=2), predictor=tiny_predictor).videos[0].skipped


@pytest.mark.slow
def test_two_minute_clip(make_clip, tiny_predictor, tmp_path):
    clip = make_clip("two-minutes", duration=120.0, size=(32, 24), fps=5)
    report = predict.run([clip], _options(tmp_path / "run", overlay="", formats=("png", "json")),
                         predictor=tiny_predictor)
    (result,) = report.videos
    assert result.frames == 120 and result.windows == 24 and len(_masks(Path(result.folder))) == 120
    _check_overlay(clip, Path(result.folder) / "overlay.mp4")


# ------------------------------------------------------------------------------------------------- interruption
def _kill_when(process: subprocess.Popen, ready, timeout: float = 180.0) -> None:
    wait_until(ready, process, "the moment to kill", timeout)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _assert_nothing_partial_under_a_final_name(folder: Path, frames: int) -> None:
    assert not (folder / "summary.json").exists()  # not done: a re-run redoes it
    assert not (folder / "overlay.mp4").exists()
    for path in _masks(folder):  # every mask under a final name is a whole PNG
        with Image.open(path) as image:
            image.load()
    if (folder / "frames.jsonl").exists():  # complete or absent
        assert len(_lines(folder / "frames.jsonl")) == frames
    if (folder / "masks.coco.json").exists():
        assert len(json.loads((folder / "masks.coco.json").read_text())["images"]) == frames


@pytest.mark.slow
def test_a_kill_leaves_no_partial_file_under_a_final_name(make_clip, tiny_checkpoint, tiny_predictor, tmp_path):
    clip = make_clip("kill", duration=30.0, size=(320, 240), pattern="testsrc")
    out = tmp_path / "run"
    folder = out / "kill"
    command = [*_av2ts(), "predict", str(clip), "--model", str(tiny_checkpoint), "--out", str(out), "--device",
               "cpu", "--overlay"]
    # 1: killed while masks are being written
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_when(process, lambda: (folder / "masks").is_dir() and len(_masks(folder)) >= 3)
    _assert_nothing_partial_under_a_final_name(folder, 30)
    assert not (folder / "frames.jsonl").exists() and len(_masks(folder)) < 30
    # 2: killed while the overlay is being encoded (its temp file exists)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_when(process, lambda: any("overlay" in p.name and ".partial" in p.name for p in folder.iterdir()))
    _assert_nothing_partial_under_a_final_name(folder, 30)
    # a re-run finishes the video and cleans up what the kills left
    result = predict.run([clip], _options(out, overlay=""), predictor=tiny_predictor).videos[0]
    assert not result.skipped and len(_masks(folder)) == 30 and (folder / "overlay.mp4").is_file()
    assert not [p for p in folder.rglob("*") if ".partial" in p.name]
    assert predict.run([clip], _options(out, overlay=""), predictor=tiny_predictor).videos[0].skipped


# -------------------------------------------------------------------------------------------------------- batch
def _unreadable(folder: Path) -> tuple[Path, str]:
    """A video file this process cannot read, and the reason av2ts should give. As root, permission bits do not
    stop reading, so a dangling symlink (a name whose file cannot be opened) stands in for it."""
    path = folder / "locked.mp4"
    if os.geteuid() == 0:
        path.symlink_to(folder / "gone" / "locked.mp4")
        return path, "no such file"
    path.write_bytes(b"\0" * 1000)
    path.chmod(0)
    return path, "permission denied"


@pytest.mark.slow
def test_batch_finishes_the_good_files_and_lists_the_bad_ones(make_clip, tiny_checkpoint, tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i in range(5):
        shutil.copy(make_clip(f"good{i}", duration=1.0, size=(32 + 2 * i, 24)), folder / f"good{i}.mp4")
    data = (folder / "good0.mp4").read_bytes()
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (folder / "text.mp4").write_text("This is a text file, not a video.\n")
    (folder / "x.mp4").mkdir()
    locked, locked_reason = _unreadable(folder)
    out = tmp_path / "run"
    result = subprocess.run([*_av2ts(), "predict", str(folder), "--model", str(tiny_checkpoint), "--out", str(out),
                             "--device", "cpu"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == EXIT_PARTIAL, result.stderr
    assert "Traceback" not in result.stderr and "Results saved to" in result.stderr
    failures = {Path(f["input"]).name: f["error"] for f in json.loads((out / "failures.json").read_text())}
    assert set(failures) == {"empty.mp4", "truncated.mp4", "text.mp4", "x.mp4", locked.name}
    assert "empty file" in failures["empty.mp4"]
    assert "truncated" in failures["truncated.mp4"]
    assert "not a video" in failures["text.mp4"]
    assert "is a directory" in failures["x.mp4"]
    assert locked_reason in failures[locked.name]
    for name, reason in failures.items():
        assert reason.startswith(str(folder / name)) and "\n" not in reason
        assert name in result.stderr  # the failures table
    for i in range(5):
        assert (out / f"good{i}" / "summary.json").is_file() and len(_masks(out / f"good{i}")) == 1
    assert not any((out / name).exists() for name in ("empty", "truncated", "text", "x"))


# ---------------------------------------------------------------------------------------------------------- CLI
def test_cli_predict_with_overlay_path(make_clip, tiny_checkpoint, tmp_path):
    clip = make_clip("cli", duration=2.0)
    overlay = tmp_path / "over lay.mp4"
    result = runner.invoke(cli.app, ["predict", str(clip), "--model", str(tiny_checkpoint), "--out",
                                     str(tmp_path / "run"), "--device", "cpu", "--fps", "2", "--overlay",
                                     str(overlay)])
    assert result.exit_code == 0, result.output
    assert f"Results saved to {tmp_path / 'run'}" in result.output and "cli.mp4: 2.0 s, 4 masks" in result.output
    assert len(_masks(tmp_path / "run" / "cli")) == 4 and media.probe(overlay).has_audio
    again = runner.invoke(cli.app, ["predict", str(clip), "--model", str(tiny_checkpoint), "--out",
                                    str(tmp_path / "run"), "--fps", "2", "--overlay", str(overlay)])
    assert again.exit_code == 0 and "already done" in again.output
    # a file the run did not write is not replaced: `predict a.mp4 --overlay b.mp4` may have meant two inputs
    other = tmp_path / "other.mp4"
    shutil.copy(clip, other)
    refused = runner.invoke(cli.app, ["predict", str(clip), "--model", str(tiny_checkpoint), "--out",
                                      str(tmp_path / "run2"), "--overlay", str(other)])
    assert refused.exit_code == EXIT_USAGE and "no earlier run wrote it" in refused.output
    assert other.read_bytes() == clip.read_bytes()


def test_cli_default_model_is_the_demo_model(make_clip, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "DEMO_MODEL_DIR", tiny_checkpoint)
    clip = make_clip("demo", duration=1.0)
    result = runner.invoke(cli.app, ["predict", str(clip), "--out", str(tmp_path / "run"), "--overlay"])
    assert result.exit_code == 0, result.output
    assert result.output.count("bundled demo model") == 1
    assert (tmp_path / "run" / "demo" / "overlay.mp4").is_file()
    summary = json.loads((tmp_path / "run" / "demo" / "summary.json").read_text())
    assert summary["model"]["name"] == "demo"


@pytest.mark.parametrize(("arguments", "code", "text"), [
    (["--format", "gif"], EXIT_USAGE, "--format 'gif'"),
    (["--fps", "0"], EXIT_USAGE, "--fps"),
    (["--device", "tpu"], EXIT_USAGE, "tpu"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], EXIT_USAGE, "cuda"),
])
def test_cli_usage_errors(make_clip, tiny_checkpoint, arguments, code, text):
    clip = make_clip("cli-usage", duration=1.0)
    result = runner.invoke(cli.app, ["predict", str(clip), "--model", str(tiny_checkpoint), *arguments])
    assert result.exit_code == code and text in result.output and "Traceback" not in result.output


def test_cli_one_bad_file_is_one_line_and_exit_1(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad video.mp4"
    bad.write_text("not a video")
    result = runner.invoke(cli.app, ["predict", str(bad), "--model", str(tiny_checkpoint), "--out",
                                     str(tmp_path / "run")])
    assert result.exit_code == 1
    assert f"error: {bad}: not a video" in result.output and "Traceback" not in result.output
    missing = runner.invoke(cli.app, ["predict", str(tmp_path / "nope.mp4"), "--model", str(tiny_checkpoint)])
    assert missing.exit_code == EXIT_USAGE and "no such file or folder" in missing.output


def test_cli_subprocess_single_video(make_clip, tiny_checkpoint, tmp_path):
    clip = make_clip("subprocess", duration=1.0, audio=False)
    result = subprocess.run([*_av2ts(), "predict", str(clip), "--model", str(tiny_checkpoint), "--out",
                             str(tmp_path / "run"), "--format", "png,json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # stdout stays clean; progress and results go to stderr
    assert "no audio stream" in result.stderr and "Results saved to" in result.stderr
    assert not (tmp_path / "run" / "subprocess" / "masks.coco.json").exists()


# ---------------------------------------------------------------------------------------- precision and memory
def _measured(monkeypatch, precision: str) -> None:
    """The CPU's measured faster precision, injected (processes.cpu_precision; tests/test_processes.py measures)."""
    speedup = 1.5 if precision == "bf16" else 0.7
    figures = {"matmul_gflops": {"fp32": 1.0, "bf16": speedup}, "conv_gflops": {"fp32": 1.0, "bf16": speedup},
               "bf16_speedup": speedup, "seconds": 0.1}
    monkeypatch.setattr(processes, "cpu_precision", lambda: {"precision": precision, "figures": figures,
                                                              "key": "test", "cached": True, "cache": "-"})


def test_half_on_cpu_is_bf16_where_the_cpu_has_it(make_clip, tiny_checkpoint, tmp_path, monkeypatch):
    clip = make_clip("half", duration=1.0)
    fp32 = predict.run([clip], _options(tmp_path / "fp32", model=str(tiny_checkpoint), device="cpu",
                                        precision="fp32"))
    _measured(monkeypatch, "bf16")
    half = predict.run([clip], _options(tmp_path / "bf16", model=str(tiny_checkpoint), device="cpu", half=True))
    assert half.model["precision"] == "bf16" and fp32.model["precision"] == "fp32"
    (a,), (b,) = (_lines(Path(r.videos[0].folder) / "frames.jsonl") for r in (fp32, half))
    assert a["sounding_area"] == pytest.approx(b["sounding_area"], abs=0.05)  # bf16 rounding, same masks
    _measured(monkeypatch, "fp32")
    plain = make_predictor(build_model(get_preset("av2ts-tiny")), get_preset("av2ts-tiny"), ["b", "s"],
                                   "x", device="cpu", half=True)
    assert plain.precision == "fp32"  # with a warning: bf16 measured no faster here
    assert plain.describe()["precision_basis"]["asked"] == "--half"


@pytest.mark.parametrize("native", [True, False])
def test_default_precision_follows_the_cpu(native, monkeypatch):
    """No --precision: bf16 (the weights cast, the whole forward in bf16) on a CPU where bf16 measured faster, else
    fp32; only the measurement is injected, the model really runs in that precision, and the summary's model record
    says what was measured."""
    _measured(monkeypatch, "bf16" if native else "fp32")
    cfg = get_preset("av2ts-tiny")
    predictor = make_predictor(build_model(cfg), cfg, ["b", "s"], "x", device="cpu")
    assert predictor.precision == ("bf16" if native else "fp32")
    basis = predictor.describe()["precision_basis"]
    assert basis["asked"] == "auto" and basis["measured"]["precision"] == predictor.precision
    assert next(predictor.model.decoder.parameters()).dtype == (torch.bfloat16 if native else torch.float32)
    frames = np.random.default_rng(0).integers(0, 256, (1, 2, 64, 64, 3), dtype=np.uint8)
    scores = predictor.segment_pictures(frames, torch.randn(1, 2, 96, 64))
    assert scores.dtype == torch.float32 and scores.shape == (1, 2, 2, 64, 64) and torch.isfinite(scores).all()


def test_precision_option_usage_errors(tmp_path):
    result = CliRunner().invoke(cli.app, ["predict", str(tmp_path / "missing.mp4"), "--precision", "fp8"])
    assert result.exit_code == EXIT_USAGE
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: --precision 'fp8' is not one of fp32, bf16, fp16"]
    cfg = get_preset("av2ts-tiny")
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        make_predictor(build_model(cfg), cfg, ["b", "s"], "x", device="cpu", precision="fp16")
    with pytest.raises(UsageError, match="--half is --precision bf16 on cpu"):
        make_predictor(build_model(cfg), cfg, ["b", "s"], "x", device="cpu", precision="fp32", half=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_half_precision_matches_cpu(make_clip, tiny_checkpoint, tmp_path):
    clip = make_clip("cuda", duration=2.0)
    cpu = predict.run([clip], _options(tmp_path / "cpu", model=str(tiny_checkpoint), device="cpu"))
    gpu = predict.run([clip], _options(tmp_path / "gpu", model=str(tiny_checkpoint), device="cuda", half=True))
    assert gpu.model["precision"] == "fp16" and gpu.model["device"].startswith("cuda")
    summary = json.loads((Path(gpu.videos[0].folder) / "summary.json").read_text())
    assert summary["peak_memory"]["cuda_mb"] > 0
    for a, b in zip(*(_lines(Path(r.videos[0].folder) / "frames.jsonl") for r in (cpu, gpu)), strict=True):
        assert a["sounding_area"] == pytest.approx(b["sounding_area"], abs=0.05)


def test_a_video_is_probed_once(make_clip, tiny_predictor, tmp_path, monkeypatch):
    """The probe of a video is made once and passed on: media.probe runs once per input, and no other inspection
    of the input (frame decoding, the overlay's frames and audio) runs ffprobe/ffmpeg -i again."""
    clip = make_clip("probed", duration=2.0)
    probed, inspected = [], []
    original_probe, original_inspect = media.probe, media._inspect

    def counting_probe(path, *args, **kwargs):
        probed.append(Path(path))
        return original_probe(path, *args, **kwargs)

    def counting_inspect(path, *args, **kwargs):
        inspected.append(Path(path))
        return original_inspect(path, *args, **kwargs)

    monkeypatch.setattr(media, "probe", counting_probe)
    monkeypatch.setattr(media, "_inspect", counting_inspect)
    predict.run([clip], _options(tmp_path / "run", overlay=""), predictor=tiny_predictor)
    assert probed.count(clip) == 1
    assert inspected.count(clip) == 1


# ----------------------------------------------------------------------------- reliability: bounds, odd inputs
def _no_frames_clip(make_clip, folder: Path) -> Path:
    """An MP4 whose container and stream headers are intact but whose packets are zeros: no frame decodes."""
    data = bytearray(make_clip("nodecode-source", duration=1.0).read_bytes())
    start = data.find(b"mdat")
    size = int.from_bytes(data[start - 4:start], "big")
    data[start + 4:start - 4 + size] = bytes(size - 8)
    path = folder / "nodecode.mp4"
    path.write_bytes(bytes(data))
    return path


def test_fps_above_the_frame_rate_and_window_beyond_the_video_are_usage_errors(make_clip, tiny_predictor,
                                                                               tiny_checkpoint, tmp_path):
    clip = make_clip("short-bounds", duration=0.3, fps=25)
    out = tmp_path / "run"
    with pytest.raises(UsageError) as caught:
        predict.run([clip], _options(out, fps=1000), predictor=tiny_predictor)
    assert caught.value.message == f"--fps 1000: {clip} has 25 frames per second; at most --fps 25"
    with pytest.raises(UsageError) as caught:
        predict.run([clip], _options(out, window=50), predictor=tiny_predictor)
    assert caught.value.message == (f"--window 50: {clip} has 1 sampled second and the model's clip is 5; at most "
                                    "--window 5")
    assert not out.exists()  # nothing written, not even the run folder
    result = runner.invoke(cli.app, ["predict", str(clip), "--model", str(tiny_checkpoint), "--out", str(out),
                                     "--fps", "26"])
    assert result.exit_code == EXIT_USAGE
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [
        f"error: --fps 26: {clip} has 25 frames per second; at most --fps 25"]
    assert predict.run([clip], _options(out, fps=25), predictor=tiny_predictor).videos[0].frames == 25


def test_a_window_that_cannot_fit_in_memory_is_refused(make_clip, tiny_predictor, tmp_path, monkeypatch):
    clip = make_clip("short-memory", duration=1.0)
    monkeypatch.setattr(one_video, "available_mib", lambda device: 100.0)  # 15.3 MB a frame at 128 px
    with pytest.raises(UsageError) as caught:
        predict.run([clip], _options(tmp_path / "run", window=5, batch=4), predictor=tiny_predictor)
    assert caught.value.message == ("--window 5 with --batch 4: needs over 306 MB, 100 MB free on cpu; at most "
                                    "--window 1")


def test_a_stream_without_decodable_frames_is_named_and_leaves_no_folder(make_clip, tiny_predictor, tmp_path):
    video = _no_frames_clip(make_clip, tmp_path)
    with pytest.raises(MediaError) as caught:
        predict.run([video], _options(tmp_path / "run"), predictor=tiny_predictor)
    assert caught.value.message == f"{video}: no decodable video frames (a h264 stream without frames)"
    assert not (tmp_path / "run").exists()


def test_a_still_image_named_mp4_is_segmented_with_a_warning(make_clip, tiny_predictor, tmp_path):
    still = tmp_path / "photo.mp4"
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(still, format="PNG")
    (result,) = predict.run([still], _options(tmp_path / "run"), predictor=tiny_predictor).videos
    assert result.frames == 1 and "a still png image, not a video: one frame, no sound" in result.warnings


def test_a_failure_mid_video_leaves_no_outputs_and_a_single_one_no_run_folder(make_clip, tiny_predictor, tmp_path,
                                                                              monkeypatch):
    clip = make_clip("fails-mid-way", duration=3.0)
    monkeypatch.setattr(predict_runner, "DEFAULT_RUNS", tmp_path / "runs" / "predict")
    real = outputs.MaskOutputs.add
    calls = []

    def add(self, frame, mask):  # the disk fills after the first mask
        calls.append(frame.index)
        if len(calls) > 1:
            raise OSError(28, "No space left on device", str(self.folder / "masks" / "000001.png"))
        real(self, frame, mask)

    monkeypatch.setattr(outputs.MaskOutputs, "add", add)
    with pytest.raises(OSError):
        predict.run([clip], predict.PredictOptions(progress=False), predictor=tiny_predictor)
    assert calls == [0, 1] and sorted(p.name for p in (tmp_path / "runs" / "predict").iterdir()) == []


def test_markup_in_file_names_is_printed_literally(make_clip, tiny_checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(make_clip("markup-good", duration=1.0), folder / "[bold]good.mp4")
    (folder / "[red]bad.mp4").write_text("not a video")
    result = runner.invoke(cli.app, ["predict", str(folder), "--model", str(tiny_checkpoint), "--out",
                                     str(tmp_path / "run")], env={"COLUMNS": "300"})
    assert result.exit_code == EXIT_PARTIAL, result.output
    assert f"failed: {folder / '[red]bad.mp4'}: not a video" in result.output
    assert "[bold]good.mp4: 1.0 s, 1 masks" in result.output
    assert "│ " + str(folder / "[red]bad.mp4") in result.output  # the failures table


# ------------------------------------------------------------------- reliability: locks, leftovers, signals
def test_a_video_another_run_holds_is_left_to_it_and_failures_json_is_merged(make_clip, tiny_predictor, tmp_path,
                                                                              capsys):
    from av2ts_cli import locks

    first, second = make_clip("held-a", duration=1.0), make_clip("held-b", duration=1.0)
    out = tmp_path / "run"
    out.mkdir()
    other = str(tmp_path / "elsewhere.mp4")
    (out / "failures.json").write_text(json.dumps([{"input": str(first), "error": "theirs"},
                                                   {"input": str(second), "error": "old"},
                                                   {"input": other, "error": "kept"}]))
    with locks.held(out / "held-a"):  # as another run would (flock: a second open file conflicts, same process too)
        report = predict.run([first, second], _options(out), predictor=tiny_predictor)
    assert report.busy == [{"input": str(first), "pid": os.getpid()}] and report.failures == []
    assert [v.name for v in report.videos] == ["held-b.mp4"]
    assert f"{first}: in use by av2ts pid {os.getpid()}" in capsys.readouterr().err
    failures = json.loads((out / "failures.json").read_text())
    assert failures == [{"input": str(first), "error": "theirs"}, {"input": other, "error": "kept"}]
    assert not (out / "held-a" / "summary.json").exists() and (out / "held-b" / "summary.json").is_file()
    assert not [p for p in out.rglob("*") if p.name == locks.LOCK_FILE]


def test_temps_a_kill_left_are_swept_by_the_next_run_even_when_it_skips(make_clip, tiny_predictor, tmp_path):
    from av2ts_cli import files

    clip = make_clip("swept", duration=1.0)
    out, overlays = tmp_path / "run", tmp_path / "overlays"
    options = _options(out, overlay=str(overlays))
    predict.run([clip, make_clip("swept-2", duration=1.0)], options, predictor=tiny_predictor)
    folder = out / "swept"
    # what SIGKILLs at different moments leave: an overlay's silent temp and its encoding temp, a mask's, a JSON's
    left = [files.temp_name_for(files.temp_name_for(overlays / "swept.mp4")), files.temp_name_for(overlays /
            "swept.mp4"), files.temp_name_for(folder / "masks" / "000000.png"),
            files.temp_name_for(folder / "frames.jsonl"), files.temp_name_for(out / "failures.json")]
    for path in left:
        path.write_bytes(b"half")
    theirs = files.temp_name_for(overlays / "other.mp4")  # another video's overlay in the shared folder: not ours
    theirs.write_bytes(b"live")
    report = predict.run([clip, make_clip("swept-2", duration=1.0)], options, predictor=tiny_predictor)
    assert all(v.skipped for v in report.videos)
    assert not any(p.exists() for p in left) and theirs.exists()
    report = predict.run([clip], _options(out, overlay=str(overlays / "swept.mp4"), force=True),
                         predictor=tiny_predictor)
    assert not [p for p in [*out.rglob("*"), *overlays.iterdir()] if ".partial" in p.name and p != theirs]


@pytest.mark.slow
def test_two_runs_into_one_folder_share_the_videos(make_clip, tiny_checkpoint, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(4):
        shutil.copy(make_clip(f"shared{i}", duration=1.0, size=(32, 24)), inputs / f"shared{i}.mp4")
    out = tmp_path / "run"
    command = [*_av2ts(), "predict", str(inputs), "--model", str(tiny_checkpoint), "--out", str(out), "--device",
               "cpu"]
    runs = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    errors = [run.communicate(timeout=600)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    assert "No such file" not in "".join(errors) and "failed:" not in "".join(errors)
    assert json.loads((out / "failures.json").read_text()) == []
    for i in range(4):
        summary = json.loads((out / f"shared{i}" / "summary.json").read_text())
        assert summary["complete"] and len(_masks(out / f"shared{i}")) == 1
    assert sorted(p.name for p in out.iterdir()) == ["failures.json", *[f"shared{i}" for i in range(4)]]
    # every video made exactly once, by one of the two: the other skipped it (done or in use)
    made = sum(err.count("ms/window") for err in errors)
    assert made == 4, errors


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_run_cleans_up_says_what_was_left_and_exits_128_plus_it(signum, make_clip, tiny_checkpoint,
                                                                              tmp_path):
    clip = make_clip("terminated", duration=30.0, size=(64, 48))
    out = tmp_path / "run"
    folder = out / "terminated"
    process = subprocess.Popen([*_av2ts(), "predict", str(clip), "--model", str(tiny_checkpoint), "--out", str(out),
                                "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: (folder / "masks").is_dir() and len(_masks(folder)) >= 1, process, "the first mask")
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err  # 143, 130
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {signal.Signals(signum).name}: {clip} left unfinished; 0 of 1 videos done or "
                     "skipped, 0 not started; the same command finishes them"], err
    assert "Traceback" not in err and not out.exists()  # no outputs, no temps, no empty folders


# ------------------------------------------------------------------------------------------------------ torchrun
def _torchrun(args: list[str], logs: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m av2ts_cli ARGS`` on the CPU, each rank's stdout and stderr in ``logs``."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--log-dir", str(logs), "--redirects", "3", "-m", "av2ts_cli", *args],
                          capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})


def _rank_logs(logs: Path, name: str) -> dict[int, str]:
    """{rank: the text of its ``name`` (stdout.log or stderr.log)} from torchrun's --log-dir."""
    return {int(path.parent.name): path.read_text() for path in logs.rglob(name)}


def test_the_processes_reports_combine_in_the_order_of_the_videos():
    """Rank r did videos[r::2]: the combined report lists videos, failures and busy ones as the run listed the
    inputs, whichever rank had them, and keeps the rank of the process that combines."""
    videos = [Path(f"v{i}.mp4") for i in range(6)]

    def report(rank, done, failed, busy):
        done = [predict.VideoResult(str(videos[i]), f"v{i}", f"v{i}") for i in done]
        return predict.RunReport("out", {}, videos=done,
                                 failures=[{"input": str(videos[i]), "error": "bad"} for i in failed],
                                 busy=[{"input": str(videos[i]), "pid": 7} for i in busy], processes=2, rank=rank)

    combined = predict_runner._combined([report(0, [4, 0], [2], []), report(1, [5, 1], [], [3])], videos, rank=1)
    assert [v.name for v in combined.videos] == ["v0", "v1", "v4", "v5"]
    assert [f["input"] for f in combined.failures] == ["v2.mp4"] and [b["input"] for b in combined.busy] == ["v3.mp4"]
    assert combined.rank == 1 and combined.processes == 2


@pytest.mark.slow
def test_torchrun_shares_the_videos_and_combines_the_failures(make_clip, tiny_checkpoint, tmp_path):
    """Two CPU processes: each video is done by exactly one of them, one failures.json lists the bad file, both
    exit 3 (a failure on one process is the job's), and the same command afterwards redoes nothing."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i in range(4):
        shutil.copy(make_clip(f"ddp{i}", duration=1.0, size=(32 + 2 * i, 24)), folder / f"v{i}.mp4")
    (folder / "v4.mp4").write_text("This is a text file, not a video.\n")  # rank 0's third video (v0, v2, v4)
    out = tmp_path / "run"
    args = ["predict", str(folder), "--model", str(tiny_checkpoint), "--out", str(out), "--device", "cpu"]
    result = _torchrun(args, tmp_path / "logs", tmp_path)
    assert result.returncode != 0 and result.stderr.count("exitcode  : 3") == 2, result.stderr[-3000:]
    stderr = _rank_logs(tmp_path / "logs", "stderr.log")
    assert sorted(stderr) == [0, 1]
    assert all("Traceback" not in text for text in stderr.values()), stderr
    for i in range(4):  # each good video once, by the rank its place in the list gives it
        summary = json.loads((out / f"v{i}" / "summary.json").read_text())
        assert Path(summary["input"]).name == f"v{i}.mp4"
        owners = [rank for rank, text in stderr.items() if f"v{i}.mp4" in text]
        assert owners == [i % 2], (i, owners)
    failures = json.loads((out / "failures.json").read_text())
    assert [Path(f["input"]).name for f in failures] == ["v4.mp4"] and "not a video" in failures[0]["error"]
    assert "1 of 5 inputs failed" in stderr[0] and "inputs failed" not in stderr[1]  # rank 0 reports for both

    again = _torchrun(args, tmp_path / "logs2", tmp_path)
    assert again.returncode != 0  # v4 still fails
    stderr = _rank_logs(tmp_path / "logs2", "stderr.log")
    assert sum(text.count("already done") for text in stderr.values()) == 4
    assert [Path(f["input"]).name for f in json.loads((out / "failures.json").read_text())] == ["v4.mp4"]


@pytest.mark.slow
def test_an_interrupted_torchrun_predict_is_finished_by_the_same_command(make_clip, tiny_checkpoint, tmp_path):
    """SIGTERM to torchrun (it passes the signal on to its processes) once some videos are done: each process
    cleans up its current video and exits 143, nothing unfinished stands under a final name, and the same command
    then does exactly the videos that were not done."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i in range(6):
        shutil.copy(make_clip(f"stop{i}", duration=6.0, size=(96, 64)), folder / f"s{i}.mp4")
    out = tmp_path / "run"
    args = ["predict", str(folder), "--model", str(tiny_checkpoint), "--out", str(out), "--device", "cpu"]
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                "2", "--log-dir", str(tmp_path / "logs"), "--redirects", "3", "-m", "av2ts_cli",
                                *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_until(lambda: len(list(out.glob("*/summary.json"))) >= 1, process, "a finished video", timeout=300)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    logs = _rank_logs(tmp_path / "logs", "stderr.log")
    assert all("SIGTERM" in text and "Traceback" not in text for text in logs.values()), logs
    done = {p.parent.name for p in out.glob("*/summary.json")}
    assert 1 <= len(done) < 6
    for name in {f"s{i}" for i in range(6)} - done:
        if (out / name).exists():
            _assert_nothing_partial_under_a_final_name(out / name, 6)
    again = _torchrun(args, tmp_path / "logs2", tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    logs = _rank_logs(tmp_path / "logs2", "stderr.log")
    assert sum(text.count("already done") for text in logs.values()) == len(done)
    assert all((out / f"s{i}" / "summary.json").is_file() for i in range(6))
    assert not [p for p in out.rglob("*") if ".partial" in p.name]
