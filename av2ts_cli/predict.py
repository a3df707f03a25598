"""``av2ts predict``: videos in; masks, per-frame records, a summary and optionally an overlay out.

Frames and audio are sampled as AVSBench did (``sampling.py``). Memory does not grow with the length of a video: a
background thread decodes the frames of one window group at a time (``media.iter_frames_at``, one sequential pass)
and a bounded queue hands windows to the model; outputs are written per frame as soon as every pass of a window
group is done. Only the 16 kHz mono audio is held whole (64 kB/s).

Per video, in ``OUT/<video name>/``: ``masks/NNNNNN.png`` (grey 0/255 for binary models, indexed AVSS palette for
semantic ones), ``frames.jsonl`` (one line per mask: time, sounding area, classes with area and box),
``masks.coco.json`` (COCO RLE), ``summary.json`` (written last, atomically: its presence marks the video done, and
a re-run skips it unless ``--force`` or the settings changed) and the overlay if asked.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from av2ts_cli import __version__, media
from av2ts_cli.console import console, make_progress
from av2ts_cli.errors import Av2tsError, DataError, MediaError, UsageError
from av2ts_cli.runs import numbered_run_folder, write_json
from av2ts_cli.sampling import (
    EXAMPLE_SECONDS,
    EXAMPLE_SPAN,
    FRAME_OFFSET,
    SampledFrame,
    Schedule,
    Window,
    make_schedule,
    video_duration,
    window_examples,
)

FORMATS = ("png", "json", "rle")
DEFAULT_RUNS = Path("runs/predict")
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".flv", ".wmv", ".ts",
                            ".mts", ".m2ts", ".3gp", ".ogv", ".gif"})
SUMMARY_FILE, FRAMES_FILE, COCO_FILE, FAILURES_FILE = "summary.json", "frames.jsonl", "masks.coco.json", "failures.json"
MASKS_DIR = "masks"
DEFAULT_OVERLAY = "overlay.mp4"
DEMO_NOTE = ("Using the bundled demo model (av2ts-tiny trained on synthetic 'sounding shapes': it finds sounding "
             "shapes, not real objects; real checkpoints come through --model and `av2ts convert`).")


@dataclass
class PredictOptions:
    """Everything ``av2ts predict`` accepts besides the sources (see the CLI help for each)."""

    model: str | None = None  # None: the bundled demo model
    out: Path | None = None  # None: runs/predict/exp, exp2, ...
    fps: int = 1
    window: int | None = None  # None: the model's num_frames
    device: str = "auto"
    half: bool = False
    batch: int = 1
    recursive: bool = False
    threshold: float = 0.5
    formats: tuple[str, ...] = FORMATS
    maskiges: Path | None = None
    overlay: str | None = None  # None: no overlay; "": OUT/<video>/overlay.mp4; else a file or folder
    force: bool = False
    require_audio: bool = False
    progress: bool = True

    def check(self) -> None:
        if self.fps < 1:
            raise UsageError(f"--fps {self.fps} must be at least 1")
        if self.window is not None and self.window < 1:
            raise UsageError(f"--window {self.window} must be at least 1")
        if self.batch < 1:
            raise UsageError(f"--batch {self.batch} must be at least 1")
        if not 0.0 <= self.threshold <= 1.0:
            raise UsageError(f"--threshold {self.threshold} must be between 0 and 1")
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise UsageError(f"--format {','.join(self.formats)}: choose from {', '.join(FORMATS)}")


def parse_formats(text: str) -> tuple[str, ...]:
    """'png,json' -> ("png", "json") in canonical order; UsageError for unknown names."""
    names = {part.strip().lower() for part in text.split(",") if part.strip()}
    unknown = sorted(names - set(FORMATS))
    if unknown or not names:
        raise UsageError(f"--format {text!r}: choose one or more of {', '.join(FORMATS)} (comma-separated)")
    return tuple(f for f in FORMATS if f in names)


# -------------------------------------------------------------------------------------------------- sources
def collect_videos(sources: Sequence[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """The videos named by ``sources``: files as given (whatever their suffix), folders' entries with a video
    suffix (subfolders with ``recursive``; an entry that is not a readable file is kept, so it gets reported),
    and glob patterns. Duplicates are dropped, order kept. UsageError for a source that names nothing."""
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            entries = sorted(path.rglob("*") if recursive else path.iterdir())
            videos = [p for p in entries if p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith(".")
                      and not (recursive and p.is_dir())]
            if not videos:
                hint = "" if recursive else " (--recursive searches subfolders)"
                raise UsageError(f"{path}: no videos in this folder{hint}")
            found += videos
        elif path.exists() or path.is_symlink():
            found.append(path)
        elif glob.has_magic(str(source)):
            matches = sorted(Path(p) for p in glob.glob(str(source), recursive=recursive))
            matches = [p for p in matches if not p.is_dir() or p.suffix.lower() in VIDEO_SUFFIXES]
            if not matches:
                raise UsageError(f"{source}: the pattern matches no files")
            found += matches
        else:
            raise UsageError(f"{source}: no such file or folder")
    unique, seen = [], set()
    for path in found:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


# ---------------------------------------------------------------------------------------------------- model
@dataclass
class Predictor:
    """A loaded network and how to run it."""

    model: object  # AV2TS, eval mode, on ``device``
    cfg: object  # ModelConfig
    class_names: list[str]
    name: str  # what --model said (or "demo")
    device: object  # torch.device
    precision: str  # "fp32", "fp16" (CUDA autocast) or "bf16" (CPU autocast, channels_last)

    @property
    def binary(self) -> bool:
        return self.cfg.num_classes == 2

    def segment(self, frames: np.ndarray, audio, maskiges: np.ndarray | None = None):
        """frames uint8 [B, T, S, S, 3] RGB, audio [B, T, 96, 64], maskiges like frames or None -> semantic maps
        [B, T, K, S, S] float32 on the CPU (``AV2TS.segment``)."""
        import contextlib

        import torch

        def as_input(array):
            return torch.from_numpy(array).permute(0, 1, 4, 2, 3).to(self.device, non_blocking=True)

        context = contextlib.nullcontext()
        if self.precision == "fp16":
            context = torch.autocast("cuda", dtype=torch.float16)
        elif self.precision == "bf16":
            context = torch.autocast("cpu", dtype=torch.bfloat16)
        with torch.inference_mode(), context:
            out = self.model.segment(as_input(frames), audio.to(self.device),
                                     None if maskiges is None else as_input(maskiges))
        return out.float().cpu()

    def describe(self) -> dict:
        return {"name": self.name, "preset": self.cfg.preset, "subset": self.cfg.subset,
                "num_classes": self.cfg.num_classes, "classes": self.class_names, "input_size": self.cfg.input_size,
                "num_frames": self.cfg.num_frames, "siam": self.cfg.siam, "device": str(self.device),
                "precision": self.precision}


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def make_predictor(model, cfg, class_names: Sequence[str], name: str, device: str = "auto",
                   half: bool = False) -> Predictor:
    """Move ``model`` to the device and pick the precision: ``half`` is fp16 autocast on CUDA, bf16 autocast with
    channels_last on CPUs with native bf16 (otherwise fp32, with a warning)."""
    import torch

    from av2ts_cli.console import warn
    from av2ts_cli.runs import resolve_device

    target = resolve_device(device)
    precision = "fp32"
    if half and target.type == "cuda":
        precision = "fp16"
    elif half and cpu_supports_bf16():
        precision = "bf16"
        model = model.to(memory_format=torch.channels_last)
    elif half:
        warn("--half: this CPU has no native bf16 (AVX512-BF16 or AMX); running in fp32")
    model = model.to(target).eval()
    return Predictor(model, cfg, list(class_names), name, target, precision)


def load_predictor(name: str | None, device: str = "auto", half: bool = False) -> Predictor:
    """The model of ``--model`` (a checkpoint folder or file, hf://..., a registry name; None: the demo model)."""
    from av2ts_cli import weights

    if name is None:
        _print(DEMO_NOTE)
        source, label = str(weights.DEMO_MODEL_DIR), "demo"
        if not weights.DEMO_MODEL_DIR.is_dir():
            raise UsageError(f"the bundled demo model is missing ({weights.DEMO_MODEL_DIR}); pass --model")
    else:
        source, label = name, name
    model, cfg, doc = weights.resolve_model(source)
    return make_predictor(model, cfg, doc.get("classes") or [], label, device, half)


# ----------------------------------------------------------------------------------------------- per video
@dataclass
class VideoResult:
    input: str
    folder: str
    name: str
    skipped: bool = False
    duration: float = 0.0
    frames: int = 0
    windows: int = 0
    ms_per_window: float = 0.0
    peak_rss_mb: float = 0.0
    overlay: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Timer:
    """Seconds per stage, summed; threads add to their own stages."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - since
        return now


class _MemoryWatch:
    """Peak resident memory of this process, sampled (per video), and peak CUDA memory."""

    def __init__(self, device):
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self.device = device
        if device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> None:
        self.peak = max(self.peak, self.process.memory_info().rss)

    def report(self) -> dict:
        self.sample()
        out = {"rss_mb": round(self.peak / 2**20, 1)}
        if self.device.type == "cuda":
            import torch

            out["cuda_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return out


_DONE = object()


class _WindowFeeder:
    """A background thread that decodes frames group by group and yields ready windows (bounded queue):
    (Window, frames uint8 [T, S, S, 3], audio [T, 96, 64], maskiges uint8 [T, S, S, 3] or None)."""

    def __init__(self, video: Path, schedule: Schedule, size: int, wave: np.ndarray, timer: _Timer,
                 maskige_for: Callable[[SampledFrame], np.ndarray] | None, depth: int):
        self.video, self.schedule, self.size, self.wave, self.timer = video, schedule, size, wave, timer
        self.maskige_for = maskige_for
        self.queue: queue.Queue = queue.Queue(maxsize=max(2, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="av2ts-feeder", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        schedule = self.schedule
        frames = media.iter_frames_at(self.video, [f.time for f in schedule.frames], (self.size, self.size))
        try:
            for group in range(schedule.groups):
                start = time.perf_counter()
                members = schedule.group_frames(group)
                decoded = {}
                for frame in members:
                    _, decoded[frame.index] = next(frames)
                start = self.timer.add("decode", start)
                for window in schedule.windows[group * schedule.fps:(group + 1) * schedule.fps]:
                    real = [decoded[f.index] for f in window.frames]
                    pad = [real[-1]] * (schedule.window - len(real))
                    clip = np.stack(real + pad)
                    audio = window_examples(self.wave, window.audio_start, len(real), schedule.window)
                    maskiges = None
                    if self.maskige_for is not None:
                        real_maskiges = [self.maskige_for(f) for f in window.frames]
                        maskiges = np.stack(real_maskiges + [real_maskiges[-1]] * len(pad))
                    start = self.timer.add("audio", start)
                    if not self._put((window, clip, audio, maskiges)):
                        return
                    start = time.perf_counter()
            self._put(_DONE)
        except BaseException as err:  # handed to the consumer, which re-raises it in the main thread
            self._put(err)
        finally:
            frames.close()

    def __iter__(self) -> Iterator[tuple]:
        while True:
            item = self.queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


class _OutputWriter:
    """Writes each sampled frame's outputs in index order once every pass of its window group is done."""

    def __init__(self, folder: Path, predictor: Predictor, schedule: Schedule, display: tuple[int, int],
                 options: PredictOptions, timer: _Timer):
        from av2ts_cli.masks import CocoWriter

        self.folder, self.predictor, self.schedule, self.display = folder, predictor, schedule, display
        self.options, self.timer = options, timer
        self.pending: dict[int, tuple[SampledFrame, Window, int, object]] = {}
        self.masks_dir = folder / MASKS_DIR
        if "png" in options.formats:
            self.masks_dir.mkdir(parents=True, exist_ok=True)
        self.frames_path = folder / FRAMES_FILE
        self.frames_temp = folder / f".{FRAMES_FILE}.{os.getpid()}.partial"
        self.frames_file = open(self.frames_temp, "w", encoding="utf-8") if "json" in options.formats else None  # noqa: SIM115
        self.coco = None
        if "rle" in options.formats:
            width, height = display
            images = [{"id": f.index, "file_name": self._mask_name(f), "width": width, "height": height,
                       "time": f.time} for f in schedule.frames]
            self.coco = CocoWriter(folder / COCO_FILE, predictor.class_names, images,
                                   {"description": "av2ts predict", "version": __version__})
        self.written = 0
        self.sounding_frames = 0

    @staticmethod
    def _mask_name(frame: SampledFrame) -> str:
        return f"{MASKS_DIR}/{frame.index:06d}.png"

    def add(self, window: Window, scores) -> None:
        """scores [T, K, S, S] of one window; padded slots are ignored."""
        for slot, frame in enumerate(window.frames):
            self.pending[frame.index] = (frame, window, slot, scores[slot])
        if window.shift == self.schedule.fps - 1:
            self._flush(self.schedule.group_frames(window.group))

    def _flush(self, frames: Sequence[SampledFrame]) -> None:
        from av2ts_cli.masks import class_records, frame_mask, write_mask_png

        start = time.perf_counter()
        options = self.options
        for frame in frames:
            _, window, slot, scores = self.pending.pop(frame.index)
            mask = frame_mask(scores, self.display, options.threshold)
            if "png" in options.formats:
                write_mask_png(self.folder / self._mask_name(frame), mask, self.predictor.binary)
            records = class_records(mask, self.predictor.class_names, rle=self.coco is not None)
            area = round(sum(r["area"] for r in records), 6)
            self.sounding_frames += bool(records)
            if self.frames_file is not None:
                audio_from = window.audio_start + slot * EXAMPLE_SECONDS
                line = {"index": frame.index, "time": frame.time, "second": frame.second, "pass": frame.shift,
                        "window": window.group, "audio": [round(audio_from, 4), round(audio_from + EXAMPLE_SPAN, 4)],
                        "sounding": bool(records), "sounding_area": area,
                        "classes": [{k: v for k, v in r.items() if k != "segmentation"} for r in records]}
                if "png" in options.formats:
                    line["mask"] = self._mask_name(frame)
                self.frames_file.write(json.dumps(line) + "\n")
            if self.coco is not None:
                for record in records:
                    self.coco.add(frame.index, record)
            self.written += 1
        self.timer.add("writing", start)

    def close(self) -> None:
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} frames were never written")
        if self.frames_file is not None:
            self.frames_file.close()
            os.replace(self.frames_temp, self.frames_path)
        if self.coco is not None:
            self.coco.close()

    def abort(self) -> None:
        if self.frames_file is not None:
            self.frames_file.close()
            self.frames_temp.unlink(missing_ok=True)
        if self.coco is not None:
            self.coco.abort()


