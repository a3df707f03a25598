"""The network's side of ``av2ts predict``: the stream of masks a ``predictor.Predictor`` gives for a video.

``stream_masks`` yields (sampled frame, mask at display size) pairs in presentation order; the writers of
``outputs.py`` and the overlay consume them. Inside the stream the schedule (``sampling.Schedule``) says which
frames and audio examples make each window, how a tail is padded and which outputs are real; a background thread
(``WindowFeeder``) decodes the frames of one window group at a time (``media.iter_frames_at``, one sequential
pass) and a bounded queue hands windows to the model, so memory does not grow with the length of a video. A
frame's mask comes out as soon as every pass of its window group is done.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from av2ts_cli import media
from av2ts_cli.data.images import read_rgb
from av2ts_cli.data.transforms import resize_images
from av2ts_cli.errors import DataError
from av2ts_cli.model.ops import kernel_setup_seconds
from av2ts_cli.predict.masks import FrameMask, frame_mask
from av2ts_cli.predictor import Predictor
from av2ts_cli.sampling import SampledFrame, Schedule, Window


# -------------------------------------------------------------------------------------------------- the stream
@dataclass
class Timer:
    """Seconds per stage, summed; threads add to their own stages."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - since
        return now


_DONE = object()
# (window, frames uint8 [T, S, S, 3], audio examples [T, 96, 64], maskiges uint8 [T, S, S, 3] or None)
WindowInputs = tuple[Window, np.ndarray, torch.Tensor, np.ndarray | None]


class WindowFeeder:
    """A background thread that decodes frames group by group and yields the ``WindowInputs`` of every window of
    ``schedule`` in its processing order, through a queue of ``depth`` windows (so decoding runs a bounded
    distance ahead of the model). ``wave``: the 16 kHz mono audio [S]; ``maskige_for``: a sampled frame's maskige
    (Siam models) or None; ``info``: the video's probe, handed to the decoder (``media.decoding_probe``);
    ``on_frame(index, frame)``: called in this thread with every decoded frame, uint8 [S, S, 3] (the preview keeps
    small copies: no second decode of the video)."""

    def __init__(self, video: Path, schedule: Schedule, size: int, wave: np.ndarray, timer: Timer,
                 maskige_for: Callable[[SampledFrame], np.ndarray] | None = None, depth: int = 2,
                 info: media.Probe | None = None, on_frame: Callable[[int, np.ndarray], None] | None = None):
        self.video, self.schedule, self.size, self.wave, self.timer = video, schedule, size, wave, timer
        self.maskige_for, self.info, self.on_frame = maskige_for, info, on_frame
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
        frames = media.iter_frames_at(self.video, [f.time for f in schedule.frames], (self.size, self.size),
                                      info=self.info)
        try:
            for group in range(schedule.groups):
                start = time.perf_counter()
                members = schedule.group_frames(group)
                decoded = {frame.index: next(frames)[1] for frame in members}
                if self.on_frame is not None:  # before the window is queued: a frame comes before its mask
                    for index, picture in decoded.items():
                        self.on_frame(index, picture)
                maskiges = None if self.maskige_for is None else {f.index: self.maskige_for(f) for f in members}
                start = self.timer.add("decode", start)
                for window in schedule.group_windows(group):
                    clip = np.stack(schedule.window_inputs(window, decoded))
                    audio = schedule.window_audio(self.wave, window)
                    window_maskiges = None if maskiges is None else np.stack(schedule.window_inputs(window, maskiges))
                    start = self.timer.add("audio", start)
                    if not self._put((window, clip, audio, window_maskiges)):
                        return
                    start = time.perf_counter()
            self._put(_DONE)
        except BaseException as err:  # handed to the consumer, which re-raises it in the main thread
            self._put(err)
        finally:
            frames.close()

    def __iter__(self) -> Iterator[WindowInputs]:
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


