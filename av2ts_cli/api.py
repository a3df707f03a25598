"""The Python API: what the commands do, from Python, through the functions the commands themselves run.

    from av2ts_cli.api import load_model

    model = load_model("demo")                       # any --model name, onto a device, in a precision
    for frame in model.predict("assets/demo.mp4"):   # a stream: one FrameResult per sampled frame, no files written
        print(frame.time, frame.mask.shape, frame.classes)
    maps = model.segment(frames, audio)              # the arrays of your own loader -> semantic maps

- ``load_model``: ``predictor.load_predictor``, the loader of ``av2ts predict`` and ``av2ts eval``, as a ``Model``;
- ``Model.predict``: ``predict.video.VideoStream``, the stream whose masks ``av2ts predict`` writes (the same
  sampling, audio, maskiges, windows and masks: pixel for pixel its ``masks/``);
- ``Model.segment`` and ``Model.masks``: ``Predictor.segment`` on arrays, and masks made as ``predict`` makes them;
- ``train`` and ``evaluate``: the functions behind ``av2ts train`` and ``av2ts eval``, with the same options.

Errors are the CLI's: ``errors.UsageError`` for a bad name, option or array shape, ``MediaError``, ``DataError`` and
``CheckpointError`` for a file at fault, each with one line that names the thing first.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from av2ts_cli.avsbench import EXAMPLE_FRAMES, MEL_BANDS
from av2ts_cli.config import ModelConfig
from av2ts_cli.data.transforms import resize_images
from av2ts_cli.errors import UsageError
from av2ts_cli.evaluate import evaluate
from av2ts_cli.model.inference import PRECISIONS
from av2ts_cli.predict import PredictOptions
from av2ts_cli.predict.maskiges import LazyGenerator
from av2ts_cli.predict.masks import class_records, frame_mask
from av2ts_cli.predict.video import VideoStream
from av2ts_cli.predictor import Predictor, load_predictor
from av2ts_cli.runs import safe_folder_name
from av2ts_cli.sampling import window_examples
from av2ts_cli.sources import collect_videos
from av2ts_cli.training import train

__all__ = ["FrameResult", "Model", "evaluate", "load_model", "train"]


@dataclass(frozen=True)
class FrameResult:
    """One sampled frame of a video and its mask, as ``av2ts predict`` writes it (``masks/NNNNNN.png`` and a line
    of ``frames.jsonl``)."""

    video: Path
    index: int  # the mask's number: masks/{index:06d}.png
    time: float  # seconds into the video of the sampled frame (second k at k + 15/16 s, see the README)
    mask: np.ndarray  # uint8 [H, W] class ids at the video's display size; binary (S4/MS3) models: 0/1
    probability: np.ndarray | None  # binary models: float32 [H, W] sounding-object probability; else None
    classes: list[dict]  # per class present: id, name, area (fraction), pixels, bbox [x, y, w, h], score (binary)

    @property
    def sounding(self) -> bool:
        """Whether anything in the frame sounds (some class other than background is present)."""
        return bool(self.classes)


class Model:
    """A loaded model (``load_model``): its network in eval mode on ``device``, run in ``precision``."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    @property
    def name(self) -> str:
        return self.predictor.name

    @property
    def classes(self) -> list[str]:
        """The class names, background first (index = class id)."""
        return self.predictor.class_names

    @property
    def config(self) -> ModelConfig:
        """The network's configuration: family, subset, num_classes (K), num_frames (T), input_size (S), siam."""
        return self.predictor.cfg

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @property
    def precision(self) -> str:
        return self.predictor.precision

    @property
    def network(self) -> torch.nn.Module:
        """The ``torch.nn.Module`` itself (prepared for inference: eval mode, BatchNorm folded, cast to bf16 when
        ``precision`` is bf16 on a CPU)."""
        return self.predictor.model

    def __repr__(self) -> str:
        cfg = self.config
        return (f"Model({self.name!r}, {cfg.preset}, {cfg.subset}, {cfg.num_classes} classes, T={cfg.num_frames}, "
                f"S={cfg.input_size}, siam={cfg.siam}, device={self.device}, precision={self.precision})")

    # ------------------------------------------------------------------------------------------------ videos
    def predict(self, source: str | os.PathLike | Iterable[str | os.PathLike], *, recursive: bool = False,
                fps: int = 1, window: int | None = None, threshold: float = 0.5, batch: int = 1,
                maskiges: str | os.PathLike | None = None, generator: str | None = None,
                points_per_side: int | None = None, require_audio: bool = False) -> Iterator[FrameResult]:
        """Segment videos as a stream: a generator of one ``FrameResult`` per sampled frame, video after video, in
        time order, each as soon as its window group is through the network. Nothing is written (a Siam model's
        ``maskiges="auto"`` makes them in a temporary folder, removed after each video), and memory does not grow
        with a video's length.

        ``source``: what ``av2ts predict SOURCE...`` takes (a video file, a folder, a glob pattern, or a list of
        them; ``recursive``: subfolders too). The options are ``av2ts predict``'s (``fps``, ``window``,
        ``threshold``, ``batch``, ``maskiges`` "auto" or a folder, ``generator``, ``points_per_side``,
        ``require_audio``), checked before anything runs. A video's warnings (no audio stream, ...) are
        ``warnings.warn``'d as it starts."""
        options = PredictOptions(model=self.name, fps=fps, window=window, batch=batch, recursive=recursive,
                                 threshold=threshold, maskiges=maskiges, generator=generator,
                                 generator_settings={} if points_per_side is None else
                                 {"points_per_side": points_per_side}, require_audio=require_audio, progress=False)
        options.check()
        sources = [source] if isinstance(source, str | os.PathLike) else list(source)
        return self._frames(collect_videos(sources, recursive), options)

    def _frames(self, videos: list[Path], options: PredictOptions) -> Iterator[FrameResult]:
        auto = self.config.siam and options.makes_maskiges
        generator = LazyGenerator(options.generator, options.generator_settings, str(self.device)) if auto else None
        for video in videos:
            with tempfile.TemporaryDirectory(prefix="av2ts-maskiges-") if auto else contextlib.nullcontext() as temp:
                stream = VideoStream(video, self.predictor, options)
                # auto: made in a temporary folder; --maskiges DIR: DIR/<the name predict gives the video's folder>
                stream.use_maskiges(Path(temp or ".") / safe_folder_name(video.stem or video.name), generator)
                for warning in stream.warnings:
                    warnings.warn(f"{video}: {warning}", stacklevel=2)
                for frame, mask in stream.masks():
                    yield FrameResult(video, frame.index, frame.time, mask.classes, mask.probability,
                                      class_records(mask, self.classes, rle=False))

    # ------------------------------------------------------------------------------------------------ arrays
    def segment(self, frames: np.ndarray | torch.Tensor, audio: np.ndarray | torch.Tensor,
                maskiges: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """The network on arrays of your own loader: the forward ``av2ts predict`` and ``av2ts eval`` run.

        - ``frames``: uint8 RGB [B, T, H, W, 3] (B clips of T frames), or one clip [T, H, W, 3]; any H x W, resized
          to the model's S x S as ``eval`` resizes (PIL's bilinear);
        - ``audio``: per clip, the log-mel examples float [B, T, 96, 64] (one per frame: the 0.96 s from the
          frame's second on, as AVSBench pairs them), or the 16 kHz mono waves float [B, N] of the T seconds
          (made into those examples as ``predict`` makes them); one clip: [T, 96, 64] or [N];
        - ``maskiges``: models with the Siam encoder only (``config.siam``), uint8 like ``frames`` (resized with
          nearest neighbour).

        Returns the semantic maps float32 [B, T, K, S, S] on the CPU (one clip: [T, K, S, S]): per class k (0 is
        background) a score in [0, 1] (docs/model.md, "Semantic maps"); ``masks`` makes masks of them."""
        single = _array(frames, "frames").ndim == 4
        clips = _clips(frames, "frames", single)  # every check before any work
        count, length = clips.shape[:2]
        if self.config.siam and maskiges is None:
            raise UsageError(f"maskiges: {self.name} has the Siam encoder: it needs a maskige per frame, uint8 "
                             "like frames (`av2ts maskiges` makes them)")
        if not self.config.siam and maskiges is not None:
            raise UsageError(f"maskiges: {self.name} has no Siam encoder and takes none; pass maskiges=None")
        given = None if maskiges is None else _clips(maskiges, "maskiges", single)
        if given is not None and given.shape[:2] != (count, length):
            raise UsageError(f"maskiges: {list(given.shape)} for frames {list(clips.shape)}: one maskige per frame")
        examples = _examples(audio, single, count, length)
        size = self.config.input_size
        maps = self.predictor.segment_pictures(_resized(clips, size, nearest=False), examples,
                                               None if given is None else _resized(given, size, nearest=True))
        return maps[0] if single else maps

    def masks(self, maps: torch.Tensor, size: tuple[int, int] | None = None, threshold: float = 0.5) -> np.ndarray:
        """Masks of semantic maps (``segment``'s [B, T, K, S, S] or [T, K, S, S]) as ``predict`` makes them:
        uint8 class ids [B, T, H, W] (or [T, H, W]) at ``size`` (W, H; default S x S), upsampled bilinearly;
        binary models: the sounding-object probability above ``threshold`` (0/1); semantic models: the argmax."""
        maps = torch.as_tensor(maps)
        if maps.ndim not in (4, 5) or maps.shape[-3] != self.config.num_classes:
            raise UsageError(f"maps: expected [B, T, K, S, S] or [T, K, S, S] with K = {self.config.num_classes}, "
                             f"got {list(maps.shape)}")
        size = size or (maps.shape[-1], maps.shape[-2])
        flat = maps.reshape(-1, *maps.shape[-3:])
        masks = np.stack([frame_mask(scores, size, threshold).classes for scores in flat])
        return masks.reshape(*maps.shape[:-3], size[1], size[0])


def load_model(name: str | os.PathLike | None = None, *, device: str | torch.device = "auto",
               precision: str | None = None, half: bool = False, subset: str | None = None) -> Model:
    """A model by any name ``--model`` takes: a checkpoint folder (or its ``model.safetensors``),
    ``hf://owner/repo[@revision][/subfolder]``, a registry name (``av2ts models`` lists them; ``demo`` is the bundled
    model, also what None loads, with a note), or a preset name (a randomly initialised network, for a training
    loop of your own; ``subset`` picks its classes, s4 by default).

    ``device``: auto, cpu, cuda or cuda:N; ``precision``: fp32, bf16 or fp16 (None: the device's default, on a
    CPU the faster of fp32 and bf16 as measured once); ``half``: the fast path, as ``--half``. ``subset``: the
    model must fit it, as ``eval --subset`` checks. The loader of ``av2ts predict`` and ``av2ts eval``."""
    if precision is not None and precision not in PRECISIONS:  # before the model loads
        raise UsageError(f"precision {precision!r}: choose {', '.join(PRECISIONS)} (or None: the device's default)")
    return Model(load_predictor(None if name is None else str(name), device, half, precision, subset=subset,
                                presets=True))


# ------------------------------------------------------------------------------------------------ array checks
def _array(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise UsageError(f"{name}: expected a numpy array or torch tensor, got {type(value).__name__}")
    return value


def _clips(value, name: str, single: bool) -> np.ndarray:
    """uint8 [B, T, H, W, 3] (``single``: [T, H, W, 3], given a batch axis) or a UsageError naming the shape."""
    array = _array(value, name)
    if array.dtype != np.uint8 or array.ndim != (4 if single else 5) or array.shape[-1] != 3 or 0 in array.shape:
        expected = ("[B, T, H, W, 3] or one clip [T, H, W, 3]" if name == "frames" else
                    f"{'[T, H, W, 3]' if single else '[B, T, H, W, 3]'}, like frames")
        raise UsageError(f"{name}: expected uint8 RGB {expected}, got {array.dtype} {list(array.shape)}")
    return array[None] if single else array


def _resized(clips: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    count, length = clips.shape[:2]
    flat = resize_images(clips.reshape(-1, *clips.shape[2:]), size, size, nearest=nearest)
    return np.ascontiguousarray(flat.reshape(count, length, size, size, 3))


def _examples(value, single: bool, count: int, length: int) -> torch.Tensor:
    """Log-mel examples float32 [B, T, 96, 64] of ``audio`` (examples or 16 kHz waves), or a UsageError."""
    array = _array(value, "audio")
    batched = array if not single else array[None]
    shape = [count, length]
    if batched.ndim == 4 and list(batched.shape) == [*shape, EXAMPLE_FRAMES, MEL_BANDS]:
        return torch.from_numpy(np.ascontiguousarray(batched, dtype=np.float32))
    if batched.ndim == 2 and batched.shape[0] == count and batched.shape[1] > 0:
        waves = np.ascontiguousarray(batched, dtype=np.float32)
        return torch.stack([window_examples(wave, 0.0, length, length) for wave in waves])
    expected = (f"[{length}, {EXAMPLE_FRAMES}, {MEL_BANDS}] log-mel examples or a 16 kHz wave [N]" if single else
                f"[{count}, {length}, {EXAMPLE_FRAMES}, {MEL_BANDS}] log-mel examples or 16 kHz waves [{count}, N]")
    raise UsageError(f"audio: expected {expected} for frames of {count} clip{'s' if count != 1 else ''} of "
                     f"{length} frames, got {array.dtype} {list(array.shape)}")