def _maskige_reader(folder: Path, size: int) -> Callable[[SampledFrame], np.ndarray]:
    """Maskige of a sampled frame: ``folder/NNNNNN.png`` (or .jpg), the mask numbering, resized to S x S."""
    from PIL import Image

    from av2ts_cli.data.images import read_rgb

    def read(frame: SampledFrame) -> np.ndarray:
        for suffix in (".png", ".jpg", ".jpeg"):
            path = folder / f"{frame.index:06d}{suffix}"
            if path.is_file():
                image = read_rgb(path, "maskige")
                if image.shape[:2] != (size, size):
                    image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
                return image
        raise DataError(folder / f"{frame.index:06d}.png", f"missing maskige for mask {frame.index} "
                        f"(t = {frame.time:.3f} s); maskiges are numbered like the masks")

    return read


def settings_of(predictor: Predictor, options: PredictOptions, overlay: Path | None) -> dict:
    """What decides a video's outputs: a finished video is skipped only when these are unchanged."""
    return {"model": predictor.name, "preset": predictor.cfg.preset, "fps": options.fps,
            "window": options.window or predictor.cfg.num_frames, "threshold": options.threshold,
            "formats": list(options.formats), "maskiges": str(options.maskiges) if options.maskiges else None,
            "overlay": str(overlay) if overlay else None}


