"""``av2ts predict``: videos in; masks, per-frame records, a summary and optionally an overlay out.

Prediction is a stream. ``stream_masks`` yields (sampled frame, mask at display size) pairs in presentation order;
the writers (``predict_outputs.MaskOutputs``: PNG, JSONL, COCO RLE) consume them one by one, and the overlay paints
the masks they wrote. Inside the stream, frames and audio are sampled as AVSBench did, and the schedule
(``sampling.Schedule``) says which frames and audio examples make each window, how a tail is padded and which
outputs are real. Memory does not grow with the length of a video: a background thread decodes the frames of one
window group at a time (``media.iter_frames_at``, one sequential pass) and a bounded queue hands windows to the
model; a frame's mask comes out as soon as every pass of its window group is done. Only the 16 kHz mono audio is
held whole (64 kB/s). The video is probed once, here, and the probe is passed on.

Per video, in ``OUT/<video name>/``: ``masks/NNNNNN.png`` (grey 0/255 for binary models, indexed AVSS palette for
semantic ones), ``frames.jsonl`` (one line per mask: time, sounding area, classes with area and box),
``masks.coco.json`` (COCO RLE), ``summary.json`` (written last, atomically: its presence marks the video done, and
a re-run skips it unless ``--force`` or the settings changed) and the overlay if asked. Siam models also get
``maskiges/fps<F>/NNNNNN.png``, their maskiges, made once and reused (``predict_maskiges``; ``--maskiges DIR``
reads them from a folder instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from av2ts_cli import __version__, locks, media
from av2ts_cli.avsbench import FRAME_OFFSET, SAMPLE_RATE
from av2ts_cli.console import console, make_progress, show_traceback
from av2ts_cli.errors import Av2tsError, MediaError, UsageError, describe_os_error
from av2ts_cli.files import write_json
from av2ts_cli.interrupts import Interrupted, signum_of, stop_on_signals
from av2ts_cli.memory import PeakWatch
from av2ts_cli.predict_maskiges import (
    AUTO,
    LazyGenerator,
    auto_settings,
    folder_of,
    make_auto,
    maskige_warning,
    parse_maskiges,
)
from av2ts_cli.predict_outputs import (
    COCO_FILE,
    DEFAULT_OVERLAY,
    FAILURES_FILE,
    FORMATS,
    FRAMES_FILE,
    MASKS_DIR,
    SUMMARY_FILE,
    MaskOutputs,
    check_overlay_target,
    clear_outputs,
    discard_unfinished,
    folder_names,
    input_identity,
    is_complete,
    is_video_name,
    overlay_path,
    read_summary,
)
from av2ts_cli.predict_stream import Predictor, Timer, load_predictor, make_predictor, maskige_reader, stream_masks
from av2ts_cli.processes import Processes
from av2ts_cli.render import render_overlay
from av2ts_cli.runs import numbered_run_folder
from av2ts_cli.sampling import sampled_seconds, video_duration, video_schedule
from av2ts_cli.sources import collect_videos

# the names other modules use through ``predict`` (bench/predict.py, the CLI, tests)
__all__ = ["COCO_FILE", "DEFAULT_OVERLAY", "FAILURES_FILE", "FORMATS", "FRAMES_FILE", "MASKS_DIR", "SUMMARY_FILE",
           "PredictOptions", "Predictor", "RunReport", "VideoResult", "collect_videos", "is_complete",
           "load_predictor", "make_predictor", "parse_formats", "predict_video", "print_report", "read_summary",
           "run", "stream_masks"]
DEFAULT_RUNS = Path("runs/predict")


@dataclass
class PredictOptions:
    """Everything ``av2ts predict`` accepts besides the sources (see the CLI help for each)."""

    model: str | None = None  # None: the bundled demo model
    out: Path | None = None  # None: runs/predict/exp, exp2, ...
    fps: int = 1
    window: int | None = None  # None: the model's num_frames
    device: str = "auto"
    half: bool = False  # the fast path: --precision fp16 on CUDA, bf16 on a CPU with native bf16
    precision: str | None = None  # fp32, bf16 or fp16; None: model.inference.default_precision
    batch: int = 1
    recursive: bool = False
    threshold: float = 0.5
    formats: tuple[str, ...] = FORMATS
    maskiges: str | Path | None = None  # Siam models: None or "auto" (made and cached per video) or a folder
    generator: str | None = None  # --maskiges auto: hf://owner/repo[@rev] or a folder (None: the pinned SAM)
    generator_settings: dict = field(default_factory=dict)  # GeneratorSettings fields (None: COMBO's run)
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
        auto_settings(self.generator, self.generator_settings)  # UsageError for settings out of range


def parse_formats(text: str) -> tuple[str, ...]:
    """'png,json' -> ("png", "json") in canonical order; UsageError for unknown names."""
    names = {part.strip().lower() for part in text.split(",") if part.strip()}
    unknown = sorted(names - set(FORMATS))
    if unknown or not names:
        raise UsageError(f"--format {text!r}: choose one or more of {', '.join(FORMATS)} (comma-separated)")
    return tuple(f for f in FORMATS if f in names)


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


def settings_of(predictor: Predictor, options: PredictOptions, overlay: Path | None) -> dict:
    """What decides a video's outputs: a finished video is skipped only when these are unchanged."""
    maskiges = None
    if predictor.cfg.siam:
        maskiges = parse_maskiges(options.maskiges)
        # auto: another generator or other settings make other maskiges, so other masks
        maskiges = auto_settings(options.generator, options.generator_settings) if maskiges == AUTO else str(maskiges)
    return {"model": predictor.name, "preset": predictor.cfg.preset, "fps": options.fps,
            "window": options.window or predictor.cfg.num_frames, "threshold": options.threshold,
            "formats": list(options.formats), "maskiges": maskiges, "overlay": str(overlay) if overlay else None}