def _segmented_batches(feeder: WindowFeeder, predictor: Predictor, batch: int,
                       timer: Timer) -> Iterator[tuple[list[Window], torch.Tensor]]:
    """(windows, their semantic maps [B, T, K, S, S]) for batches of up to ``batch`` windows, in feeding order."""
    pending: list[WindowInputs] = []
    items = iter(feeder)
    while True:
        start = time.perf_counter()
        item = next(items, None)
        timer.add("waiting", start)
        if item is not None:
            pending.append(item)
        if pending and (len(pending) == batch or item is None):
            start = time.perf_counter()
            maskiges = None if pending[0][3] is None else np.stack([p[3] for p in pending])
            setup = kernel_setup_seconds()
            scores = predictor.segment_pictures(np.stack([p[1] for p in pending]),
                                                torch.stack([p[2] for p in pending]), maskiges)
            # the first forward pass may build the deformable-attention kernel (10-60 s, once per machine: it
            # says so itself); that is its own stage, and "model" (ms/window) is the network's time alone
            setup = kernel_setup_seconds() - setup
            if setup > 0:
                timer.seconds["kernel_setup"] = timer.seconds.get("kernel_setup", 0.0) + setup
            timer.add("model", start + setup)
            yield [p[0] for p in pending], scores
            pending = []
        if item is None:
            return


def stream_masks(video: Path, schedule: Schedule, predictor: Predictor, wave: np.ndarray,
                 display: tuple[int, int], *, threshold: float = 0.5, batch: int = 1,
                 maskige_for: Callable[[SampledFrame], np.ndarray] | None = None, timer: Timer | None = None,
                 on_batch: Callable[[int], None] | None = None, info: media.Probe | None = None,
                 on_frame: Callable[[int, np.ndarray], None] | None = None
                 ) -> Iterator[tuple[SampledFrame, FrameMask]]:
    """(sampled frame, its mask at ``display`` size (W, H)) for every frame of ``schedule``, in index (= time)
    order, each as soon as every pass of its window group has been through the network.

    ``wave``: the video's 16 kHz mono audio [S] (silence where it is shorter); ``threshold``: of binary models
    (``masks.frame_mask``); ``batch``: windows per forward pass; ``maskige_for``: a frame's maskige uint8 [S, S, 3]
    for Siam models; ``on_batch(windows)`` is called after each forward pass (progress, memory samples);
    ``info``: the video's probe (``media.probe(video, ffprobe=False)``), so decoding does not inspect it again;
    ``on_frame(index, frame uint8 [S, S, 3])``: every decoded frame, from the decoding thread (``WindowFeeder``)."""
    timer = timer if timer is not None else Timer()
    feeder = WindowFeeder(video, schedule, predictor.cfg.input_size, wave, timer, maskige_for, depth=2 * batch,
                          info=info, on_frame=on_frame)
    scores: dict[int, torch.Tensor] = {}  # frame index -> semantic map [K, S, S] until its group is complete
    try:
        for windows, batch_scores in _segmented_batches(feeder, predictor, batch, timer):
            ready: list[SampledFrame] = []
            for window, window_scores in zip(windows, batch_scores, strict=True):
                scores.update((frame.index, s) for frame, s in schedule.real_outputs(window, window_scores))
                if schedule.completes_group(window):
                    ready += schedule.group_frames(window.group)
            if on_batch is not None:
                on_batch(len(windows))
            for frame in ready:
                start = time.perf_counter()
                mask = frame_mask(scores.pop(frame.index), display, threshold)
                timer.add("writing", start)
                yield frame, mask
    finally:
        feeder.close()
    if scores:
        raise RuntimeError(f"{len(scores)} frames of {video} never completed their window group")


def maskige_reader(folder: Path, size: int) -> Callable[[SampledFrame], np.ndarray]:
    """Maskige of a sampled frame: ``folder/NNNNNN.png`` (or .jpg), the mask numbering, as uint8 [S, S, 3] RGB."""
    def read(frame: SampledFrame) -> np.ndarray:
        for suffix in (".png", ".jpg", ".jpeg"):
            path = folder / f"{frame.index:06d}{suffix}"
            if path.is_file():
                image = read_rgb(path, "maskige")
                # nearest, as COMBO resizes maskiges (and as eval reads them, data.transforms): a bilinear resize
                # blends two palette colours at every region border into a colour that names no region
                return resize_images(image[None], size, size, nearest=True)[0]
        raise DataError(folder / f"{frame.index:06d}.png", f"missing maskige for mask {frame.index} "
                        f"(t = {frame.time:.3f} s); maskiges are numbered like the masks")

    return read