def _input_identity(video: Path) -> dict:
    stat = video.stat()
    return {"input": str(video.resolve()), "input_bytes": stat.st_size, "input_mtime_ns": stat.st_mtime_ns}


def read_summary(folder: Path) -> dict | None:
    try:
        return json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(folder: Path, video: Path, settings: dict) -> bool:
    """Whether ``folder`` holds the finished outputs of ``video`` made with ``settings``."""
    summary = read_summary(folder)
    if not summary or not summary.get("complete"):
        return False
    try:
        identity = _input_identity(video)
    except OSError:
        return False
    if any(summary.get(key) != value for key, value in identity.items()) or summary.get("settings") != settings:
        return False
    return all((folder / name).exists() for name in summary.get("files", [])) and (
        settings["overlay"] is None or Path(settings["overlay"]).is_file())


def _clear_outputs(folder: Path) -> None:
    """Remove what an earlier run left (summary first: the folder stops counting as done at once)."""
    for name in (SUMMARY_FILE, FRAMES_FILE, COCO_FILE, DEFAULT_OVERLAY):
        (folder / name).unlink(missing_ok=True)
    masks = folder / MASKS_DIR
    if masks.is_dir():
        for path in masks.iterdir():
            if path.suffix == ".png":
                path.unlink(missing_ok=True)
    for path in folder.glob(".*.partial*"):
        path.unlink(missing_ok=True)


