"""One video of ``av2ts predict``: masks, per-frame records, a summary and optionally an overlay out.

Prediction is a stream. ``stream_masks`` yields (sampled frame, mask at display size) pairs in presentation order;
the writers (``outputs.MaskOutputs``: PNG, JSONL, COCO RLE) consume them one by one, and the overlay paints
the masks they wrote. Inside the stream, frames and audio are sampled as AVSBench did, and the schedule
(``sampling.Schedule``) says which frames and audio examples make each window, how a tail is padded and which
outputs are real. Memory does not grow with the length of a video: a background thread decodes the frames of one
window group at a time (``media.iter_frames_at``, one sequential pass) and a bounded queue hands windows to the
model; a frame's mask comes out as soon as every pass of its window group is done. Only the 16 kHz mono audio is
held whole (64 kB/s). The video is probed once, here, and the probe is passed on.

Per video, in ``OUT/<video name>/``: ``masks/NNNNNN.png`` (grey 0/255 for binary models, indexed AVSS palette for
semantic ones), ``frames.jsonl`` (one line per mask: time, sounding area, classes with area and box),
``masks.coco.json`` (COCO RLE), ``preview.jpg`` (up to 16 of the frames with their masks), ``summary.json``
(written last, atomically: its presence marks the video done, and a re-run skips it unless ``--force`` or the
settings changed) and the overlay if asked. Siam models also get
``maskiges/fps<F>/NNNNNN.png``, their maskiges, made once and reused (``maskiges.py``; ``--maskiges DIR``
reads them from a folder instead).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.markup import escape

from av2ts_cli import __version__, media
from av2ts_cli.avsbench import FRAME_OFFSET, SAMPLE_RATE
from av2ts_cli.errors import MediaError, UsageError
from av2ts_cli.files import write_json
from av2ts_cli.maskiges.render import geometry_for
from av2ts_cli.memory import PeakWatch, available_mib
from av2ts_cli.predict.maskiges import LazyGenerator, folder_of, geometry_warning, make_auto, maskige_warning
from av2ts_cli.predict.masks import FrameMask
from av2ts_cli.predict.options import PredictOptions
from av2ts_cli.predict.outputs import MaskOutputs, clear_outputs, output_names
from av2ts_cli.predict.stream import Timer, maskige_reader, stream_masks
from av2ts_cli.predictor import Predictor
from av2ts_cli.render import render_overlay
from av2ts_cli.runs import MASKS_DIR, SUMMARY_FILE, input_identity, record_owned
from av2ts_cli.sampling import SampledFrame, sampled_seconds, video_duration, video_schedule


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
        # auto: another generator or other settings make other maskiges, so other masks
        maskiges = options.auto_maskiges if options.makes_maskiges else str(options.maskige_source)
    # the model by its content (a retrained best/ at the same path is another model) and its precision
    return {"model": predictor.name, "weights_sha256": predictor.weights_sha256, "precision": predictor.precision,
            "preset": predictor.cfg.preset, "fps": options.fps,
            "window": options.window or predictor.cfg.num_frames, "threshold": options.threshold,
            "formats": list(options.formats), "maskiges": maskiges, "overlay": str(overlay) if overlay else None}


# Peak memory of one forward pass grows by this much per frame at 128 x 128 px (av2ts-tiny on the CPU, measured
# with a 2 ms RSS sampler: +106 MB at T = 5, +336 MB at T = 20, +630 MB at T = 40, so 15.3 MB/frame); it scales
# with the pixels. Bigger backbones need more, so a window refused by this bound surely does not fit.
_MB_PER_FRAME_AT_128 = 15.3
# still pictures: ffmpeg's image decoders (a motion-JPEG *video* has frames and a rate, so it passes)
_IMAGE_CODECS = frozenset({"png", "mjpeg", "jpeg2000", "bmp", "tiff", "webp", "jpegls", "pam", "ppm", "pgm", "qoi"})


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
    free = available_mib(predictor.device)
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
    wave = media.decode_audio(video, SAMPLE_RATE, info=info)
    seconds = len(wave) / SAMPLE_RATE
    if seconds < duration - 0.5:
        return wave, [f"the audio ends at {seconds:.2f} s, before the video ({duration:.2f} s): silence after it"]
    return wave, []


class VideoStream:
    """One video as the network takes it, and its masks as a stream: the one path of ``predict_video`` (which
    writes them) and of ``api.Model.predict`` (which yields them).

    Construction probes the video once (the probe, ``info``, is passed on, never re-probed), checks ``options``
    against it (``check_bounds``), samples it (``schedule``) and reads its 16 kHz mono audio (``wave`` [S], with
    the ``warnings`` it gives); ``use_maskiges`` gives a Siam model its maskiges; ``masks`` is the stream."""

    def __init__(self, video: Path, predictor: Predictor, options: PredictOptions, timer: Timer | None = None):
        self.video, self.predictor, self.options = video, predictor, options
        self.timer = timer if timer is not None else Timer()
        # ffmpeg's start time: the decoders take this probe (media.decoding_probe)
        self.info = info = media.probe(video, ffprobe=False)
        if info.frame_count == 0:  # before the audio: its decoder would blame the file as a whole
            raise MediaError(video, f"no decodable video frames (a {info.video_codec} stream without frames)")
        check_bounds(video, info, options, predictor)
        self.schedule = video_schedule(info, options.fps, options.window or predictor.cfg.num_frames)
        start = time.perf_counter()
        self.wave, warnings = _read_audio(video, info, self.schedule.duration, options.require_audio)
        self.warnings = [w for w in [still_image_warning(info)] if w] + warnings
        self.timer.add("audio", start)
        self.maskige_for: Callable[[SampledFrame], np.ndarray] | None = None

    @property
    def display(self) -> tuple[int, int]:
        """The masks' size (W, H): the video's display size, rotation applied."""
        return self.info.width, self.info.height

    def use_maskiges(self, folder: Path, generator: LazyGenerator | None, progress=None, task=None) -> dict | None:
        """A Siam model's maskiges, the summary's record of them (None for a model without the Siam encoder):
        ``--maskiges auto`` makes them with ``generator`` into ``folder/maskiges/fps<F>/`` (reused when there),
        ``--maskiges DIR`` reads ``DIR/<folder's name>/`` or ``DIR``. Adds the warnings when they may not be the
        kind the model trained on."""
        cfg, options = self.predictor.cfg, self.options
        if not cfg.siam:
            return None
        start = time.perf_counter()
        geometry = geometry_for(cfg.family, cfg.subset).name  # the maskiges the model trained on
        if options.makes_maskiges:
            if generator is None:
                raise UsageError("a Siam model with --maskiges auto needs the run's maskige generator")
            maskige_folder, maskiges = make_auto(self.video, folder, generator, options.fps, progress, task,
                                                 self.info, geometry)
        else:
            maskige_folder, maskiges = folder_of(options.maskige_source, folder.name, self.video,
                                                 [frame.time for frame in self.schedule.frames])
        self.maskige_for = maskige_reader(maskige_folder, cfg.input_size)
        self.warnings += [w for w in [maskige_warning(self.predictor.trained_on, maskiges, cfg.family),
                                      geometry_warning(maskiges, geometry)] if w]
        self.timer.add("maskiges", start)
        return maskiges

    def masks(self, on_batch: Callable[[int], None] | None = None,
              on_frame: Callable[[int, np.ndarray], None] | None = None) -> Iterator[tuple[SampledFrame, FrameMask]]:
        """(sampled frame, its mask at ``display`` size) in time order (``stream.stream_masks``); a Siam model
        needs ``use_maskiges`` first. ``on_frame(index, frame uint8 [S, S, 3])``: each decoded frame (the
        preview's)."""
        if self.predictor.cfg.siam and self.maskige_for is None:
            raise UsageError("a Siam model needs its maskiges (VideoStream.use_maskiges) before its masks")
        return stream_masks(self.video, self.schedule, self.predictor, self.wave, self.display,
                            threshold=self.options.threshold, batch=self.options.batch, maskige_for=self.maskige_for,
                            timer=self.timer, on_batch=on_batch, info=self.info, on_frame=on_frame)


def predict_video(video: Path, folder: Path, predictor: Predictor, options: PredictOptions, settings: dict,
                  overlay: Path | None = None, progress=None, task=None,
                  generator: LazyGenerator | None = None) -> VideoResult:
    """Segment one video into ``folder`` (see the module docstring); ``summary.json`` is written last.
    ``settings``: ``settings_of`` the run for this video (recorded in the summary); ``generator``: the run's one
    maskige generator (a Siam model with ``--maskiges auto``)."""
    started = time.perf_counter()
    stream = VideoStream(video, predictor, options)
    info, schedule, timer = stream.info, stream.schedule, stream.timer
    duration = schedule.duration
    clear_outputs(folder)  # what an earlier run wrote here, by its record; nothing else
    record_owned(folder, output_names(schedule, options.formats, overlay, folder))  # before writing any of it
    maskiges = stream.use_maskiges(folder, generator, progress, task)
    warnings = stream.warnings
    if progress is not None:
        progress.update(task, total=len(schedule.windows), completed=0,
                        description=f"windows · {escape(video.name)}")  # a description is markup
    display = stream.display
    with PeakWatch(predictor.device) as memory, MaskOutputs(folder, schedule, predictor.class_names,
                                                             predictor.binary, display, options.formats) as outputs:
        def after_batch(windows: int) -> None:
            memory.sample()
            if progress is not None:
                progress.advance(task, windows)

        for frame, mask in stream.masks(on_batch=after_batch, on_frame=outputs.keep_frame):
            start = time.perf_counter()
            outputs.add(frame, mask)
            timer.add("writing", start)
    model_done = time.perf_counter()
    if overlay is not None:
        start = time.perf_counter()
        render_overlay(video, outputs.track(), overlay, info=info)  # written whole or not at all
        if overlay.parent != folder:  # the folder's record says av2ts wrote it (a later run may replace it; a
            record_owned(overlay.parent, [overlay.name])  # folder source skips it as an input)
        timer.add("overlay", start)

    windows = len(schedule.windows)
    timings = {f"{stage}_s": round(seconds, 3) for stage, seconds in sorted(timer.seconds.items())}
    timings["total_s"] = round(time.perf_counter() - started, 3)
    timings["predict_s"] = round(model_done - started, 3)
    timings["ms_per_window"] = round(1000 * timer.seconds.get("model", 0.0) / windows, 1)
    summary = {
        "av2ts_version": __version__, "complete": True, **input_identity(video), "folder_name": folder.name,
        "probe": info.to_dict(),
        "video_duration": round(duration, 4), "model": predictor.describe(),
        "settings": settings,
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