# Peak memory of one forward pass grows by this much per frame at 128 x 128 px (av2ts-tiny on the CPU, measured
# with a 2 ms RSS sampler: +106 MB at T = 5, +336 MB at T = 20, +630 MB at T = 40, so 15.3 MB/frame); it scales
# with the pixels. Bigger backbones need more, so a window refused by this bound surely does not fit.
_MB_PER_FRAME_AT_128 = 15.3
# still pictures: ffmpeg's image decoders (a motion-JPEG *video* has frames and a rate, so it passes)
_IMAGE_CODECS = frozenset({"png", "mjpeg", "jpeg2000", "bmp", "tiff", "webp", "jpegls", "pam", "ppm", "pgm", "qoi"})


def available_mb(device) -> float | None:
    """Free memory on ``device`` in MB (CPU: MemAvailable; CUDA: the driver's free memory), None if unknown."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch  # local: predict_stream has loaded it already; only the CUDA branch needs it here

        return torch.cuda.mem_get_info(device)[0] / 2**20
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_bounds(video: Path, info: media.Probe, options: PredictOptions, predictor: Predictor) -> None:
    """UsageError (exit 2) naming the limit for options this video cannot take: ``--fps`` above its frame rate
    (every mask past it repeats a frame, at the cost of a pass each), ``--window`` longer than both the video and
    the model's clip (padding only) or than the free memory holds for ``--batch`` windows."""
    rate = info.fps
    if math.isfinite(rate) and rate > 0 and options.fps > max(1, round(rate)):
        raise UsageError(f"--fps {options.fps}: {video} has {rate:g} frames per second; at most --fps "
                         f"{max(1, round(rate))}")
    if options.window is None:
        return
    seconds = sampled_seconds(video_duration(info))
    longest = max(seconds, predictor.cfg.num_frames)
    if options.window > longest:
        raise UsageError(f"--window {options.window}: {video} has {seconds} sampled second"
                         f"{'s' if seconds != 1 else ''} and the model's clip is {predictor.cfg.num_frames}; at "
                         f"most --window {longest}")
    free = available_mb(predictor.device)
    per_frame = _MB_PER_FRAME_AT_128 * (predictor.cfg.input_size / 128) ** 2
    if free is not None and options.window * options.batch * per_frame > free:
        fits = max(1, int(free // (per_frame * options.batch)))
        raise UsageError(f"--window {options.window} with --batch {options.batch}: needs over "
                         f"{options.window * options.batch * per_frame:.0f} MB, {free:.0f} MB free on "
                         f"{predictor.device}; at most --window {fits}")


def still_image_warning(info: media.Probe) -> str | None:
    """A warning for a still picture named like a video (a PNG renamed .mp4): one frame, no sound; it is
    segmented (one mask), as the sampler shows the last frame for every later second."""
    if info.video_codec in _IMAGE_CODECS and info.frame_count <= 1 and not info.has_audio:
        return f"a still {info.video_codec} image, not a video: one frame, no sound"
    return None


def _read_audio(video: Path, info: media.Probe, duration: float, require_audio: bool) -> tuple[np.ndarray, list[str]]:
    """The 16 kHz mono audio [S] of ``video`` (empty: silence) and the warnings it gives."""
    if not info.has_audio:
        if require_audio:
            raise MediaError(video, "no audio stream (--require-audio)")
        return np.zeros(0, np.float32), ["no audio stream: the model heard silence"]
    wave = media.decode_audio(video, SAMPLE_RATE)
    seconds = len(wave) / SAMPLE_RATE
    if seconds < duration - 0.5:
        return wave, [f"the audio ends at {seconds:.2f} s, before the video ({duration:.2f} s): silence after it"]
    return wave, []


def predict_video(video: Path, folder: Path, predictor: Predictor, options: PredictOptions,
                  overlay: Path | None = None, progress=None, task=None,
                  generator: LazyGenerator | None = None) -> VideoResult:
    """Segment one video into ``folder`` (see the module docstring); ``summary.json`` is written last.
    ``generator``: the maskige generator of ``--maskiges auto`` (Siam models; None: made from the options)."""
    started = time.perf_counter()
    timer = Timer()
    info = media.probe(video, ffprobe=False)  # ffmpeg's start time: the decoders take this probe (media.decoding_probe)
    cfg = predictor.cfg
    if info.frame_count == 0:  # before the audio: its decoder would blame the file as a whole
        raise MediaError(video, f"no decodable video frames (a {info.video_codec} stream without frames)")
    check_bounds(video, info, options, predictor)
    schedule = video_schedule(info, options.fps, options.window or cfg.num_frames)
    duration = schedule.duration
    if overlay is not None and "png" not in options.formats:
        raise UsageError("--overlay paints the PNG masks: add png to --format")

    start = time.perf_counter()
    wave, warnings = _read_audio(video, info, duration, options.require_audio)
    warnings = [w for w in [still_image_warning(info)] if w] + warnings
    timer.add("audio", start)
    folder.mkdir(parents=True, exist_ok=True)
    clear_outputs(folder)
    maskige_for, maskiges = None, None
    if cfg.siam:
        start = time.perf_counter()
        source = parse_maskiges(options.maskiges)
        if source == AUTO:
            generator = generator or LazyGenerator(options.generator, options.generator_settings,
                                                   str(predictor.device))
            maskige_folder, maskiges = make_auto(video, folder, generator, options.fps, progress, task, info)
        else:
            maskige_folder, maskiges = folder_of(source, folder.name)
        maskige_for = maskige_reader(maskige_folder, cfg.input_size)
        warnings += [w for w in [maskige_warning(predictor.trained_on, maskiges)] if w]
        timer.add("maskiges", start)
    if progress is not None:
        progress.update(task, total=len(schedule.windows), completed=0,
                        description=f"windows · {escape(video.name)}")  # a description is markup
    display = (info.width, info.height)
    with PeakWatch(predictor.device) as memory, MaskOutputs(folder, schedule, predictor.class_names,
                                                             predictor.binary, display, options.formats) as outputs:
        def after_batch(windows: int) -> None:
            memory.sample()
            if progress is not None:
                progress.advance(task, windows)

        for frame, mask in stream_masks(video, schedule, predictor, wave, display, threshold=options.threshold,
                                        batch=options.batch, maskige_for=maskige_for, timer=timer,
                                        on_batch=after_batch, info=info):
            start = time.perf_counter()
            outputs.add(frame, mask)
            timer.add("writing", start)
    model_done = time.perf_counter()
    if overlay is not None:
        start = time.perf_counter()
        render_overlay(video, outputs.track(), overlay, info=info)
        timer.add("overlay", start)

    windows = len(schedule.windows)
    timings = {f"{stage}_s": round(seconds, 3) for stage, seconds in sorted(timer.seconds.items())}
    timings["total_s"] = round(time.perf_counter() - started, 3)
    timings["predict_s"] = round(model_done - started, 3)
    timings["ms_per_window"] = round(1000 * timer.seconds.get("model", 0.0) / windows, 1)
    summary = {
        "av2ts_version": __version__, "complete": True, **input_identity(video), "probe": info.to_dict(),
        "video_duration": round(duration, 4), "model": predictor.describe(),
        "settings": settings_of(predictor, options, overlay),
        "sampling": {"seconds": schedule.seconds, "fps": schedule.fps, "frames": len(schedule.frames),
                     "offset": FRAME_OFFSET, "window": schedule.window, "padded_frames": schedule.padded_frames},
        "windows": windows, "batch": options.batch, "sounding_frames": outputs.sounding_frames,
        "files": outputs.files, "masks": f"{MASKS_DIR}/" if "png" in options.formats else None, "maskiges": maskiges,
        "overlay": str(overlay) if overlay else None, "timings": timings, "peak_memory": memory.report(),
        "warnings": warnings,
    }
    write_json(folder / SUMMARY_FILE, summary)
    return VideoResult(str(video), str(folder), video.name, duration=duration, frames=len(schedule.frames),
                       windows=windows, ms_per_window=timings["ms_per_window"],
                       peak_rss_mb=summary["peak_memory"]["rss_mb"], overlay=str(overlay) if overlay else None,
                       warnings=warnings)


# ---------------------------------------------------------------------------------------------------- batch
@dataclass
class RunReport:
    out: str
    model: dict
    videos: list[VideoResult] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # {"input", "error"}
    batch: bool = False
    busy: list[dict] = field(default_factory=list)  # {"input", "pid"}: locked by another run, left to it
    processes: int = 1  # torchrun: the processes that shared the videos (the report covers all of them)
    rank: int = 0  # this process's rank: rank 0 prints the report

    @property
    def collects(self) -> bool:
        """Whether a video's failure is recorded and the run goes on (several videos or processes), or raised."""
        return self.batch or self.processes > 1

    def to_dict(self) -> dict:
        return {"out": self.out, "model": self.model, "batch": self.batch,
                "videos": [dataclasses.asdict(v) for v in self.videos], "failures": self.failures,
                "busy": self.busy, "processes": self.processes}


def run(sources: Sequence[str | os.PathLike], options: PredictOptions, predictor: Predictor | None = None
        ) -> RunReport:
    """Predict every video of ``sources``. One video: its error propagates. Several: failures are collected
    (``failures.json``, merged with what other runs recorded there) and the others go on. ``predictor``: an
    already loaded model (else ``options.model``).

    Each video is done under the lock of its folder (``locks``): a video another run holds is left to it (a
    line ``x.mp4: in use by av2ts pid N``, counted in ``busy``, not a failure), so two runs into one ``--out``
    share the work. SIGINT/SIGTERM: the current video's unfinished outputs are removed and ``Interrupted`` (exit
    130/143) says what was left.

    Under torchrun (WORLD_SIZE > 1) the processes share the videos: process r does every WORLD_SIZE-th video from
    the r-th on, on its own device (``--device cuda``: the GPU of its LOCAL_RANK), into the one output folder rank
    0 chose, with the folder names rank 0 gave. Failures are always collected, not raised; each process records
    its own in ``failures.json`` (under the folder's lock) and, at the end, every process returns the combined
    report, so all of them exit alike (3 when any video failed). A re-run of the same command skips the videos
    that are done, whichever process did them."""
    options.check()
    videos = collect_videos(sources, options.recursive)
    if options.overlay is not None and "png" not in options.formats:
        raise UsageError("--overlay paints the PNG masks: add png to --format")
    batch = len(videos) > 1
    if options.overlay and batch and is_video_name(options.overlay):
        raise UsageError(f"--overlay {options.overlay}: several videos need a folder for their overlays")
    processes = Processes.start(options.device, backend="gloo")
    try:
        return _run(videos, options, predictor, batch, processes)
    finally:
        processes.stop()


def _run(videos: list[Path], options: PredictOptions, predictor: Predictor | None, batch: bool,
         processes: Processes) -> RunReport:
    run_dir: Path | None = None
    created = False
    current: list[Path] = []  # the video being done, for the interrupt's line
    report = None  # this process's
    merged = False  # its failures recorded in failures.json
    shard: list[tuple[Path, str]] = []
    with stop_on_signals():
        try:
            if predictor is None:
                predictor = load_predictor(options.model, str(processes.device), options.half, options.precision)
            generator = None  # one maskige generator for every video; a model without the Siam encoder never makes one
            if predictor.cfg.siam and parse_maskiges(options.maskiges) == AUTO:
                generator = LazyGenerator(options.generator, options.generator_settings, str(predictor.device))
            if processes.main:
                if options.out is not None:
                    run_dir = Path(options.out)
                    created = not run_dir.exists()
                    run_dir.mkdir(parents=True, exist_ok=True)
                else:
                    run_dir, created = numbered_run_folder(DEFAULT_RUNS), True
            run_dir, names = processes.broadcast((run_dir, folder_names(videos, run_dir) if processes.main else None))
            report = RunReport(str(run_dir), predictor.describe(), batch=batch, processes=processes.world_size,
                               rank=processes.rank)
            shard = processes.shard(list(zip(videos, names, strict=True)))
            _run_videos(shard, run_dir, predictor, options, generator, report, current)
            if report.collects:
                _merge_failures(run_dir, report)  # each process its own, under the run folder's lock
                merged = True
            if processes.distributed:  # every process waits for the others here and gets the combined report
                return _combined(processes.gather(report), videos, processes.rank)
            return report
        except KeyboardInterrupt as stop:
            done = len(report.videos) + len(report.failures) + len(report.busy) if report else 0
            left = f"{current[0]} left unfinished" if current else "no video started"
            total = len(shard) if report else len(videos)
            rest = total - done - len(current)
            raise Interrupted(signum_of(stop), f"{left}; {done} of {total} videos done or skipped, {rest} not "
                              "started; the same command finishes them") from None
        finally:
            if report is not None and report.collects and not merged:  # interrupted: what was done so far
                _merge_failures(run_dir, report)
            if created and run_dir is not None:  # nothing written (a single failed video): no empty expN
                with contextlib.suppress(OSError):
                    run_dir.rmdir()


def _combined(reports: list[RunReport], videos: list[Path], rank: int) -> RunReport:
    """The processes' reports as one, each list in the order of ``videos``."""
    order = {str(video): i for i, video in enumerate(videos)}

    def merged(field: str) -> list:
        entries = [entry for part in reports for entry in getattr(part, field)]
        return sorted(entries, key=lambda e: order.get(e.input if isinstance(e, VideoResult) else e["input"], -1))

    return dataclasses.replace(reports[0], rank=rank, videos=merged("videos"), failures=merged("failures"),
                               busy=merged("busy"))


def _run_videos(shard: list[tuple[Path, str]], run_dir: Path, predictor: Predictor, options: PredictOptions,
                generator: LazyGenerator | None, report: RunReport, current: list[Path]) -> None:
    """The videos of ``shard`` (video, folder name), one after the other."""
    batch = report.batch
    progress = make_progress() if options.progress and report.rank == 0 else None
    with progress if progress is not None else contextlib.nullcontext():
        videos_task = progress.add_task("videos", total=len(shard)) if progress else None
        windows_task = progress.add_task("windows", total=None) if progress else None
        for video, name in shard:
            current[:] = [video]
            try:
                result = _locked_video(video, run_dir / name, predictor, options, batch, progress, windows_task,
                                       generator)
                if isinstance(result, locks.Busy):
                    report.busy.append({"input": str(video), "pid": result.pid})
                    _print(result.message)
                else:
                    report.videos.append(result)
            except (Av2tsError, OSError) as err:
                if not report.collects:
                    raise
                show_traceback(err)  # --debug: the traceback of a failure the batch goes on from
                reason = err.message if isinstance(err, Av2tsError) else describe_os_error(
                    err, None if err.filename else video)
                report.failures.append({"input": str(video), "error": reason})
                _print(f"[red]failed:[/red] {escape(reason)}", markup=True)
            current.clear()
            if progress is not None:
                progress.advance(videos_task)


def _locked_video(video: Path, folder: Path, predictor: Predictor, options: PredictOptions, batch: bool,
                  progress, task, generator: LazyGenerator | None) -> VideoResult | locks.Busy:
    """One video under its folder's lock: the temps a killed run left are swept first, a finished video is
    skipped, a failed or interrupted one leaves no unfinished outputs (and no folder, when nothing else is in
    it). Returns the Busy error, not raised, when another run holds the folder."""
    try:
        lock = locks.acquire(folder, label=video)
    except locks.Busy as busy:
        return busy
    finished = False
    try:
        locks.sweep_temps(folder)
        overlay = overlay_path(options.overlay, folder, folder.name, batch)
        if overlay is not None and overlay.parent != folder:  # a shared overlay folder: only this overlay's temps
            locks.sweep_temps(overlay.parent, recursive=False, stem=overlay.stem)
        settings = settings_of(predictor, options, overlay)
        if not options.force and is_complete(folder, video, settings):
            _print(f"{video.name}: already done in {folder}, skipped (--force redoes it)")
            finished = True
            return VideoResult(str(video), str(folder), video.name, skipped=True, overlay=settings["overlay"])
        check_overlay_target(overlay, folder, options.overlay, options.force)
        result = predict_video(video, folder, predictor, options, overlay, progress, task, generator)
        _print(_closing_line(result))
        finished = True
        return result
    finally:
        if not finished and not (folder / SUMMARY_FILE).exists():  # outputs of no finished video: removed
            discard_unfinished(folder)
        lock.release(remove_empty_folder=True)


def _merge_failures(run_dir: Path, report: RunReport) -> None:
    """``failures.json``: this run's failures, and the entries of earlier or concurrent runs for the inputs this
    run did not handle (an input it did or failed replaces its old entry; one it left busy keeps it), written
    atomically under the run folder's lock."""
    handled = {os.path.abspath(v.input) for v in report.videos} | {
        os.path.abspath(f["input"]) for f in report.failures}
    with locks.held(run_dir, wait=60, label=run_dir):
        locks.sweep_temps(run_dir, recursive=False, stem=Path(FAILURES_FILE).stem)
        try:
            previous = json.loads((run_dir / FAILURES_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = []
        kept = [f for f in previous if isinstance(f, dict) and os.path.abspath(str(f.get("input"))) not in handled] \
            if isinstance(previous, list) else []
        write_json(run_dir / FAILURES_FILE, kept + report.failures)


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
    if report.failures:
        table = Table(title=f"{len(report.failures)} of {len(report.failures) + len(report.videos)} inputs failed",
                      title_justify="left")
        table.add_column("input", overflow="fold")
        table.add_column("reason", overflow="fold")
        for failure in report.failures:
            reason = failure["error"]
            prefix = f"{failure['input']}: "
            # Text, not str: a cell string is rich markup, and "[red]x.mp4" is a file name here
            table.add_row(Text(failure["input"]), Text(reason[len(prefix):] if reason.startswith(prefix) else reason))
        console.print(table)
        _print(f"Failures listed in {Path(report.out) / FAILURES_FILE}")
    if report.busy:
        _print(f"{len(report.busy)} video{'s' if len(report.busy) > 1 else ''} in use by another av2ts run, left to "
               "it (not failed; the same command afterwards reports them done)")
    _print(f"Results saved to {report.out}")