def predict_video(video: Path, folder: Path, predictor: Predictor, options: PredictOptions,
                  overlay: Path | None = None, progress=None, task=None) -> VideoResult:
    """Segment one video into ``folder`` (see the module docstring); ``summary.json`` is written last."""
    import torch

    from av2ts_cli.render import MaskTrack, render_overlay

    started = time.perf_counter()
    timer, memory = _Timer(), _MemoryWatch(predictor.device)
    result = VideoResult(str(video), str(folder), video.name)
    info = media.probe(video)
    cfg = predictor.cfg
    window = options.window or cfg.num_frames
    duration = video_duration(info)
    last_time = duration - (0.5 / info.fps if info.fps > 0 else 1e-3)
    schedule = make_schedule(duration, options.fps, window, last_time)
    maskige_for = None
    if cfg.siam:
        if options.maskiges is None:
            raise UsageError(f"model {predictor.name} ({cfg.preset}) uses the Siam encoder: pass --maskiges DIR")
        own = options.maskiges / folder.name
        maskige_for = _maskige_reader(own if own.is_dir() else options.maskiges, cfg.input_size)
    if overlay is not None and "png" not in options.formats:
        raise UsageError("--overlay paints the PNG masks: add png to --format")

    warnings = []
    start = time.perf_counter()
    if info.has_audio:
        wave = media.decode_audio(video)
        audio_seconds = len(wave) / 16000
        if audio_seconds < duration - 0.5:
            warnings.append(f"the audio ends at {audio_seconds:.2f} s, before the video ({duration:.2f} s): "
                            "silence after it")
    else:
        if options.require_audio:
            raise MediaError(video, "no audio stream (--require-audio)")
        wave = np.zeros(0, np.float32)
        warnings.append("no audio stream: the model heard silence")
    timer.add("audio", start)

    folder.mkdir(parents=True, exist_ok=True)
    _clear_outputs(folder)
    if progress is not None:
        progress.update(task, total=len(schedule.windows), completed=0, description=f"windows · {video.name}")
    writer = _OutputWriter(folder, predictor, schedule, (info.width, info.height), options, timer)
    feeder = _WindowFeeder(video, schedule, cfg.input_size, wave, timer, maskige_for, depth=2 * options.batch)
    try:
        batch: list[tuple] = []
        items = iter(feeder)
        while True:
            start = time.perf_counter()
            item = next(items, None)
            timer.add("waiting", start)
            if item is not None:
                batch.append(item)
            if batch and (len(batch) == options.batch or item is None):
                start = time.perf_counter()
                frames = np.stack([b[1] for b in batch])
                audio = torch.stack([b[2] for b in batch])
                maskiges = np.stack([b[3] for b in batch]) if cfg.siam else None
                scores = predictor.segment(frames, audio, maskiges)
                timer.add("model", start)
                memory.sample()
                for (window_, *_), window_scores in zip(batch, scores, strict=True):
                    writer.add(window_, window_scores)
                if progress is not None:
                    progress.advance(task, len(batch))
                batch = []
            if item is None:
                break
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        feeder.close()
    model_done = time.perf_counter()

    files = [FRAMES_FILE] if "json" in options.formats else []
    files += [COCO_FILE] if "rle" in options.formats else []
    if overlay is not None:
        start = time.perf_counter()
        track = MaskTrack([f.time for f in schedule.frames],
                          [folder / MASKS_DIR / f"{f.index:06d}.png" for f in schedule.frames])
        render_overlay(video, track, overlay)
        timer.add("overlay", start)
        result.overlay = str(overlay)

    elapsed = time.perf_counter() - started
    windows = len(schedule.windows)
    timings = {f"{stage}_s": round(seconds, 3) for stage, seconds in sorted(timer.seconds.items())}
    timings["total_s"] = round(elapsed, 3)
    timings["predict_s"] = round(model_done - started, 3)
    timings["ms_per_window"] = round(1000 * timer.seconds.get("model", 0.0) / windows, 1)
    summary = {
        "av2ts_version": __version__,
        "complete": True,
        **_input_identity(video),
        "probe": info.to_dict(),
        "video_duration": round(duration, 4),
        "model": predictor.describe(),
        "settings": settings_of(predictor, options, overlay),
        "sampling": {"seconds": schedule.seconds, "fps": schedule.fps, "frames": len(schedule.frames),
                     "offset": FRAME_OFFSET, "window": window,
                     "padded_frames": schedule.fps * (schedule.groups * window - schedule.seconds)},
        "windows": windows,
        "batch": options.batch,
        "sounding_frames": writer.sounding_frames,
        "files": files,
        "masks": f"{MASKS_DIR}/" if "png" in options.formats else None,
        "overlay": str(overlay) if overlay else None,
        "timings": timings,
        "peak_memory": memory.report(),
        "warnings": warnings,
    }
    write_json(folder / SUMMARY_FILE, summary)
    result.duration, result.frames, result.windows = duration, len(schedule.frames), windows
    result.ms_per_window = timings["ms_per_window"]
    result.peak_rss_mb = summary["peak_memory"]["rss_mb"]
    result.warnings = warnings
    return result


