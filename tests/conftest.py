"""Shared pytest fixtures. SHARED FILE: append your fixtures below (with a docstring), don't rewrite others'.

Media fixtures (media engineer):
- ``make_clip(...)`` -> Path: small test clips made with ffmpeg (lavfi sources plus a sine), cached per session.
- ``read_frame_index(frame, rotation=0)`` -> int: the index painted on a frame of a ``pattern="index"`` clip.
- ``vfr_frame_times(count, fps)`` -> list[float]: the timestamps of a ``vfr=True`` clip.
- ``bad_videos`` -> dict[str, Path]: files named like videos that no decoder can read.
- ``make_odd_clip(kind)`` -> Path: several audio streams, a picture that starts late, anamorphic pixels.
- ``dominant_frequency(wave)`` -> float: the tone a decoded audio holds (a module function; import it).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from av2ts_cli.media import find_ffmpeg, sum_expression

INDEX_BITS = 10  # index clips carry the frame index in 10 vertical bars: bar b (from the left) is white iff bit b is 1
VFR_OFFSETS = (0.0, 0.5, 2.0, 3.0)  # vfr clips: frame 4q+r is stamped at (4q + VFR_OFFSETS[r]) / fps


def vfr_frame_times(count: int, fps: float) -> list[float]:
    """Timestamps (s) of the frames of ``make_clip(..., vfr=True)``: intervals cycle 0.5, 1.5, 1, 1 frame periods,
    so the average rate is ``fps`` but no two neighbouring intervals agree."""
    return [(4 * (k // 4) + VFR_OFFSETS[k % 4]) / fps for k in range(count)]


def read_frame_index(frame: np.ndarray, rotation: int = 0) -> int:
    """The index painted on a frame of an index clip (RGB uint8 [H, W, 3], any size >= 10 px wide in the
    original orientation). ``rotation``: clockwise degrees the frame was turned for display (Probe.rotation);
    it is undone first."""
    upright = np.rot90(frame, k=(rotation // 90) % 4)  # rot90 turns counter-clockwise
    height, width = upright.shape[:2]
    row = upright[height // 2].astype(np.int32).mean(axis=1)  # grey level along the middle row
    centers = ((np.arange(INDEX_BITS) + 0.5) * width / INDEX_BITS).astype(int)
    return sum(1 << b for b, x in enumerate(centers) if row[x] > 128)


@pytest.fixture(scope="session", name="read_frame_index")
def read_frame_index_fixture():
    """``read_frame_index(frame, rotation=0) -> int`` (see the module function)."""
    return read_frame_index


@pytest.fixture(scope="session", name="vfr_frame_times")
def vfr_frame_times_fixture():
    """``vfr_frame_times(count, fps) -> list[float]`` (see the module function)."""
    return vfr_frame_times


def _run_ffmpeg(args: list[str]) -> None:
    result = subprocess.run([find_ffmpeg(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg failed making a test clip: {result.stderr.strip()}")


@pytest.fixture(scope="session")
def make_clip(tmp_path_factory):
    """Factory for small test clips, each made once per session for a given set of parameters::

        make_clip(name="clip", *, duration=2.0, size=(64, 48), fps=25, audio=True, sample_rate=16000, channels=1,
                  audio_duration=None, rotation=None, vfr=False, frame_times=None, pattern="index") -> Path

    - ``name``: the file name without ".mp4" (spaces and non-ASCII letters are fine).
    - ``duration``/``fps``: ``round(duration * fps)`` frames at a constant rate starting at 0 (H.264 in MP4;
      yuv420p, or yuv444p when a side is odd, e.g. 1x1).
    - ``size``: (width, height) as stored; ``rotation``: clockwise degrees (90, 180, 270) written as display-matrix
      metadata, so players (and av2ts) show it turned; Probe reports the turned size.
    - ``vfr=True``: variable frame rate, frame k stamped at ``vfr_frame_times(n, fps)[k]``.
      ``frame_times``: explicit timestamps (s, increasing) for each frame instead; ``duration`` is then ignored.
    - ``pattern="index"``: frame k shows k in binary as 10 vertical bars (``read_frame_index`` reads it back);
      ``"testsrc"``: ffmpeg's colour test pattern.
    - ``audio``: an AAC track, a 440 Hz sine (amplitude 1/8) in every channel, ``sample_rate`` Hz, ``channels``
      channels, lasting ``audio_duration`` (default: the video's duration; shorter or longer is allowed).
    """
    root = tmp_path_factory.mktemp("clips")
    cache: dict[str, Path] = {}

    def make(name: str = "clip", *, duration: float = 2.0, size: tuple[int, int] = (64, 48), fps: float = 25,
             audio: bool = True, sample_rate: int = 16000, channels: int = 1, audio_duration: float | None = None,
             rotation: int | None = None, vfr: bool = False, frame_times: list[float] | None = None,
             pattern: str = "index") -> Path:
        params = dict(name=name, duration=duration, size=list(size), fps=fps, audio=audio, sample_rate=sample_rate,
                      channels=channels, audio_duration=audio_duration, rotation=rotation, vfr=vfr,
                      frame_times=frame_times, pattern=pattern)
        key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        if key in cache:
            return cache[key]
        folder = root / key
        folder.mkdir()
        out = folder / f"{name}.mp4"
        width, height = size
        if frame_times is None:
            count = max(1, round(duration * fps))
            frame_times = vfr_frame_times(count, fps) if vfr else None
        else:
            count = len(frame_times)
        video_seconds = (frame_times[-1] + 1 / fps) if frame_times else count / fps
        if pattern == "index":  # a 10x2 picture of the bits, blown up without smoothing
            source = (f"color=black:size={INDEX_BITS}x2:rate={fps},format=yuv444p,"
                      f"geq=lum='if(bitand(N,pow(2,X)),235,16)':cb=128:cr=128,"
                      f"scale={width}:{height}:flags=neighbor,setsar=1")
        elif pattern == "testsrc":
            source = f"testsrc=size={width}x{height}:rate={fps}"
        else:
            raise ValueError(f"unknown pattern {pattern!r}")
        source += f",trim=end_frame={count}"
        if frame_times is not None:  # timestamps set frame by frame, on a fine clock so they stay exact
            expression = sum_expression([f"eq(N,{k})*{t!r}" for k, t in enumerate(frame_times)])
            source += f",settb=1/90000,setpts='({expression})/TB'"
        args = ["-f", "lavfi", "-i", source]
        if audio:
            seconds = video_seconds if audio_duration is None else audio_duration
            args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={sample_rate}:duration={seconds}"]
        pix_fmt = "yuv444p" if width % 2 or height % 2 else "yuv420p"
        args += ["-map", "0:v", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", pix_fmt, "-fps_mode",
                 "passthrough"]
        if frame_times is not None:
            # a fine clock keeps the stamps exact; no B-frames, or the MP4 muxer misjudges a VFR track's duration
            args += ["-enc_time_base:v", "1/90000", "-video_track_timescale", "90000", "-bf", "0"]
        if audio:
            args += ["-map", "1:a", "-c:a", "aac"]
            if channels > 1:  # the same samples in every channel (``-ac`` would scale them by 1/sqrt(2))
                layout = "stereo" if channels == 2 else f"{channels}c"
                args += ["-af", f"pan={layout}|" + "|".join(f"c{i}=c0" for i in range(channels))]
        if rotation:
            plain = folder / "plain.mp4"
            _run_ffmpeg([*args, str(plain)])
            _run_ffmpeg(["-display_rotation:v:0", str(-rotation), "-i", str(plain), "-c", "copy", str(out)])
            plain.unlink()
        else:
            _run_ffmpeg([*args, str(out)])
        cache[key] = out
        return out

    return make


@pytest.fixture(scope="session")
def bad_videos(tmp_path_factory, make_clip) -> dict[str, Path]:
    """Files named like videos that cannot be decoded: "empty" (0 bytes), "truncated" (an MP4 cut in half: no
    index), "truncated_faststart" (index up front, data cut), "text" (a text file named .mp4), "directory"
    (a folder named x.mp4)."""
    root = tmp_path_factory.mktemp("bad")
    good = make_clip("for-truncation", duration=2.0, size=(64, 48))
    data = good.read_bytes()
    bad = {name: root / f"{name}.mp4" for name in ("empty", "truncated", "truncated_faststart", "text")}
    bad["empty"].write_bytes(b"")
    bad["truncated"].write_bytes(data[: len(data) // 2])
    faststart = root / "faststart-source.mp4"
    _run_ffmpeg(["-i", str(good), "-c", "copy", "-movflags", "+faststart", str(faststart)])
    bad["truncated_faststart"].write_bytes(faststart.read_bytes()[: len(data) // 2])
    bad["text"].write_text("This is a text file, not a video.\n")
    bad["directory"] = root / "x.mp4"
    bad["directory"].mkdir()
    return bad


# ------------------------------------------------------------------------------------------------ data engineer
SYNTH_SIZE = 64  # frame side of the shared synthetic datasets (small: the tests read every file)
SYNTH_COUNTS = {"s4": {"train": 3, "val": 2, "test": 3}, "ms3": {"train": 2, "val": 2, "test": 2},
                "avss": {"train": 3, "val": 2, "test": 3}}


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A dataset root (seed layout) holding synthetic S4, MS3 and AVSS written by ``av2ts_cli.data.synth`` with
    seed 0, ``SYNTH_SIZE`` px frames, maskiges and log-mel pickles, and ``SYNTH_COUNTS`` videos per split (AVSS
    videos cycle v1s, v1m, v2, so its train and test splits hold all three sets). Read-only: copy it to break it."""
    from av2ts_cli.data.synth import SynthOptions, synthesize

    root = tmp_path_factory.mktemp("synth") / "AVS_dataset"
    for subset, counts in SYNTH_COUNTS.items():
        synthesize(root, SynthOptions(subset, counts=counts, seed=0, size=SYNTH_SIZE))
    return root


# ---------------------------------------------------------------------------------------------- kernel engineer
KERNEL_FIRST_USE = """
import json, torch
from av2ts_cli.console import show_library_messages
from av2ts_cli.model import ops as da
show_library_messages()  # the CLI's display: the "compiling" notice is a log record, the fallback a warning
torch.manual_seed(0)
shapes = torch.tensor([[4, 3], [2, 2]]); start = torch.tensor([0, 12])
value = torch.randn(2, 16, 2, 32, requires_grad=True)
loc = torch.rand(2, 5, 2, 2, 2, 2) * 1.4 - 0.2
weights = torch.rand(2, 5, 2, 2, 2)
out = da.ms_deform_attn(value, shapes, start, loc, weights)
ref = da.ms_deform_attn_torch(value, shapes, start, loc, weights)
print(json.dumps({"backend": da.active_backend("cpu"), "root": str(da.build_root()),
                  "grad_fn": type(out.grad_fn).__name__, "diff": float((out - ref).abs().max())}))
"""


def _python_process(code: str, env: dict) -> subprocess.Popen:
    import os
    import sys

    environment = dict(os.environ)
    for key, value in env.items():
        if value is None:
            environment.pop(key, None)
        else:
            environment[key] = str(value)
    return subprocess.Popen([sys.executable, "-c", code], env=environment, cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from the repository root with environment changes (None removes)."""
    process = _python_process(code, env)
    stdout, stderr = process.communicate(timeout=900)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def kernel_first_use(tmp_path_factory):
    """(cache folder, [two completed processes]): two fresh processes ran ``KERNEL_FIRST_USE`` (the deformable-
    attention op on small CPU tensors) at the same time with the same empty ``AV2TS_CACHE``, so one built the C++
    kernel there (10-30 s, once per session) while the other waited on the build lock. The last stdout line of each
    is JSON: backend, root (build_root()), grad_fn, diff (max |kernel - fallback|)."""
    cache = tmp_path_factory.mktemp("kernel-cache")
    processes = [_python_process(KERNEL_FIRST_USE, {"AV2TS_CACHE": cache, "AV2TS_DEFORM_ATTN": None})
                 for _ in range(2)]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=900)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
        assert process.returncode == 0, stderr
    return cache, results


@pytest.fixture(scope="session")
def cpp_kernel(kernel_first_use):
    """The ``torch.ops`` namespace of the C++ deformable-attention kernel, loaded in this process from the
    session's build (no second compile); later ``ms_deform_attn`` calls on CPU tensors use it."""
    from av2ts_cli.model import ops as deform_attn

    cache, _ = kernel_first_use
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AV2TS_CACHE", str(cache))
        mp.delenv("AV2TS_DEFORM_ATTN", raising=False)
        return deform_attn.load_kernel("cpp")


# ---------------------------------------------------------------------------------------------- weights engineer
# Helpers and fixtures shared by test_weights.py (checkpoints) and test_convert.py (importing upstream files).
def reference_keys(name: str) -> list[tuple[str, list[int], str]]:
    """(key, shape, dtype) rows of ``tests/data/reference-keys-{name}.tsv`` (the reference checkpoint's entries)."""
    path = Path(__file__).parent / "data" / f"reference-keys-{name}.tsv"
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()]
    return [(key, json.loads(shape), dtype) for key, shape, dtype in rows[1:]]


def random_state(rows, seed: int) -> dict:
    """{key: random tensor} for ``reference_keys`` rows (int64 entries: integers in [0, 1000))."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {key: torch.randint(0, 1000, shape, generator=g) if dtype == "int64" else torch.randn(shape, generator=g)
            for key, shape, dtype in rows}


def tiny_cfg(**changes):
    """The av2ts-tiny S4 config with the Siam encoder, with ``changes`` applied (and validated)."""
    from av2ts_cli.config import get_preset

    cfg = get_preset("av2ts-tiny", "s4", siam=True)
    for key, value in changes.items():
        setattr(cfg, key, value)
    return type(cfg).from_dict(cfg.to_dict())  # validated


def ced_hf_names(ced_state: dict) -> dict:
    """CED-Mini under the names of its transformers conversion (mispeech/ced-mini): the conversion script drops
    front_end.*, renames init_bn.1 to init_bn and puts "encoder." in front of everything but outputlayer.*."""
    return {key if key.startswith("outputlayer.") else "encoder." + key.replace("init_bn.1", "init_bn"): value
            for key, value in ced_state.items() if not key.startswith("front_end.")}


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


@pytest.fixture(scope="session")
def ced_base(tmp_path_factory):
    """(folder, state dict): a small checkpoint whose audio encoder has CED-Mini's exact shapes (the rest of the
    network is tiny). Read-only."""
    import torch

    from av2ts_cli.model import build_model
    from av2ts_cli.weights import checkpoint

    torch.manual_seed(2)
    cfg = tiny_cfg(siam=False, audio_dim=256, audio_depth=12, audio_heads=4)
    folder = tmp_path_factory.mktemp("ced-base") / "base"
    model = build_model(cfg)
    checkpoint.save_checkpoint(model, cfg, folder)
    return folder, model.state_dict()


@pytest.fixture(scope="session")
def ced_state():
    """CED-Mini as RicherMans/CED saves it: the AV2TS audio_backbone entries plus the unused front end. Read-only."""
    rows = [(k.removeprefix("audio_backbone."), s, d) for k, s, d in reference_keys("r50-s4")
            if k.startswith("audio_backbone.")]
    rows += [("front_end.0.spectrogram.window", [512], "float32"), ("front_end.0.mel_scale.fb", [257, 64], "float32")]
    return random_state(rows, seed=3)


# ------------------------------------------------------------------------------------------------ subprocesses
def wait_until(condition, process: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    """Poll ``condition()`` until it holds while ``process`` runs; fail (killing the process on a timeout) if the
    process ends first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            err = process.stderr.read() if process.stderr else ""
            err = err.decode(errors="replace") if isinstance(err, bytes) else err
            raise AssertionError(f"the process ended (exit {process.returncode}) before {what}: {err[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------------- training
# Shared by the tests/test_training_*.py files that run `av2ts train` (trainer, checkpoint, options).
SMALL_RUN = ["--model", "av2ts-tiny", "--iters", "6", "--batch", "2", "--lr", "1e-3", "--workers", "1", "--seed", "3",
             "--log-every", "1"]


def av2ts_command() -> list[str]:
    """The command line that starts av2ts in a fresh interpreter."""
    import sys

    return [sys.executable, "-m", "av2ts_cli"]


def invoke_cli(args: list[str], expect: int = 0):
    """`av2ts ARGS` in this process (typer's CliRunner), asserting the exit code; -> the result."""
    from typer.testing import CliRunner

    from av2ts_cli import cli

    cli._state["debug"] = False
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == expect, result.output
    return result


def run_train(args: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    """`av2ts train ARGS` in a fresh process: runs compared bit for bit must not inherit this process's torch settings
    (other tests may change the thread count)."""
    result = subprocess.run([*av2ts_command(), "train", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, result.stderr
    return result


def train_error(args: list[str], code: int, *fragments: str) -> str:
    """`av2ts train ARGS` must fail with exit ``code`` and one line "error: ..." on stderr holding every fragment
    (whitespace normalised; with --json the same error as a JSON object on stdout, else nothing there); -> that
    line."""
    result = invoke_cli(["train", *args], expect=code)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    if "--json" in args:  # the failure as one JSON object on stdout too, the same words
        assert json.loads(result.stdout) == {"error": lines[0].removeprefix("error: "), "exit_code": code}
    else:
        assert not result.stdout.strip(), result.stdout
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in " ".join(result.output.split()), result.output
    return lines[0]


@pytest.fixture(scope="session")
def small_s4(tmp_path_factory) -> Path:
    """A few synthetic S4 videos (`av2ts data synth`): enough for a handful of training steps and an evaluation."""
    root = tmp_path_factory.mktemp("small-s4")
    invoke_cli(["data", "synth", "--subset", "s4", "--out", str(root), "--videos", "6", "--val", "2", "--test", "1",
                "--size", "64", "--seed", "5", "--no-maskiges"])
    return root


@pytest.fixture(scope="session")
def straight_run(small_s4, tmp_path_factory) -> Path:
    """``SMALL_RUN`` on ``small_s4`` without interruption, evaluated and saved every 3 iterations (a run folder)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    run_train(["--subset", "s4", "--data", str(small_s4), *SMALL_RUN, "--eval-every", "3", "--out", str(run)])
    return run


# ------------------------------------------------------------------------------------------------- the session
@pytest.fixture(scope="session", autouse=True)
def session_folders(tmp_path_factory):
    """Every test, and every process a test starts, caches and makes temporary files in folders of the session's
    own, which pytest deletes after a passing run:

    - ``AV2TS_CACHE``: a CI run wrote about 900 MB of log-mel examples of generated clips into
      ~/.cache/av2ts/log-mel, and each run added more (the clips are new files). The kernel builds are shared
      with the real cache (``kernels`` links to it), so a rerun here compiles nothing; tests that need an empty
      cache set ``AV2TS_CACHE`` themselves.
    - ``TMPDIR`` (and ``tempfile.tempdir`` in this process): processes the tests stop with a signal leave what
      torch made in the temp folder behind (torchrun's torchelastic_* logs, multiprocessing's pymp-* sockets,
      inductor's cache); one CI run left seven such folders in /tmp."""
    import tempfile

    from av2ts_cli.model.ops.build import build_root

    kernels = build_root()
    kernels.mkdir(parents=True, exist_ok=True)
    cache = tmp_path_factory.mktemp("av2ts-cache")
    (cache / "kernels").symlink_to(kernels, target_is_directory=True)
    temp = tmp_path_factory.mktemp("temp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AV2TS_CACHE", str(cache))
        mp.setenv("TMPDIR", str(temp))
        mp.setattr(tempfile, "tempdir", str(temp))
        yield cache


# ------------------------------------------------------------------------------- media engineer: how a file is read
def dominant_frequency(wave: np.ndarray, sample_rate: int = 16000) -> float:
    """The frequency (Hz) of the strongest FFT bin of ``wave`` (Hann window): which tone a decoded audio holds."""
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / sample_rate)[np.argmax(spectrum)])


@pytest.fixture(scope="session")
def make_odd_clip(tmp_path_factory, make_clip):
    """Factory for clips that test which audio and which picture av2ts reads, each made once per session::

        make_odd_clip(kind) -> Path

    Every picture is an index clip (``read_frame_index`` reads frame k back), 25 fps, stored 64x48.

    - ``"two audio"``: 2 s; audio stream 1 a 440 Hz sine (amplitude 1/8, no language, not default), audio stream
      2 a 1000 Hz sine (amplitude 1/4, language "fre", marked default). MP4.
    - ``"late video"``: the video (6 s, 150 frames) starts 1 s after the file does (an MP4 edit list, made with
      ``-itsoffset``); the audio (16 kHz AAC, 7 s from the file's start) is an 880 Hz sine during the second before
      the picture, then a 440 Hz sine (amplitude 1/4 both). File time 1 s is the video's time 0.
    - ``"anamorphic"``: 2 s, sample aspect ratio 2:1 (``setsar=2``): displayed 128x48; 440 Hz audio.
    - ``"anamorphic portrait"``: the same picture with a 90-degree display rotation: displayed 48x128.
    - ``"refused audio"``: MKV, 2 s; audio stream 1 AAC (440 Hz, default), audio stream 2 WMA v2 (1000 Hz), a
      codec MP4 cannot hold.
    """
    root = tmp_path_factory.mktemp("odd-clips")
    cache: dict[str, Path] = {}
    tone = "sine=frequency={}:sample_rate=16000:duration={}"

    def make(kind: str) -> Path:
        if kind in cache:
            return cache[kind]
        out = root / f"{kind.replace(' ', '-')}.mp4"
        if kind == "two audio":
            video = make_clip("odd-two-audio-picture", duration=2.0, audio=False)
            _run_ffmpeg(["-i", str(video), "-f", "lavfi", "-i", tone.format(440, 2), "-f", "lavfi", "-i",
                         tone.format(1000, 2), "-map", "0:v", "-map", "1:a", "-map", "2:a", "-c:v", "copy",
                         "-c:a", "aac", "-af:a:1", "volume=2", "-metadata:s:a:1", "language=fre",
                         "-disposition:a:0", "0", "-disposition:a:1", "default", str(out)])
        elif kind == "late video":
            video = make_clip("odd-late-picture", duration=6.0, audio=False)
            sound = "aevalsrc=exprs='0.25*sin(2*PI*if(lt(t,1),880,440)*t)':s=16000:d=7"
            _run_ffmpeg(["-itsoffset", "1", "-i", str(video), "-f", "lavfi", "-i", sound, "-map", "0:v", "-map",
                         "1:a", "-c:v", "copy", "-c:a", "aac", str(out)])
        elif kind == "anamorphic":
            video = make_clip("odd-anamorphic-source", duration=2.0)
            _run_ffmpeg(["-i", str(video), "-vf", "setsar=2", "-c:v", "libx264", "-preset", "veryfast", "-crf",
                         "12", "-pix_fmt", "yuv420p", "-c:a", "copy", str(out)])
        elif kind == "anamorphic portrait":
            _run_ffmpeg(["-display_rotation:v:0", "-90", "-i", str(make("anamorphic")), "-c", "copy", str(out)])
        elif kind == "refused audio":
            out = out.with_suffix(".mkv")
            video = make_clip("odd-refused-picture", duration=2.0, audio=False)
            _run_ffmpeg(["-i", str(video), "-f", "lavfi", "-i", tone.format(440, 2), "-f", "lavfi", "-i",
                         tone.format(1000, 2), "-map", "0:v", "-map", "1:a", "-map", "2:a", "-c:v", "copy",
                         "-c:a:0", "aac", "-c:a:1", "wmav2", str(out)])
        else:
            raise ValueError(f"unknown kind {kind!r}")
        cache[kind] = out
        return out

    return make