# ---------------------------------------------------------------------------------------------------- batch
@dataclass
class RunReport:
    out: str
    model: dict
    videos: list[VideoResult] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # {"input", "error"}
    batch: bool = False

    def to_dict(self) -> dict:
        return {"out": self.out, "model": self.model, "batch": self.batch,
                "videos": [dataclasses.asdict(v) for v in self.videos], "failures": self.failures}


def _folder_names(videos: Sequence[Path], run_dir: Path) -> list[str]:
    """One output folder name per video: its stem, then stem-2, stem-3, ... when the stem is already used in this
    run or a folder of that name holds another input's outputs."""
    names, used = [], set()
    for video in videos:
        stem = video.stem or video.name
        candidate, number = stem, 2
        while True:
            summary = read_summary(run_dir / candidate)
            other = summary is not None and summary.get("input") != str(video.resolve())
            if candidate not in used and not other:
                break
            candidate, number = f"{stem}-{number}", number + 1
        used.add(candidate)
        names.append(candidate)
    return names


def _overlay_path(option: str | None, folder: Path, name: str, batch: bool) -> Path | None:
    if option is None:
        return None
    if option == "":
        return folder / DEFAULT_OVERLAY
    path = Path(option)
    if path.suffix.lower() in VIDEO_SUFFIXES and not path.is_dir():
        if batch:
            raise UsageError(f"--overlay {option}: several videos need a folder for their overlays")
        return path
    return path / f"{name}.mp4"


def _check_overlay_target(overlay: Path | None, folder: Path, options: PredictOptions) -> None:
    """An existing file at an explicit ``--overlay PATH`` is replaced only if an earlier run wrote it there, or
    with ``--force``: ``predict a.mp4 --overlay b.mp4`` must not destroy b.mp4 if it was meant as a second input."""
    if overlay is None or options.force or not overlay.exists() or options.overlay == "":
        return
    previous = read_summary(folder) or {}
    if previous.get("overlay") != str(overlay):
        raise UsageError(f"--overlay {overlay}: the file exists and no earlier run wrote it; pass --force to "
                         "replace it (to predict it as well, give --overlay after the sources or as --overlay=PATH)")


def run(sources: Sequence[str | os.PathLike], options: PredictOptions, predictor: Predictor | None = None
        ) -> RunReport:
    """Predict every video of ``sources``. One video: its error propagates. Several: failures are collected
    (``failures.json``) and the others go on. ``predictor``: an already loaded model (else ``options.model``)."""
    options.check()
    videos = collect_videos(sources, options.recursive)
    if options.overlay is not None and "png" not in options.formats:
        raise UsageError("--overlay paints the PNG masks: add png to --format")
    batch = len(videos) > 1
    if options.overlay and batch and Path(options.overlay).suffix.lower() in VIDEO_SUFFIXES:
        raise UsageError(f"--overlay {options.overlay}: several videos need a folder for their overlays")
    if predictor is None:
        predictor = load_predictor(options.model, options.device, options.half)
    if predictor.cfg.siam and options.maskiges is None:
        raise UsageError(f"model {predictor.name} ({predictor.cfg.preset}) uses the Siam encoder: pass --maskiges DIR "
                         "(maskige images numbered like the masks, one subfolder per video)")
    run_dir = Path(options.out) if options.out is not None else numbered_run_folder(DEFAULT_RUNS)
    run_dir.mkdir(parents=True, exist_ok=True)
    report = RunReport(str(run_dir), predictor.describe(), batch=batch)
    names = _folder_names(videos, run_dir)
    progress = make_progress() if options.progress else None
    context = progress if progress is not None else _NullContext()
    with context:
        videos_task = progress.add_task("videos", total=len(videos)) if progress else None
        windows_task = progress.add_task("windows", total=None) if progress else None
        for video, name in zip(videos, names, strict=True):
            folder = run_dir / name
            try:
                overlay = _overlay_path(options.overlay, folder, name, batch)
                settings = settings_of(predictor, options, overlay)
                if not options.force and is_complete(folder, video, settings):
                    result = VideoResult(str(video), str(folder), video.name, skipped=True,
                                         overlay=settings["overlay"])
                    _print(f"{video.name}: already done in {folder}, skipped (--force redoes it)")
                else:
                    _check_overlay_target(overlay, folder, options)
                    result = predict_video(video, folder, predictor, options, overlay, progress, windows_task)
                    _print(_closing_line(result))
                report.videos.append(result)
            except (Av2tsError, OSError) as err:
                if not batch:
                    raise
                reason = err.message if isinstance(err, Av2tsError) else f"{video}: {err.strerror or err}"
                report.failures.append({"input": str(video), "error": reason})
                _print(f"[red]failed:[/red] {reason}", markup=True)
            if progress is not None:
                progress.advance(videos_task)
    if batch:
        write_json(run_dir / FAILURES_FILE, report.failures)
    return report


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _print(text: str, markup: bool = False) -> None:
    console.print(text, markup=markup, highlight=False, soft_wrap=True)


def _closing_line(result: VideoResult) -> str:
    line = (f"{result.name}: {result.duration:.1f} s, {result.frames} masks, {result.windows} windows, "
            f"{result.ms_per_window:.0f} ms/window, peak {result.peak_rss_mb:.0f} MB")
    for warning in result.warnings:
        line += f" ({warning})"
    return line


def print_report(report: RunReport) -> None:
    """The failures table (batch mode) and where the results are."""
    from rich.table import Table

    if report.failures:
        table = Table(title=f"{len(report.failures)} of {len(report.failures) + len(report.videos)} inputs failed",
                      title_justify="left")
        table.add_column("input", overflow="fold")
        table.add_column("reason", overflow="fold")
        for failure in report.failures:
            reason = failure["error"]
            prefix = f"{failure['input']}: "
            table.add_row(failure["input"], reason[len(prefix):] if reason.startswith(prefix) else reason)
        console.print(table)
        _print(f"Failures listed in {Path(report.out) / FAILURES_FILE}")
    _print(f"Results saved to {report.out}")
